"""Find and replace personal data and secrets in text, in one compiled pass.

Most texts hold nothing to redact, so the cost that matters is deciding that: every recogniser's
pattern is compiled into one RE2 ``Set`` (or a Hyperscan database), which tells in one scan of
the text which recognisers match anywhere. Only those then run on
their own (RE2, linear time whatever the input) to find the matches, which their validators
decide. Overlaps go to the longer match, then to the earlier recogniser.

Texts are scanned as UTF-8 bytes with ASCII word boundaries (see :mod:`.recognizers`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any, Sequence

import re2

from agentwatch.streams.pii.policy import PiiConfigError, PiiPolicy
from agentwatch.streams.pii.recognizers import BUILTIN_RECOGNIZERS, Recognizer

try:  # optional (x86-64 wheels only)
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform
    hyperscan = None

# How far past a text limit to scan: the longest entity whose cut-off prefix would no longer match
# its pattern (an e-mail address is at most 254 characters). Text in the last MARGIN characters of
# a scanned window is never emitted, so an entity cut by the window cannot leak by halves.
MARGIN_CHARS = 512
_NO_DETECTIONS: tuple[str, ...] = ()
_MAX_PROJECT_MODES = 10_000


@dataclass(frozen=True, slots=True)
class Detection:
    """One entity found: its type and where it is in the text (character offsets)."""

    entity: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Match:
    start: int  # byte offsets in the scanned bytes
    end: int
    rank: int   # the recogniser's position: lower wins a tie
    entity: str


class Redactor:
    """Applies a :class:`PiiPolicy` to texts.

    Parameters
    ----------
    policy
        Modes per entity type and project, custom recognisers, allow-lists, the hash key.
    recognizers
        The built-in recognisers (tests pass fewer); the policy's custom ones are added.
    engine
        The prefilter: ``re2`` (an RE2 set; the default) or ``hyperscan`` (when installed).
        On clean text, the common case, the two measure the same or RE2 faster
        (``agentwatch bench --section pii``); on text dense with entities Hyperscan is
        about twice as fast, so it stays selectable for traffic like that.
    """

    def __init__(self, policy: PiiPolicy, *, recognizers: Sequence[Recognizer] = BUILTIN_RECOGNIZERS,
                 engine: str = "re2") -> None:
        if engine not in ("hyperscan", "re2"):
            raise ValueError("engine must be re2 or hyperscan")
        if engine == "hyperscan" and hyperscan is None:
            raise ValueError("the hyperscan engine is not installed on this platform")
        self.policy = policy
        custom = tuple(Recognizer(c.entity, c.pattern.encode()) for c in policy.custom)
        self.recognizers: tuple[Recognizer, ...] = tuple(recognizers) + custom
        self._compiled = [compile_pattern(r) for r in self.recognizers]
        self.engine = engine
        self._prefilter = _HyperscanPrefilter(self.recognizers) if self.engine == "hyperscan" \
            else _Re2Prefilter(self.recognizers)
        self._allow = frozenset(a.casefold() for a in policy.allow)
        self._allow_patterns = tuple(re.compile(p) for p in policy.allow_patterns)
        self._project_modes: dict[str, dict[str, str]] = {}

    # -- the hot path -------------------------------------------------------------------------

    def redact(self, text: str, *, project: str = "", limit: int | None = None) -> tuple[str, tuple[str, ...]]:
        """``(text with entities replaced, one entity type per detection)``.

        With ``limit``, the result is at most ``limit`` characters and only as much of a long
        text is scanned as that needs (plus :data:`MARGIN_CHARS`).
        """
        if not self.policy.enabled or len(text) < 5:
            return (text if limit is None else text[:limit]), _NO_DETECTIONS
        cut = limit is not None and len(text) > limit
        if cut and len(text) > limit + MARGIN_CHARS:
            text = text[:limit + MARGIN_CHARS]
        data = text.encode("utf-8", "surrogatepass")
        hits = self._prefilter.hits(data)
        if not hits:
            return (text if limit is None else text[:limit]), _NO_DETECTIONS
        matches = self._matches(data, hits)
        if not matches:
            return (text if limit is None else text[:limit]), _NO_DETECTIONS
        # With a cut, text from the limit on is not kept: what starts there is neither emitted nor
        # counted. (Scanning past it is what lets an entity the cut crosses be seen whole.)
        safe_end = len(text[:limit].encode("utf-8", "surrogatepass")) if cut else len(data)
        modes = self._modes(project)
        pieces: list[bytes] = []
        detected: list[str] = []
        position = 0
        for match in matches:
            if match.start >= safe_end:
                break
            detected.append(match.entity)
            mode = modes.get(match.entity, "redact")
            if mode == "keep":
                continue
            pieces.append(data[position:match.start])
            pieces.append(self._replacement(match.entity, mode, data[match.start:match.end]))
            position = match.end
        pieces.append(data[position:safe_end])
        out = b"".join(pieces).decode("utf-8", "surrogatepass")
        return (out if limit is None else out[:limit]), tuple(detected)

    def scan(self, text: str) -> list[Detection]:
        """Every entity in ``text`` (allow-listed values excluded), whatever the policy's modes."""
        data = text.encode("utf-8", "surrogatepass")
        hits = self._prefilter.hits(data)
        return [Detection(m.entity, len(data[:m.start].decode("utf-8", "surrogatepass")),
                          len(data[:m.end].decode("utf-8", "surrogatepass")))
                for m in (self._matches(data, hits) if hits else ())]

    def mask_bytes(self, data: bytes) -> tuple[bytes, tuple[str, ...]]:
        """Overwrite every entity in a binary payload with ``*`` of the same length.

        For records kept as they came (dead letters): the length of every field stays, so a
        protobuf payload still decodes, but no detected value remains in it.
        """
        if not self.policy.enabled:
            return data, _NO_DETECTIONS
        hits = self._prefilter.hits(data)
        matches = self._matches(data, hits) if hits else []
        if not matches:
            return data, _NO_DETECTIONS
        masked = bytearray(data)
        for match in matches:
            masked[match.start:match.end] = b"*" * (match.end - match.start)
        return bytes(masked), tuple(m.entity for m in matches)

    # -- helpers ------------------------------------------------------------------------------

    def _matches(self, data: bytes, hits: Sequence[int]) -> list[_Match]:
        found: list[_Match] = []
        for index in hits:
            recognizer = self.recognizers[index]
            group, validate = recognizer.group, recognizer.validate
            for m in self._compiled[index].finditer(data):
                start, end = m.span(group)
                if start < 0 or end <= start:
                    continue
                while end < len(data) and data[end] & 0xC0 == 0x80:  # never end inside a character
                    end += 1
                value = data[start:end].decode("utf-8", "replace")
                if validate is not None and not validate(value):
                    continue
                if self._allowed(value):
                    continue
                found.append(_Match(start, end, index, recognizer.entity))
        if len(found) > 1:
            found.sort(key=lambda m: (m.start, m.start - m.end, m.rank))
            kept = [found[0]]
            for match in found[1:]:
                last = kept[-1]
                if match.start >= last.end:
                    kept.append(match)
                elif (match.end - match.start, -match.rank) > (last.end - last.start, -last.rank):
                    kept[-1] = match  # an overlapping, longer match wins
            return kept
        return found

    def _allowed(self, value: str) -> bool:
        if self._allow and value.casefold() in self._allow:
            return True
        return any(p.fullmatch(value) for p in self._allow_patterns)

    def _modes(self, project: str) -> dict[str, str]:
        modes = self._project_modes.get(project)
        if modes is None:
            modes = self.policy.modes_for(project)
            if len(self._project_modes) < _MAX_PROJECT_MODES:
                self._project_modes[project] = modes
        return modes

    def _replacement(self, entity: str, mode: str, value: bytes) -> bytes:
        if mode == "hash":
            digest = hmac.new(self.policy.hash_key, entity.encode() + b"\0" + value, hashlib.sha256).hexdigest()
            return f"<{entity}:{digest[:16]}>".encode()
        return f"<{entity}>".encode()


