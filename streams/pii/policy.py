"""What to do with each entity type found: the redaction policy, validated once at start.

``AGENTWATCH_PII_MODE`` sets the default for every type (``redact``, ``hash`` or ``off``);
``AGENTWATCH_PII`` refines it, as JSON or as the path of a YAML/JSON file::

    entities:            # per type: redact | hash | keep
      IP_ADDRESS: keep
      EMAIL: hash
    projects:            # per project, over the types above
      analytics: {EMAIL: hash, PHONE: hash}
    custom:              # more recognisers (RE2/Hyperscan syntax, matched on UTF-8 bytes)
      - {entity: EMPLOYEE_ID, pattern: 'EMP-[0-9]{6}', mode: redact}
    allow:               # values never redacted (exact, case-insensitive)
      - support@example.com
    allow_patterns:      # values never redacted (the whole value matches)
      - '10\\.0\\.[0-9]+\\.[0-9]+'

``keep`` still detects and counts (``agentwatch_pii_detections_total``) without changing the text;
``off`` does not scan at all. ``hash`` needs a key (``AGENTWATCH_PII_HASH_KEY``): the same value
always gives the same token, so analysts can count distinct values without seeing any.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from agentwatch.streams.pii.recognizers import ENTITY_TYPES

MODES = ("redact", "hash", "keep")
DEFAULT_MODES = ("redact", "hash", "off")
_ENTITY_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,39}")


class PiiConfigError(ValueError):
    """The PII configuration is invalid; the message says where."""


@dataclass(frozen=True)
class CustomPattern:
    entity: str
    pattern: str
    mode: str = "redact"


@dataclass(frozen=True)
class PiiPolicy:
    """Validated redaction policy.

    Parameters
    ----------
    default_mode
        ``redact`` | ``hash`` | ``off``.
    entities
        Entity type -> ``redact`` | ``hash`` | ``keep``, over the default.
    projects
        Project -> (entity type -> mode), over ``entities``.
    custom
        Extra recognisers.
    allow, allow_patterns
        Values never redacted.
    hash_key
        HMAC key of ``hash`` mode (required when any type hashes).
    """

    default_mode: str = "redact"
    entities: Mapping[str, str] = field(default_factory=dict)
    projects: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    custom: tuple[CustomPattern, ...] = ()
    allow: frozenset[str] = frozenset()
    allow_patterns: tuple[str, ...] = ()
    hash_key: bytes = b""

    def __post_init__(self) -> None:
        if self.default_mode not in DEFAULT_MODES:
            raise PiiConfigError(f"AGENTWATCH_PII_MODE must be one of {', '.join(DEFAULT_MODES)}, "
                                 f"not {self.default_mode!r}")
        known = set(ENTITY_TYPES) | {c.entity for c in self.custom}
        for where, modes in [("entities", self.entities),
                             *((f"projects.{p}", m) for p, m in self.projects.items())]:
            if not isinstance(modes, Mapping):
                raise PiiConfigError(f"AGENTWATCH_PII {where}: expected a mapping of entity type to mode")
            for entity, mode in modes.items():
                if entity not in known:
                    raise PiiConfigError(f"AGENTWATCH_PII {where}: unknown entity type {entity!r} "
                                         f"(known: {', '.join(sorted(known))})")
                if mode not in MODES:
                    raise PiiConfigError(f"AGENTWATCH_PII {where}.{entity}: mode must be one of "
                                         f"{', '.join(MODES)}, not {mode!r}")
        from agentwatch.streams.pii.recognizers import Recognizer
        from agentwatch.streams.pii.redactor import compile_pattern  # imports this module

        for custom in self.custom:
            compile_pattern(Recognizer(custom.entity, custom.pattern.encode()))
            if not _ENTITY_NAME.fullmatch(custom.entity):
                raise PiiConfigError(f"AGENTWATCH_PII custom: entity {custom.entity!r} must be upper case "
                                     "letters, digits and _ (it becomes the placeholder <NAME>)")
            if custom.mode not in MODES:
                raise PiiConfigError(f"AGENTWATCH_PII custom {custom.entity}: mode must be one of "
                                     f"{', '.join(MODES)}, not {custom.mode!r}")
        for pattern in self.allow_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PiiConfigError(f"AGENTWATCH_PII allow_patterns: {pattern!r} is not a regex: {exc}") from None
        if self.default_mode != "off" and "hash" in self._all_modes() and not self.hash_key:
            raise PiiConfigError("PII hash mode needs a key: set AGENTWATCH_PII_HASH_KEY (a long random secret; "
                                 "tokens stay comparable only while it stays the same)")

    @property
    def enabled(self) -> bool:
        return self.default_mode != "off"

    def _all_modes(self) -> set[str]:
        modes = {self.default_mode, *self.entities.values(), *(c.mode for c in self.custom)}
        for per_project in self.projects.values():
            modes.update(per_project.values())
        return modes

    def modes_for(self, project: str) -> dict[str, str]:
        """Entity type -> mode for one project (every known type present)."""
        base = "redact" if self.default_mode == "off" else self.default_mode
        modes = {entity: base for entity in ENTITY_TYPES}
        modes.update({c.entity: c.mode for c in self.custom})
        modes.update(self.entities)
        modes.update(self.projects.get(project, {}))
        return modes

    @classmethod
    def from_settings(cls, mode: str, spec: str, hash_key: str) -> "PiiPolicy":
        """The policy of ``AGENTWATCH_PII_MODE``, ``AGENTWATCH_PII`` (JSON or a file path) and the key."""
        raw = _load_spec(spec)
        unknown = set(raw) - {"entities", "projects", "custom", "allow", "allow_patterns"}
        if unknown:
            raise PiiConfigError(f"AGENTWATCH_PII: unknown keys {sorted(unknown)} "
                                 "(known: entities, projects, custom, allow, allow_patterns)")
        custom = []
        for i, item in enumerate(raw.get("custom") or []):
            if not isinstance(item, Mapping) or not {"entity", "pattern"} <= set(item):
                raise PiiConfigError(f"AGENTWATCH_PII custom[{i}]: needs entity and pattern")
            custom.append(CustomPattern(str(item["entity"]), str(item["pattern"]), str(item.get("mode", "redact"))))
        allow = raw.get("allow") or []
        patterns = raw.get("allow_patterns") or []
        if not isinstance(allow, list) or not isinstance(patterns, list):
            raise PiiConfigError("AGENTWATCH_PII allow and allow_patterns must be lists")
        return cls(default_mode=mode, entities=dict(raw.get("entities") or {}),
                   projects={str(k): dict(v) if isinstance(v, Mapping) else v
                             for k, v in (raw.get("projects") or {}).items()},
                   custom=tuple(custom), allow=frozenset(str(a).casefold() for a in allow),
                   allow_patterns=tuple(str(p) for p in patterns), hash_key=hash_key.encode())


def _load_spec(spec: str) -> dict[str, Any]:
    spec = spec.strip()
    if not spec:
        return {}
    if spec.startswith("{"):
        try:
            raw = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise PiiConfigError(f"AGENTWATCH_PII is not valid JSON: {exc}") from None
    else:
        path = Path(spec)
        if not path.is_file():
            raise PiiConfigError(f"AGENTWATCH_PII: {spec!r} is neither JSON nor a readable file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise PiiConfigError(f"AGENTWATCH_PII file {path}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PiiConfigError("AGENTWATCH_PII must be a mapping (entities, projects, custom, allow, allow_patterns)")
    return raw
