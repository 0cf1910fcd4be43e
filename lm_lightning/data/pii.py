"""PII masking: e-mail addresses, IPv4/IPv6 addresses and phone numbers become placeholders.

Each rule is switched on by its own ``data.corpus.cleaning`` key (``mask_email``,
``mask_ip``, ``mask_phone``) and replaces every match with a fixed token (``<EMAIL>``,
``<IP>``, ``<PHONE>``), so a model learns that something was there without learning what.
Counts of masked spans are reported as ``masked_email`` etc.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)"
IPV6 = r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![\w:])"
IP = re.compile(f"{IPV4}|{IPV6}")
# International (+44 20 7946 0958), North American ((555) 123-4567, 555-123-4567, 555.123.4567)
# and other grouped forms of 9-15 digits. Plain digit runs (years, page numbers) are left alone:
# a phone number needs a separator or a leading "+".
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?(?![\w-])"
    r"|(?<![\w+])\+\d{9,15}(?!\w)"
)

RULES = (("email", "mask_email", EMAIL, "<EMAIL>"), ("ip", "mask_ip", IP, "<IP>"), ("phone", "mask_phone", PHONE, "<PHONE>"))


def mask_pii(text: str, cfg: Mapping, counts: dict | None = None) -> str:
    """``text`` with each switched-on rule's matches replaced; ``counts[f"masked_{name}"]`` += matches.

    E-mail runs first (its domain may hold digits), then IP (so an address is not read as a
    phone number), then phone.
    """
    for name, key, pattern, token in RULES:
        if cfg.get(key):
            text, n = pattern.subn(token, text)
            if n and counts is not None:
                counts[f"masked_{name}"] = counts.get(f"masked_{name}", 0) + n
    return text
