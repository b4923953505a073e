"""Keyword arguments checked before they cross into the native module: lists of names given as
one string, numbers that are not finite, and the request as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any


def names(keyword: str, value: Any) -> list[str]:
    """A list of names (obs columns, conditions, genes): one string is one name, not its
    characters; ``None`` is none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        out = list(value)
        bad = [v for v in out if not isinstance(v, str)]
        if bad:
            raise TypeError(f"{keyword}: expected names (strings), got {bad[0]!r}")
        return out
    raise TypeError(f"{keyword}: expected a name or a list of names, got {type(value).__name__}")


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}={value!r}: expected a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}[{k!r}]" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")


def request(fields: dict[str, Any], keywords: dict[str, str] | None = None) -> str:
    """The request as JSON, after checking that every number in it is finite (NaN and infinity
    are errors naming the keyword, as the caller spelled it: ``keywords`` maps request fields to
    keyword names where they differ). A field left ``None`` is left out: the library's default
    applies, as it does to a flag not given."""
    keywords = keywords or {}
    for field, value in fields.items():
        _check_finite(value, keywords.get(field, field))
    return json.dumps({k: v for k, v in fields.items() if v is not None}, allow_nan=False)
