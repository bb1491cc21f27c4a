"""Triples (context, query, response): the unit of every task set, and their JSONL files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raymeta.errors import InputError


class TripleFileError(InputError):
    """A triple file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Triple:
    """One fact: ``context`` holds it, ``query`` asks about it, ``response`` answers.

    ``meta`` carries free-form annotations (e.g. the template ids of a generated fact)."""

    context: str
    query: str
    response: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


FIELDS = ("context", "query", "response")


def write_triples(path: str | Path, triples: Iterable[Triple]) -> int:
    """Write one JSON object per line; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for t in triples:
            row = {k: getattr(t, k) for k in FIELDS}
            if t.meta:
                row["meta"] = t.meta
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def parse_triple(row: object, where: str) -> Triple:
    """Validate one decoded JSON value; ``where`` is ``file:line`` for the error."""
    if not isinstance(row, dict):
        raise TripleFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise TripleFileError(f"{where}: missing field(s) {', '.join(missing)}")
    for k in FIELDS:
        if not isinstance(row[k], str):
            raise TripleFileError(f"{where}: field {k!r} must be a string, got {row[k]!r}")
    for k in FIELDS:
        if not row[k].strip():
            raise TripleFileError(f"{where}: field {k!r} is empty")
    extra = set(row) - set(FIELDS) - {"meta"}
    if extra:
        raise TripleFileError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise TripleFileError(f"{where}: field 'meta' must be an object, got {meta!r}")
    return Triple(row["context"], row["query"], row["response"], meta)


def check_triple_file(path: str | Path, field: str = "") -> Path:
    """``path`` as a Path; TripleFileError when no such file exists (``field``: the config field
    that named it, for the message)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TripleFileError(f"{path}: triple file not found" + (f" ({field})" if field else ""))
    return path


def utf8_lines(path: Path, error: type[InputError] = InputError) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file (a leading BOM dropped); ``error`` names the
    file, line and byte of the first that is not UTF-8."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{path}:{i}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ) from None


def read_triples(path: str | Path) -> list[Triple]:
    """Read a JSONL triple file (yours or ours; UTF-8, a leading BOM allowed); blank lines are
    skipped.

    Raises TripleFileError naming the file and line of the first malformed line."""
    path = check_triple_file(path)
    out = []
    for i, line in utf8_lines(path, TripleFileError):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TripleFileError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        out.append(parse_triple(row, f"{path}:{i}"))
    if not out:
        raise TripleFileError(f"{path}: no triples in file")
    return out


def content_hash(triples: Iterable[Triple]) -> str:
    """sha256 over the (context, query, response) of every triple, in order."""
    h = hashlib.sha256()
    for t in triples:
        h.update(json.dumps([t.context, t.query, t.response], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
