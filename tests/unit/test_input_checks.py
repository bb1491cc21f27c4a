"""Bad or too small inputs stop early with an InputError naming the field / file / value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raymeta.config import DataConfig, EvalConfig, load_config
from raymeta.data.sets import load_task_set, read_task_set
from raymeta.data.tasks import check_task_count
from raymeta.data.triples import Triple, write_triples
from raymeta.errors import InputError
from raymeta.evaluate import eval_triples, evaluate, normalise, partners
from raymeta.pipeline import run_pipeline
from raymeta.pretrain import tiny_cache_key

SQUAD = "examples/data/squad_tiny"


def facts(n: int, word: str = "alpha") -> list[Triple]:
    """``n`` distinct triples mentioning ``word``."""
    return [
        Triple(f"River {i} is called {word}{i}.", f"River {i} is called", f"{word}{i}")
        for i in range(n)
    ]


def squad(tmp_path, max_context_chars: int) -> DataConfig:
    return DataConfig(
        dataset="squad",
        source=SQUAD,
        n_train=0,
        n_test=0,
        max_context_chars=max_context_chars,
        cache_dir=str(tmp_path / "data"),
    )


# A: the tiny model's cache key follows the triples' content


def test_tiny_cache_key_follows_the_triple_content(tmp_path):
    path = tmp_path / "mine.jsonl"
    cfg = load_config(None, ["data.dataset=jsonl", f"data.source={path}", "data.n_test=10"])
    write_triples(path, facts(70))
    key = tiny_cache_key(cfg, *load_task_set(cfg.data))
    assert tiny_cache_key(cfg, *load_task_set(cfg.data)) == key  # same file, same model
    write_triples(path, facts(70, word="zeta"))  # same path, other words
    assert tiny_cache_key(cfg, *load_task_set(cfg.data)) != key


def test_tiny_cache_key_follows_the_context_filter(tmp_path):
    cfg = load_config("configs/tiny_squad.yaml")
    long, short = read_task_set(squad(tmp_path, 2000)), read_task_set(squad(tmp_path, 400))
    assert long != short
    assert tiny_cache_key(cfg, *long) != tiny_cache_key(cfg, *short)


# B: no training triples


def test_filter_that_drops_every_training_triple_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as e:
        load_task_set(squad(tmp_path, 400))
    msg = str(e.value)
    assert "0 training triples" in msg and "squad" in msg and SQUAD in msg
    assert "max_context_chars=400" in msg


def test_empty_generated_training_set_is_an_input_error():
    with pytest.raises(InputError, match="0 training triples .*character_descriptions"):
        load_task_set(DataConfig(n_train=0, n_test=10))


# C: too few test triples


def test_no_test_triples_is_an_input_error():
    with pytest.raises(InputError, match="0 test triples"):
        load_task_set(DataConfig(n_train=10, n_test=0))
    with pytest.raises(InputError, match="no test triples"):
        eval_triples([], EvalConfig(settings=["NC", "Prompt"]))


def test_paired_settings_need_two_test_triples():
    one = facts(1)
    with pytest.raises(InputError, match="FT_irrelevant, FT2 .* at least 2"):
        eval_triples(one, EvalConfig())
    with pytest.raises(InputError, match="FT2 .*eval.n_examples=1"):
        eval_triples(facts(5), EvalConfig(settings=["FT2"], n_examples=1))
    assert eval_triples(one, EvalConfig(settings=["NC", "Prompt", "FT"])) == one


def test_evaluate_refuses_to_pair_a_fact_with_itself():
    with pytest.raises(InputError, match="FT_irrelevant"):
        evaluate(None, None, facts(1), EvalConfig(settings=["FT_irrelevant"]), None, None)


def test_partners_never_pair_an_item_with_itself():
    assert partners(facts(2), seed=0) == [1, 0]
    for n in (3, 7):
        p = partners(facts(n), seed=5)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    for n in (0, 1):
        with pytest.raises(InputError, match="cannot be paired"):
            partners(facts(n), seed=0)


def test_partners_have_another_context_and_another_response():
    """SQuAD-style sets: several questions on one paragraph are never each other's partner,
    nor are two triples whose answers are the same."""
    paragraphs = [f"paragraph {k} about topic {k}." for k in range(3)]
    triples = [Triple(paragraphs[i % 3], f"question {i}?", f"answer {i}") for i in range(12)] + [
        Triple("another text.", "question x?", "Answer 0")
    ]  # the same answer as triple 0
    for seed in range(5):
        p = partners(triples, seed)
        for i, j in enumerate(p):
            assert triples[j].context != triples[i].context
            assert normalise(triples[j].response) != normalise(triples[i].response)
    one = [Triple(paragraphs[0], f"question {i}?", f"answer {i}") for i in range(4)]
    with pytest.raises(InputError, match=r"test triple \d+ .* has none among the 4"):
        partners(one, seed=0)


# D: a single jsonl file holds out 10% (capped at data.n_test)


def test_single_file_holds_out_ten_percent_under_the_default_n_test(tmp_path, capsys):
    rows = facts(70)
    write_triples(tmp_path / "own.jsonl", rows)
    data = DataConfig(dataset="jsonl", source=str(tmp_path / "own.jsonl"), n_train=0)
    assert data.n_test == 500  # the default, larger than the file
    train, test = load_task_set(data)
    assert train == rows[:63] and test == rows[63:]
    assert "held out the last 7 of the 70 triples" in capsys.readouterr().out


def test_single_file_holds_out_at_most_n_test(tmp_path):
    rows = facts(70)
    write_triples(tmp_path / "own.jsonl", rows)
    data = DataConfig(dataset="jsonl", source=str(tmp_path / "own.jsonl"), n_train=0, n_test=2)
    assert load_task_set(data) == (rows[:68], rows[68:])


def test_single_triple_file_cannot_hold_out_a_test_set(tmp_path):
    path = tmp_path / "one.jsonl"
    write_triples(path, facts(1))
    with pytest.raises(InputError, match=re.escape(f"{path} holds 1 triple(s), too few")):
        load_task_set(DataConfig(dataset="jsonl", source=str(path)))


# E: tasks per meta-batch


def test_contexts_per_update_beyond_the_training_triples_is_named():
    with pytest.raises(InputError, match="meta.contexts_per_update: 100 exceeds the 50 training"):
        check_task_count(50, 100, 16)
    with pytest.raises(InputError, match="meta.meta_batch_size: 16 exceeds the 12 tasks"):
        check_task_count(50, 4, 16)
    assert check_task_count(50, 2, 16) == 25


def test_job_stops_on_too_few_tasks_before_building_a_model(tmp_path):
    cfg = load_config(
        None,
        [
            "data.n_train=50",
            "data.n_test=10",
            "meta.contexts_per_update=100",
            f"model.tiny_cache_dir={tmp_path / 'models'}",
        ],
    )
    with pytest.raises(InputError, match="meta.contexts_per_update: 100 .* 50 training triples"):
        run_pipeline(cfg, tmp_path / "out")
    assert not (tmp_path / "models").exists() and not (tmp_path / "out" / "results.json").exists()


def test_test_triples_without_partners_stop_the_job_before_a_model(tmp_path):
    """Test triples that all share one response have no partner for FT_irrelevant / FT2: found
    with the data (before the MLflow run opens), not in the base model's evaluation."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_triples(train, facts(40))
    write_triples(
        test,
        [Triple(f"River {i} is called alba.", f"River {i} is called", "alba") for i in range(4)],
    )
    cfg = load_config(
        None,
        [
            "data.dataset=jsonl",
            f"data.source={train},{test}",
            f"model.tiny_cache_dir={tmp_path / 'models'}",
        ],
    )
    with pytest.raises(
        InputError, match=r"eval.settings: .* test triple \d .* has none among the 4"
    ):
        run_pipeline(cfg, tmp_path / "out")
    assert not (tmp_path / "models").exists() and not (tmp_path / "out" / "results.json").exists()


