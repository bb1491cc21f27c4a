"""MLflow tracking against real stores: the embedded sqlite one and a real `mlflow server`.

No mocks: a server is started on a free port, killed mid-run and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raymeta.config import RunConfig, TrackingConfig, to_dict
from raymeta.train.tracking import TrackingError, replay_spill, start_run
from raymeta.train.tracking import main as tracking_main

pytestmark = pytest.mark.integration

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` process group on 127.0.0.1 that a test can kill and restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Launch the server and wait until /health answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            MLFLOW,
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--default-artifact-root",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the whole process group (server, workers, job runners)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server")
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


def test_local_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a stray relative path would land here and be caught below
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    out = tmp_path / "out"
    cfg = RunConfig()
    cfg.meta.inner_lr = 0.001
    tracker = start_run(
        TrackingConfig(enabled=True, experiment="exp-local"),
        default_dir=out,
        run_name="local-run",
        params=to_dict(cfg),
        tags={"experiment": "main", "dataset": "character_descriptions", "model_kind": "tiny"},
    )
    assert tracker.url is None
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note)
    tracker.log_artifact(note, "notes")
    tracker.log_dict({"acc": 0.5, "settings": ["NC", "FT"]}, "eval/results.json")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    tracker.log_figure(fig, "plots/loss.png")
    assert tracker.finish() is True
    assert not tracker.spill_path.exists()

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "local-run"
    assert run.data.params["meta.inner_lr"] == "0.001"
    assert run.data.params["model.tiny.hidden_size"] == "128"
    assert run.data.params["meta.objectives"] == "['LG', 'LC']"
    assert run.data.tags["dataset"] == "character_descriptions"
    assert run.data.tags["model_kind"] == "tiny"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert len(client.get_metric_history(tracker.run_id, "acc")) == 5

    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"note.txt", "notes", "eval", "plots"} <= names
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/loss.png"]
    local = Path(client.download_artifacts(tracker.run_id, "eval/results.json", str(tmp_path)))
    assert json.loads(local.read_text())["settings"] == ["NC", "FT"]

    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "exp-local"
    location = experiment.artifact_location
    assert location.startswith("file:///")
    assert Path(location[len("file://") :]).is_relative_to(out.resolve())
    assert run.info.artifact_uri.startswith(location)
    assert not (tmp_path / "mlruns").exists()

    # A second run reuses the experiment; a crash before finish() is recovered from the spill.
    crashed = start_run(
        TrackingConfig(enabled=True, experiment="exp-local"),
        default_dir=out,
        run_name="crashed",
        params={},
        tags={},
    )
    crashed.log_metrics({"loss": 2.0}, step=0)
    crashed.log_metrics({"loss": 1.0}, step=1)
    assert replay_spill(crashed.spill_path) == crashed.run_id  # nothing doubles
    history = client.get_metric_history(crashed.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0)]
    assert client.get_run(crashed.run_id).info.experiment_id == run.info.experiment_id


def test_server_killed_and_restarted_mid_run(server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow import MlflowClient

    tracker = start_run(
        TrackingConfig(enabled=True, tracking_uri=server.uri, experiment="exp-server"),
        default_dir=tmp_path / "out",
        run_name="flaky",
        params={"meta": {"inner_lr": 1e-3}},
        tags={"setting": "FT"},
        retry_interval_s=1.0,
        flush_timeout_s=30.0,
    )
    assert (
        tracker.url == f"{server.uri}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
    )
    doomed = start_run(
        TrackingConfig(enabled=True, tracking_uri=server.uri, experiment="exp-server"),
        default_dir=tmp_path / "out",
        run_name="finishes-while-down",
        params={},
        tags={},
        flush_timeout_s=2.0,
    )
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step=step)
    doomed.log_metrics({"x": 0.0}, step=0)

    server.kill()
    doomed.log_metrics({"x": 1.0}, step=1)
    t0 = time.monotonic()
    assert doomed.finish() is False  # bounded wait, spill kept
    assert time.monotonic() - t0 < 10
    assert doomed.spill_path.exists()
    for step in range(10, 20):
        t0 = time.monotonic()
        tracker.log_metrics({"loss": float(step)}, step=step)
        assert time.monotonic() - t0 < 3.0
    assert len(tracker._metrics) == 10  # buffered, not lost

    server.start()
    for step in range(20, 30):
        tracker.log_metrics({"loss": float(step)}, step=step)
        time.sleep(0.05)
    assert tracker.finish() is True
    assert not tracker.spill_path.exists()

    client = MlflowClient(tracking_uri=server.uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == list(range(30))
    assert [m.value for m in history] == [float(s) for s in range(30)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["meta.inner_lr"] == "0.001"
    assert run.data.tags["setting"] == "FT"

    # the command line takes the spill directory (here holding only the doomed run's file)
    assert tracking_main(["replay", str(doomed.spill_path.parent)]) == 0
    assert [m.value for m in client.get_metric_history(doomed.run_id, "x")] == [0.0, 1.0]
    assert client.get_run(doomed.run_id).info.status == "FINISHED"


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as info:
        start_run(
            TrackingConfig(enabled=True, tracking_uri=uri),
            default_dir=tmp_path,
            run_name="r",
            params={},
            tags={},
        )
    assert time.monotonic() - t0 < 30
    message = str(info.value)
    assert uri in message
    assert "tracking.enabled=false" in message and "MLFLOW_TRACKING_URI" in message
