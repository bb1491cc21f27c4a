"""SQuAD and WikiText as (context, query, response) triples, via ``datasets.load_dataset``.

Every source, hub name or local file, is read by ``datasets.load_dataset`` (the ``json``,
``text`` and ``parquet`` builders for local files, the hub loader for names), so one code
path serves both. Results are filtered by a rule defined here, cached as JSONL under
``cache_dir`` and described by a ``manifest.json`` beside them.

Splits: ``train`` is each data set's own train split; ``test`` is SQuAD's ``validation``
split and WikiText's ``test`` split (as in the paper).

Sources (``DataConfig.source``):

* a hub name, optionally with a config after a colon: ``rajpurkar/squad``,
  ``Salesforce/wikitext:wikitext-103-raw-v1`` (WikiText defaults to that config);
* a local file: used for whichever split is asked;
* a local directory: the split's file is found by name. SQuAD: ``train*.json[l]`` /
  ``train*.parquet`` for train, ``dev*`` / ``valid*`` / ``test*`` for test (e.g. the
  official ``train-v1.1.json`` / ``dev-v1.1.json``). WikiText: ``wiki.train.raw`` /
  ``train.txt`` and ``wiki.test.raw`` / ``test.txt``. A directory without such files is
  handed whole to ``load_dataset`` (a Hugging Face style directory of parquet files,
  e.g. ``train-00000-of-00001.parquet`` / ``validation-...``; point at one config's
  sub-directory when the copy holds several).

SQuAD files may be the official nested JSON (``{"version", "data": [{"title",
"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
"answer_start"}]}]}]}]}``, recognised by a top-level ``"version"`` or ``"data"`` key at the
start of the file) or flat tables (JSON lines / parquet with columns ``id, title, context,
question, answers``).

SQuAD filter (:data:`SQUAD_RULE`): one triple per question, context = the paragraph,
query = the question, response = the first answer's text. A question is dropped by the
first rule it fails: ``empty_question``, ``no_answer``, ``empty_answer``, ``long_answer``
(more than ``max_answer_words`` = 10 words), ``long_context`` (more than
``max_context_chars`` characters), ``duplicate`` (an exact (context, question) pair already
kept). The paper's own filter is unpublished: it keeps 82,031 / 10,380 of the raw 87,599
train / 10,570 validation questions (drops of 6.4% and 1.8%). Ours is a different, explicit
rule; its raw count, per-rule drops and kept count are written to every manifest, so its
counts on the real data can be compared with the paper's once the data is at hand.

WikiText rule (:data:`WIKITEXT_RULE`): lines are grouped into articles (a ``= Title =``
heading starts one; ``= = Section = =`` headings and empty lines are skipped); each
remaining line is a paragraph. The WikiText tokenisation is undone (``@-@``, ``@,@``,
``@.@`` and the spaces around punctuation, brackets and quotes), the paragraph is split
into sentences, and every sentence after the first of its paragraph gives one triple:
context = the preceding sentences of the paragraph (whole sentences, the most recent ones
that fit in ``max_context_chars``); the sentence is cut before its first content word (not
one of :data:`FUNCTION_WORDS`) at or after its middle word (``n // 2``): query = the words
before the cut, response = ``response_words`` (= 1) word(s) from the cut, stripped of
surrounding punctuation, so that greedy-decode accuracy is a meaningful metric (the answer
is never "the" or "of"). Sentences of fewer than ``min_sentence_words`` (= 6) words,
sentences with no content word in their second half, contexts whose
last sentence alone exceeds ``max_context_chars`` and duplicate (context, query) pairs are
dropped. The paper reports 343,586 train / 758 test triples; its counts (about one triple
per 300 tokens of text) suggest non-overlapping passages, whereas this rule makes one
triple per sentence, so it yields more, overlapping, triples; ``limit`` (the config's
``n_train`` / ``n_test``) takes a seeded subset. The counts are recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raymeta.data.triples import Triple, TripleFileError, content_hash, read_triples, write_triples
from raymeta.errors import InputError
from raymeta.paths import looks_local

CACHE_VERSION = 1
SQUAD_MAX_ANSWER_WORDS = 10
WIKITEXT_MIN_SENTENCE_WORDS = 6
WIKITEXT_RESPONSE_WORDS = 1
WIKITEXT_DEFAULT_CONFIG = "wikitext-103-raw-v1"
HF_SPLITS = {
    "squad": {"train": "train", "test": "validation"},
    "wikitext": {"train": "train", "test": "test"},
}

SQUAD_RULE = (
    "One triple per question: context = the paragraph, query = the question, response = the "
    "first answer's text (each stripped of surrounding whitespace). A question is dropped by "
    "the first of these rules it fails, in this order: empty_question: the question is blank; "
    "no_answer: the question has no answer; empty_answer: the first answer's text is blank; "
    "long_answer: the first answer has more than {max_answer_words} whitespace-separated "
    "words; long_context: the paragraph has more than {max_context_chars} characters; "
    "duplicate: the same (context, question) pair (exact strings) was already kept, the first "
    "occurrence in file order being kept."
)
WIKITEXT_RULE = (
    "Lines are stripped; a line '= Title =' starts an article, '= = Section = =' headings "
    "and empty lines are skipped, every other line is a paragraph. WikiText tokenisation is "
    "undone (' @-@ ' -> '-', ' @,@ ' -> ',', ' @.@ ' -> '.', no space before , . ; : ! ? % ) ] "
    "and n't 's 're 've 'll 'd 'm, none after ( [, none inside \" \" pairs). A paragraph is split "
    "into sentences after . ! ? (with closing quotes/brackets) followed by whitespace and an "
    "upper-case letter, digit, quote or bracket, except after a known abbreviation or a "
    "single-capital initial. Each sentence after the first of its paragraph gives one triple "
    "(the first is dropped as first_in_paragraph): context = the most recent preceding "
    "sentences of the paragraph whose ' '-joined length fits in {max_context_chars} "
    "characters; the sentence (n words) is cut before its first content word at or after "
    "word n // 2 (a content word has a letter or digit and is not one of the function words "
    "listed in params.function_words, compared case-insensitively without surrounding "
    "punctuation); query = the words before the cut; response = {response_words} word(s) "
    "from the cut, stripped of surrounding punctuation. Dropped, in this order: "
    "first_in_paragraph; short_sentence: n < {min_sentence_words}; no_content_word: no "
    "content word at or after the middle; long_context: the preceding sentence alone is longer "
    "than {max_context_chars} characters; duplicate: the same (context, query) pair was "
    "already kept."
)


class HFSetError(InputError):
    """A SQuAD/WikiText source is malformed; the message names the file and the problem."""


class SourceNotFound(InputError, FileNotFoundError):
    """A local SQuAD/WikiText source does not exist or holds no data files."""


def missing_source(name: str, problem: str) -> SourceNotFound:
    """The error for a local source ``name``; a relative one says where it was looked for."""
    where = "" if Path(name).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
    return SourceNotFound(f"{name}{where}: {problem}")


@dataclass
class LoadPlan:
    """How ``datasets.load_dataset`` is called for one split, and which local files it reads."""

    path: str
    hf_split: str
    name: str | None = None
    data_files: dict[str, list[str]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    local: bool = False

    def describe(self) -> dict:
        """The call, as recorded in the manifest."""
        return {
            "path": self.path,
            "name": self.name,
            "split": self.hf_split,
            "data_files": self.data_files,
            "kwargs": self.kwargs,
        }

    def where(self) -> str:
        """What error messages name: the local files, else the hub name."""
        return ", ".join(self.files) if self.files else self.path


# --------------------------------------------------------------------------- public


def load_hf_split(
    dataset: str,
    source: str,
    split: str,
    *,
    max_context_chars: int,
    cache_dir: str,
    limit: int = 0,
    seed: int = 0,
    max_answer_words: int = SQUAD_MAX_ANSWER_WORDS,
    min_sentence_words: int = WIKITEXT_MIN_SENTENCE_WORDS,
    response_words: int = WIKITEXT_RESPONSE_WORDS,
) -> list[Triple]:
    """The filtered triples of one split of SQuAD or WikiText (cached; see the module doc).

    ``limit`` > 0 keeps a seeded random subset of that many triples (in their original order).
    Raises SourceNotFound (a FileNotFoundError) naming a missing local path, HFSetError for
    malformed data."""
    check_args(dataset, split, max_context_chars, limit)
    params = filter_params(
        dataset, max_context_chars, max_answer_words, min_sentence_words, response_words
    )
    plan = plan_load(dataset, source, split)
    key = cache_key(dataset, source, split, params, limit, seed, plan)
    out_dir = Path(cache_dir) / "hf_sets" / f"{dataset}-{split}-{key[:16]}"
    cached, problem = read_cache(out_dir)
    if cached is not None:
        return cached
    if problem:
        warnings.warn(f"{out_dir}: {problem}; rebuilding the cache", stacklevel=2)
    rows = load_rows(plan, cache_dir)
    if dataset == "squad":
        triples, stats = squad_triples(rows, plan, params)
    else:
        triples, stats = wikitext_triples(rows, plan, params)
    chosen = take_subset(triples, limit, seed)
    manifest = make_manifest(
        dataset, source, split, plan, params, stats, triples, chosen, limit, seed
    )
    manifest["rebuilt_because"] = problem
    write_cache(out_dir, chosen, manifest)
    return chosen


def read_manifest(cache_dir: str, dataset: str, split: str) -> list[dict]:
    """Every cached manifest of ``dataset``/``split`` under ``cache_dir`` (for reports)."""
    root = Path(cache_dir) / "hf_sets"
    return [
        json.loads(p.read_text()) for p in sorted(root.glob(f"{dataset}-{split}-*/manifest.json"))
    ]


# --------------------------------------------------------------------------- arguments


def check_args(dataset: str, split: str, max_context_chars: int, limit: int) -> None:
    """Reject unknown data sets or splits and nonsensical numbers."""
    if dataset not in HF_SPLITS:
        raise ValueError(f"dataset: {dataset!r} is not one of {sorted(HF_SPLITS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split: {split!r} is not one of ['train', 'test']")
    if max_context_chars <= 0:
        raise ValueError(f"max_context_chars: must be positive, got {max_context_chars}")
    if limit < 0:
        raise ValueError(f"limit: must be >= 0, got {limit}")


def filter_params(
    dataset: str,
    max_context_chars: int,
    max_answer_words: int,
    min_sentence_words: int,
    response_words: int,
) -> dict:
    """The parameters of the data set's filter rule (recorded and part of the cache key)."""
    if dataset == "squad":
        return {"max_context_chars": max_context_chars, "max_answer_words": max_answer_words}
    return {
        "max_context_chars": max_context_chars,
        "min_sentence_words": min_sentence_words,
        "response_words": response_words,
        "function_words": sorted(FUNCTION_WORDS),
    }