# a jsonl source file that does not exist stops the job before its MLflow run or Ray start


def test_check_inputs_names_a_missing_jsonl_file_before_the_run(tmp_path):
    from raymeta.train.launch import check_inputs

    good = tmp_path / "good.jsonl"
    write_triples(good, facts(20))
    cfg = load_config(None, ["data.dataset=jsonl", f"data.source={good},{tmp_path / 'no.jsonl'}"])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"no\.jsonl: triple file not found \(data\.source\)"):
        check_inputs(cfg, out)
    assert not out.exists()  # nothing was written
    check_inputs(load_config(None, ["data.dataset=jsonl", f"data.source={good}"]), out)


def test_check_inputs_names_a_missing_squad_or_wikitext_source_before_the_run(tmp_path):
    """A SQuAD source not found was reported once the MLflow run had opened (a FAILED run)."""
    from raymeta.train.launch import check_inputs

    out = tmp_path / "out"
    for dataset in ("squad", "wikitext"):
        cfg = load_config(None, [f"data.dataset={dataset}", f"data.source={tmp_path / 'none'}"])
        with pytest.raises(InputError, match=rf"none: {dataset} source not found"):
            check_inputs(cfg, out)
        empty = tmp_path / f"empty_{dataset}"
        empty.mkdir()
        cfg = load_config(None, [f"data.dataset={dataset}", f"data.source={empty}"])
        with pytest.raises(InputError, match="holds no data files"):
            check_inputs(cfg, out)
    assert not out.exists()
    check_inputs(load_config("configs/tiny_squad.yaml", []), out)  # the shipped local sets
    check_inputs(load_config("configs/tiny_wikitext.yaml", []), out)
    check_inputs(load_config(None, ["data.dataset=squad", "data.source=rajpurkar/squad"]), out)


