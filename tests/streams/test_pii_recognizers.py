"""Each recogniser: valid values, wrong checksums, values inside Korean/English/Japanese text with
and without spaces, at the start and end of a text, and hard negatives that must not match.

Expected values are worked out by hand (card and IBAN test numbers are the networks' and the
IBAN registry's published examples; RRN check digits computed with the weights 2..9,2..5).
Every case runs with both prefilters (RE2 set, Hyperscan where installed).
"""

from __future__ import annotations

import pytest

from agentwatch.streams.pii import PiiPolicy, Redactor
from agentwatch.streams.pii import redactor as redactor_module
from agentwatch.streams.pii.recognizers import (
    BUILTIN_RECOGNIZERS,
    ENTITY_TYPES,
    card_valid,
    email_valid,
    iban_valid,
    ipv4_valid,
    ipv6_valid,
    kr_rrn_valid,
    luhn_valid,
    phone_valid,
    us_ssn_valid,
)

ENGINES = ["re2"] + (["hyperscan"] if redactor_module.hyperscan is not None else [])

PEM = ("-----BEGIN RSA PRIVATE KEY-----\n"
       "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
       "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
       "-----END RSA PRIVATE KEY-----")

VALID: dict[str, list[str]] = {
    "EMAIL": ["kim@example.co.kr", "jane.doe+news@mail.example.com", "a_b-c@sub-domain.example.io",
              "tanaka.h42@corp.example.co.jp"],
    "PHONE": ["010-1234-5678", "01012345678", "010 1234 5678", "+82-10-1234-5678", "+821012345678",
              "+1 415 555 0132", "+14155550132", "(555) 555-0100", "555-555-0100", "555.555.0100x1234",
              "+1-780-563-6083x7783", "001-415-555-0132", "03-1234-5678", "02-0080-6360", "020 7946 0958",
              "(0306) 9990089", "(08076) 124622", "01 23 45 67 89", "0238891532", "01414960454",
              "+49 (0) 9141 777631", "+44(0)115 4960914", "+33 1 83 41 77 76"],
    "CREDIT_CARD": ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5555555555554444",
                    "2223000048400011", "378282246310005", "3782 822463 10005", "6011111111111117",
                    "3530111333300000", "30569309025904", "4222222222222"],
    "IBAN": ["DE89370400440532013000", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432",
             "FR1420041010050500013M02606", "NL91ABNA0417164300"],
    # Check digits: 900101-123456[8], 850615-234567[4]; 210315-3847261 is issued since 2020 (random tail).
    "KR_RRN": ["900101-1234568", "850615-2345674", "9001011234568", "210315-3847261", "020229-4123451"],
    "US_SSN": ["536-22-8726", "536 22 8726", "078-05-1121"],
    "IP_ADDRESS": ["192.168.0.1", "8.8.8.8", "255.255.255.255", "2001:db8::1", "fe80::1ff:fe23:4567:890a",
                   "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1"],
    "SECRET": ["sk-proj-" + "Ab3_x-9Kq" * 6, "sk-" + "a1B2c3D4" * 6, "sk-ant-api03-" + "Zx9_Yw8-Vu7" * 8 + "AA",
               "AKIAIOSFODNN7EXAMPLE", "ghp_" + "aB3dE6gH9j" * 3 + "kL2mN5", "xoxb-123456789012-1234567890123-"
               + "AbCdEfGhIjKlMnOpQrStUvWx", "AIzaSyA-1234567890abcdefghijklmnopqrs_t", "AIzaSyA1234567890abcdefghijklmnopqrstu-",
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", PEM],
}

# Text around a value: English and Korean with and without spaces, Japanese, quotes, and the
# value alone (start and end of the text).
CONTEXTS = [
    "{}",
    "{} is what I have",
    "please check {}",
    "My value is {}.",
    "메일은{}입니다",
    "제 번호는 {} 입니다",
    "確認：{}です",
    "«{}»",
    "“{}” ✓",
    '{{"value": "{}"}}',
    "line one\n{}\nline three",
]

WRONG_CHECKSUM = {
    "CREDIT_CARD": ["4111 1111 1111 1112", "4111111111111112", "5555-5555-5555-4445", "378282246310006"],
    "IBAN": ["DE89370400440532013001", "GB82WEST12345698765433", "FR1420041010050500013M02607"],
    "KR_RRN": ["9001011234567", "8506152345670"],
}