def rule_text(dataset: str, params: dict) -> str:
    """The filter rule, with its parameters filled in."""
    return (SQUAD_RULE if dataset == "squad" else WIKITEXT_RULE).format(**params)


# --------------------------------------------------------------------------- sources


def split_source(source: str) -> tuple[str, str | None]:
    """``name:config`` -> (name, config); an existing local path is never split."""
    if not source:
        raise ValueError("source: empty; give a hub name or a local file or directory")
    if Path(source).expanduser().exists() or ":" not in source:
        return source, None
    name, config = source.rsplit(":", 1)
    return name, config or None


def plan_load(dataset: str, source: str, split: str) -> LoadPlan:
    """Decide the ``load_dataset`` call for this split (no data is read)."""
    name, config = split_source(source)
    hf_split = HF_SPLITS[dataset][split]
    path = Path(name).expanduser()
    if path.exists():
        return plan_local(dataset, path.resolve(), config, hf_split, split)
    if looks_local(name):
        raise missing_source(name, f"{dataset} source not found (no such file or directory)")
    if dataset == "wikitext" and config is None and name.rstrip("/").endswith("wikitext"):
        config = WIKITEXT_DEFAULT_CONFIG
    return LoadPlan(path=name, name=config, hf_split=hf_split)


def plan_local(dataset: str, path: Path, config: str | None, hf_split: str, split: str) -> LoadPlan:
    """A local file, a directory with the split's file, or a Hugging Face style directory."""
    file = path if path.is_file() else find_split_file(dataset, path, split)
    if file is None:
        files = sorted(
            str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise missing_source(str(path), f"directory holds no data files for {dataset}")
        return LoadPlan(path=str(path), name=config, hf_split=hf_split, files=files, local=True)
    return plan_file(dataset, file, hf_split)


def find_split_file(dataset: str, directory: Path, split: str) -> Path | None:
    """The one file of ``directory`` named for ``split`` (None: none; error: several)."""
    if dataset == "wikitext":
        names = (
            ["wiki.train.raw", "train.txt"] if split == "train" else ["wiki.test.raw", "test.txt"]
        )
        found = [directory / n for n in names if (directory / n).is_file()]
    else:
        prefixes = ("train",) if split == "train" else ("dev", "valid", "test")
        found = [
            p
            for p in sorted(directory.iterdir())
            if p.is_file()
            and p.name.lower().startswith(prefixes)
            and p.suffix in (".json", ".jsonl", ".parquet")
        ]
    if len(found) > 1:
        raise HFSetError(
            f"{directory}: several {split} files ({', '.join(p.name for p in found)}); name one as source"
        )
    return found[0] if found else None


def plan_file(dataset: str, file: Path, hf_split: str) -> LoadPlan:
    """The builder (json / parquet / text) for one local file."""
    data_files = {hf_split: [str(file)]}
    plan = LoadPlan(
        path="", hf_split=hf_split, data_files=data_files, files=[str(file)], local=True
    )
    if file.suffix == ".parquet":
        plan.path = "parquet"
    elif file.suffix in (".json", ".jsonl"):
        plan.path = "json"
        if dataset == "squad" and is_nested_squad(file):
            plan.kwargs = {"field": "data"}
    elif dataset == "wikitext":
        plan.path = "text"
    else:
        raise HFSetError(f"{file}: a SQuAD file must be .json, .jsonl or .parquet")
    return plan


def is_nested_squad(file: Path) -> bool:
    """True for the official nested format: the file starts with ``{"version"`` or ``{"data"``."""
    with file.open(encoding="utf-8", errors="replace") as f:
        head = f.read(4096)
    return re.match(r'\s*\{\s*"(?:version|data)"\s*:', head) is not None


def fingerprint(plan: LoadPlan) -> list:
    """(path, size, mtime) of every local file the plan reads, so edits invalidate the cache."""
    out = []
    for name in plan.files:
        st = Path(name).stat()
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------- loading


def load_rows(plan: LoadPlan, cache_dir: str):
    """Run ``datasets.load_dataset`` for the plan; errors name the files or the hub name."""
    import datasets  # lazy: keeps ``import raymeta`` light

    hf_cache = str(Path(cache_dir) / "hf_datasets")
    try:
        return datasets.load_dataset(
            plan.path,
            plan.name,
            data_files=plan.data_files,
            split=plan.hf_split,
            cache_dir=hf_cache if plan.local else None,  # hub: the usual HF cache
            **plan.kwargs,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        if plan.kwargs.get("field") == "data":
            raise HFSetError(
                f"{plan.where()}: not a SQuAD JSON file with a top-level 'data' field ({e})"
            ) from e
        hint = (
            ""
            if plan.local
            else " (a hub name needs network access or a local copy in the HF cache)"
        )
        raise HFSetError(
            f"{plan.where()}: datasets.load_dataset failed{hint}: {type(e).__name__}: {e}"
        ) from e


def require(obj: Any, key: str, where: str) -> Any:
    """``obj[key]``, or an HFSetError naming ``where`` and the missing field."""
    if not isinstance(obj, dict) or obj.get(key) is None:
        raise HFSetError(f"{where}: missing field {key!r}")
    return obj[key]


def require_columns(rows, columns: tuple[str, ...], plan: LoadPlan) -> None:
    """Every needed column is there, else an error naming the file and the missing field."""
    for col in columns:
        if col not in rows.column_names:
            raise HFSetError(
                f"{plan.where()}: missing field {col!r} (columns: {', '.join(rows.column_names)})"
            )


# --------------------------------------------------------------------------- SQuAD


def squad_records(rows, plan: LoadPlan):
    """Yield (id, title, context, question, answer texts) from nested or flat SQuAD rows."""
    if "paragraphs" in rows.column_names or plan.kwargs.get("field") == "data":
        yield from nested_records(rows, plan)
        return
    require_columns(rows, ("context", "question", "answers"), plan)
    for i, row in enumerate(rows):
        where = f"{plan.where()}: row {i}"
        answers = answer_texts(require(row, "answers", where), where)
        yield row.get("id"), row.get("title"), row["context"] or "", row["question"] or "", answers


def nested_records(rows, plan: LoadPlan):
    """Flatten the official ``data[].paragraphs[].qas[]`` structure."""
    require_columns(rows, ("paragraphs",), plan)
    for a, article in enumerate(rows):
        for p, para in enumerate(require(article, "paragraphs", f"{plan.where()}: data[{a}]")):
            where = f"{plan.where()}: data[{a}].paragraphs[{p}]"
            context = require(para, "context", where)
            for q, qa in enumerate(require(para, "qas", where)):
                qwhere = f"{where}.qas[{q}]"
                question = require(qa, "question", qwhere)
                answers = answer_texts(require(qa, "answers", qwhere), qwhere)
                yield qa.get("id"), article.get("title"), context, question, answers


def answer_texts(answers: Any, where: str) -> list[str]:
    """Answer texts from a list of ``{"text", ...}`` or from ``{"text": [...]}`` columns."""
    if isinstance(answers, dict):
        return [str(t) for t in require(answers, "text", f"{where}.answers")]
    return [str(require(a, "text", f"{where}.answers[{i}]")) for i, a in enumerate(answers)]


def squad_verdict(context: str, question: str, answers: list[str], params: dict) -> str | None:
    """The first filter rule the question fails (None: kept, unless a duplicate)."""
    if not question:
        return "empty_question"
    if not answers:
        return "no_answer"
    if not answers[0].strip():
        return "empty_answer"
    if len(answers[0].split()) > params["max_answer_words"]:
        return "long_answer"
    if len(context) > params["max_context_chars"]:
        return "long_context"
    return None


def squad_triples(rows, plan: LoadPlan, params: dict) -> tuple[list[Triple], dict]:
    """Apply the SQuAD rule; returns the triples and the counts for the manifest."""
    drops = dict.fromkeys(
        ["empty_question", "no_answer", "empty_answer", "long_answer", "long_context", "duplicate"],
        0,
    )
    seen: set[tuple[str, str]] = set()
    out, raw = [], 0
    for qid, title, context, question, answers in squad_records(rows, plan):
        raw += 1
        context, question = context.strip(), question.strip()
        verdict = squad_verdict(context, question, answers, params)
        if verdict is None and (context, question) in seen:
            verdict = "duplicate"
        if verdict:
            drops[verdict] += 1
            continue
        seen.add((context, question))
        meta = {k: v for k, v in (("id", qid), ("title", title)) if v is not None}
        out.append(Triple(context, question, answers[0].strip(), meta))
    return out, {"raw_count": raw, "drops": drops}


# --------------------------------------------------------------------------- WikiText

_DETOK = [
    (re.compile(r"\s@([-,.])@\s"), r"\1"),
    (re.compile(r" ([,.;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),
    (re.compile(r"\s+"), " "),
]
_BOUNDARY = re.compile(r"([.!?][\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")
ABBREVIATIONS = frozenset(
    "Mr Mrs Ms Dr St Mt Jr Sr No vs lit Gen Col Lt Capt Sgt Rev Fr Prof Inc Co Ltd Bros ca c "
    "e.g i.e U.S U.K Jan Feb Mar Apr Aug Sept Sep Oct Nov Dec".split()
)
_PUNCT = "\"'()[]{},.;:!?"
FUNCTION_WORDS = frozenset(
    "a an the and or but nor so yet of in on at to for from by with as into onto upon about "
    "over under after before between through during without within than that this these those "
    "it its it's he him his she her hers they them their theirs we us our you your i me my "
    "is are was were be been being am has have had do does did will would shall should can "
    "could may might must not no there here which who whom whose what when where while if "
    "then also only all any each both such".split()
)


def detokenize(line: str) -> str:
    """Undo WikiText's tokenisation: ``1 @,@ 200 @-@ metre , ( a )`` -> ``1,200-metre, (a)``."""
    text = f" {line.strip()} "
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text.strip()


def heading_level(line: str) -> int:
    """1 for ``= Title =``, 2 for ``= = Section = =``, ...; 0 for a non-heading line."""
    s = line.strip()
    m = re.fullmatch(r"((?:= )+)(.*?)((?: =)+)", s)
    if not m or not m.group(2).strip():
        return 0
    return m.group(1).count("=")


def split_sentences(text: str) -> list[str]:
    """Sentences of a detokenised paragraph (abbreviations and initials do not end one)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        piece = text[start : m.end(1)]
        if piece.endswith(".") and is_abbreviation(piece):
            continue
        out.append(piece.strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def is_abbreviation(piece: str) -> bool:
    """Does ``piece`` end with a known abbreviation or a single-letter initial plus '.'?"""
    words = piece.split()
    last = words[-1].rstrip(".").lstrip("\"'([") if words else ""
    return last in ABBREVIATIONS or (len(last) == 1 and last.isupper())


def wikitext_paragraphs(lines) -> tuple[list[tuple[str, list[str]]], dict]:
    """(article title, sentences) for every paragraph, and the line counts."""
    stats = {"lines": 0, "empty_lines": 0, "headings": 0, "articles": 0, "paragraphs": 0}
    title, out = "", []
    for line in lines:
        stats["lines"] += 1
        line = (line or "").strip()
        if not line:
            stats["empty_lines"] += 1
            continue
        level = heading_level(line)
        if level:
            stats["headings"] += 1
            if level == 1:
                stats["articles"] += 1
                title = detokenize(line.strip("= "))
            continue
        stats["paragraphs"] += 1
        out.append((title, split_sentences(detokenize(line))))
    return out, stats


def fit_context(previous: list[str], max_chars: int) -> str | None:
    """The most recent whole sentences whose joined length fits in ``max_chars``."""
    kept: list[str] = []
    size = -1
    for sentence in reversed(previous):
        if size + 1 + len(sentence) > max_chars:
            break
        kept.insert(0, sentence)
        size += 1 + len(sentence)
    return " ".join(kept) if kept else None


def cut_sentence(sentence: str, params: dict) -> tuple[str, str] | str:
    """(query, response) of a sentence, or the name of the rule that drops it.

    The cut is the first word at or after the middle (``n // 2``) that is a content word:
    it has a letter or digit and is not one of :data:`FUNCTION_WORDS`."""
    words = sentence.split()
    if len(words) < params["min_sentence_words"]:
        return "short_sentence"
    cut = next((k for k in range(len(words) // 2, len(words)) if is_content_word(words[k])), None)
    if cut is None:
        return "no_content_word"
    response = " ".join(words[cut : cut + params["response_words"]]).strip(_PUNCT)
    return " ".join(words[:cut]), response


def is_content_word(word: str) -> bool:
    """A word with a letter or digit that is not a function word (case-insensitive)."""
    bare = word.strip(_PUNCT)
    return any(c.isalnum() for c in bare) and bare.lower() not in FUNCTION_WORDS


def wikitext_triples(rows, plan: LoadPlan, params: dict) -> tuple[list[Triple], dict]:
    """Apply the WikiText rule; returns the triples and the counts for the manifest."""
    require_columns(rows, ("text",), plan)
    paragraphs, line_stats = wikitext_paragraphs(rows["text"])
    drops = dict.fromkeys(
        ["first_in_paragraph", "short_sentence", "no_content_word", "long_context", "duplicate"], 0
    )
    seen: set[tuple[str, str]] = set()
    out, raw = [], 0
    for p, (title, sentences) in enumerate(paragraphs):
        for i in range(len(sentences)):
            raw += 1
            verdict, triple = wikitext_triple(sentences, i, params, seen)
            if verdict:
                drops[verdict] += 1
                continue
            triple.meta.update({"article": title, "paragraph": p, "sentence": i})
            seen.add((triple.context, triple.query))
            out.append(triple)
    return out, {"raw_count": raw, "drops": drops, "lines": line_stats}


def wikitext_triple(
    sentences: list[str], i: int, params: dict, seen: set
) -> tuple[str | None, Triple | None]:
    """The triple of sentence ``i`` of a paragraph, or the rule that drops it."""
    if i == 0:
        return "first_in_paragraph", None
    cut = cut_sentence(sentences[i], params)
    if isinstance(cut, str):
        return cut, None
    context = fit_context(sentences[:i], params["max_context_chars"])
    if context is None:
        return "long_context", None
    if (context, cut[0]) in seen:
        return "duplicate", None
    return None, Triple(context, cut[0], cut[1], {})


# --------------------------------------------------------------------------- cache


def take_subset(triples: list[Triple], limit: int, seed: int) -> list[Triple]:
    """A seeded random subset of ``limit`` triples in their original order (0 = all)."""
    if limit <= 0 or limit >= len(triples):
        return list(triples)
    picked = sorted(random.Random(seed).sample(range(len(triples)), limit))
    return [triples[i] for i in picked]


def cache_key(
    dataset: str, source: str, split: str, params: dict, limit: int, seed: int, plan: LoadPlan
) -> str:
    """sha256 of everything that determines the cached triples."""
    spec = {
        "version": CACHE_VERSION,
        "dataset": dataset,
        "source": source,
        "split": split,
        "params": params,
        "limit": limit,
        "seed": seed,
        "load": plan.describe(),
        "files": fingerprint(plan),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def make_manifest(
    dataset: str,
    source: str,
    split: str,
    plan: LoadPlan,
    params: dict,
    stats: dict,
    kept: list[Triple],
    chosen: list[Triple],
    limit: int,
    seed: int,
) -> dict:
    """What the cache directory holds and how it was made."""
    return {
        "version": CACHE_VERSION,
        "dataset": dataset,
        "source": source,
        "split": split,
        "hf_split": plan.hf_split,
        "load_dataset": plan.describe(),
        "filter": {"rule": rule_text(dataset, params), "params": params},
        "raw_count": stats["raw_count"],
        "drops": stats["drops"],
        "kept_count": len(kept),
        "line_stats": stats.get("lines"),
        "limit": limit,
        "seed": seed,
        "count": len(chosen),
        "content_hash": content_hash(chosen),
        "triples_file": "triples.jsonl",
        "created": datetime.now(timezone.utc).isoformat(),
    }


def read_cache(out_dir: Path) -> tuple[list[Triple] | None, str | None]:
    """(triples, None) if the cache is valid; (None, why) if it exists but is broken."""
    manifest_path, triples_path = out_dir / "manifest.json", out_dir / "triples.jsonl"
    if not manifest_path.is_file():
        return None, None
    try:
        manifest = json.loads(manifest_path.read_text())
        triples = read_triples(triples_path) if manifest.get("count") else []
    except (json.JSONDecodeError, TripleFileError) as e:
        return None, f"cached data unreadable ({e})"
    got = content_hash(triples)
    if got != manifest.get("content_hash"):
        return (
            None,
            f"cached triples do not match the manifest (hash {got[:12]} != {str(manifest.get('content_hash'))[:12]})",
        )
    return triples, None


def write_cache(out_dir: Path, triples: list[Triple], manifest: dict) -> None:
    """Write the triples, then the manifest (atomically), so a manifest implies its data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_triples(out_dir / "triples.jsonl", triples)
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / "manifest.json")
