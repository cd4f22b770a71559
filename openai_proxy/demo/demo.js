// The daemon's demo page: a Deepgram Voice Agent API v1 client in plain JavaScript.
//
// Connects to /v1/agent/converse on this host (a client token, if given, goes in the subprotocol as
// ["token", TOKEN]), sends Settings after Welcome, streams the microphone as linear16 at the
// AudioContext's rate while Talk is on, plays the agent's linear16 24 kHz audio, drops it on
// UserStartedSpeaking (barge-in), and shows ConversationText and every message.
"use strict";

(() => {
  const OUTPUT_RATE = 24000;
  const $ = (id) => document.getElementById(id);
  const ui = {
    talk: $("talk"), status: $("status"), level: $("level"), say: $("say"), text: $("text"),
    token: $("token"), model: $("model"), voice: $("voice"), prompt: $("prompt"),
    transcript: $("transcript"), events: $("events"),
  };

  // What the page has seen, for a person reading the console or a test reading the page.
  const demo = {
    state: "idle", // idle | connecting | ready | closed
    transcript: [], // {role, content}
    messages: [], // message types, in order ("audio" for binary frames)
    audioBytes: 0,
    outputLevel: 0, // the playback analyser's current RMS, 0..1
    maxOutputLevel: 0,
    micChunks: 0,
  };
  window.demo = demo;

  let socket = null;
  let context = null;
  let analyser = null;
  let playHead = 0;
  let playing = [];
  let mic = null; // {stream, source, node}
  let keepAlive = null;
  let pendingText = [];
  let lastAudioEvent = null;

  function setStatus(text) {
    ui.status.textContent = text;
  }

  function logEvent(text, problem) {
    const item = document.createElement("li");
    item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    if (problem) item.className = "problem";
    ui.events.appendChild(item);
    ui.events.scrollTop = ui.events.scrollHeight;
    return item;
  }

  function addTranscript(role, content) {
    demo.transcript.push({ role, content });
    const item = document.createElement("li");
    item.className = role;
    item.textContent = content;
    ui.transcript.appendChild(item);
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  // -- audio out ------------------------------------------------------------------------------

  function audioContext() {
    if (!context) {
      context = new AudioContext();
      analyser = context.createAnalyser();
      analyser.fftSize = 1024;
      analyser.connect(context.destination);
      const samples = new Float32Array(analyser.fftSize);
      setInterval(() => {
        analyser.getFloatTimeDomainData(samples);
        let sum = 0;
        for (const s of samples) sum += s * s;
        demo.outputLevel = Math.sqrt(sum / samples.length);
        demo.maxOutputLevel = Math.max(demo.maxOutputLevel, demo.outputLevel);
        ui.level.value = Math.min(1, demo.outputLevel * 4);
      }, 50);
    }
    if (context.state === "suspended") context.resume();
    return context;
  }

  function play(buffer) {
    const pcm = new Int16Array(buffer);
    if (!pcm.length) return;
    const ctx = audioContext();
    const audio = ctx.createBuffer(1, pcm.length, OUTPUT_RATE);
    const channel = audio.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 0x8000;
    const source = ctx.createBufferSource();
    source.buffer = audio;
    source.connect(analyser);
    playHead = Math.max(playHead, ctx.currentTime + 0.05);
    source.start(playHead);
    playHead += audio.duration;
    playing.push(source);
    source.onended = () => { playing = playing.filter((s) => s !== source); };
  }

  function stopPlayback() {
    for (const source of playing) {
      try { source.stop(); } catch (e) { /* already stopped */ }
    }
    playing = [];
    playHead = 0;
  }

  // -- the protocol ---------------------------------------------------------------------------

  function settings(inputRate) {
    return {
      type: "Settings",
      audio: {
        input: { encoding: "linear16", sample_rate: inputRate },
        output: { encoding: "linear16", sample_rate: OUTPUT_RATE, container: "none" },
      },
      agent: {
        language: "en",
        think: { provider: { type: "open_ai", model: ui.model.value.trim() || "gpt-realtime" },
                 prompt: ui.prompt.value },
        speak: { provider: { type: "open_ai", model: "tts-1", voice: ui.voice.value.trim() || "marin" } },
        greeting: "Hello! Press Talk and speak, or type a message.",
      },
    };
  }

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(message));
      logEvent(`> ${message.type}`);
    }
  }

  function onMessage(event) {
    if (event.data instanceof ArrayBuffer) {
      demo.audioBytes += event.data.byteLength;
      if (demo.messages[demo.messages.length - 1] !== "audio") {
        demo.messages.push("audio");
        lastAudioEvent = logEvent("< audio");
        lastAudioEvent.dataset.bytes = "0";
      }
      const total = Number(lastAudioEvent.dataset.bytes) + event.data.byteLength;
      lastAudioEvent.dataset.bytes = String(total);
      lastAudioEvent.textContent = lastAudioEvent.textContent.replace(/< audio.*$/, `< audio ${total} bytes`);
      play(event.data);
      return;
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (e) {
      logEvent("< (not JSON)", true);
      return;
    }
    demo.messages.push(message.type);
    const problem = message.type === "Error" || message.type === "Warning";
    logEvent(`< ${message.type}${problem ? ` ${message.code}: ${message.description}` : ""}`, problem);
    switch (message.type) {
      case "Welcome":
        send(settings(audioContext().sampleRate));
        break;
      case "SettingsApplied":
        demo.state = "ready";
        setStatus(mic ? "Listening" : "Connected");
        for (const text of pendingText.splice(0)) send({ type: "InjectUserMessage", content: text });
        break;
      case "ConversationText":
        addTranscript(message.role, message.content);
        break;
      case "UserStartedSpeaking":
        stopPlayback();
        setStatus("You are speaking");
        break;
      case "AgentStartedSpeaking":
        setStatus("Agent speaking");
        break;
      case "AgentAudioDone":
      case "UtteranceEnd":
        setStatus(mic ? "Listening" : "Connected");
        break;
      default:
        break;
    }
  }

  function connect() {
    if (socket && socket.readyState <= WebSocket.OPEN) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const token = ui.token.value.trim();
    socket = token ? new WebSocket(`${scheme}//${location.host}/v1/agent/converse`, ["token", token])
                   : new WebSocket(`${scheme}//${location.host}/v1/agent/converse`);
    socket.binaryType = "arraybuffer";
    demo.state = "connecting";
    setStatus("Connecting…");
    socket.onmessage = onMessage;
    socket.onclose = (event) => {
      demo.state = "closed";
      logEvent(`connection closed (${event.code}${event.reason ? ` ${event.reason}` : ""})`, event.code !== 1000);
      setStatus("Not connected");
      stopMicrophone();
      clearInterval(keepAlive);
      socket = null;
    };
    socket.onerror = () => logEvent("connection failed (is a token required?)", true);
    clearInterval(keepAlive);
    // Deepgram's advice: KeepAlive every 8 s while no audio is sent.
    keepAlive = setInterval(() => { if (!mic) send({ type: "KeepAlive" }); }, 8000);
  }

  // -- microphone -----------------------------------------------------------------------------

  async function startMicrophone() {
    const ctx = audioContext();
    const stream = await navigator.mediaDevices.getUserMedia({
      // Echo cancellation keeps the agent from hearing itself through the speakers; noise suppression
      // is left to the upstream (it would also flatten the simulator's tone words).
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
    await ctx.audioWorklet.addModule("/demo/mic-worklet.js");
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "mic-capture");
    node.port.onmessage = (event) => {
      if (socket && socket.readyState === WebSocket.OPEN && demo.state === "ready") {
        socket.send(event.data);
        demo.micChunks += 1;
      }
    };
    source.connect(node);
    mic = { stream, source, node };
  }

  function stopMicrophone() {
    if (!mic) return;
    mic.source.disconnect();
    mic.node.port.onmessage = null;
    for (const track of mic.stream.getTracks()) track.stop();
    mic = null;
    ui.talk.setAttribute("aria-pressed", "false");
    ui.talk.textContent = "Talk";
  }

  ui.talk.addEventListener("click", async () => {
    if (mic) {
      stopMicrophone();
      setStatus(socket ? "Connected" : "Not connected");
      return;
    }
    ui.talk.setAttribute("aria-pressed", "true");
    ui.talk.textContent = "Stop";
    try {
      audioContext();
      connect();
      await startMicrophone();
      setStatus(demo.state === "ready" ? "Listening" : "Connecting…");
    } catch (error) {
      logEvent(`microphone: ${error.message || error}`, true);
      stopMicrophone();
    }
  });

  ui.say.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return;
    ui.text.value = "";
    audioContext();
    if (demo.state === "ready") {
      send({ type: "InjectUserMessage", content: text });
    } else {
      pendingText.push(text);
      connect();
    }
  });
})();
