"""Numeric options checked against their ranges before any work, each named as the user writes it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lm_lightning.errors import UserError

#: (int: a whole number, or float: any real number; the test the value must pass; what the value must be, in words)
Rule = tuple[type, Callable[[Any], bool], str]


def check_numbers(options: Mapping[str, Any] | None, rules: Mapping[str, Rule], prefix: str = "") -> None:
    """Each option of ``rules`` that ``options`` sets (None: off, or its default) is a number of its kind (a bool never
    is) that passes its test; else one error line names ``<prefix><name>=<value>`` and what it must be."""
    for name, (kind, test, must) in rules.items():
        value = (options or {}).get(name)
        if value is None:
            continue
        typed = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
        if not typed or not test(value):
            raise UserError(f"{prefix}{name}={value!r} {'is out of range: it ' if typed else ''}must be {must}")
