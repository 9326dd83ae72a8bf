"""The redaction policy: validated at start with errors that say where, modes per type and per
project, allow-lists, keyed hashing, keep mode, the text limit, and the two prefilters giving
the same answers."""

from __future__ import annotations

import json
import re

import pytest

from agentwatch.streams.pii import PiiConfigError, PiiPolicy, Redactor
from agentwatch.streams.pii import redactor as redactor_module
from agentwatch.streams.pii.redactor import MARGIN_CHARS

KEY = "k" * 32
TEXT = "mail kim@example.co.kr, card 4111 1111 1111 1111, ip 10.1.2.3"


def policy(mode: str = "redact", spec: dict | None = None, key: str = "") -> PiiPolicy:
    return PiiPolicy.from_settings(mode, json.dumps(spec or {}), key)


# -- validation -----------------------------------------------------------------------------

def test_invalid_default_mode_is_named() -> None:
    with pytest.raises(PiiConfigError, match=r"AGENTWATCH_PII_MODE.*'mask'"):
        policy("mask")


def test_invalid_entity_mode_is_named() -> None:
    with pytest.raises(PiiConfigError, match=r"entities\.EMAIL.*'blur'"):
        policy(spec={"entities": {"EMAIL": "blur"}})


def test_unknown_entity_is_named_with_the_known_ones() -> None:
    with pytest.raises(PiiConfigError, match=r"unknown entity type 'PASSPORT'.*EMAIL"):
        policy(spec={"entities": {"PASSPORT": "redact"}})
    with pytest.raises(PiiConfigError, match=r"projects\.billing: unknown entity type 'NAME'"):
        policy(spec={"projects": {"billing": {"NAME": "keep"}}})


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(PiiConfigError, match="entites"):
        policy(spec={"entites": {"EMAIL": "keep"}})


def test_bad_custom_pattern_error_names_entity_and_pattern() -> None:
    # Refused where the policy is read (before up, demo or a worker starts), not at the first text.
    with pytest.raises(PiiConfigError, match=re.escape("EMPLOYEE_ID") + ".*" + re.escape("EMP-([0-9]")):
        policy(spec={"custom": [{"entity": "EMPLOYEE_ID", "pattern": "EMP-([0-9]"}]})


def test_custom_entity_name_must_be_a_placeholder_name() -> None:
    with pytest.raises(PiiConfigError, match="'employee id'"):
        policy(spec={"custom": [{"entity": "employee id", "pattern": "EMP-[0-9]{6}"}]})


def test_hash_mode_without_a_key_says_which_variable() -> None:
    with pytest.raises(PiiConfigError, match="AGENTWATCH_PII_HASH_KEY"):
        policy("hash")
    with pytest.raises(PiiConfigError, match="AGENTWATCH_PII_HASH_KEY"):
        policy(spec={"projects": {"analytics": {"EMAIL": "hash"}}})
    policy("off", key="")  # off needs no key


def test_spec_that_is_neither_json_nor_a_file() -> None:
    with pytest.raises(PiiConfigError, match="neither JSON nor a readable file"):
        PiiPolicy.from_settings("redact", "/no/such/pii.yaml", "")


def test_yaml_file_spec(tmp_path) -> None:
    path = tmp_path / "pii.yaml"
    path.write_text("entities:\n  IP_ADDRESS: keep\nallow:\n  - Support@Example.com\n")
    p = PiiPolicy.from_settings("redact", str(path), "")
    out, found = Redactor(p).redact("ip 10.1.2.3 from support@example.com")
    assert out == "ip 10.1.2.3 from support@example.com" and found == ("IP_ADDRESS",)


# -- modes ----------------------------------------------------------------------------------

ENGINES = ["re2"] + (["hyperscan"] if redactor_module.hyperscan is not None else [])


def test_redact_everything_by_default() -> None:
    out, found = Redactor(PiiPolicy()).redact(TEXT)
    assert out == "mail <EMAIL>, card <CREDIT_CARD>, ip <IP_ADDRESS>"
    assert found == ("EMAIL", "CREDIT_CARD", "IP_ADDRESS")


def test_off_scans_nothing() -> None:
    assert Redactor(policy("off")).redact(TEXT) == (TEXT, ())


def test_per_project_override() -> None:
    p = policy(spec={"entities": {"IP_ADDRESS": "keep"},
                     "projects": {"netops": {"IP_ADDRESS": "redact", "EMAIL": "keep"}}})
    r = Redactor(p)
    assert r.redact(TEXT)[0] == "mail <EMAIL>, card <CREDIT_CARD>, ip 10.1.2.3"
    assert r.redact(TEXT, project="netops")[0] == "mail kim@example.co.kr, card <CREDIT_CARD>, ip <IP_ADDRESS>"
    assert r.redact(TEXT, project="other")[0] == "mail <EMAIL>, card <CREDIT_CARD>, ip 10.1.2.3"