# a Ray address nobody answers at stops the job at once (ray.init would retry for minutes)


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_named(monkeypatch):
    import socket

    from raymeta.train.launch import check_ray_address

    def train(address=""):
        return load_config(None, [f"train.ray_address={address}"] if address else []).train

    port = free_port()
    with pytest.raises(InputError, match=rf"train\.ray_address='127\.0\.0\.1:{port}': no Ray"):
        check_ray_address(train(f"127.0.0.1:{port}"))
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(InputError, match=r"\$RAY_ADDRESS='ray://127\.0\.0\.1:\d+': no Ray"):
        check_ray_address(train())
    with pytest.raises(InputError, match="expected HOST:PORT"):
        check_ray_address(train("headnode"))
    check_ray_address(train("local"))
    monkeypatch.delenv("RAY_ADDRESS")
    check_ray_address(train())
    monkeypatch.setenv("RAY_TMPDIR", "/nonexistent")  # no record of a `ray start` here
    from ray._private.services import find_gcs_addresses

    if not find_gcs_addresses():  # ``auto`` also finds any cluster running on this machine
        with pytest.raises(InputError, match="train.ray_address='auto': no running Ray cluster"):
            check_ray_address(train("auto"))
    else:
        check_ray_address(train("auto"))
    with socket.socket() as listening:  # something answers: ray.init takes it from here
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_ray_address(train(f"127.0.0.1:{listening.getsockname()[1]}"), timeout_s=1.0)