HARD_NEGATIVES = [
    "order #100234567", "ORD-2024-0012345", "PO12345678", "054-6125397-0241461",
    "2024-03-15T14:22:05Z", "2024-03-15 14:22:05.123", "15.03.2024", "03/15/2024", "20240315142205",
    "2024년 3월 15일", "2024年3月15日", "14:22:05", "1710512525", "1710512525123",
    "550e8400-e29b-41d4-a716-446655440000", "12345678-1234-4567-8901-234567890123",
    "1.2.3", "v1.2.3.4", "2.14.0-rc1", "10.0.19045.3803", "Chrome/120.0.6099.109", "01.02.03.04",
    "1Z999AA10123456784", "123456789012", "123456789012345", "9400 1000 0000 0000 0000 00",
    "4111 1111 1111 1112", "5458-2284-2011-9501", "INV-2024-00123", "RE-20240456",
    "978-3-16-148410-0", "9783161484100", "978-7-030-06940-5",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "d41d8cd98f00b204e9800998ecf8427e",
    "$1,234.56", "₩1,250,000", "1.234,56 €", "¥12,800", "the password is required", "sk-learn",
    "000-12-3456", "666-12-3456", "912-34-5678", "901301-1234567", "256.1.1.1", "12:30:45",
]


@pytest.fixture(scope="module", params=ENGINES)
def redactor(request: pytest.FixtureRequest) -> Redactor:
    return Redactor(PiiPolicy(), engine=request.param)


def _entities(redactor: Redactor, text: str) -> list[tuple[str, str]]:
    return [(d.entity, text[d.start:d.end]) for d in redactor.scan(text)]


@pytest.mark.parametrize("entity,value", [(e, v) for e, values in VALID.items() for v in values])
@pytest.mark.parametrize("context", CONTEXTS)
def test_valid_value_is_found_whole_in_any_context(redactor: Redactor, entity: str, value: str, context: str) -> None:
    text = context.format(value)
    assert _entities(redactor, text) == [(entity, value)]


@pytest.mark.parametrize("key,value", [("password=", "Hunter2!xyz"), ("passwd: ", "s3cr3t-pw"),
                                       ("DB_PASSWORD=", "NLtTVDQ/W3omDOpgTwQ"), ('"password": "', "p@ss w0rd"),
                                       ("api_key = '", "abc123def456")])
def test_password_pair_redacts_the_value_and_keeps_the_key(redactor: Redactor, key: str, value: str) -> None:
    text = f"설정에서 {key}{value}' 입니다"
    found = _entities(redactor, text)
    expected = value.split(" ")[0]  # a value ends at a space
    assert found == [("SECRET", expected)]
    redacted, _ = redactor.redact(text)
    assert key in redacted and expected not in redacted


def test_password_value_stops_at_non_ascii_text(redactor: Redactor) -> None:
    assert _entities(redactor, "APIキー：client_secret=EI4ScjjPjDrE31、カード番号：4111 1111 1111 1111") == [
        ("SECRET", "EI4ScjjPjDrE31"), ("CREDIT_CARD", "4111 1111 1111 1111")]


def test_pem_block_stops_at_its_end_line(redactor: Redactor) -> None:
    text = f"key: {PEM}\nSSN 536-22-8726 and ip 8.8.8.8"
    assert _entities(redactor, text) == [("SECRET", PEM), ("US_SSN", "536-22-8726"), ("IP_ADDRESS", "8.8.8.8")]


def test_pem_block_cut_off_is_redacted_to_the_end(redactor: Redactor) -> None:
    cut = PEM[:80]
    assert _entities(redactor, "key: " + cut) == [("SECRET", cut)]


@pytest.mark.parametrize("entity,value", [(e, v) for e, values in WRONG_CHECKSUM.items() for v in values])
@pytest.mark.parametrize("context", ["{}", "제 번호는 {}입니다", "number {} please"])
def test_wrong_checksum_matches_nothing(redactor: Redactor, entity: str, value: str, context: str) -> None:
    assert _entities(redactor, context.format(value)) == []


@pytest.mark.parametrize("value", HARD_NEGATIVES)
@pytest.mark.parametrize("context", ["{}", "참조번호 {} 확인해 주세요", "ref: {}."])
def test_hard_negative_matches_nothing(redactor: Redactor, value: str, context: str) -> None:
    assert _entities(redactor, context.format(value)) == []


