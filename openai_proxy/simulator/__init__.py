"""A built-in, strict simulation of the OpenAI Realtime (GA) WebSocket API.

Used by ``twistd -n openai-proxy --simulator``, by the test suites, and by anyone working on the
daemon without an OpenAI key. See :mod:`openai_proxy.simulator.server` for what it does and how it
is stricter than the real API, and :mod:`openai_proxy.simulator.voice` for the simulated audio.
"""

from .server import SimulatedSession, SimulatorFactory, SimulatorProtocol, listen_simulator

__all__ = ["SimulatedSession", "SimulatorFactory", "SimulatorProtocol", "listen_simulator"]
