"""SQuAD / WikiText triples through datasets.load_dataset, on the offline fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raymeta.data.fixtures import SQUAD_TRAIN, write_squad_fixture, write_wikitext_fixture
from raymeta.data.hf_sets import (
    HFSetError,
    detokenize,
    load_hf_split,
    plan_load,
    read_manifest,
    split_sentences,
)
from raymeta.data.triples import Triple, content_hash

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory) -> Path:
    return write_squad_fixture(tmp_path_factory.mktemp("squad"))


@pytest.fixture(scope="module")
def wiki_dir(tmp_path_factory) -> Path:
    return write_wikitext_fixture(tmp_path_factory.mktemp("wikitext"))


def load(dataset, source, split, cache, **kw):
    kw.setdefault("max_context_chars", 2000)
    return load_hf_split(dataset, str(source), split, cache_dir=str(cache), **kw)


def only_manifest(cache, dataset, split) -> dict:
    (manifest,) = read_manifest(str(cache), dataset, split)
    return manifest


# --------------------------------------------------------------------------- SQuAD


def test_squad_train_triples_and_drop_counts(squad_dir, tmp_path):
    triples = load("squad", squad_dir, "train", tmp_path)
    assert len(triples) == 36
    first = triples[0]
    assert first.query == "Who designed the Harrowgate Lighthouse?"
    assert first.response == "Miriam Todd"
    assert first.context.startswith("The Harrowgate Lighthouse stands on a granite spur")
    assert first.meta == {"id": "tr0001", "title": "Harrowgate_Lighthouse"}
    queries = [t.query for t in triples]
    assert "What colour is Velmar inside?" not in queries  # empty answer
    assert "What was Orrin Vale's favourite instrument?" not in queries  # no answer
    assert "What happened after the last keeper left?" not in queries  # long answer
    assert queries.count("Which animal's milk is used to make Velmar?") == 1  # duplicate
    assert not any("Tessly" in t.context for t in triples)  # long context
    m = only_manifest(tmp_path, "squad", "train")
    assert m["raw_count"] == 42
    assert m["drops"] == {
        "empty_question": 0,
        "no_answer": 1,
        "empty_answer": 1,
        "long_answer": 1,
        "long_context": 2,
        "duplicate": 1,
    }
    assert m["kept_count"] == m["count"] == 36
    assert m["content_hash"] == content_hash(triples)
    assert m["source"] == str(squad_dir) and m["split"] == "train" and m["hf_split"] == "train"
    assert m["filter"]["params"] == {"max_context_chars": 2000, "max_answer_words": 10}
    assert "more than 10 whitespace-separated words" in m["filter"]["rule"]
    assert "more than 2000 characters" in m["filter"]["rule"]
    assert m["load_dataset"]["path"] == "json" and m["load_dataset"]["kwargs"] == {"field": "data"}
    assert m["created"] and m["rebuilt_because"] is None


def test_squad_test_is_validation_with_first_answer(squad_dir, tmp_path):
    triples = load("squad", squad_dir, "test", tmp_path)
    assert len(triples) == 19
    by_query = {t.query: t.response for t in triples}
    assert by_query["Who coached Ida Brennan?"] == "her father"
    assert by_query["Where does the Marrow Pass Railway start?"] == "Ketter"
    assert "Where did Ida Brennan train?" not in by_query  # first answer blank
    m = only_manifest(tmp_path, "squad", "test")
    assert m["hf_split"] == "validation" and m["raw_count"] == 21
    assert m["drops"]["empty_answer"] == 1 and m["drops"]["duplicate"] == 1
    assert sum(m["drops"].values()) == 2


def test_squad_context_limit_is_a_parameter(squad_dir, tmp_path):
    triples = load("squad", squad_dir, "train", tmp_path, max_context_chars=420)
    m = only_manifest(tmp_path, "squad", "train")
    expected = sum(
        1
        for _, context, qas in SQUAD_TRAIN
        for _, answers in qas
        if len(context) > 420 and answers and answers[0].strip() and len(answers[0].split()) <= 10
    )
    assert m["drops"]["long_context"] == expected > 2
    assert all(len(t.context) <= 420 for t in triples)
    assert m["raw_count"] == len(triples) + sum(m["drops"].values())


def flat_rows(fixture_file: Path) -> list[dict]:
    """The nested SQuAD file as Hugging Face's flat rows."""
    rows = []
    for article in json.loads(fixture_file.read_text())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = {
                    "text": [a["text"] for a in qa["answers"]],
                    "answer_start": [a["answer_start"] for a in qa["answers"]],
                }
                rows.append(
                    {
                        "id": qa["id"],
                        "title": article["title"],
                        "context": para["context"],
                        "question": qa["question"],
                        "answers": answers,
                    }
                )
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_squad_flat_format_matches_nested(squad_dir, tmp_path, fmt):
    import datasets

    flat = tmp_path / "flat"
    flat.mkdir()
    for name, split in (("train-v1.1.json", "train"), ("dev-v1.1.json", "validation")):
        ds = datasets.Dataset.from_list(flat_rows(squad_dir / name))
        target = flat / f"{split}.{fmt}"
        ds.to_json(target) if fmt == "jsonl" else ds.to_parquet(target)
    for split in ("train", "test"):
        nested = load("squad", squad_dir, split, tmp_path / "c1")
        got = load("squad", flat, split, tmp_path / "c2")
        assert content_hash(got) == content_hash(nested)
        assert got[0].meta == nested[0].meta