def test_korean_text_without_spaces(redactor: Redactor) -> None:
    text = "메일은kim@example.co.kr입니다 전화는010-1234-5678이고 주민번호900101-1234568확인"
    assert _entities(redactor, text) == [("EMAIL", "kim@example.co.kr"), ("PHONE", "010-1234-5678"),
                                        ("KR_RRN", "900101-1234568")]
    redacted, detected = redactor.redact(text)
    assert redacted == "메일은<EMAIL>입니다 전화는<PHONE>이고 주민번호<KR_RRN>확인"
    assert detected == ("EMAIL", "PHONE", "KR_RRN")


def test_adjacent_values_are_all_found(redactor: Redactor) -> None:
    text = "010-1234-5678, 010-2345-6789 0301234567 0301234568"
    assert [v for _, v in _entities(redactor, text)] == ["010-1234-5678", "010-2345-6789", "0301234567", "0301234568"]


def test_ten_bare_digits_without_trunk_zero_are_not_a_phone(redactor: Redactor) -> None:
    # A documented limit: 5551234567 reads the same as an order number or a Unix time.
    assert _entities(redactor, "call 5551234567") == []


def test_entity_types_are_the_documented_ones() -> None:
    assert set(ENTITY_TYPES) == {"SECRET", "EMAIL", "KR_RRN", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "PHONE"}
    assert all(r.group == 0 or b"(" in r.pattern for r in BUILTIN_RECOGNIZERS)


# -- validators, one by one -----------------------------------------------------------------

def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("4111-1111-1111-1111")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("0000000000000")  # one digit repeated
    assert not luhn_valid("424242424242")   # 12 digits: too short


def test_card_needs_a_network_prefix_for_its_length() -> None:
    assert card_valid("378282246310005") and card_valid("30569309025904") and card_valid("4222222222222")
    assert not card_valid("1632861428000")  # Luhn-valid 13 digits from 1: a timestamp in ms
    assert not card_valid("0112083680259")  # a leading 0: no network
    assert not card_valid("9780672008016")  # an ISBN-13 that passes Luhn


def test_iban() -> None:
    assert iban_valid("DE89370400440532013000") and iban_valid("de89 3704 0044 0532 0130 00")
    assert not iban_valid("DE8937040044053201300")   # one digit short for DE
    assert not iban_valid("XX89370400440532013000")  # no such country
    assert not iban_valid("DE89370400440532013001")


def test_kr_rrn() -> None:
    assert kr_rrn_valid("9001011234568") and kr_rrn_valid("900101-1234568")
    assert not kr_rrn_valid("9001011234567")           # bare: the check digit decides
    assert kr_rrn_valid("210315-3847261")              # hyphenated: date and G decide
    assert not kr_rrn_valid("901301-1234567")          # month 13
    assert not kr_rrn_valid("900230-1234567")          # 30 February
    assert not kr_rrn_valid("900101-9234567")          # G = 9


def test_us_ssn() -> None:
    assert us_ssn_valid("536-22-8726")
    for bad in ("000-22-8726", "666-22-8726", "936-22-8726", "536-00-8726", "536-22-0000", "078-05-1120"):
        assert not us_ssn_valid(bad), bad


def test_ip() -> None:
    assert ipv4_valid("10.0.0.1") and not ipv4_valid("256.0.0.1") and not ipv4_valid("01.02.03.04")
    assert ipv6_valid("2001:db8::1") and ipv6_valid("::1") and not ipv6_valid("::") and not ipv6_valid("12:30:45")


def test_email() -> None:
    assert email_valid("kim@example.co.kr")
    assert not email_valid(".kim@example.com") and not email_valid("kim@example.c0m")
    assert not email_valid("kim@-example.com") and not email_valid("x" * 65 + "@example.com")


def test_phone() -> None:
    assert phone_valid("010-1234-5678") and phone_valid("555-555-0100x1234")
    assert not phone_valid("2026-11-29") and not phone_valid("29.11.2026")  # dates
    assert not phone_valid("4111 1111 1111")  # three groups of four: a slice of a 16-digit number
    assert phone_valid("0505-1234-5678")      # except 050 personal numbers
    assert not phone_valid("+1234567")        # international needs 8 digits
    assert not phone_valid("054-6125397-0241461")  # 17 digits