def test_a_ray_version_mismatch_reads_as_one_line():
    """Ray's own multi-line "Version mismatch" message (its real check, with a cluster's
    metadata from another install) becomes the versions on both sides, in one line."""
    import platform

    import ray
    from ray._private.utils import check_version_info

    from raymeta.train.launch import describe_version_mismatch

    with pytest.raises(RuntimeError) as mismatch:
        check_version_info({"ray_version": "1.0.0", "python_version": "3.9.1"}, "127.0.0.1:9")
    python = platform.python_version()
    assert describe_version_mismatch(str(mismatch.value)) == (
        f"Ray 1.0.0 on Python 3.9.1, this job Ray {ray.__version__} on Python {python}"
    )
    assert describe_version_mismatch("Version mismatch:\n  of another form") == (
        "Version mismatch: of another form"
    )


def test_a_dashboard_address_is_named_as_one(monkeypatch):
    """The dashboard's address (what `ray job submit` takes) given to a job: an http:// one, or
    its HOST:PORT (a web server answers there, not a GCS), stops the job at once."""
    import http.server
    import threading

    from raymeta.train.launch import check_ray_address

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(InputError, match=r"\$RAY_ADDRESS='http://127\.0\.0\.1:8265': an http"):
        check_ray_address(load_config(None, []).train)
    monkeypatch.delenv("RAY_ADDRESS")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        cfg = load_config(None, [f"train.ray_address={address}"]).train
        with pytest.raises(InputError, match=rf"'{address}': {address} is a web server"):
            check_ray_address(cfg)
    finally:
        server.shutdown()
        server.server_close()


# pretraining on a set without a generator validates on triples it never trains on


def test_held_out_facts_are_left_out_of_pretraining():
    from raymeta.pretrain import held_out_facts

    train = facts(50)
    pool, val = held_out_facts(train)
    assert val == train[-5:] and pool == train[:-5]
    assert held_out_facts(facts(5000))[1] == facts(5000)[-200:]
    assert held_out_facts(facts(9)) == (facts(9), facts(9))  # too few: said in the log


def test_pretraining_a_jsonl_set_scores_prompt_reading_on_held_out_triples(capsys):
    from raymeta.config import PretrainConfig, TinyModelConfig
    from raymeta.models import build_tiny_model, train_tokenizer
    from raymeta.pretrain import pretrain_tiny, tokenizer_texts

    train, test = facts(40), facts(4, "beta")
    tok = train_tokenizer(tokenizer_texts("jsonl", train, test))
    model = build_tiny_model(TinyModelConfig(hidden_size=16, intermediate_size=32), len(tok))
    scored = []

    def prompt_accuracy(m, triples):
        scored.append(list(triples))
        return 0.5

    cfg = PretrainConfig(steps=2, eval_every=1, batch_size=4)
    report = pretrain_tiny(model, tok, "jsonl", train, test, cfg, "cpu", prompt_accuracy)
    assert scored == [train[-4:], train[-4:]]
    assert report["validation"] == "4 training triples held out of pretraining"
    assert "Prompt accuracy measured on 4 training triples held out" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("meta-llama/Llama-3.2-1B", False),
        ("gpt2", False),
        ("Salesforce/wikitext:wikitext-2-raw-v1", False),
        ("./models/llama", True),
        ("~/models/llama", True),
        ("/abs/model", True),
        ("models/llama/final", True),  # three parts cannot be a hub id
        ("train.jsonl", True),
        ("C:\\data\\train.json", True),
    ],
)
def test_looks_local_tells_paths_from_hub_names(name, local):
    from raymeta.paths import looks_local

    assert looks_local(name) is local


def test_model_path_with_nested_parts_is_checked_as_a_path(tmp_path):
    from raymeta.models import check_model_path

    with pytest.raises(InputError, match="models/llama/final does not exist"):
        check_model_path("models/llama/final")
    check_model_path("meta-llama/Llama-3.2-1B")  # a hub name: left to from_pretrained


