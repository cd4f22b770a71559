"""System tests: the installed ``twistd openai-proxy`` daemon, driven by the official Deepgram SDK."""
