from setuptools import setup

setup(
    name="openai-proxy",
    version="0.1.0",
    description=(
        "A Twisted daemon that serves Deepgram's Voice Agent API v1 "
        "on top of OpenAI's Realtime API"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "openai_proxy",
        "openai_proxy.translate",
        "openai_proxy.simulator",
        "openai_proxy.demo",
        "openai_proxy.tests",
        "twisted.plugins",
    ],
    include_package_data=False,
    package_data={
        "openai_proxy.tests": ["data/*.jsonl"],
        "openai_proxy.demo": ["*.html", "*.js", "*.css"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "autobahn>=24.4",
        "service-identity>=24.1",
        "pyopenssl>=24.0",
        "python-dotenv>=1.0",
        "opentelemetry-sdk>=1.25",
        "soxr>=0.5",
        "numpy>=1.26",
        "treq>=24.9",
    ],
    extras_require={
        # The built-in simulated upstream validates every event with the
        # openai package's GA types.
        "simulator": ["openai>=2.0"],
        "otlp": ["opentelemetry-exporter-otlp-proto-http>=1.25"],
        # Only for benchmarks/cpath_*.py and wsaccel_daemon.py: what compiled frame paths would cost
        # (docs/performance.md); the daemon never imports them.
        "cpath": ["picows>=2.0", "uvloop>=0.19", "wsaccel>=0.6"],
        "test": [
            "openai>=2.0",
            "deepgram-sdk>=7.17",
            "hypothesis>=6.100",
            # Drives the system's Chromium in tests/test_browser.py (never downloads a browser).
            "playwright>=1.40",
            # The OTLP metric export is tested against a local collector stub.
            "opentelemetry-exporter-otlp-proto-http>=1.25",
            # Validates the Kubernetes examples offline (it ships the schemas).
            "kubernetes-validate>=1.28",
        ],
        "dev": [
            "openai>=2.0",
            "deepgram-sdk>=7.17",
            "hypothesis>=6.100",
            "playwright>=1.40",
            "opentelemetry-exporter-otlp-proto-http>=1.25",
            "kubernetes-validate>=1.28",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "ruff>=0.5",
        ],
    },
    entry_points={
        "console_scripts": [
            "openai-proxy-cli = openai_proxy.cli:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
