"""Finding keys of the form ``a=b/c=d``: the one writer and the one reader.

Detectors that watch a named thing key their findings by its fields (``project=shop/model=gpt-4o``,
``host=gpu-1/gpu=0/pid=42``); alert routing reads the fields back as labels. Keys that are not
of this form (a trace id) parse to no fields.
"""

from __future__ import annotations

from typing import Sequence


def key_string(fields: Sequence[str], values: Sequence[object]) -> str:
    """``("project", "model"), ("shop", "gpt-4o")`` -> ``"project=shop/model=gpt-4o"``.

    >>> key_string(("host", "gpu"), ("a", 0))
    'host=a/gpu=0'
    """
    return "/".join(f"{f}={v}" for f, v in zip(fields, values))


def parse_key(key: str) -> dict[str, str]:
    """The ``name=value`` segments of ``key``, names and values stripped.

    Segments without ``=`` or with an empty name are skipped; a later segment of the same name
    wins.

    >>> parse_key("host=a/gpu=0/pid=12")
    {'host': 'a', 'gpu': '0', 'pid': '12'}
    >>> parse_key("4bf92f3577b34da6a3ce929d0e0e4736")
    {}
    """
    fields: dict[str, str] = {}
    for segment in key.split("/"):
        name, sep, value = segment.partition("=")
        name = name.strip()
        if sep and name:
            fields[name] = value.strip()
    return fields
