"""What counts as personal data or a secret: one :class:`Recognizer` per shape, each a pattern
plus a validator that checks what a pattern alone cannot (a checksum, a calendar date, an
address range).

Patterns are written for bytes and for the engines that scan them in one compiled pass
(Hyperscan and RE2): no look-around, no back-references, ASCII ``\\b``. ASCII word boundaries
are deliberate: in ``메일은a@b.com입니다`` a Unicode-aware ``\\b`` sees no boundary between Hangul
and Latin letters and would miss the address.

A validator receives the matched text (the pattern's ``group``) and returns whether it is the
entity. Validators are small pure functions, tested one by one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class Recognizer:
    """One entity shape.

    Parameters
    ----------
    entity
        The entity type, upper case (``EMAIL``); its placeholder is ``<EMAIL>``.
    pattern
        A bytes regex both Hyperscan and RE2 accept.
    validate
        Decides a candidate the pattern found (None: every match counts).
    group
        The capture group that holds the value: a ``password=`` pair keeps its key readable and
        redacts the value only. 0 is the whole match.
    caseless
        Match letters in either case.
    """

    entity: str
    pattern: bytes
    validate: Callable[[str], bool] | None = None
    group: int = 0
    caseless: bool = False


# -- validators -----------------------------------------------------------------------------

def _digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


def luhn_valid(text: str) -> bool:
    """Payment card numbers: 13-19 digits (separators ignored) with a Luhn check digit, not all one digit."""
    digits = _digits(text)
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _issuer_known(digits: str) -> bool:
    # Issuer prefixes (IIN) of the card networks, by length: Visa 4 (13, 16, 19); Mastercard
    # 51-55 and 2221-2720; Amex 34/37 (15); Diners 30/36/38/39 (14); JCB 35 and the 15-digit
    # 1800/2131; Discover, UnionPay and Maestro 6/5/35 (16-19). A timestamp in milliseconds
    # (13 digits from 1), an ISBN-13 (978...) or a zero-padded id is none of these.
    n, first, two, four = len(digits), digits[0], digits[:2], int(digits[:4])
    if n == 13:
        return first == "4"
    if n == 14:
        return two in ("30", "36", "38", "39")
    if n == 15:
        return two in ("34", "37") or digits[:4] in ("1800", "2131")
    return first in "456" or two == "35" or (n == 16 and 2221 <= four <= 2720)


def card_valid(text: str) -> bool:
    """A payment card number: Luhn-valid (see :func:`luhn_valid`) with a card network's prefix
    for its length."""
    return luhn_valid(text) and _issuer_known(_digits(text))


# ISO 13616 lengths of the countries that issue IBANs (SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_valid(text: str) -> bool:
    """An IBAN: a known country's length and the ISO 7064 mod-97 check (remainder 1)."""
    iban = text.replace(" ", "").replace("-", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def kr_rrn_valid(text: str) -> bool:
    """A Korean resident registration number, ``YYMMDD-GNNNNNN``.

    The birth date must be a calendar date and G a sex/century digit. Numbers issued before
    October 2020 end in a check digit; those issued since end in random digits, so the written
    form ``YYMMDD-G......`` (with the hyphen, which nothing else uses) is accepted on its date
    and G alone, while 13 bare digits, which could be anything, must also pass the checksum.
    """
    digits = _digits(text)
    if len(digits) != 13:
        return False
    month, day, sex = int(digits[2:4]), int(digits[4:6]), digits[6]
    if not (1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month - 1]) or sex not in "12345678":
        return False
    if "-" in text:
        return True
    check = (11 - sum(int(d) * w for d, w in zip(digits, _RRN_WEIGHTS)) % 11) % 10
    return check == int(digits[12])


def us_ssn_valid(text: str) -> bool:
    """A US social security number as the SSA issues them: area not 000, 666 or 9xx, group not
    00, serial not 0000, and not one of the numbers published in advertising."""
    digits = _digits(text)
    if len(digits) != 9:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return (area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"
            and digits not in ("078051120", "219099999", "123456789"))


