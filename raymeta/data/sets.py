"""One entry point for every task set: ``load_task_set(DataConfig) -> (train, test)``."""

from __future__ import annotations

import json
from pathlib import Path

from raymeta.data import generate
from raymeta.data.triples import Triple, content_hash, read_triples, write_triples


def load_task_set(data) -> tuple[list[Triple], list[Triple]]:
    """Train and test triples of ``data`` (a DataConfig).

    Generated sets are produced from the seed; SQuAD/WikiText go through
    ``datasets.load_dataset`` with a recorded filter (raymeta.data.hf_sets); ``jsonl``
    reads your own triple files ``data.source = TRAIN.jsonl[,TEST.jsonl]`` (without a
    test file, the last ``n_test`` training triples are held out)."""
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
    raise ValueError(f"data.dataset: unknown data set {data.dataset!r}")


def own_triples(data) -> tuple[list[Triple], list[Triple]]:
    parts = [p.strip() for p in data.source.split(",") if p.strip()]
    if not parts or len(parts) > 2:
        raise ValueError(f"data.source: expected TRAIN.jsonl[,TEST.jsonl], got {data.source!r}")
    train = read_triples(parts[0])
    if len(parts) == 2:
        test = read_triples(parts[1])
    else:
        k = data.n_test or max(1, len(train) // 10)
        if k >= len(train):
            raise ValueError(f"data.n_test: {k} leaves no training triples in {parts[0]}")
        train, test = train[:-k], train[-k:]
    if data.n_train:
        train = train[: data.n_train]
    if data.n_test:
        test = test[: data.n_test]
    return train, test


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