# --------------------------------------------------------------------------- WikiText


def test_wikitext_test_triples(wiki_dir, tmp_path):
    triples = load("wikitext", wiki_dir, "test", tmp_path)
    assert [(t.query, t.response) for t in triples] == [
        ("It was first lit in 1872 and was", "designed"),
        ("Its light can be seen from", "40.5"),
        ("The last principal keeper was Walter Innes, who had", "served"),
    ]
    assert triples[0].context == (
        "The Corran Lighthouse is a 46-metre tower on the southern cape of the Strait of Corran."
    )
    assert triples[1].context.endswith(
        "It was first lit in 1872 and was designed by the engineer Thomas Reid."
    )
    assert triples[2].meta == {"article": "Corran Lighthouse", "paragraph": 1, "sentence": 1}
    m = only_manifest(tmp_path, "wikitext", "test")
    assert m["hf_split"] == "test" and m["raw_count"] == 7
    assert m["drops"] == {
        "first_in_paragraph": 3,
        "short_sentence": 1,
        "no_content_word": 0,
        "long_context": 0,
        "duplicate": 0,
    }
    assert m["line_stats"] == {
        "lines": 11,
        "empty_lines": 6,
        "headings": 2,
        "articles": 1,
        "paragraphs": 3,
    }
    assert m["filter"]["params"]["min_sentence_words"] == 6
    assert "first_in_paragraph" in m["filter"]["rule"]


def test_wikitext_train_detokenised(wiki_dir, tmp_path):
    triples = load("wikitext", wiki_dir, "train", tmp_path)
    assert len(triples) == 13
    assert not any("@" in t.context + t.query + t.response for t in triples)
    pairs = {(t.query, t.response) for t in triples}
    assert ("Work on the bridge began in", "1926") in pairs
    assert ("In 1915 she was requisitioned by the", "navy") in pairs
    contexts = " ".join(t.context for t in triples)
    assert "a 1,200-metre suspension bridge" in contexts
    assert "St. Brede, and each weighs about 30,000 tonnes." in contexts
    assert "the engineer J. R. Carver." in contexts
    assert "(rather than rivets)" in contexts
    m = only_manifest(tmp_path, "wikitext", "train")
    assert m["raw_count"] == 21 and m["drops"]["first_in_paragraph"] == 7
    assert m["drops"]["short_sentence"] == 1  # "The cost was high."


def test_wikitext_context_limit_drops(wiki_dir, tmp_path):
    triples = load("wikitext", wiki_dir, "test", tmp_path, max_context_chars=80)
    m = only_manifest(tmp_path, "wikitext", "test")
    assert m["drops"]["long_context"] == 1  # the 86-character first sentence
    assert all(len(t.context) <= 80 for t in triples)


