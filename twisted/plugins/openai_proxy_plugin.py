from twisted.application.service import ServiceMaker

openai_proxy = ServiceMaker(
    "openai-proxy",
    "openai_proxy.tap",
    "Serve Deepgram's Voice Agent API v1 on top of OpenAI's Realtime API.",
    "openai-proxy",
)