def ipv4_valid(text: str) -> bool:
    """A dotted quad of octets 0-255 without leading zeros (``01.02.03.04`` is a version)."""
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) <= 255 and (p == "0" or p[0] != "0") for p in parts)


def ipv6_valid(text: str) -> bool:
    """An IPv6 address as :mod:`ipaddress` parses it, with at least one hex letter or ``::`` (so a
    clock time such as ``12:30:45`` never qualifies; it does not parse anyway)."""
    if "::" not in text and text.count(":") != 7:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return text != "::"


def email_valid(text: str) -> bool:
    """An address with a local part of at most 64 characters and a domain of dot-separated labels
    (none empty, none starting or ending with a hyphen) ending in an alphabetic TLD."""
    local, _, domain = text.rpartition("@")
    if not local or len(local) > 64 or len(domain) > 253 or local.startswith(".") or local.endswith("."):
        return False
    labels = domain.split(".")
    return (len(labels) >= 2 and labels[-1].isalpha() and len(labels[-1]) >= 2
            and all(label and label[0] != "-" and label[-1] != "-" for label in labels))


def phone_valid(text: str) -> bool:
    """A telephone number: 7-15 digits (E.164's maximum), international ones at least 8, and not
    a calendar date written with separators (``2026-11-29``, ``29.11.2026``)."""
    digits = _digits(text.split("x")[0])  # an extension (x1234) is not part of the number
    if not 7 <= len(digits) <= 15:
        return False
    if text.startswith("+") and len(digits) < 8:
        return False
    groups = [g for g in _split_groups(text.split("x")[0]) if g]
    if len(groups) == 3 and _looks_like_date(groups):
        return False
    # Three groups of four are a slice of a 16-digit number (a card failing Luhn, a UUID's
    # digit-only groups), not a phone number, except for 050 personal numbers (Korea, Japan).
    if [len(g) for g in groups] == [4, 4, 4] and not text.startswith(("050", "+", "(")):
        return False
    return True


def _split_groups(text: str) -> list[str]:
    out, current = [], []
    for ch in text:
        if "0" <= ch <= "9":
            current.append(ch)
        else:
            out.append("".join(current))
            current = []
    out.append("".join(current))
    return out


def _looks_like_date(groups: list[str]) -> bool:
    lens = [len(g) for g in groups]
    if lens == [4, 2, 2]:
        year, month, day = groups
    elif lens == [2, 2, 4]:
        day, month, year = groups
    else:
        return False
    return 1900 <= int(year) <= 2199 and 1 <= int(month) <= 12 and 1 <= int(day) <= 31


# -- the recognisers ------------------------------------------------------------------------

