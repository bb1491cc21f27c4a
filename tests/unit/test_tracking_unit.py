"""Fast checks of the MLflow helpers that need no store: URIs, params, keys."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raymeta.config import RunConfig, TrackingConfig, to_dict
from raymeta.train.tracking import (
    MAX_PARAM_VALUE,
    Tracker,
    TrackingError,
    end_status,
    flatten_params,
    local_artifact_root,
    resolve_tracking_uri,
    sanitize_key,
    start_run,
)


def test_resolve_prefers_configured_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(" http://cfg:5000 ", tmp_path) == "http://cfg:5000"


def test_resolve_uses_env_when_not_configured(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("", tmp_path) == "http://env:5000"


def test_resolve_default_is_absolute_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri("", "out")
    assert uri == f"sqlite:///{tmp_path.resolve()}/out/mlflow.db"
    assert uri.startswith("sqlite:////")


def test_local_artifact_root_is_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert (
        local_artifact_root("sqlite:///rel/mlflow.db", "x")
        == tmp_path.resolve() / "rel" / "artifacts"
    )
    db = tmp_path / "d" / "mlflow.db"
    assert local_artifact_root(f"sqlite:///{db}", "x") == db.parent / "artifacts"
    assert local_artifact_root("http://127.0.0.1:5000", "x") is None
    assert (
        local_artifact_root("postgresql://h/db", "out") == tmp_path.resolve() / "out" / "artifacts"
    )


def test_flatten_nested_config_to_dotted_keys():
    cfg = RunConfig()
    cfg.meta.inner_lr = 0.001
    flat = flatten_params(to_dict(cfg))
    assert flat["meta.inner_lr"] == "0.001"
    assert flat["model.tiny.hidden_size"] == "128"
    assert flat["pretrain.mix.prompt"] == "2.0"
    assert flat["meta.objectives"] == "['LG', 'LC']"
    assert flat["tracking.enabled"] == "True"
    assert all(isinstance(v, str) for v in flat.values())


def test_flatten_accepts_dataclasses_and_odd_leaves():
    flat = flatten_params({"cfg": RunConfig(), "none": None, "empty": {}, 3: "x"})
    assert flat["cfg.data.dataset"] == "character_descriptions"
    assert flat["none"] == "None"
    assert flat["empty"] == "{}"
    assert flat["3"] == "x"


def test_long_values_are_truncated():
    flat = flatten_params({"big": list(range(10_000)), "text": "a" * 7000})
    assert len(flat["big"]) == MAX_PARAM_VALUE
    assert flat["big"].endswith("...[truncated]")
    assert flat["text"].startswith("aaa") and len(flat["text"]) == MAX_PARAM_VALUE
    assert flatten_params({"ok": "b" * MAX_PARAM_VALUE})["ok"] == "b" * MAX_PARAM_VALUE


def test_keys_are_sanitized():
    assert sanitize_key("meta.inner_lr") == "meta.inner_lr"
    assert sanitize_key("loss/LG eval:acc") == "loss/LG eval:acc"
    assert sanitize_key("a(b)[c]=d") == "a_b__c__d"
    assert sanitize_key("../etc") == ".._etc"
    assert sanitize_key("a//b") == "a__b"
    assert sanitize_key("/abs") == "_abs"
    assert sanitize_key(".") == "_"
    assert len(sanitize_key("k" * 400)) == 250
    assert flatten_params({"a": {"b/": 1}}) == {"a.b_": "1"}


def test_disabled_tracking_does_nothing(tmp_path):
    tracker = start_run(
        TrackingConfig(enabled=False), default_dir=tmp_path, run_name="r", params={}, tags={}
    )
    assert type(tracker) is Tracker
    assert tracker.run_id is None and tracker.url is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.log_dict({"a": 1}, "a.json")
    tracker.log_figure(tmp_path / "missing.png", "f.png")
    assert tracker.finish() is True
    assert list(tmp_path.iterdir()) == []


def test_import_is_light():
    """Importing the module pulls in neither mlflow nor torch."""
    code = (
        "import sys, raymeta.train.tracking; "
        "assert 'mlflow' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interrupted_runs_end_killed_and_errors_failed():
    assert end_status(None) == "FINISHED"
    assert end_status(KeyboardInterrupt()) == "KILLED"
    assert end_status(SystemExit(143)) == "KILLED"
    assert end_status(ValueError("bad")) == "FAILED"


def test_a_store_mlflow_refuses_is_a_tracking_error_with_the_fixes(tmp_path, monkeypatch):
    """A bare directory is MLflow's deprecated file store, which it refuses at client creation
    (``MLFLOW_ALLOW_FILE_STORE``, MLflow 3.13 and later). Earlier MLflow still keeps runs
    there: the run is recorded in it."""
    from mlflow import environment_variables

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = str(tmp_path / "mlruns")
    if not hasattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        tracker = start_run(TrackingConfig(tracking_uri=store), default_dir=tmp_path, run_name="r")
        assert tracker.finish()
        assert (tmp_path / "mlruns" / tracker.experiment_id / tracker.run_id / "meta.yaml").exists()
        return
    with pytest.raises(TrackingError) as e:
        start_run(TrackingConfig(tracking_uri=store), default_dir=tmp_path, run_name="r")
    text = str(e.value)
    assert f"MLflow tracking store {store} cannot be used" in text
    assert "sqlite:///<abs dir>/mlflow.db" in text and "tracking.enabled=false" in text


def test_source_tags_take_the_commit_from_the_checkout_else_the_environment(tmp_path, monkeypatch):
    """A script in a git checkout is tagged with its commit; one outside any (a `ray job submit`
    working-dir copy) with ``$RAYMETA_GIT_COMMIT`` when that is a commit id."""
    import shutil
    import subprocess

    from raymeta.train.tracking import source_tags

    def fresh(script):  # computed once per process: forget the last call's
        source_tags.cache_clear()
        return source_tags(script)

    script = tmp_path / "jobs" / "metatrain.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.delenv("RAYMETA_GIT_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no checkout above tmp_path
    assert "mlflow.source.git.commit" not in fresh(script)
    monkeypatch.setenv("RAYMETA_GIT_COMMIT", "not a commit")
    assert "mlflow.source.git.commit" not in fresh(script)
    monkeypatch.setenv("RAYMETA_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    tags = fresh(script)
    assert tags["mlflow.source.git.commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["mlflow.source.name"] == str(script)
    if shutil.which("git"):  # a checkout's own commit wins over the variable
        monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
        env = {
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "PATH": __import__("os").environ["PATH"],
        }
        for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
            subprocess.run(["git", *cmd], cwd=tmp_path, env=env, check=True)
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
        ).stdout.strip()
        assert fresh(script)["mlflow.source.git.commit"] == head
