// The official @deepgram/sdk browser agent client, bundled by the browser test with esbuild.
// window.runSdkAgent({agentUrl, token, text, workletUrl}) holds a text turn, then a microphone turn
// (Chromium's fake microphone), and resolves with what it saw; window.sdkPage shows progress.
import { DeepgramClient } from "@deepgram/sdk";

const page = { messages: [], transcript: [], audioBytes: 0, maxOutputLevel: 0, micChunks: 0, error: null };
window.sdkPage = page;

function waitFor(predicate, what, timeoutMs) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const timer = setInterval(() => {
      if (page.error) { clearInterval(timer); reject(new Error(page.error)); return; }
      const found = predicate();
      if (found) { clearInterval(timer); resolve(found); return; }
      if (Date.now() - started > timeoutMs) {
        clearInterval(timer);
        reject(new Error(`timed out waiting for ${what}; saw ${page.messages.join(",")}`));
      }
    }, 20);
  });
}

window.runSdkAgent = async ({ agentUrl, token, text, workletUrl }) => {
  const audio = new AudioContext({ sampleRate: 48000 });
  await audio.resume();
  const analyser = audio.createAnalyser();
  analyser.fftSize = 1024;
  analyser.connect(audio.destination);
  const samples = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    page.maxOutputLevel = Math.max(page.maxOutputLevel, Math.sqrt(sum / samples.length));
  }, 20);
  let playHead = 0;
  const play = async (data) => {
    const buffer = data instanceof Blob ? await data.arrayBuffer() : data;
    const pcm = new Int16Array(buffer);
    page.audioBytes += buffer.byteLength;
    if (!pcm.length) return;
    const chunk = audio.createBuffer(1, pcm.length, 24000);
    const channel = chunk.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 0x8000;
    const source = audio.createBufferSource();
    source.buffer = chunk;
    source.connect(analyser);
    playHead = Math.max(playHead, audio.currentTime + 0.02);
    source.start(playHead);
    playHead += chunk.duration;
  };

  const http = agentUrl.replace(/^ws/, "http");
  const client = new DeepgramClient({
    apiKey: token,
    environment: { base: http, production: agentUrl, agent: agentUrl, agentRest: http },
  });
  const agent = await client.agent.v1.connect({ reconnectAttempts: 0 });
  agent.on("message", (message) => {
    if (message instanceof Blob || message instanceof ArrayBuffer) {
      if (page.messages[page.messages.length - 1] !== "audio") page.messages.push("audio");
      play(message);
      return;
    }
    page.messages.push(message.type);
    if (message.type === "ConversationText") page.transcript.push(`${message.role}: ${message.content}`);
    if (message.type === "Error") page.error = `${message.code}: ${message.description}`;
    if (message.type === "Welcome") {
      agent.sendSettings({
        type: "Settings",
        audio: {
          input: { encoding: "linear16", sample_rate: audio.sampleRate },
          output: { encoding: "linear16", sample_rate: 24000, container: "none" },
        },
        agent: {
          language: "en",
          think: { provider: { type: "open_ai", model: "gpt-realtime" }, prompt: "Keep answers short." },
          speak: { provider: { type: "open_ai", model: "tts-1", voice: "marin" } },
        },
      });
    }
    if (message.type === "UserStartedSpeaking") playHead = 0;
  });
  agent.on("error", (error) => { page.error = page.error || `socket error: ${error.message}`; });
  agent.on("close", (event) => { page.messages.push(`close ${event.code}`); });
  agent.connect();
  await agent.waitForOpen();
  page.subprotocol = agent.socket && agent.socket._ws ? agent.socket._ws.protocol : null;
  await waitFor(() => page.messages.includes("SettingsApplied"), "SettingsApplied", 15000);

  // A text turn.
  agent.sendInjectUserMessage({ type: "InjectUserMessage", content: text });
  await waitFor(() => page.transcript.find((t) => t.startsWith("assistant:")), "the text reply", 15000);
  await waitFor(() => page.messages.includes("AgentAudioDone"), "AgentAudioDone", 15000);
  const textTurnLevel = await waitFor(() => page.maxOutputLevel > 0.01 && page.maxOutputLevel,
                                      "audible playback of the text reply", 15000);

  // A spoken turn from the fake microphone.
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  await audio.audioWorklet.addModule(workletUrl);
  const mic = new AudioWorkletNode(audio, "mic-capture");
  mic.port.onmessage = (event) => { page.micChunks += 1; agent.sendMedia(event.data); };
  audio.createMediaStreamSource(stream).connect(mic);
  const before = page.transcript.length;
  await waitFor(() => page.transcript.slice(before).find((t) => t.startsWith("user:")), "the user's transcript", 30000);
  await waitFor(() => page.transcript.slice(before).find((t) => t.startsWith("assistant:")), "the spoken reply", 30000);
  for (const track of stream.getTracks()) track.stop();
  agent.close();
  return { transcript: page.transcript, messages: page.messages, audioBytes: page.audioBytes,
           textTurnLevel, maxOutputLevel: page.maxOutputLevel, micChunks: page.micChunks };
};
