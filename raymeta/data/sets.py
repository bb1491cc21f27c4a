"""One entry point for every task set: ``load_task_set(DataConfig) -> (train, test)``."""

from __future__ import annotations

import json
from pathlib import Path

from raymeta.data import generate
from raymeta.data.triples import (
    Triple,
    check_triple_file,
    content_hash,
    read_triples,
    write_triples,
)
from raymeta.errors import InputError

HELD_OUT_FRACTION = 10
"""A single jsonl file holds out its last 1/HELD_OUT_FRACTION (at least one triple) as test."""


def load_task_set(data) -> tuple[list[Triple], list[Triple]]:
    """Train and test triples of ``data`` (a DataConfig); InputError if either is empty.

    Generated sets are produced from the seed; SQuAD/WikiText go through
    ``datasets.load_dataset`` with a recorded filter (raymeta.data.hf_sets); ``jsonl``
    reads your own triple files ``data.source = TRAIN.jsonl[,TEST.jsonl]`` (without a
    test file, the file's last 10%, at most ``n_test``, are held out)."""
    train, test = read_task_set(data)
    check_not_empty(data, train, "training")
    check_not_empty(data, test, "test")
    return train, test


def read_task_set(data) -> tuple[list[Triple], list[Triple]]:
    """Train and test triples of ``data`` as its source gives them (possibly empty)."""
    if data.dataset in generate.CONTEXTS:
        return generate.generate(data.dataset, data.n_train, data.n_test, data.seed)
    if data.dataset in ("squad", "wikitext"):
        from raymeta.data.hf_sets import load_hf_split

        def split(name: str, limit: int) -> list[Triple]:
            return load_hf_split(
                data.dataset,
                data.source,
                name,
                max_context_chars=data.max_context_chars,
                cache_dir=data.cache_dir,
                limit=limit,
                seed=data.seed,
            )

        return split("train", data.n_train), split("test", data.n_test)
    if data.dataset == "jsonl":
        return own_triples(data)
    raise InputError(f"data.dataset: unknown data set {data.dataset!r}")


def describe_source(data) -> str:
    """Where the triples of ``data`` came from, for error messages."""
    if data.dataset in generate.CONTEXTS:
        return f"dataset {data.dataset}, generated with seed {data.seed}"
    where = f"dataset {data.dataset}, source {data.source}"
    if data.dataset in ("squad", "wikitext"):
        where += f", after the max_context_chars={data.max_context_chars} filter"
    return where


def check_not_empty(data, triples: list[Triple], role: str) -> None:
    """Raise InputError naming the data set when its ``role`` (training/test) split is empty."""
    if not triples:
        raise InputError(f"data: 0 {role} triples ({describe_source(data)})")


def jsonl_files(source: str) -> list[str]:
    """The files of ``data.source = TRAIN.jsonl[,TEST.jsonl]`` (InputError if malformed)."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    if not parts or len(parts) > 2:
        raise InputError(f"data.source: expected TRAIN.jsonl[,TEST.jsonl], got {source!r}")
    return parts


def check_source(data) -> None:
    """Raise InputError for a jsonl ``data.source`` naming a file that does not exist or holds a
    malformed line, or a local SQuAD / WikiText source that does not exist or holds no file for
    a split (checked before a run starts, so that no MLflow run is opened for it)."""
    if data.dataset in ("squad", "wikitext"):
        from raymeta.data.hf_sets import HF_SPLITS, plan_load

        for split in HF_SPLITS[data.dataset]:
            plan_load(data.dataset, data.source, split)  # reads no data; a hub name passes
        return
    if data.dataset != "jsonl":
        return
    for path in jsonl_files(data.source):
        read_triples(check_triple_file(path, "data.source"))


def own_triples(data) -> tuple[list[Triple], list[Triple]]:
    """Triples of ``data.source = TRAIN.jsonl[,TEST.jsonl]``, capped at n_train / n_test."""
    parts = jsonl_files(data.source)
    train = read_triples(parts[0])
    if len(parts) == 2:
        test = read_triples(parts[1])
    else:
        train, test = hold_out(train, parts[0], data.n_test)
    if data.n_train:
        train = train[: data.n_train]
    if data.n_test:
        test = test[: data.n_test]
    return train, test


def hold_out(triples: list[Triple], path: str, n_test: int) -> tuple[list[Triple], list[Triple]]:
    """Split one file's triples: the last 10% (at least 1; at most ``n_test`` unless 0) are test."""
    k = max(1, len(triples) // HELD_OUT_FRACTION)
    if n_test:
        k = min(k, n_test)
    if k >= len(triples):
        raise InputError(
            f"data.source: {path} holds {len(triples)} triple(s), too few to hold out a test "
            "set; give a test file too (data.source=TRAIN.jsonl,TEST.jsonl)"
        )
    cap = f", at most data.n_test={n_test}" if n_test else ""
    print(
        f"[data] held out the last {k} of the {len(triples)} triples in {path} as the test set "
        f"({100 // HELD_OUT_FRACTION}% of the file{cap}; data.source=TRAIN.jsonl,TEST.jsonl chooses them)",
        flush=True,
    )
    return triples[:-k], triples[-k:]


def save_task_set(out_dir: str | Path, data, train, test) -> dict:
    """Write ``train.jsonl``/``test.jsonl`` and a manifest (source, counts, hashes)."""
    out = Path(out_dir)
    write_triples(out / "train.jsonl", train)
    write_triples(out / "test.jsonl", test)
    manifest = {
        "dataset": data.dataset,
        "source": data.source or "generated",
        "seed": data.seed,
        "counts": {"train": len(train), "test": len(test)},
        "hash": {"train": content_hash(train), "test": content_hash(test)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