def test_ray_only_settings_of_a_local_run_are_named():
    from raymeta.train.launch import unused_by_local

    cfg = load_config(None, ["train.launcher=local", "train.num_workers=2", "train.zero_stage=1"])
    assert unused_by_local(cfg.train) == ["train.num_workers=2", "train.zero_stage=1"]
    assert unused_by_local(load_config(None, ["train.launcher=local"]).train) == []

    from raymeta.train.launch import unused_lora

    lora = load_config(None, ["model.lora.mode=outer_lora_inner_full", "model.lora.rank=4"])
    assert unused_lora(lora.model.lora) == [
        "model.lora.rank=4",
        "model.lora.mode='outer_lora_inner_full'",
    ]
    lora.model.lora.enabled = True
    assert unused_lora(lora.model.lora) == []


def test_an_output_dir_in_rays_copy_of_the_working_dir_is_refused(tmp_path, monkeypatch, capsys):
    """Under `ray job submit`, a relative --output-dir lands in Ray's copy of the working dir
    (deleted after the job): refused, while the caches there are only noted."""
    from raymeta.train.launch import check_inputs, check_output_dir, in_ray_working_dir

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0a1b"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert in_ray_working_dir(Path("runs/rel")) and not in_ray_working_dir(tmp_path / "runs")
    with pytest.raises(InputError, match=r"--output-dir .*runs/rel: inside this job's copy"):
        check_output_dir(Path("runs/rel").resolve())
    check_output_dir(tmp_path / "runs")
    check_inputs(load_config(None, ["train.launcher=local"]), tmp_path / "runs")
    notes = capsys.readouterr().out
    assert "[cache] data.cache_dir=.cache/raymeta/data lies in this job's copy" in notes
    assert "[cache] model.tiny_cache_dir=.cache/raymeta/models lies in" in notes