def test_allow_list_exact_case_insensitive_and_patterns() -> None:
    p = policy(spec={"allow": ["Support@Example.com"], "allow_patterns": [r"10\.0\.[0-9]+\.[0-9]+"]})
    out, found = Redactor(p).redact("support@example.com, kim@example.co.kr, 10.0.3.4, 10.1.2.3")
    assert out == "support@example.com, <EMAIL>, 10.0.3.4, <IP_ADDRESS>"
    assert found == ("EMAIL", "IP_ADDRESS")  # allowed values are not detections


def test_hash_same_value_same_token_different_value_different_token() -> None:
    r = Redactor(policy("hash", key=KEY))
    a1, _ = r.redact("from kim@example.co.kr")
    a2, _ = r.redact("again kim@example.co.kr!")
    b, _ = r.redact("from lee@example.co.kr")
    token = re.fullmatch(r"from (<EMAIL:[0-9a-f]{16}>)", a1).group(1)
    assert a2 == f"again {token}!"
    assert b != a1 and b.startswith("from <EMAIL:")
    assert "kim" not in a1
    other_key, _ = Redactor(policy("hash", key="another key")).redact("from kim@example.co.kr")
    assert other_key != a1  # the token depends on the key


def test_hash_token_differs_by_entity_type() -> None:
    # The same digits as two different types must not be linkable through the token.
    r = Redactor(policy("hash", key=KEY))
    assert r._replacement("PHONE", "hash", b"0301234567") != r._replacement("KR_RRN", "hash", b"0301234567")


def test_keep_counts_without_changing_the_text() -> None:
    p = policy(spec={"entities": {"EMAIL": "keep", "CREDIT_CARD": "keep", "IP_ADDRESS": "keep"}})
    assert Redactor(p).redact(TEXT) == (TEXT, ("EMAIL", "CREDIT_CARD", "IP_ADDRESS"))


def test_custom_pattern_with_its_own_mode() -> None:
    p = policy(spec={"custom": [{"entity": "EMPLOYEE_ID", "pattern": "EMP-[0-9]{6}", "mode": "redact"}],
                     "entities": {"EMAIL": "keep"}})
    assert Redactor(p).redact("EMP-123456 kim@example.co.kr") == ("<EMPLOYEE_ID> kim@example.co.kr",
                                                                  ("EMPLOYEE_ID", "EMAIL"))


# -- the text limit -------------------------------------------------------------------------

EMAIL = "kim.minji.longname@example.co.kr"


@pytest.fixture(scope="module")
def default_redactor() -> Redactor:
    return Redactor(PiiPolicy())  # compiled once: a Hyperscan database takes a few hundred ms


@pytest.mark.parametrize("tail", [10, MARGIN_CHARS + 100])  # scanned whole, and cut to limit + margin
@pytest.mark.parametrize("offset", range(-len(EMAIL) + 1, 1))  # where the limit cuts the address
def test_limit_never_emits_part_of_an_entity_cut_by_the_window(default_redactor: Redactor, offset: int,
                                                               tail: int) -> None:
    limit = 100
    start = limit + offset  # the address starts here: it straddles the limit (or starts on it)
    text = "x" * (start - 1) + " " + EMAIL + " " + "y" * tail
    out, found = default_redactor.redact(text, limit=limit)
    assert len(out) <= limit
    assert out[:start] == text[:start]
    visible = out[start:]
    # The placeholder, perhaps cut by the limit, or nothing: never the address or a piece of it.
    assert visible.startswith("<EMAIL>") or "<EMAIL>".startswith(visible), visible
    if visible:
        assert found == ("EMAIL",)
    else:  # starts on the limit: counted when the whole text was scanned, not when it was cut
        assert found in ((), ("EMAIL",))


def test_limit_cuts_at_the_original_texts_limit() -> None:
    # The limit counts the original's characters: what follows a shortened entity is not pulled in.
    original = "mail kim@example.co.kr then " + "z" * 2000
    out, found = Redactor(PiiPolicy()).redact(original, limit=40)
    assert out == "mail <EMAIL> then " + "z" * (40 - len("mail kim@example.co.kr then "))
    assert found == ("EMAIL",)


# -- the engines agree ----------------------------------------------------------------------

@pytest.mark.skipif(redactor_module.hyperscan is None, reason="hyperscan is not installed")
def test_re2_and_hyperscan_give_identical_results_on_the_corpus() -> None:
    from bench.pii import make_corpus

    corpus = make_corpus(1500, seed=7)
    re2_redactor, hs_redactor = Redactor(PiiPolicy(), engine="re2"), Redactor(PiiPolicy(), engine="hyperscan")
    assert hs_redactor.engine == "hyperscan" and re2_redactor.engine == "re2"
    for sample in corpus:
        assert hs_redactor.scan(sample.text) == re2_redactor.scan(sample.text), sample.text
        assert hs_redactor.redact(sample.text) == re2_redactor.redact(sample.text), sample.text
    assert sum(len(re2_redactor.scan(s.text)) for s in corpus) > 1000  # the corpus is PII-laden
