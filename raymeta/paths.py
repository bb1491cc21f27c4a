"""Telling a local path from a Hugging Face hub name."""

from __future__ import annotations

from pathlib import Path

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".raw", ".txt", ".tokens", ".arrow", ".csv")


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path: it exists here, starts with ``/``, ``.`` or
    ``~``, has a backslash, more than one ``/`` (hub names are ``name`` or ``owner/name``) or a
    data file's suffix."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(DATA_SUFFIXES)
        or Path(name).expanduser().exists()
    )
