"""Personal data and secrets, found and redacted before anything is stored."""

from agentwatch.streams.pii.policy import PiiConfigError, PiiPolicy
from agentwatch.streams.pii.redactor import Detection, Redactor

__all__ = ["Detection", "PiiConfigError", "PiiPolicy", "Redactor"]