def test_wikitext_txt_names_and_single_file(wiki_dir, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.txt").write_text((wiki_dir / "wiki.train.raw").read_text())
    (plain / "test.txt").write_text((wiki_dir / "wiki.test.raw").read_text())
    reference = load("wikitext", wiki_dir, "test", tmp_path / "c0")
    assert load("wikitext", plain, "test", tmp_path / "c1") == reference
    assert load("wikitext", wiki_dir / "wiki.test.raw", "test", tmp_path / "c2") == reference


def test_detokenize_and_sentences():
    line = ' The 1 @,@ 200 @-@ metre span ( in 2 @.@ 5 years ) , called " the harp " , is Fenwick \'s . '
    assert (
        detokenize(line) == 'The 1,200-metre span (in 2.5 years), called "the harp", is Fenwick\'s.'
    )
    text = 'Built by Dr. Holt in St. Ives. It opened in 1931! J. R. Carver said so. "Yes." Done.'
    assert split_sentences(text) == [
        "Built by Dr. Holt in St. Ives.",
        "It opened in 1931!",
        "J. R. Carver said so.",
        '"Yes."',
        "Done.",
    ]


# --------------------------------------------------------------------------- cache


def test_cache_reused_then_rebuilt_when_tampered(squad_dir, tmp_path):
    first = load("squad", squad_dir, "train", tmp_path)
    created = only_manifest(tmp_path, "squad", "train")["created"]
    assert load("squad", squad_dir, "train", tmp_path) == first
    assert only_manifest(tmp_path, "squad", "train")["created"] == created

    (cached,) = (tmp_path / "hf_sets").glob("squad-train-*/triples.jsonl")
    cached.write_text(cached.read_text().replace("Miriam Todd", "Someone Else"))
    with pytest.warns(UserWarning, match="do not match the manifest"):
        again = load("squad", squad_dir, "train", tmp_path)
    assert again == first
    m = only_manifest(tmp_path, "squad", "train")
    assert m["created"] != created
    assert "do not match" in m["rebuilt_because"]
    assert m["content_hash"] == content_hash(again)


def test_limit_takes_seeded_subset(squad_dir, tmp_path):
    full = load("squad", squad_dir, "train", tmp_path / "full")
    a = load("squad", squad_dir, "train", tmp_path / "a", limit=5, seed=1)
    b = load("squad", squad_dir, "train", tmp_path / "b", limit=5, seed=1)
    c = load("squad", squad_dir, "train", tmp_path / "a", limit=5, seed=2)
    assert a == b and len(a) == 5 and a != c
    positions = [full.index(t) for t in a]
    assert positions == sorted(positions)
    manifests = read_manifest(str(tmp_path / "a"), "squad", "train")
    assert len(manifests) == 2  # one cache entry per (limit, seed)
    m = next(m for m in manifests if m["seed"] == 1)
    assert m["limit"] == 5 and m["count"] == 5 and m["kept_count"] == 36
    assert m["content_hash"] == content_hash(a)


# --------------------------------------------------------------------------- errors


def test_missing_source_names_path(tmp_path):
    missing = tmp_path / "nope" / "squad"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load("squad", missing, "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="examples/data/absent"):
        load("wikitext", "examples/data/absent", "train", tmp_path)


def test_squad_missing_field_names_file(squad_dir, tmp_path):
    data = json.loads((squad_dir / "train-v1.1.json").read_text())
    del data["data"][1]["paragraphs"][0]["qas"][2]["question"]
    bad = tmp_path / "train-bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(
        HFSetError,
        match=r"train-bad\.json.*data\[1\]\.paragraphs\[0\]\.qas\[2\]: missing field 'question'",
    ):
        load("squad", bad, "train", tmp_path)

    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"id": "1", "context": "c", "question": "q?"}) + "\n")
    with pytest.raises(HFSetError, match=r"flat\.jsonl: missing field 'answers'"):
        load("squad", flat, "train", tmp_path)


def test_wrong_split_or_dataset(squad_dir, tmp_path):
    with pytest.raises(ValueError, match="split"):
        load("squad", squad_dir, "validation", tmp_path)
    with pytest.raises(ValueError, match="dataset"):
        load("imdb", squad_dir, "train", tmp_path)


def test_hub_names_are_planned_without_network():
    plan = plan_load("wikitext", "Salesforce/wikitext", "test")
    assert (plan.path, plan.name, plan.hf_split, plan.local) == (
        "Salesforce/wikitext",
        "wikitext-103-raw-v1",
        "test",
        False,
    )
    plan = plan_load("wikitext", "Salesforce/wikitext:wikitext-2-raw-v1", "train")
    assert (plan.path, plan.name) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    plan = plan_load("squad", "rajpurkar/squad", "test")
    assert (plan.path, plan.name, plan.hf_split) == ("rajpurkar/squad", None, "validation")


# --------------------------------------------------------------------------- misc


def test_committed_examples_match_fixtures(tmp_path):
    fresh_squad = write_squad_fixture(tmp_path / "squad")
    fresh_wiki = write_wikitext_fixture(tmp_path / "wiki")
    for fresh, committed in ((fresh_squad, "squad_tiny"), (fresh_wiki, "wikitext_tiny")):
        for f in sorted(fresh.iterdir()):
            assert (ROOT / "examples/data" / committed / f.name).read_text() == f.read_text(), (
                f.name
            )


def test_examples_load(tmp_path):
    assert len(load("squad", ROOT / "examples/data/squad_tiny", "test", tmp_path)) == 19
    assert isinstance(
        load("wikitext", ROOT / "examples/data/wikitext_tiny", "test", tmp_path)[0], Triple
    )


def test_import_is_light():
    code = (
        "import sys, raymeta.data.hf_sets, raymeta.data.fixtures; print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
