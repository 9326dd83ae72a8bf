"""agentwatch: streaming observability and drift detection for LLM agents."""

__version__ = "0.1.0"
