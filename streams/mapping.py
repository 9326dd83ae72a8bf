"""A user-declared mapping: spans in a team's own shape rewritten into the GenAI names.

Teams that instrument by hand often emit spans such as ``ai_inference`` with ``user.id``,
``inference.duration`` and ``tokens.consumed``: no convention the normaliser knows. A mapping
file (``AGENTWATCH_MAPPING_PATH``, YAML) declares, rule by rule, which spans are model calls,
tool calls or agent steps and where their fields are::

    rules:
      - name: inference spans           # optional; `agentwatch mapping check` shows it
        match:                          # every condition given must hold
          span_name: "ai_*"             # glob over the whole span name (fnmatch: * ? [...])
          # span_name_regex: "ai_(inference|call)"   # or a Python regex over the whole name
          scope: "my-company.*"         # glob over the instrumentation scope name (scope_regex too)
          has: [tokens.consumed]        # attributes that must be present
        kind: llm_call                  # llm_call | tool_call | agent_step
        fields:
          model: {attr: model.name, default: gpt-4o-mini}
          input_tokens: tokens.consumed # a bare string is an attribute name
          provider: {value: openai}     # a constant
          latency: {attr: inference.duration, unit: s}

Rules are tried in file order and the first whose conditions all hold wins. A rule rewrites
the span's attributes into the names :mod:`agentwatch.streams.semconv` lists first (the
original attributes stay); the normaliser then reads the span as any other. A declared latency
is honoured through :meth:`MappingRules.map_span`, which gives the normaliser a view of the span
that starts ``latency`` before it ends, so the bounds check and every derived time (an agent
step's start) agree with it.

The file is validated when loaded; every error names the file and line
(``mapping.yaml line 7: unknown field 'tokns_in' (known: ...)``).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from agentwatch.streams import semconv as sc

# kind -> the gen_ai.operation.name that makes the normaliser read the span as that kind.
KINDS = {"llm_call": "chat", "tool_call": "execute_tool", "agent_step": "invoke_agent"}
OPERATION = sc.OPERATION[0]
# Where a mapped latency is written (in ms). Only a rule's own latency is honoured: the
# attribute in a span as sent means nothing to the normaliser.
LATENCY_MS = "agentwatch.mapping.latency_ms"
# latency unit -> factor to milliseconds
UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}

_ALL = frozenset(KINDS)
_LLM = frozenset({"llm_call"})
_TOOL = frozenset({"tool_call"})


@dataclass(frozen=True, slots=True)
class _Target:
    attribute: str
    kinds: frozenset[str]
    role: str = ""  # prompt/response texts become a one-message list under this role


# field -> where the normaliser reads it (the first name of its semconv tuple), and for which kinds.
FIELDS: dict[str, _Target] = {
    "model": _Target(sc.REQUEST_MODEL[0], _LLM),
    "provider": _Target(sc.PROVIDER[0], _LLM),
    "input_tokens": _Target(sc.INPUT_TOKENS[0], _LLM),
    "output_tokens": _Target(sc.OUTPUT_TOKENS[0], _LLM),
    "prompt": _Target(sc.INPUT_MESSAGES, _LLM, "user"),
    "response": _Target(sc.OUTPUT_MESSAGES, _LLM, "assistant"),
    "tool_name": _Target(sc.TOOL_NAME[0], _TOOL),
    "tool_arguments": _Target(sc.TOOL_ARGUMENTS[0], _TOOL),
    "tool_result": _Target(sc.TOOL_RESULT[0], _TOOL),
    "user": _Target(sc.USER[0], _ALL),
    "project": _Target(sc.PROJECT[0], _ALL),
    "session": _Target(sc.SESSION[0], _ALL),
    "agent": _Target(sc.AGENT[0], _ALL),
    "latency": _Target(LATENCY_MS, _ALL),
}
_RULE_KEYS = ("name", "match", "kind", "fields")
_MATCH_KEYS = ("span_name", "span_name_regex", "scope", "scope_regex", "has")
_SPEC_KEYS = ("attr", "value", "default", "unit")
_TOP_KEYS = ("version", "rules")
# Distinct (span name, scope) pairs whose candidate rules are remembered; past it the memo
# starts over, so hostile span names cannot grow it.
_DECISION_MEMO_ENTRIES = 4096


class MappingError(ValueError):
    """The mapping file is invalid; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class FieldMap:
    """One field of a rule: the attributes read (first present wins), or a constant."""

    field: str
    target: str
    sources: tuple[str, ...]
    constant: Any = None  # the value when no source is given, or none of them is present
    scale: float | None = None  # latency: factor to ms
    role: str = ""

    def value(self, attrs: Mapping[str, Any]) -> Any:
        """The value written to ``target``; None when there is nothing to write."""
        raw = None
        for name in self.sources:
            raw = attrs.get(name)
            if raw is not None and raw != "":
                break
        else:
            raw = self.constant
        if raw is None:
            return None
        if self.scale is not None:
            return _millis(raw, self.scale)
        if self.role:
            return [{"role": self.role, "content": raw}]
        return raw

    def describe(self) -> str:
        where = " or ".join(self.sources)
        if self.constant is not None:
            where = f"{where}, else {self.constant!r}" if where else repr(self.constant)
        return where


