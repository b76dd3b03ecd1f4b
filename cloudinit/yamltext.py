"""A small YAML writer for cloud-config: block literals keep file contents readable.

Only what user-data needs: a top-level mapping of sequences whose items are strings, flat
mappings of scalars, or lists of strings. Strings are JSON-quoted (a subset of YAML's
double-quoted style) unless they can be a ``|`` block literal that reads back identically
in PyYAML, which cloud-init uses. PyYAML is not needed on the launcher's side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Union

Scalar = Union[str, int, bool]
Item = Union[str, Sequence[str], Mapping[str, Scalar]]

_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
# YAML 1.1 (PyYAML) printable characters; tab and newline are handled separately.
_NON_PRINTABLE = re.compile("[^\x09\x0a\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LINE_BREAKS = re.compile("[\r\x85\u2028\u2029\ufeff]")
BLOCK_INDENT = 4  # content of a block literal inside "- key: |"


def dump(document: Mapping[str, Sequence[Item]]) -> str:
    """YAML text for ``document``; every top-level value is a sequence."""
    lines: list[str] = []
    for key, items in document.items():
        lines.append(f"{_key(key)}:")
        for item in items:
            lines.extend(_item(item))
    return "\n".join(lines) + "\n"


def quoted(text: str) -> str:
    """A double-quoted scalar: JSON escapes, plus YAML's extra line breaks escaped."""
    out = json.dumps(text, ensure_ascii=False)
    return _NON_PRINTABLE.sub(_escape, _LINE_BREAKS.sub(_escape, out))


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"unsupported YAML key {key!r}")
    return key


def _item(item: Item) -> list[str]:
    if isinstance(item, str):
        return [f"- {quoted(item)}"]
    if isinstance(item, Mapping):
        lines: list[str] = []
        for i, (key, value) in enumerate(item.items()):
            lead = "- " if i == 0 else "  "
            lines.extend(_entry(lead, _key(key), value))
        return lines
    return ["- [" + ", ".join(quoted(s) for s in item) + "]"]


def _entry(lead: str, key: str, value: Scalar) -> list[str]:
    if isinstance(value, bool):
        return [f"{lead}{key}: {'true' if value else 'false'}"]
    if isinstance(value, int):
        return [f"{lead}{key}: {value}"]
    if not can_be_literal(value):
        return [f"{lead}{key}: {quoted(value)}"]
    body = value.rstrip("\n")
    trailing = len(value) - len(body)
    chomp = "-" if trailing == 0 else ("" if trailing == 1 else "+")
    pad = " " * BLOCK_INDENT
    lines = [f"{lead}{key}: |{chomp}"]
    lines.extend(pad + line if line else "" for line in body.split("\n"))
    lines.extend("" for _ in range(trailing - 1))  # kept by "|+"
    return lines


def can_be_literal(text: str) -> bool:
    """Whether a ``|`` block reads back as exactly ``text``: multi-line, printable, no
    line breaks YAML knows but Python's split does not, and a first line that does not
    start with whitespace (it would set the block's indentation)."""
    return (
        "\n" in text
        and text[:1] not in ("", " ", "\t", "\n")
        and not _NON_PRINTABLE.search(text)
        and not _LINE_BREAKS.search(text)
    )