# Secrets first: where two recognisers claim the same text, the longer match wins, then the
# earlier recogniser in this list.
BUILTIN_RECOGNIZERS: tuple[Recognizer, ...] = (
    # PEM private keys: the whole block; a block cut off (by the text limit) is redacted to the end.
    # The body never takes a "-" followed by another (so it stops at the END line), but keeps
    # the hyphens of headers such as "DEK-Info: AES-128-CBC".
    Recognizer("SECRET", rb"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[A-Za-z0-9+/=\s\\:,]|-[A-Za-z0-9])*"
                         rb"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?"),
    # Anthropic (sk-ant-...), OpenAI project/service/admin and legacy keys.
    Recognizer("SECRET", rb"\bsk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
    Recognizer("SECRET", rb"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}\b"),
    Recognizer("SECRET", rb"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    Recognizer("SECRET", rb"\bxox[abposre]-[A-Za-z0-9-]{10,255}"),
    Recognizer("SECRET", rb"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,200}"),
    Recognizer("SECRET", rb"\bAIza[0-9A-Za-z_-]{35}"),
    # JWTs: header and payload are enough (a token cut by the text limit is still one).
    Recognizer("SECRET", rb"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?"),
    # key=value and "key": "value" pairs; the key stays readable. The key may carry prefixes
    # (DB_PASSWORD, MYSQL_ROOT_PASSWORD); the value is printable ASCII up to a quote, comma,
    # semicolon, brace or angle bracket (so it never runs on into the sentence around it).
    Recognizer("SECRET", rb"\b(?:[a-z0-9]{1,20}_){0,3}(?:password|passwd|passphrase|pwd|secret|client_secret|api[_-]?key"
                         rb"|access[_-]?token|auth[_-]?token|private[_-]?key|aws_secret_access_key)[\"']?\s{0,4}[:=]\s{0,4}"
                         rb"[\"']?([A-Za-z0-9!#$%&()*+./:=?@^_`|~\[\]\\-]{3,256})", group=1, caseless=True),
    Recognizer("EMAIL", rb"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        rb"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,8}\.[A-Za-z]{2,24}\b",
               email_valid),
    # Before the cards: 13 bare digits passing both checks are far likelier a resident number
    # than one of the 13-digit Visa numbers no longer issued.
    Recognizer("KR_RRN", rb"\b\d{2}[01]\d[0-3]\d-?[1-8]\d{6}\b", kr_rrn_valid),
    # Card numbers as printed: bare, in groups of four (4-4-4-4, 4-4-4-4-3, 4-4-4-1), or Amex and
    # Diners' 4-6-5 / 4-6-4. Other groupings (YYMMDD-GNNNNNN, 3-7-7 order numbers) are no card.
    Recognizer("CREDIT_CARD", rb"\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,4}(?:[ -]\d{3})?|\d{4}[ -]\d{6}[ -]\d{4,5})\b",
               card_valid),
    Recognizer("IBAN", rb"\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,3})?\b", iban_valid),
    Recognizer("US_SSN", rb"\b\d{3}-\d{2}-\d{4}\b|\b\d{3} \d{2} \d{4}\b", us_ssn_valid),
    Recognizer("IP_ADDRESS", rb"\b(?:\d{1,3}\.){3}\d{1,3}\b", ipv4_valid),
    # Full (eight groups) or compressed (with "::") IPv6 addresses.
    Recognizer("IP_ADDRESS", rb"\b[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}\b"
                             rb"|(?:\b[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}\b)?",
               ipv6_valid),
    # International (+CC, or 00 CC), Korean mobile (010-1234-5678, 01012345678), and national
    # numbers written in groups: (555) 555-0100, 555-555-0100, 03-1234-5678, 020 7946 0958,
    # 0171 1234567, (0306) 9990089, 01 23 45 67 89; an extension (x1234) goes with the number.
    # Bare national numbers only with their trunk 0 (0238891532, 01414960454): ten bare digits
    # without one (5551234567) read the same as an order number or a Unix time, and are left.
    Recognizer("PHONE", rb"\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]?\d{2,5}){1,4}(?:x\d{1,5})?\b"
                        rb"|\b00[1-9]\d{0,2}(?:[ .-]\d{1,5}){2}(?:[ .-]\d{2,5}){1,2}(?:x\d{1,5})?\b", phone_valid),
    # Grouped numbers run on over further "-digits" groups, so that a slice of a longer number
    # (016-1420415 of the order number 016-1420415-3965944, 4364-9570-0092 of a card failing
    # Luhn) reaches the validator whole and fails its length. Nor do they start after "digits-":
    # 030-06940 in the ISBN 978-7-030-06940-5 is no phone number.
    Recognizer("PHONE", rb"\b01[016789][ .-]?\d{3,4}[ .-]?\d{4}(?:-\d{1,8})*\b", phone_valid),
    Recognizer("PHONE", rb"(?:\(\d{2,5}\) ?|\b\d{2,5}[ .-])\d{3,4}[ .-]\d{3,4}(?:-\d{1,8})*(?:x\d{1,5})?\b"
                        rb"|\(0\d{1,4}\) ?\d{4,8}\b", phone_valid),
    Recognizer("PHONE", rb"(?:^|[^0-9A-Za-z_-])(0\d{2,4}[ /-]\d{5,8}(?:-\d{1,8})*|0\d(?:[ .]\d{2}){4}|0[1-9]\d{8,9})\b",
               phone_valid, group=1),
)

ENTITY_TYPES: tuple[str, ...] = tuple(dict.fromkeys(r.entity for r in BUILTIN_RECOGNIZERS))
