"""The metatrain job on bad inputs and signals, as a user runs it (a subprocess, real files,
the real local sqlite MLflow store):

* a bad data file, model path, LoRA target, inner-parameter pattern, Ray address or output
  dir gives one ``error:`` line and exit 2, no traceback;
* a re-run that fails on its inputs leaves the earlier results where they were;
* SIGTERM ends the MLflow run (KILLED) and the process (exit 143).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_input_checks import free_port

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
        "lora_target": (
            ["model.lora.enabled=true", "model.lora.target_modules=[nosuch]"],
            "model.lora.target_modules",
        ),
        "inner_params": (["meta.inner_params=[nosuch]"], "meta.inner_params"),
        "ray_address": (
            ["train.launcher=ray", f"train.ray_address=127.0.0.1:{free_port()}"],
            "train.ray_address",
        ),
    }


CASES = [
    "missing_file",
    "bad_line",
    "missing_field",
    "no_model_dir",
    "dir_without_model",
    "lora_target",
    "inner_params",
    "ray_address",
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


def test_sigterm_ends_the_mlflow_run_and_the_job(tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "job.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = job_command(out, tmp_path, "meta.steps=100000", "meta.log_every=1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        # the job prints this once its run exists (opening the store earlier races its creation)
        wait_for(lambda: "MLflow run " in log.read_text(), proc, log)
        (run,) = mlflow_runs(out)
        assert run.info.status == "RUNNING"
        wait_for(lambda: "[meta-train LG" in log.read_text(), proc, log)  # in the thick of it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = mlflow_runs(out)
    assert run.info.status == "KILLED"
    assert run.info.end_time is not None
