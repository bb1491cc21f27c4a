"""Telling a local path from a Hugging Face hub name, and a path in Ray's copy of a job's
working dir from one that outlives the job; writing a file whole."""

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


def in_ray_working_dir(path: Path) -> bool:
    """Whether ``path`` lies in the copy of a working dir Ray made for a submitted job
    (``.../runtime_resources/working_dir_files/_ray_pkg_*/``), which Ray deletes later."""
    parts = path.resolve().parts
    return any(
        a == "runtime_resources" and b == "working_dir_files" for a, b in zip(parts, parts[1:])
    )


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
