"""json.dumps(obj, indent=2), the same text several times faster for reports.

The standard library encodes indented JSON in pure Python, one generator per
level; a report of a long session has millions of hops. This writes the same
characters (ensure_ascii, ", " -> "," at line ends, ": " between key and value,
NaN/Infinity as json writes them) for what reports hold: dicts with string
keys, lists, tuples, strings, ints, floats, bools and None. Anything else is
left to json.dumps.
"""

from __future__ import annotations

import json
import math
from json.encoder import encode_basestring_ascii
from typing import Any

_FLOATS = {float("inf"): "Infinity", float("-inf"): "-Infinity"}


def dumps_indented(obj: Any) -> str:
    """Exactly json.dumps(obj, indent=2)."""
    out: list[str] = []
    _put(obj, "\n", out)
    return "".join(out)


def _put(o: Any, nl: str, out: list[str]) -> None:
    """Append o's text; nl is a newline followed by the current indentation."""
    if isinstance(o, str):
        out.append(encode_basestring_ascii(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        out.append(_float(o))
    elif isinstance(o, dict):
        if not o:
            out.append("{}")
            return
        inner = nl + "  "
        sep = "{" + inner
        for k, v in o.items():
            head = sep + (encode_basestring_ascii(k) if type(k) is str else _key(k)) + ": "
            leaf = _leaf(v)
            if leaf is None:
                out.append(head)
                _put(v, inner, out)
            else:
                out.append(head + leaf)
            sep = "," + inner
        out.append(nl + "}")
    elif isinstance(o, list | tuple):
        if not o:
            out.append("[]")
            return
        inner = nl + "  "
        sep = "[" + inner
        for v in o:
            leaf = _leaf(v)
            if leaf is None:
                out.append(sep)
                _put(v, inner, out)
            else:
                out.append(sep + leaf)
            sep = "," + inner
        out.append(nl + "]")
    else:  # not in a report: let json decide (and raise), indented as it would be
        text = json.dumps(o, indent=2)
        out.append(text.replace("\n", nl))


def _leaf(v: Any) -> str | None:
    """The text of a string, int or None exactly of that type (the common leaves); None
    for anything else."""
    t = type(v)
    if t is str:
        return str(encode_basestring_ascii(v))
    if t is int:
        return int.__repr__(v)
    if v is None:
        return "null"
    return None


def _float(f: float) -> str:
    if math.isnan(f):
        return "NaN"
    return _FLOATS.get(f) or float.__repr__(f)


def _key(k: Any) -> str:
    if isinstance(k, str):
        return str(encode_basestring_ascii(k))
    return str(encode_basestring_ascii(json.loads(json.dumps({k: 0})).popitem()[0]))
