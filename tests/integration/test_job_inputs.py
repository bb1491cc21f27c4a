"""The metatrain job on bad inputs and signals, as a user runs it (a subprocess, real files,
the real local sqlite MLflow store):

* a bad data file, model path, LoRA target, inner-parameter pattern, Ray address or output
  dir gives one ``error:`` line and exit 2, no traceback;
* a re-run that fails on its inputs leaves the earlier results where they were;
* SIGTERM or Ctrl-C ends the MLflow runs (KILLED) and the process (exit 143 / 130, one line),
  on either launcher, and summary.json / results.png keep the meta-training curve so far.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import save_tiny
from tests.unit.test_input_checks import free_port

WORDS = ["a few words to have a vocabulary"]
"""The text the saved tiny models' tokenizers are trained on."""

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "train.launcher=local",
    "threads=1",
    "meta.steps=1",
    "data.n_train=50",
    "data.n_test=10",
    "pretrain.steps=2",
    "prepare.steps=1",
    "eval.n_examples=4",
]


def job_command(out: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """The job's command line on the quick config, caches under ``tmp_path``."""
    return [
        sys.executable,
        "jobs/metatrain.py",
        "--output-dir",
        str(out),
        f"model.tiny_cache_dir={tmp_path / 'models'}",
        f"data.cache_dir={tmp_path / 'data'}",
        *QUICK,
        *overrides,
    ]


def run_job(out: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the job to its end; tracking off unless an override turns it on."""
    cmd = job_command(out, tmp_path, "tracking.enabled=false", *overrides)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name → (overrides, text the error line must contain), with the bad files written."""
    (tmp_path / "bad_line.jsonl").write_text("not json\n")
    (tmp_path / "no_response.jsonl").write_text('{"context": "a", "query": "b"}\n')
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "model_no_tokenizer").mkdir()
    (tmp_path / "model_no_tokenizer" / "config.json").write_text("{}")
    good = '{"context": "a", "query": "b", "response": "c"}\n'
    (tmp_path / "latin1.jsonl").write_bytes((good + '{"context": "caf\xe9", ').encode("latin-1"))
    (tmp_path / "empty_context.jsonl").write_text(good.replace('"a"', '""'))
    (tmp_path / "lm.txt").write_bytes(b"\xff\n")
    # GPT-OSS has no SDPA attention in any supported transformers (Gemma 2 lost its in 5.21)
    save_tiny(tmp_path / "gpt_oss", WORDS, "gpt_oss", attn="eager", num_local_experts=4)
    return {
        "missing_file": (
            ["data.dataset=jsonl", f"data.source={tmp_path / 'missing.jsonl'}"],
            "missing.jsonl",
        ),
        "bad_line": (
            ["data.dataset=jsonl", f"data.source={tmp_path / 'bad_line.jsonl'}"],
            "bad_line.jsonl:1",
        ),
        "missing_field": (
            ["data.dataset=jsonl", f"data.source={tmp_path / 'no_response.jsonl'}"],
            "response",
        ),
        "no_model_dir": (
            [f"model.name_or_path={tmp_path / 'nonexistent_model'}"],
            "model.name_or_path",
        ),
        "dir_without_model": (
            [f"model.name_or_path={tmp_path / 'empty_model'}"],
            "config.json",
        ),
        "model_without_tokenizer": (
            [f"model.name_or_path={tmp_path / 'model_no_tokenizer'}"],
            "holds a model but no tokenizer",
        ),
        "not_utf8": (
            ["data.dataset=jsonl", f"data.source={tmp_path / 'latin1.jsonl'}"],
            "latin1.jsonl:2: not UTF-8",
        ),
        "empty_context": (
            ["data.dataset=jsonl", f"data.source={tmp_path / 'empty_context.jsonl'}"],
            "empty_context.jsonl:1: field 'context' is empty",
        ),
        "lm_file_missing": (
            ["meta.lm_source=file", f"meta.lm_file={tmp_path / 'nope.txt'}"],
            "meta.lm_file",
        ),
        "lm_file_not_utf8": (
            ["meta.lm_source=file", f"meta.lm_file={tmp_path / 'lm.txt'}"],
            "lm.txt:1: not UTF-8",
        ),
        "device": (["device=cuda:99"], "device='cuda:99'"),
        "attention_the_model_lacks": (
            [f"model.name_or_path={tmp_path / 'gpt_oss'}", "model.attn_implementation=sdpa"],
            "model.attn_implementation=sdpa: ",
        ),
        "lora_target": (
            ["model.lora.enabled=true", "model.lora.target_modules=[nosuch]"],
            "model.lora.target_modules",
        ),
        "inner_params": (["meta.inner_params=[nosuch]"], "meta.inner_params"),
        "ray_address": (
            ["train.launcher=ray", f"train.ray_address=127.0.0.1:{free_port()}"],
            "train.ray_address",
        ),
        # no cluster runs during this test (or only a stale record of one)
        "ray_auto": (["train.launcher=ray", "train.ray_address=auto"], "train.ray_address"),
    }


CASES = [
    "missing_file",
    "bad_line",
    "missing_field",
    "no_model_dir",
    "dir_without_model",
    "model_without_tokenizer",
    "not_utf8",
    "empty_context",
    "lm_file_missing",
    "lm_file_not_utf8",
    "device",
    "attention_the_model_lacks",
    "lora_target",
    "inner_params",
    "ray_address",
    "ray_auto",
]
"""The keys of :func:`bad_inputs`."""


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, case):
    overrides, expected = bad_inputs(tmp_path)[case]
    proc = run_job(tmp_path / "out", tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, proc.stderr[-2000:]
    assert "[pretrain]" not in proc.stdout  # found before the tiny model is trained


def test_output_dir_that_is_a_file_is_named(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    proc = run_job(target, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip() == f"error: --output-dir {target}: {target} is a file, not a directory"
    )


def test_a_tracking_server_that_does_not_answer_stops_the_job_before_ray(tmp_path):
    """Exit 3, one ``tracking error:`` line naming the server, and no Ray instance started
    (nor anything written to the output dir) for a store that could never be used."""
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = job_command(tmp_path / "out", tmp_path, "train.launcher=ray", "tracking.enabled=true")
    cmd.append(f"tracking.tracking_uri={uri}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tracking error: MLflow tracking store {uri} is not reachable"), last
    assert "Ray instance" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def write_earlier_results(out: Path) -> dict[str, str]:
    """A finished run's files in ``out`` (as keep_previous knows them); name → text."""
    files = {
        "results.json": json.dumps({"BM": {"NC": {"accuracy": 0.5, "nll": 1.0}}}),
        "results.md": "| model | NC |\n",
        "config.yaml": "name: earlier\n",
        "records/BM.jsonl": '{"setting": "NC"}\n',
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


@pytest.mark.parametrize("case", ["missing_file", "lora_target"])
def test_failing_rerun_leaves_earlier_results_in_place(tmp_path, case):
    out = tmp_path / "out"
    earlier = write_earlier_results(out)
    overrides, _ = bad_inputs(tmp_path)[case]
    proc = run_job(out, tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not (out / "previous").exists()
    for name, text in earlier.items():
        assert (out / name).read_text() == text


def test_a_model_fastweights_refuses_stops_before_anything_runs(tmp_path):
    """meta.engine=fastweights on a model it cannot run exactly: one error line, exit 2, before
    preparation, and an earlier run's results stay where they were; auto falls back."""
    out = tmp_path / "out"
    earlier = write_earlier_results(out)
    # DiffLlama: its attention's lambda vectors are parameters of a kind the engine does not know
    model = save_tiny(tmp_path / "diffllama", WORDS, "diffllama")
    proc = run_job(out, tmp_path, f"model.name_or_path={model}", "meta.engine=fastweights")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: meta.engine=fastweights cannot run exactly here: "), last
    assert "DiffLlamaAttention" in last and "meta.engine=auto" in last, last
    assert "[prepare" not in proc.stdout and "[eval" not in proc.stdout, proc.stdout[-2000:]
    assert not (out / "previous").exists()
    for name, text in earlier.items():
        assert (out / name).read_text() == text
    # meta.engine=auto (the default) runs the reference engine, says why once, right away
    proc = run_job(out, tmp_path, f"model.name_or_path={model}", "meta.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = "[engine] meta.engine=auto: using the reference engine because "
    assert proc.stderr.count(why) == 1 and "DiffLlamaAttention" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engines"] == {"BM": "reference", "LG": "reference", "LC": "reference"}
    assert "[eval LG] (reference engine)" in proc.stdout


@pytest.mark.parametrize("case", ["not_utf8", "lora_target", "inner_params"])
def test_bad_input_opens_no_mlflow_run(tmp_path, case):
    """Input refused before the job starts (a malformed data file) or once the data and model
    have loaded (a LoRA target or inner-parameter pattern that matches nothing in the model):
    the store holds no run of the job."""
    out = tmp_path / "out"
    overrides, expected = bad_inputs(tmp_path)[case]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = job_command(out, tmp_path, *overrides)  # tracking on
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert "MLflow run " not in proc.stdout + proc.stderr
    assert not (out / "mlflow.db").exists() or not mlflow_runs(out)


def mlflow_runs(out: Path) -> list:
    """The runs in the job's local sqlite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float = 180):
    """Poll ``condition()`` until it is truthy; fail if the job ends or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, "the job ended early:\n" + log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError("timed out waiting; job output:\n" + log.read_text()[-3000:])


@pytest.mark.parametrize(
    ("launcher", "signum", "code"),
    [
        ("local", signal.SIGTERM, 143),
        ("local", signal.SIGINT, 130),
        ("ray", signal.SIGTERM, 143),  # raised inside ray.get, which turns it into exit 1
        ("ray", signal.SIGINT, 130),  # Ray Train's own handler would abort with exit 1
    ],
)
def test_a_signal_ends_the_mlflow_runs_and_the_job(tmp_path, launcher, signum, code):
    """... and keeps the meta-training curve so far: summary.json (logged to the run) holds LG's
    steps up to the signal (on Ray, as rank 0 last wrote them: every report) and a ``stopped``
    entry, and results.png is drawn from it."""
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    extra = ["train.num_workers=1", "train.checkpoint_every=0", "train.report_every=1"]
    extra = extra if launcher == "ray" else []
    cmd = job_command(
        out,
        tmp_path,
        "meta.steps=100000",
        "meta.epochs=100000",
        "meta.log_every=1",
        f"train.launcher={launcher}",
        *extra,
    )
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        # the job prints this once its run exists (opening the store earlier races its creation)
        wait_for(lambda: "MLflow run " in log.read_text(), proc, log)
        (run,) = [r for r in mlflow_runs(out) if "mlflow.parentRunId" not in r.data.tags]
        assert run.info.status == "RUNNING"
        # in the thick of it: step 3 printed, so steps 1-2 are in the history (on Ray: written)
        wait_for(lambda: re.search(r"\[meta-train LG.*\] step 3/", log.read_text()), proc, log)
        proc.send_signal(signum)
        assert proc.wait(timeout=90) == code, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert last == f"stopped by {signal.Signals(signum).name}", text[-3000:]
    if launcher == "local":  # (Ray's own processes may log their ends)
        assert "Traceback" not in text.split("[meta-train LG", 1)[1], text[-3000:]
    runs = mlflow_runs(out)
    assert len(runs) == 2  # the job's run and LG's child run
    assert {r.info.status for r in runs} == {"KILLED"}
    assert all(r.info.end_time is not None for r in runs)
    summary = json.loads((out / "summary.json").read_text())
    steps = [h["step"] for h in summary["history"]["LG"]]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1)), summary["history"]
    how = "KeyboardInterrupt" if signum == signal.SIGINT else f"SystemExit({code})"
    assert summary["stopped"] == {"LG": f"{how} after step {steps[-1]}"}, summary
    assert summary["complete"] is False and summary["diverged"] == {}
    assert (out / "results.png").stat().st_size > 10_000
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert "summary.json" in {a.path for a in _artifacts(out, parent.info.run_id)}


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_diverged_meta_training_stops_with_one_line_and_keeps_earlier_results(tmp_path, launcher):
    """A nan loss stops the job (exit 4) at its step; the base model's evaluation, done before,
    stays in results.json, records/, results.png, summary.json (``complete`` false) and the
    MLflow run (logged as it finished); the summary also holds LG's steps before the one that
    diverged, and its error line."""
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    cmd = job_command(
        out,
        tmp_path,
        "meta.steps=5",
        "meta.outer_lr=1e30",  # step 1 is finite; its update makes step 2's losses overflow
        "eval.inner_lr=1e-3",
        f"train.launcher={launcher}",
        "train.num_workers=1",
        "train.max_failures=2",  # a divergence is not retried
    )
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 4, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # (after Ray's streamed worker lines)
    assert last.startswith("error: meta-training diverged at step 2: "), proc.stderr[-3000:]
    assert "meta.outer_lr" in last
    assert proc.stdout.count("Attempting to start training worker group") <= 1
    assert list(json.loads((out / "results.json").read_text())) == ["BM"]
    assert (out / "records" / "BM.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())  # as it stood after BM
    assert summary["complete"] is False, summary
    (step,) = summary["history"]["LG"]  # the step before the nan, as a finished run keeps it
    assert step["step"] == 1 and math.isfinite(step["outer_loss"]), summary
    assert summary["diverged"] == {"LG": last.removeprefix("error: ")}, summary
    assert summary["engines"] == {"BM": "fastweights"}
    assert (out / "results.png").stat().st_size > 10_000
    assert not list(out.glob(".*.tmp*"))
    parent = next(r for r in mlflow_runs(out) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert "BM.Prompt.accuracy" in parent.data.metrics
    logged = {a.path for a in _artifacts(out, parent.info.run_id)}
    assert {"results.json", "results.png", "summary.json"} <= logged, logged


def _artifacts(out: Path, run_id: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").list_artifacts(run_id)