def compile_pattern(recognizer: Recognizer) -> Any:
    """The recogniser's RE2 program; an invalid pattern is a :class:`PiiConfigError` naming it."""
    options = re2.Options()
    options.log_errors = False  # the error is raised here, with the recogniser's name
    options.case_sensitive = not recognizer.caseless
    try:
        return re2.compile(recognizer.pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise PiiConfigError(f"PII pattern of {recognizer.entity} "
                             f"({recognizer.pattern.decode(errors='replace')!r}) is not valid RE2: {reason}") from None


class _HyperscanPrefilter:
    """Which recognisers match somewhere in the bytes: one Hyperscan scan, each pattern reported once."""

    def __init__(self, recognizers: Sequence[Recognizer]) -> None:
        self._db = hyperscan.Database()
        flags = [hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_PREFILTER
                 | (hyperscan.HS_FLAG_CASELESS if r.caseless else 0) for r in recognizers]
        try:
            self._db.compile(expressions=[r.pattern for r in recognizers], ids=list(range(len(recognizers))),
                             elements=len(recognizers), flags=flags)
        except hyperscan.error as exc:
            raise PiiConfigError(f"PII recognisers do not compile for Hyperscan: {exc}") from None
        self._scratch = hyperscan.Scratch(self._db)

    def hits(self, data: bytes) -> list[int]:
        found: list[int] = []
        self._db.scan(data, match_event_handler=_collect, context=found, scratch=self._scratch)
        if len(found) > 1:
            found.sort()
        return found


def _collect(pattern_id: int, _start: int, _end: int, _flags: int, found: list[int]) -> None:
    found.append(pattern_id)


class _Re2Prefilter:
    """The same question answered by an RE2 set (no Hyperscan on this platform)."""

    def __init__(self, recognizers: Sequence[Recognizer]) -> None:
        self._set = re2.Set.SearchSet()
        for recognizer in recognizers:
            self._set.Add((b"(?i)" if recognizer.caseless else b"") + recognizer.pattern)
        self._set.Compile()

    def hits(self, data: bytes) -> list[int]:
        found = self._set.Match(data)
        return sorted(found) if found else []
