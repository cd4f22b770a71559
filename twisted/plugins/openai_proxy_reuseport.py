"""The ``reuseport:`` server endpoint string (see openai_proxy.endpoints)."""

from openai_proxy.endpoints import ReusePortParser

reuseport = ReusePortParser()