@dataclass(frozen=True, slots=True)
class MappingRule:
    """One compiled rule; ``line`` is where it starts in its file (1-based)."""

    index: int
    name: str
    line: int
    kind: str
    fields: tuple[FieldMap, ...]
    span_name: re.Pattern[str] | None = None
    scope: re.Pattern[str] | None = None
    has: tuple[str, ...] = ()
    latency: FieldMap | None = None  # the field among ``fields`` that declares the latency
    # The conditions as written in the file, for messages ("span_name 'ai_*'").
    span_name_text: str = ""
    scope_text: str = ""

    @property
    def label(self) -> str:
        return f"rule {self.index + 1}" + (f" {self.name!r}" if self.name else "") + f" (line {self.line})"

    def matches_name(self, span_name: str, scope_name: str) -> bool:
        return ((self.span_name is None or self.span_name.fullmatch(span_name) is not None)
                and (self.scope is None or self.scope.fullmatch(scope_name) is not None))

    def why_not(self, span_name: str, scope_name: str, attrs: Mapping[str, Any]) -> str:
        """Why this rule does not match ('' when it does)."""
        if self.span_name is not None and self.span_name.fullmatch(span_name) is None:
            return f"span name {span_name!r} does not match {self.span_name_text}"
        if self.scope is not None and self.scope.fullmatch(scope_name) is None:
            return f"scope {scope_name!r} does not match {self.scope_text}"
        missing = [name for name in self.has if attrs.get(name) is None]
        return f"no attribute {', '.join(missing)}" if missing else ""

    def rewrite(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(attrs)
        out[OPERATION] = KINDS[self.kind]
        for field_map in self.fields:
            value = field_map.value(attrs)
            if value is not None:
                out[field_map.target] = value
        return out


class MappingRules:
    """The rules of one mapping file, compiled; first match wins.

    Each (span name, scope name) pair's candidate rules (those whose name and scope patterns
    match) are remembered, so a span costs a dict look-up plus the attribute-presence checks of
    its candidates; a span no rule can match costs the look-up alone.
    """

    def __init__(self, rules: list[MappingRule], source: str = "") -> None:
        self.rules = tuple(rules)
        self.source = source
        self._candidates: dict[tuple[str, str], tuple[MappingRule, ...]] = {}

    @classmethod
    def load(cls, path: str | Path) -> "MappingRules":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MappingError(f"{path}: cannot read the mapping file ({exc.strerror or exc})") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "mapping") -> "MappingRules":
        return cls(_Parser(source).rules(text), source)

    def match(self, span_name: str, scope_name: str, attrs: Mapping[str, Any]) -> MappingRule | None:
        key = (span_name, scope_name)
        candidates = self._candidates.get(key)
        if candidates is None:
            candidates = tuple(r for r in self.rules if r.matches_name(span_name, scope_name))
            if len(self._candidates) >= _DECISION_MEMO_ENTRIES:
                self._candidates.clear()
            self._candidates[key] = candidates
        for rule in candidates:
            if not rule.has or all(attrs.get(name) is not None for name in rule.has):
                return rule
        return None

    def apply(self, span_name: str, scope_name: str, attrs: dict[str, Any]) -> dict[str, Any]:
        """``attrs`` rewritten by the first matching rule (a new dict), or ``attrs`` itself."""
        rule = self.match(span_name, scope_name, attrs)
        return attrs if rule is None else rule.rewrite(attrs)

    def map_span(self, span: Any, scope_name: str, attrs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(span, attributes) as the normaliser should read them.

        The span is the one given unless its rule declares a latency: then a view of it that
        starts that long before it ends.
        """
        rule = self.match(span.name, scope_name, attrs)
        if rule is None:
            return span, attrs
        mapped = rule.rewrite(attrs)
        latency = rule.latency.value(attrs) if rule.latency is not None else None
        if latency is None:
            return span, mapped
        end = span.end_time_unix_nano
        return DeclaredLatencySpan(span, end - round(latency * 1e6), end), mapped

    def memo_size(self) -> int:
        return len(self._candidates)


class DeclaredLatencySpan:
    """A span whose start is moved so that end - start is the latency its rule declared."""

    __slots__ = ("_span", "start_time_unix_nano", "end_time_unix_nano")

    def __init__(self, span: Any, start_ns: int, end_ns: int) -> None:
        self._span = span
        self.start_time_unix_nano = start_ns
        self.end_time_unix_nano = end_ns

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


def _millis(raw: Any, scale: float) -> float | None:
    """A duration in ms, or None when it is not a finite number (the span's own times then count)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (str, bytes)):
        try:
            raw = float(raw)
        except ValueError:
            return None
    if not isinstance(raw, (int, float)) or not math.isfinite(raw):
        return None
    return raw * scale


# -- parsing ----------------------------------------------------------------------------------

class _Parser:
    """Validates the YAML node tree (which knows each node's line) and builds the rules."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: Any, message: str) -> MappingError:
        line = node.start_mark.line + 1 if node is not None else 1
        return MappingError(f"{self.source} line {line}: {message}")

    def rules(self, text: str) -> list[MappingRule]:
        loader = yaml.SafeLoader(text)
        try:
            try:
                root = loader.get_single_node()
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line = mark.line + 1 if mark is not None else 1
                raise MappingError(f"{self.source} line {line}: not valid YAML ({exc.problem or exc})") from None
            if root is None:
                raise MappingError(f"{self.source} line 1: empty mapping file (expected 'rules:')")
            top = self.mapping(root, _TOP_KEYS, "top-level key")
            version = top.get("version")
            if version is not None and self.scalar(loader, version[1]) != 1:
                raise self.error(version[1], "unsupported version (known: 1)")
            if "rules" not in top:
                raise self.error(root, "no 'rules' list")
            rules_node = top["rules"][1]
            if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
                raise self.error(rules_node, "'rules' must be a non-empty list of rules")
            return [self.rule(loader, i, node) for i, node in enumerate(rules_node.value)]
        finally:
            loader.dispose()

    def mapping(self, node: Any, known: tuple[str, ...], what: str) -> dict[str, tuple[Any, Any]]:
        """key -> (key node, value node) of a YAML mapping, every key known and given once."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"expected a mapping with keys {', '.join(known)}")
        out: dict[str, tuple[Any, Any]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in known:
                raise self.error(key_node, f"unknown {what} {key!r} (known: {', '.join(known)})")
            if key in out:
                raise self.error(key_node, f"{key!r} given twice")
            out[key] = (key_node, value_node)
        return out

    def scalar(self, loader: Any, node: Any) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, "expected a single value, not a list or mapping")
        try:
            return loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.error(node, f"unreadable value ({exc})") from None

    def text(self, loader: Any, node: Any, what: str) -> str:
        value = self.scalar(loader, node)
        if not isinstance(value, str) or not value:
            raise self.error(node, f"{what} must be a non-empty string")
        return value

    def names(self, loader: Any, node: Any, what: str) -> tuple[str, ...]:
        """One attribute name or a list of them."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not items:
            raise self.error(node, f"{what} lists no attribute")
        return tuple(self.text(loader, item, what) for item in items)

    def pattern(self, loader: Any, node: Any, regex: bool, what: str) -> re.Pattern[str]:
        text = self.text(loader, node, what)
        try:
            return re.compile(text if regex else fnmatch.translate(text))
        except re.error as exc:
            raise self.error(node, f"bad regex {text!r} in {what}: {exc}") from None

    def rule(self, loader: Any, index: int, node: Any) -> MappingRule:
        keys = self.mapping(node, _RULE_KEYS, "rule key")
        if "kind" not in keys:
            raise self.error(node, f"rule {index + 1} has no kind (known: {', '.join(KINDS)})")
        kind_node = keys["kind"][1]
        kind = self.scalar(loader, kind_node)
        if kind not in KINDS:
            raise self.error(kind_node, f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        name = self.text(loader, keys["name"][1], "name") if "name" in keys else ""
        if "match" not in keys:
            raise self.error(node, f"rule {index + 1} has no match (give span_name, scope and/or has)")
        (span_name, span_name_text), (scope, scope_text), has = self.conditions(loader, keys["match"][1])
        fields = self.fields(loader, keys["fields"][1], kind) if "fields" in keys else ()
        latency = next((f for f in fields if f.field == "latency"), None)
        return MappingRule(index=index, name=name, line=node.start_mark.line + 1, kind=kind, fields=fields,
                           span_name=span_name, scope=scope, has=has, latency=latency,
                           span_name_text=span_name_text, scope_text=scope_text)

    def conditions(self, loader: Any, node: Any) -> tuple[Any, Any, tuple[str, ...]]:
        """((span name pattern, as written), (scope pattern, as written), attributes required)."""
        keys = self.mapping(node, _MATCH_KEYS, "match condition")
        if not keys:
            raise self.error(node, "match gives no condition (span_name, scope and/or has)")
        found: dict[str, tuple[re.Pattern[str] | None, str]] = {"span_name": (None, ""), "scope": (None, "")}
        for what in found:
            glob, regex = keys.get(what), keys.get(f"{what}_regex")
            if glob and regex:
                raise self.error(regex[0], f"give {what} or {what}_regex, not both")
            if glob:
                pattern = self.pattern(loader, glob[1], False, what)
                found[what] = pattern, f"glob {glob[1].value!r}"
            elif regex:
                pattern = self.pattern(loader, regex[1], True, f"{what}_regex")
                found[what] = pattern, f"regex {regex[1].value!r}"
        has = self.names(loader, keys["has"][1], "has") if "has" in keys else ()
        return found["span_name"], found["scope"], has

    def fields(self, loader: Any, node: Any, kind: str) -> tuple[FieldMap, ...]:
        keys = self.mapping(node, tuple(FIELDS), "field")
        out = []
        for field, (key_node, value_node) in keys.items():
            target = FIELDS[field]
            if kind not in target.kinds:
                allowed = ", ".join(f for f, t in FIELDS.items() if kind in t.kinds)
                raise self.error(key_node, f"field {field!r} does not apply to kind {kind} (known: {allowed})")
            out.append(self.field_map(loader, field, target, value_node))
        return tuple(out)

    def field_map(self, loader: Any, field: str, target: _Target, node: Any) -> FieldMap:
        if isinstance(node, yaml.ScalarNode):  # a bare attribute name
            sources, constant, unit, unit_node = (self.text(loader, node, field),), None, None, node
        else:
            spec = self.mapping(node, _SPEC_KEYS, f"key of {field}")
            if ("attr" in spec) == ("value" in spec):
                raise self.error(node, f"{field}: give attr (attribute names) or value (a constant)")
            if "default" in spec and "attr" not in spec:
                raise self.error(spec["default"][0], f"{field}: default goes with attr")
            sources = self.names(loader, spec["attr"][1], f"{field} attr") if "attr" in spec else ()
            constant_node = (spec.get("value") or spec.get("default") or (None, None))[1]
            constant = self.scalar(loader, constant_node) if constant_node is not None else None
            unit_node = spec["unit"][1] if "unit" in spec else node
            unit = self.scalar(loader, unit_node) if "unit" in spec else None
        if field == "latency":
            if unit is None:
                raise self.error(unit_node, f"latency needs a unit (known: {', '.join(UNITS)})")
            if unit not in UNITS:
                raise self.error(unit_node, f"unknown unit {unit!r} (known: {', '.join(UNITS)})")
            if constant is not None and _millis(constant, 1.0) is None:
                raise self.error(unit_node, f"latency constant {constant!r} is not a number")
            return FieldMap(field, target.attribute, sources, constant, UNITS[unit])
        if unit is not None:
            raise self.error(unit_node, f"unit applies to latency only, not {field}")
        return FieldMap(field, target.attribute, sources, constant, role=target.role)
