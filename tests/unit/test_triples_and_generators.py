"""Triples, JSONL files (with errors that name file and line) and the generated sets."""

import json

import pytest

from raymeta.config import DataConfig
from raymeta.data import generate
from raymeta.data.sets import load_task_set
from raymeta.data.triples import Triple, TripleFileError, content_hash, read_triples, write_triples


def test_jsonl_round_trip(tmp_path):
    ts = [Triple("c1", "q1", "r1", {"k": 1}), Triple("c2", "q2", "r2")]
    assert write_triples(tmp_path / "t.jsonl", ts) == 2
    back = read_triples(tmp_path / "t.jsonl")
    assert back == ts and back[0].meta == {"k": 1}
    assert content_hash(back) == content_hash(ts)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not valid JSON"),
        ('{"context": "c", "query": "q"}', "missing field(s) response"),
        ('{"context": "c", "query": "q", "response": 3}', "'response' must be a string"),
        ('{"context": "c", "query": "", "response": "r"}', "'query' is empty"),
        ('{"context": " ", "query": "q", "response": "r"}', "'context' is empty"),
        ('["c", "q", "r"]', "expected a JSON object"),
        ('{"context": "c", "query": "q", "response": "r", "extra": 1}', "unknown field(s) extra"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, line, problem):
    p = tmp_path / "mine.jsonl"
    good = json.dumps({"context": "c", "query": "q", "response": "r"})
    p.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(TripleFileError) as e:
        read_triples(p)
    assert f"{p}:3" in str(e.value) and problem in str(e.value)


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    good = json.dumps({"context": "c", "query": "q", "response": "r"})
    bad = json.dumps({"context": "Café", "query": "q", "response": "r"}, ensure_ascii=False)
    p.write_bytes(f"{good}\n".encode() + f"{bad}\n".encode("latin-1"))
    with pytest.raises(TripleFileError, match=rf"{p}:2: not UTF-8 \(byte 0xe9 at column 17\)"):
        read_triples(p)


def test_a_leading_byte_order_mark_is_allowed(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_text(json.dumps({"context": "c", "query": "q", "response": "r"}) + "\n", "utf-8-sig")
    assert read_triples(p) == [Triple("c", "q", "r")]


def test_bring_your_own_triples(tmp_path):
    rows = [Triple(f"c{i}", f"q{i}", f"r{i}") for i in range(30)]
    write_triples(tmp_path / "own.jsonl", rows)
    train, test = load_task_set(
        DataConfig(dataset="jsonl", source=str(tmp_path / "own.jsonl"), n_train=0, n_test=3)
    )
    assert train == rows[:27] and test == rows[27:]


@pytest.mark.parametrize("dataset", ["character_descriptions", "reversal_curse"])
def test_generated_sets(dataset):
    train, test = generate.generate(dataset, 300, 60, seed=3)
    assert (len(train), len(test)) == (300, 60)
    assert generate.generate(dataset, 300, 60, seed=3) == (train, test)  # deterministic
    assert generate.generate(dataset, 300, 60, seed=4)[0] != train
    train_names = {t.response for t in train}
    train_descs = {t.meta["description"] for t in train}
    assert len(train_names) == 300 and len(train_descs) == 300  # unique facts
    assert not train_names & {t.response for t in test}  # no test fact in training
    assert not train_descs & {t.meta["description"] for t in test}
    assert not any(t.meta["heldout_query"] for t in train)
    assert any(t.meta["heldout_query"] for t in test)
    for t in train + test:
        d, n = t.meta["description"], t.response
        assert d in t.context and d in t.query and n in t.context and n not in t.query
        if dataset == "character_descriptions":
            assert t.context.index(d) < t.context.index(n)  # description, then the name
        else:
            assert t.context.index(n) < t.context.index(d)  # the name first


def test_default_sizes():
    train, test = generate.generate("character_descriptions")
    assert (len(train), len(test)) == (5000, 500)


def test_heldout_query_templates_use_only_words_of_the_training_queries():
    import re

    words = set(re.findall(r"\w+|[^\w\s]", " ".join(generate.QUERIES).replace("{d}", "")))
    for t in generate.HELDOUT_QUERIES:
        assert t not in generate.QUERIES
        assert set(re.findall(r"\w+|[^\w\s]", t.replace("{d}", ""))) <= words
