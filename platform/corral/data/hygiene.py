"""Personal information out of pretraining text: typed placeholders, and documents from blocked
domains dropped (Llama 2, section 2.1: data from sites known to hold much personal information
was removed).

`scrub_pii(text)` replaces, in this order (a span taken by one kind is not looked at again):

- e-mail addresses -> `[EMAIL]`;
- IBANs, checked with the ISO 13616 mod-97 checksum -> `[IBAN]`;
- payment card numbers, 13-19 digits (spaces or dashes between groups) passing the Luhn check -> `[CARD]`;
- IPv6 and IPv4 addresses that `ipaddress` parses, IPv4 not part of a longer dotted number (a
  version such as 1.2.3.4.5) nor after a `v` (v1.2.3.4) -> `[IPV6]`, `[IPV4]`;
- phone numbers: `+` and a country code with 7-15 digits in groups, or North American
  (NNN) NNN-NNNN / NNN-NNN-NNNN / NNN.NNN.NNNN -> `[PHONE]`.

What must survive is as deliberate as what goes: dates (2023-12-06, 12/06/2023), times
(12:30:45), version numbers, digit runs that fail Luhn or mod-97, prices and years. The checks
are the cheap, well-known ones; a pattern-based scrubber misses what does not look like its
patterns (names, street addresses), which is why the paper also drops whole sites.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from urllib.parse import urlparse

KINDS = ("email", "iban", "card", "ipv6", "ipv4", "phone")
PLACEHOLDER = {kind: f"[{kind.upper()}]" for kind in KINDS}

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
CARD = re.compile(r"(?<![\d.-])\d(?:[ -]?\d){12,18}(?![\d-]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
                   r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}([.-])\d{3}\1\d{4})(?![\w-]|\.\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, letters as 10..35, mod 97 == 1."""
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _ip_ok(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


CHECKS = {
    "email": (EMAIL, lambda m: True),
    "iban": (IBAN, lambda m: iban_ok(m)),
    "card": (CARD, lambda m: luhn_ok(re.sub(r"\D", "", m))),
    "ipv6": (IPV6, lambda m: m.count(":") >= 2 and _ip_ok(m, 6)),
    "ipv4": (IPV4, lambda m: _ip_ok(m, 4)),
    "phone": (PHONE, lambda m: 7 <= len(re.sub(r"\D", "", m)) <= 15),
}


def scrub_pii(text: str) -> tuple[str, Counter, list[tuple[str, str]]]:
    """`text` with personal information replaced by typed placeholders; counts by kind; and the
    (kind, found text) of each replacement, in order."""
    counts: Counter = Counter()
    found: list[tuple[str, str]] = []
    for kind in KINDS:
        pattern, valid = CHECKS[kind]

        def replace(m: re.Match, kind=kind, valid=valid) -> str:
            if not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            found.append((kind, m.group(0)))
            return PLACEHOLDER[kind]

        text = pattern.sub(replace, text)
    return text, counts, found


def mask(found: str) -> str:
    """A found item for review without repeating it: its first and last character, the rest `*`."""
    return found if len(found) <= 2 else found[0] + "*" * (len(found) - 2) + found[-1]


def blocked(url: str | None, domains: list[str]) -> bool:
    """Whether `url`'s host is one of `domains` or under one (example.com blocks www.example.com)."""
    if not url or not domains:
        return False
    host = (urlparse(url if "://" in url else f"//{url}").hostname or "").lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains))