def test_pretraining_progress_counts_the_sequences_it_trained_on(capsys, monkeypatch):
    """The rate counted eval_every batches at each line: 60 steps with eval_every=1000 printed
    1000/60 times the real rate."""
    import re as _re
    import types

    from raymeta import pretrain, progress
    from raymeta.config import PretrainConfig, TinyModelConfig
    from raymeta.models import build_tiny_model, train_tokenizer

    clock = iter(range(1, 10**6))  # each reading of the progress clock: one second later
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(pretrain, "PROGRESS_EVERY", 3)
    train, test = facts(40), facts(4, "beta")
    tok = train_tokenizer(pretrain.tokenizer_texts("jsonl", train, test))
    model = build_tiny_model(TinyModelConfig(hidden_size=16, intermediate_size=32), len(tok))
    cfg = PretrainConfig(steps=7, eval_every=1000, batch_size=4, target_prompt_accuracy=0)
    pretrain.pretrain_tiny(model, tok, "jsonl", train, test, cfg, "cpu", lambda m, t: 0.0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[pretrain] step")]
    assert [int(_re.search(r"step (\d+)/7", ln)[1]) for ln in lines] == [3, 6, 7]
    # one clock reading per step: 4 sequences a second, in every window
    assert [float(_re.search(r"([\d.]+) seqs/s", ln)[1]) for ln in lines] == [4.0, 4.0, 4.0]
    assert "prompt_acc" in lines[-1] and "prompt_acc" not in lines[0]


@pytest.mark.parametrize("target", [0.97, 0.0])
def test_pretraining_that_ends_below_its_target_says_so(tmp_path, capsys, target):
    """A tiny model whose pretraining hit pretrain.steps below the Prompt-accuracy target
    (tiny_reversal.yaml's did, at 0.3) gets a warning, when built and each time it is reused
    from the cache; target 0 (never stop early) has none."""
    from raymeta.models import train_tokenizer
    from raymeta.pipeline import prompt_accuracy_fn
    from raymeta.pretrain import ensure_tiny_model, tokenizer_texts

    cfg = load_config(
        None,
        [
            "data.dataset=jsonl",
            f"data.source={tmp_path / 'train.jsonl'}",
            f"model.tiny_cache_dir={tmp_path}",
            "model.tiny={hidden_size: 16, intermediate_size: 32}",
            "pretrain.steps=4",
            "pretrain.eval_every=2",
            "pretrain.batch_size=4",
            f"pretrain.target_prompt_accuracy={target}",
        ],
    )
    train, test = facts(40), facts(4, "beta")
    tok = train_tokenizer(tokenizer_texts("jsonl", train, test))
    built = ensure_tiny_model(cfg, train, test, "cpu", prompt_accuracy_fn(tok, "cpu"), tok)
    first = capsys.readouterr().out
    again = ensure_tiny_model(cfg, train, test, "cpu", prompt_accuracy_fn(tok, "cpu"), tok)
    second = capsys.readouterr().out
    assert again == built and "reusing the cached tiny model" in second
    if target:
        assert "[pretrain] warning: Prompt accuracy 0 after 4 steps is below " in first
        assert "pretrain.target_prompt_accuracy=0.97" in first and "raise pretrain.steps" in first
        assert (
            f"[pretrain] warning: Prompt accuracy 0 after 4 steps (the cached model {built})"
            in second
        )
    else:
        assert "warning" not in first + second


def test_a_base_model_in_rays_copy_of_the_working_dir_is_kept_with_the_results(tmp_path, capsys):
    """Under `ray job submit` the tiny model's default cache lies in Ray's copy of the working
    dir, which Ray deletes later: the results name a copy in the output dir instead."""
    from raymeta.pipeline import model_source

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0a1b"
    model = copy / ".cache" / "raymeta" / "models" / "tiny-0123"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    source = model_source(str(model), out, None)
    assert source == str(out / "models" / "base")
    assert (out / "models" / "base" / "config.json").read_text() == "{}"
    assert f"[model] {model} lies in this job's copy" in capsys.readouterr().out
    elsewhere = tmp_path / "models" / "tiny-0123"  # outside the copy: named where it is
    elsewhere.mkdir(parents=True)
    assert model_source(str(elsewhere), tmp_path / "out2", None) == str(elsewhere)
    assert not (tmp_path / "out2").exists()


def test_responses_longer_than_the_answer_budget_are_named(capsys):
    """A test response over eval.max_new_tokens can never be scored correct, and a training
    response over meta.max_answer_tokens is cut in LC's teacher answers: each is one warning
    line naming the field, the count and the longest response; responses that fit say nothing."""
    from raymeta.models import train_tokenizer
    from raymeta.pipeline import check_answer_budgets

    long_answer = "one two three four five six"
    test = facts(3, "beta") + [Triple("The river is long.", "The river is", long_answer)]
    train = facts(5) + [Triple("A b c d e.", "A b c d", long_answer)]
    tok = train_tokenizer([t.context + " " + t.response for t in (*train, *test)])
    n = len(tok(" " + long_answer, add_special_tokens=False)["input_ids"])
    assert n > 4
    cfg = load_config(None, ["eval.max_new_tokens=4", "meta.max_answer_tokens=4"])
    lines = check_answer_budgets(cfg, tok, train, test)
    assert lines == capsys.readouterr().out.splitlines() and len(lines) == 2
    assert lines[0].startswith("[data] warning: 1 of 4 test responses take more than ")
    assert f"eval.max_new_tokens=4 tokens (the longest, test triple 3, {long_answer!r}" in lines[0]
    assert f"takes {n}): no setting can score them correct; eval.max_new_tokens={n}" in lines[0]
    assert "1 of 6 training responses" in lines[1] and "meta.max_answer_tokens=4" in lines[1]
    assert "LC's teacher answers are cut there" in lines[1]
    lg_only = load_config(None, ["eval.max_new_tokens=4", "meta.objectives=[LG]"])
    assert len(check_answer_budgets(lg_only, tok, train, test)) == 1  # no LC teacher
    capsys.readouterr()
    fits = load_config(None, [f"eval.max_new_tokens={n}", f"meta.max_answer_tokens={n}"])
    assert check_answer_budgets(fits, tok, train, test) == []
    assert capsys.readouterr().out == ""
