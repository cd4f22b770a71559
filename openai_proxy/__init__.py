"""openai-proxy: Deepgram Voice Agent API v1 served on OpenAI's Realtime API."""

__version__ = "0.1.0"
