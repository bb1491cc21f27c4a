"""The local-cluster path for real: `ray start --head`, `ray job submit` of jobs/metatrain.py,
progress in the job's logs, the run in the MLflow store; the cluster is torn down after.

The cluster is started with ``ray start --head --block`` in its own process group and
torn down by signalling that group (plus any process left that names this test's temp
dir), which stops exactly this cluster, like ``ray stop`` does for a machine's only one,
without touching other Ray instances on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = [
    ".venv",
    ".git",
    ".cache",
    "runs",
    "mlruns",
    "outputs",
    ".pytest_cache",
    ".ruff_cache",
    "**/__pycache__",
]


AGENT_PORTS = (
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "metrics-export",
    "runtime-env-agent",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_answers(url: str) -> bool:
    """Whether a web server answers at ``url`` (any status: 401 under token auth, 404)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def cluster_env(temp: Path) -> dict:
    """The environment of the test's cluster and its clients: token authentication with a
    token of its own (in ``temp``; a fresh machine has no ``~/.ray/auth_token``)."""
    token = temp / "auth_token"
    if not token.is_file():
        token.write_text(secrets.token_hex(32))
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        TMPDIR=str(temp),
        RAY_TMPDIR=str(temp),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    return env


# What the job head reads before it hands a submission to the head node's dashboard agent
# (ray/dashboard/modules/job/job_head.py, `_get_head_node_agent_once`): the head node's id,
# which the dashboard's node module writes once it sees the node alive, and the agent's
# address under that id, which the agent writes after its HTTP server is up. Either can lag
# the servers answering by more than the head's 10 s wait on a busy 2-core machine.
AGENT_REGISTERED = """
import sys, time
from ray._private.ray_constants import (
    KV_HEAD_NODE_ID_KEY, KV_NAMESPACE_DASHBOARD, KV_NAMESPACE_JOB,
)
from ray._raylet import GcsClient
from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

gcs = GcsClient(address=sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    head = gcs.internal_kv_get(KV_HEAD_NODE_ID_KEY, KV_NAMESPACE_JOB)
    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{(head or b'').decode()}".encode()
    if head and gcs.internal_kv_get(key, KV_NAMESPACE_DASHBOARD):
        sys.exit(0)
    time.sleep(0.5)
sys.exit(f"the head node's job agent is not registered in the GCS at {sys.argv[1]}")
"""


def stop_cluster(proc: subprocess.Popen, temp: Path) -> None:
    """Stop the `ray start --block` group, then anything still naming our temp dir."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(temp) in cmdline and int(pid_dir.name) != os.getpid():
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def cluster():
    """A head node on 127.0.0.1 with 2 CPUs, a 256 MB object store and the dashboard."""
    temp = Path(f"/tmp/rj{os.getpid()}")
    temp.mkdir(exist_ok=True)
    dash = free_port()
    agent_ports = {name: free_port() for name in AGENT_PORTS}
    env = cluster_env(temp)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs_port := free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--include-dashboard",
        "true",
        "--ray-client-server-port",
        str(free_port()),
        # ports of its own, so that it can run beside another cluster on this machine
        *[f"--{name}-port={port}" for name, port in agent_ports.items()],
        "--object-store-memory",
        str(256 * 1024**2),
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=open(temp / "ray_start.log", "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        # the dashboard, then the head node's job agent registered in the GCS (after its
        # HTTP server is up): on a busy 2-core machine that can come more than 10 s after
        # the dashboard answers, and a submission before then fails with "No available agent"
        t0 = time.monotonic()
        deadline = t0 + 90
        while not http_answers(address + "/api/version"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (temp / "ray_start.log").read_text()
                raise RuntimeError(f"ray start: nothing answers at {address}:\n{log}")
            time.sleep(0.5)
        print(f"cluster: the dashboard answers after {time.monotonic() - t0:.1f} s")
        left = max(deadline - time.monotonic(), 1.0)
        probe = [sys.executable, "-c", AGENT_REGISTERED, f"127.0.0.1:{gcs_port}", str(left)]
        registered = subprocess.run(probe, env=env, capture_output=True, text=True)
        if registered.returncode != 0:
            log = (temp / "ray_start.log").read_text()
            raise RuntimeError(f"{registered.stderr[-3000:]}\n{log}")
        print(f"cluster: the job agent is registered after {time.monotonic() - t0:.1f} s")
        env["RAYMETA_TEST_GCS"] = f"127.0.0.1:{gcs_port}"  # for drivers run here
        yield address, env
    finally:
        stop_cluster(proc, temp)


def submit_command(address: str, env: dict, out: Path, tmp_path: Path, *flags: str) -> list[str]:
    """``ray job submit`` (with ``flags``) of the job on configs/tiny_char_ray.yaml."""
    runtime_env = {
        "excludes": EXCLUDES,
        "env_vars": {
            k: env[k]
            for k in (
                "MLFLOW_DISABLE_TELEMETRY",
                "HF_HUB_OFFLINE",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
            )
        },
    }
    return [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        *flags,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "jobs/metatrain.py",
        "--config",
        "configs/tiny_char_ray.yaml",
        "--output-dir",
        str(out),
        f"model.tiny_cache_dir={tmp_path / 'models'}",
    ]


def test_ray_job_submit_metatrain(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "out"
    cmd = submit_command(address, env, out, tmp_path)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    logs = proc.stdout + proc.stderr
    print(f"ray job submit: rc={proc.returncode} in {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, logs[-6000:]
    assert "succeeded" in logs.lower(), logs[-3000:]
    assert "[meta-train LG" in logs and "step 8/8" in logs, logs[-3000:]
    assert "Reporting training result" not in logs  # Ray's per-report INFO lines are quiet
    assert "[eval LG]" in logs
    assert json.loads((out / "results.json").read_text()).keys() == {"BM", "LG"}
    # the model saved for the user holds the final checkpoint's weights
    from safetensors.torch import load_file

    *_, final = sorted(out.glob("ray/tiny_char_ray-LG-*/checkpoint_*/model/model.safetensors"))
    saved = load_file(out / "models" / "LG" / "model.safetensors")
    trained = load_file(final)
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raymeta")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent, child = runs["tiny_char_ray"], runs["tiny_char_ray-LG"]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert parent.data.params["meta.inner_lr"] == "0.3"
    assert parent.data.params["train.zero_stage"] == "2"
    assert parent.data.tags["experiment"] == "smoke"
    assert parent.data.tags["dataset"] == "character_descriptions"
    assert parent.data.tags["model_kind"] == "BM,LG"
    assert parent.data.tags["overrides"] == f"model.tiny_cache_dir={tmp_path / 'models'}"
    assert parent.data.tags["output_dir"] == str(out.resolve())
    assert child.data.tags["model_kind"] == "LG"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "LG.FT.accuracy" in parent.data.metrics
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "outer_loss")]
    assert sorted(steps) == list(range(1, 9))
    assert "eval_FT_accuracy" in child.data.metrics
    assert child.data.metrics["FT.accuracy"] == parent.data.metrics["LG.FT.accuracy"]
    assert child.data.tags["output_dir"] == str(out.resolve())
    assert child.data.params["meta.inner_lr"] == "0.3" and child.data.params["objective"] == "LG"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.md", "records", "config.yaml"} <= artifacts
    records = {a.path for a in client.list_artifacts(parent.info.run_id, "records")}
    assert {"records/BM.jsonl", "records/LG.jsonl"} <= records
    assert "results.png" in artifacts

    # a second job into the same output directory trains afresh (Ray must not resume the
    # first job's finished run) and keeps the first job's results
    first = (out / "results.json").read_text()
    cmd[-1:] = [cmd[-1], "meta.steps=4"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    assert "step 4/4" in logs and "resumed at step" not in logs, logs[-3000:]
    kept = list((out / "previous").glob("*/results.json"))
    assert len(kept) == 1 and kept[0].read_text() == first
    parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'tiny_char_ray'")
    assert len(parents) == 2


def test_ray_job_stop_ends_the_runs_and_keeps_the_curve(cluster, tmp_path):
    """``ray job stop`` (SIGTERM, then SIGKILL after Ray's 3 s): within that time the job ends
    its MLflow runs KILLED and writes summary.json and results.png with LG's steps so far."""
    address, env = cluster
    out = tmp_path / "out"
    cmd = submit_command(address, env, out, tmp_path, "--no-wait")
    cmd += ["meta.steps=100000", "meta.epochs=100000", "meta.log_every=1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (job,) = set(re.findall(r"raysubmit_\w+", proc.stdout + proc.stderr))
    ray = [str(BIN / "ray"), "job"]
    where = ["--address", address]
    deadline = time.monotonic() + 300
    while True:  # until rank 0 has printed step 3 (steps 1-2 are recorded by then)
        logs = subprocess.run(
            [*ray, "logs", job, *where], env=env, capture_output=True, text=True, timeout=60
        ).stdout
        if re.search(r"\[meta-train LG.*\] step 3/", logs):
            break
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(1)
    stop = subprocess.run(
        [*ray, "stop", job, *where], env=env, capture_output=True, text=True, timeout=120
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = subprocess.run(
        [*ray, "status", job, *where], env=env, capture_output=True, text=True, timeout=60
    )
    assert "was stopped" in status.stdout + status.stderr, status.stdout + status.stderr
    logs = subprocess.run(
        [*ray, "logs", job, *where], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert logs.strip().splitlines()[-1] == "stopped by SIGTERM", logs[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = [h["step"] for h in summary["history"]["LG"]]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1)), summary["history"]
    assert summary["stopped"] == {"LG": f"SystemExit(143) after step {steps[-1]}"}, summary
    assert summary["complete"] is False
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raymeta").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert {"summary.json", "results.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }


DRIVER = """
import ray
from raymeta.config import from_dict
from raymeta.errors import InputError
from raymeta.train.launch import check_ray_address, connect_ray
train = from_dict({"train": {"ray_address": "%s"}}).train
check_ray_address(train)  # a GCS: it answers, and not as a web server
try:
    connect_ray(train)
    print("CPUs", ray.cluster_resources()["CPU"])
except InputError as e:
    print("InputError:", e)
"""


def test_a_driver_here_sends_the_token_it_finds(cluster, tmp_path):
    """The cluster has token authentication; a driver run on this machine without
    RAY_AUTH_MODE sends the token it finds; one without a token, or with another one, is told
    why it failed. (Ray before 2.52 has no token authentication: nothing to send there.)"""
    import ray

    from tests.helpers import older_than

    if older_than(ray, 2, 52):
        pytest.skip(f"Ray {ray.__version__} has no token authentication (2.52 added it)")
    _, env = cluster
    code = DRIVER % env["RAYMETA_TEST_GCS"]
    plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    ok = subprocess.run(
        [sys.executable, "-c", code], env=plain, cwd=ROOT, capture_output=True, text=True
    )
    assert "CPUs 2.0" in ok.stdout, ok.stdout + ok.stderr[-3000:]
    lost = {**plain, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"), "HOME": str(tmp_path)}
    refused = subprocess.run(
        [sys.executable, "-c", code], env=lost, cwd=ROOT, capture_output=True, text=True
    )
    assert "InputError: the Ray cluster at 127.0.0.1:" in refused.stdout, refused.stderr[-3000:]
    assert "token not found" in refused.stdout
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    other = {**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}  # RAY_AUTH_MODE=token, another token
    refused = subprocess.run(
        [sys.executable, "-c", code], env=other, cwd=ROOT, capture_output=True, text=True
    )
    assert "InputError: the Ray cluster at 127.0.0.1:" in refused.stdout, refused.stderr[-3000:]
    assert "the token this job found" in refused.stdout and "is not the cluster's" in refused.stdout


def test_a_driver_of_another_ray_is_told_which_versions_differ(cluster):
    """A job started with another Ray than the cluster's (another environment on the machine;
    here the driver's Ray reports another version, the cluster is real) stops with one line
    that names both versions, not Ray's RuntimeError and traceback."""
    import ray

    _, env = cluster
    gcs = env["RAYMETA_TEST_GCS"]
    code = "import ray\nray.__version__ = '2.0.0'\n" + DRIVER % gcs
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    python = platform.python_version()
    expected = (
        f"InputError: the Ray cluster at {gcs} runs Ray {ray.__version__} on Python {python}, "
        f"this job Ray 2.0.0 on Python {python}; Ray requires the same Ray and Python"
    )
    assert expected in run.stdout, run.stdout + run.stderr[-3000:]
    assert "train.ray_address=local" in run.stdout
