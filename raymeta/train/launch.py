"""Launching meta-training on Ray: the Ray instance, the TorchTrainer, and the whole job.

* :func:`connect_ray` joins the cluster named by ``train.ray_address`` or
  ``$RAY_ADDRESS`` (set by ``ray job submit``), else the cluster ``ray start`` left running
  on this machine, else starts a private instance sized by ``train.object_store_mb``.
* :func:`fit_objective` trains one objective with a ``TorchTrainer``
  (``train.num_workers`` workers, DeepSpeed in each, checkpoints and restarts
  through ``FailureConfig(train.max_failures)``) and returns where the trained
  weights are.
* :func:`ray_trainer` adapts that to :func:`raymeta.pipeline.run_pipeline`'s
  ``meta_trainer`` hook; :func:`run_job` is the ``jobs/metatrain.py`` entry:
  MLflow run (fail fast), pipeline, results and records as artifacts.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from raymeta.config import ConfigError, RunConfig, to_dict
from raymeta.errors import InputError
from raymeta.paths import in_ray_working_dir
from raymeta.train.checkpoint import MODEL_DIR, read_state
from raymeta.train.engine import check_zero_stage

if TYPE_CHECKING:
    from raymeta.train.tracking import Tracker


@dataclass
class FitResult:
    """What one distributed meta-training run left behind."""

    model_dir: Path
    """The trained weights (``save_pretrained`` directory inside the final checkpoint)."""
    checkpoint_dir: Path
    """The final Ray checkpoint directory."""
    history: list[dict] = field(default_factory=list)
    """Per-step metrics (rank 0), across restarts."""
    steps_log: list[list[int]] = field(default_factory=list)
    """``[step, attempt]`` of every step done."""


def check_launchable(cfg: RunConfig) -> None:
    """Raise ConfigError for settings the Ray path cannot run (before anything starts)."""
    check_zero_stage(cfg.train)
    if cfg.train.precision == "bf16" and cfg.model.dtype != "float32":
        raise ConfigError("train.precision=bf16 expects model.dtype=float32 master weights")


def check_output_dir(out: Path) -> None:
    """Raise InputError when ``out`` (``--output-dir``) or the nearest existing folder above it
    is not a directory, or when it lies in Ray's copy of a submitted job's working dir."""
    if in_ray_working_dir(out):
        raise InputError(
            f"--output-dir {out}: inside this job's copy of the working dir, which Ray deletes "
            "after the job (a relative --output-dir under `ray job submit`); give an absolute "
            "path outside it"
        )
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise InputError(f"--output-dir {out}: {path} is a file, not a directory")
            return


def check_inputs(cfg: RunConfig, out: Path) -> None:
    """Raise InputError for an unusable output dir, model path or data file, before anything
    starts (the MLflow run, Ray)."""
    from raymeta.data.sets import check_source
    from raymeta.models import check_model_path

    check_output_dir(out)
    caches = [("data.cache_dir", cfg.data.cache_dir)]
    if cfg.model.name_or_path == "tiny":
        caches.append(("model.tiny_cache_dir", cfg.model.tiny_cache_dir))
    for field_name, cache in caches:
        if in_ray_working_dir(Path(cache)):
            print(
                f"[cache] {field_name}={cache} lies in this job's copy of the working dir, which "
                "Ray deletes after the job: later jobs build it again (give an absolute path to "
                "keep it)",
                flush=True,
            )
    check_device(cfg.device)
    check_model_path(cfg.model.name_or_path)
    check_source(cfg.data)
    if cfg.meta.lm_source == "file" and cfg.meta.lm_weight > 0:
        from raymeta.outer import read_lm_file

        read_lm_file(cfg.meta.lm_file)
    if cfg.train.launcher == "ray":
        check_ray_address(cfg.train)


def check_device(device: str) -> None:
    """Raise InputError when ``device`` (cuda, cuda:N) names a GPU this torch cannot use."""
    import torch

    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise InputError(
            f"device={device!r}: torch {torch.__version__} sees no CUDA GPU here "
            "(a CPU build, or no driver); use device=cpu"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InputError(
            f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def ray_address(train_cfg) -> tuple[str, str]:
    """The Ray address the job uses and where it was set: ``train.ray_address``, else
    $RAY_ADDRESS, else ``("", "")`` (a ``ray start`` cluster, else a private instance)."""
    if train_cfg.ray_address:
        return train_cfg.ray_address, "train.ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    return "", ""


def check_ray_address(train_cfg, timeout_s: float = 10.0) -> None:
    """Raise InputError when the Ray address the job would use (``train.ray_address``, else
    $RAY_ADDRESS) is a HOST:PORT (or ``auto``'s cluster) that takes no TCP connection within
    ``timeout_s``, or ``auto`` finds no cluster:
    ``ray.init`` would retry such an address for minutes without a word of raymeta's."""
    address, source = ray_address(train_cfg)
    if address in ("", "local"):
        return
    if address == "auto":  # the cluster the last `ray start` on this machine left behind
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            found = None
        if found is None:
            raise InputError(
                f"{source}='auto': no running Ray cluster found on this machine; start one "
                "(`ray start --head`) or leave the address empty to run on a local instance"
            )
        address = found
    scheme, _, rest = address.rpartition("://")
    if scheme in ("http", "https"):
        raise InputError(
            f"{source}={address!r}: an {scheme}:// address is the dashboard's (the one `ray job "
            "submit --address` takes); a job connects to the cluster's GCS, HOST:PORT (`ray "
            "start --port`, 6379 by default), or leave the address empty for the `ray start` "
            "cluster of this machine"
        )
    host, sep, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("", "ray") or not sep or not host or not port.isdigit():
        raise InputError(
            f"{source}={address!r}: expected HOST:PORT, ray://HOST:PORT, auto or local"
        )
    if (error := connection_error(host, int(port), timeout_s)) is not None:
        raise InputError(
            f"{source}={address!r}: no Ray cluster answers at {host}:{port} ({error}); start "
            "one (`ray start --head`) or leave the address empty to run on a local instance"
        )
    if speaks_http(host, int(port), min(timeout_s, 3.0)):
        raise InputError(
            f"{source}={address!r}: {host}:{port} is a web server (the Ray dashboard?), not a "
            "Ray cluster's GCS; give the GCS port (`ray start --port`, 6379 by default)"
        )


def connection_error(host: str, port: int, timeout_s: float) -> OSError | None:
    """Why a TCP connection to ``host:port`` failed within ``timeout_s`` (None: it answered)."""
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout_s).close()
    except OSError as e:
        return e
    return None


def speaks_http(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` answers an HTTP/1.0 request with an HTTP status line (a dashboard
    does; a GCS or Ray client server speaks gRPC and answers with HTTP/2 frames or nothing)."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(b"GET / HTTP/1.0\r\nHost: raymeta\r\n\r\n")
            return conn.recv(5) == b"HTTP/"
    except OSError:
        return False


def auth_token_found() -> bool:
    """Whether this user has a Ray auth token: ``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).expanduser().is_file()


def cluster_init(address: str) -> None:
    """``ray.init(address)`` for a running cluster. With a token at hand and ``$RAY_AUTH_MODE``
    unset, the driver sends it (``RAY_AUTH_MODE=token``): Ray 2.60's ``ray start`` turns token
    authentication on whenever the user has a token, and a cluster without it accepts the
    token too. A cluster that takes no connection (a token it does not accept, say) is an
    InputError that says so, not Ray's ConnectionError."""
    import ray

    if "RAY_AUTH_MODE" not in os.environ and auth_token_found():
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config

        Config.initialize("")  # Ray reads the mode into its config once; read it again
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        where = "~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN"
        if not auth_token_found():
            advice = f"token not found: a cluster with token authentication needs it ({where})"
        elif mode == "token":
            advice = (
                f"the token this job found ({where}) is not the cluster's: copy the head "
                "node's ~/.ray/auth_token"
            )
        else:
            advice = "token found but not sent: set RAY_AUTH_MODE=token"
        raise InputError(
            f"the Ray cluster at {address} did not accept this job's connection ({e}); "
            f"RAY_AUTH_MODE={mode}, {advice}; docs/cluster.md"
        ) from None
    except RuntimeError as e:
        if not str(e).startswith("Version mismatch"):
            raise
        raise InputError(
            f"the Ray cluster at {address} runs {describe_version_mismatch(str(e))}; Ray "
            "requires the same Ray and Python (to the patch release): run the job from the "
            "environment that started the cluster, or set train.ray_address=local for a "
            "private instance"
        ) from None


def describe_version_mismatch(message: str) -> str:
    """One line from Ray's multi-line "Version mismatch" message: "Ray 2.51.0 on Python 3.11.9,
    this job Ray 2.60.0 on Python 3.11.13" (the message itself, joined, if its form changes)."""
    found = re.findall(r"Ray: (\S+)\s+Python: (\S+)", message)
    if len(found) != 2:
        return " ".join(message.split())
    (ray_c, py_c), (ray_j, py_j) = found
    return f"Ray {ray_c} on Python {py_c}, this job Ray {ray_j} on Python {py_j}"


@contextlib.contextmanager
def keeping_signal_handlers():
    """Within the block, ``ray.init`` may replace the SIGTERM handler (with ``sys.exit(15)``) or
    SIGINT's; afterwards the Python handlers the caller had installed (the job's) are put back."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in previous.items():
                if callable(handler):
                    signal.signal(signum, handler)


def connect_ray(train_cfg) -> None:
    """``ray.init`` against the configured cluster, else the one ``ray start`` left running on
    this machine, else a private local instance."""
    import ray

    if ray.is_initialized():
        return
    with keeping_signal_handlers():
        init_ray(train_cfg)


def init_ray(train_cfg) -> None:
    """The ``ray.init`` call of :func:`connect_ray`."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    address, _ = ray_address(train_cfg)
    if address and address != "local":
        cluster_init(address)
        return
    recorded = started_cluster() if not address else None
    if recorded:
        cluster_init(recorded)
        return
    # a private instance: never another job's (``address="auto"`` would join any instance)
    kwargs = {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    if train_cfg.object_store_mb:
        kwargs["object_store_memory"] = train_cfg.object_store_mb * 1024**2
    ray.init(**kwargs)


def started_cluster(timeout_s: float = 2.0) -> str | None:
    """HOST:PORT of the cluster the last ``ray start`` on this machine recorded, if it answers
    (None: none recorded, or it has stopped). Other jobs' private instances are not recorded."""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit() or connection_error(host, int(port), timeout_s) is not None:
        return None
    return address


def check_cluster_fits(train_cfg) -> None:
    """Raise ConfigError when the connected Ray cluster can never hold the worker group.

    Ray Train otherwise retries starting the worker group for resources that never come
    ("No available node types can fulfill resource request"). Only a cluster that cannot
    grow fails here: an autoscaling cluster publishes its node groups (the autoscaler's
    cluster config) and may still add nodes, and against that config's maximum Ray Train
    fails fast itself. Without that config (a local instance, nodes started by hand with
    ``ray start``) nothing adds nodes, so the resources it has now are all it will have."""
    import ray
    from ray._private.state import state  # the call Ray Train's own check makes

    if state.get_max_resources_from_cluster_config():
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    total = ray.cluster_resources()
    need = {"CPU": train_cfg.cpus_per_worker, "GPU": 1.0 if train_cfg.use_gpu else 0.0}
    for kind, per_worker in need.items():
        largest = max((node.get(kind, 0.0) for node in nodes), default=0.0)
        if per_worker * train_cfg.num_workers > total.get(kind, 0.0) or per_worker > largest:
            raise ConfigError(unfit_message(train_cfg, kind, total.get(kind, 0.0), largest))


def unfit_message(train_cfg, kind: str, total: float, largest: float) -> str:
    """The error text of :func:`check_cluster_fits` for resource ``kind`` (CPU or GPU)."""
    n = train_cfg.num_workers
    if kind == "GPU":
        asked = f"train.use_gpu=true with train.num_workers={n} needs {n} GPU(s)"
        fix = "set train.use_gpu=false, lower train.num_workers, or use a cluster with GPUs"
    else:
        c = train_cfg.cpus_per_worker
        asked = f"train.num_workers={n} x train.cpus_per_worker={c:g} needs {n * c:g} CPUs"
        fix = "lower train.num_workers or train.cpus_per_worker, or add nodes first"
    return (
        f"{asked}, but the Ray cluster has {total:g} {kind} in all "
        f"({largest:g} on its largest node) and no autoscaler to add nodes: {fix}"
    )


def start_ray(train_cfg) -> None:
    """Connect to Ray (:func:`connect_ray`) and check the worker group can fit there."""
    connect_ray(train_cfg)
    check_cluster_fits(train_cfg)


def fit_objective(
    cfg: RunConfig,
    objective: str,
    model_dir: str | Path,
    train,
    test,
    output_dir: str | Path,
    tracking: dict | None = None,
    fault: dict | None = None,
    run_name: str | None = None,
    history: list[dict] | None = None,
) -> FitResult:
    """Meta-train ``objective`` from ``model_dir`` on Ray workers; the trained weights' location.

    Checkpoints live under ``output_dir/ray/<run_name>`` (Ray's storage path; use a shared
    filesystem on a multi-node cluster). Ray resumes a run of the same name from its last
    checkpoint, so every job gives its own ``run_name``. ``fault`` is a test hook (see worker).
    ``history`` (a list) receives the step records: the final checkpoint's, or, if the fit is
    stopped (Ctrl-C, SIGTERM), fails or diverges, those rank 0 appended beside the checkpoints
    as each step ended."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymeta.train.worker import DIVERGED, read_history, train_loop

    check_launchable(cfg)
    start_ray(cfg.train)
    t = cfg.train
    storage = Path(output_dir).expanduser().resolve() / "ray"
    name = run_name or f"{cfg.name}-{objective}"
    steps_dir = storage / name  # rank 0's step records as it goes: read if the fit stops
    history = [] if history is None else history
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "objective": objective,
            "model_dir": str(model_dir),
            "train": list(train),
            "test": list(test),
            "tracking": tracking,
            "fault": fault,
            "steps_dir": str(steps_dir),
        },
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
        ),
    )
    try:
        result = fit_off_main_thread(trainer)
        if result.checkpoint is None:
            raise RuntimeError(
                f"meta-training {objective} ended without a checkpoint: {result.error}"
            )
        ckpt = Path(result.checkpoint.path)
        if (ckpt / DIVERGED).is_file():
            from raymeta.outer import MetaTrainingDiverged

            raise MetaTrainingDiverged((ckpt / DIVERGED).read_text())
    except BaseException:
        with contextlib.suppress(OSError, ValueError):  # (the error that stopped it comes first)
            history[:] = read_history(steps_dir)
        raise
    from raymeta.models import point_adapter_at_base

    point_adapter_at_base(ckpt / MODEL_DIR)  # it was written in a worker's temporary folder
    state = read_state(ckpt)
    history[:] = read_history(ckpt)
    return FitResult(ckpt / MODEL_DIR, ckpt, history, state.steps_log)


def fit_off_main_thread(trainer):
    """``trainer.fit()`` in a daemon thread while the main thread waits, interruptibly.

    Called from the main thread, Ray Train replaces the SIGINT handler with its own, so Ctrl-C
    would end the job with exit 1 and no word of ours; from another thread it installs none
    (as under Tune), and the job's handlers (Ctrl-C, SIGTERM) stay in force."""
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def load_weights_into(model, model_dir: str | Path, cfg: RunConfig) -> None:
    """Copy the trained weights of ``model_dir`` into ``model`` in place."""
    from raymeta.models import load_model

    trained, _ = load_model(str(model_dir), cfg.model.dtype, cfg.model.attn_implementation, "cpu")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in trained.state_dict().items()})


def ray_trainer(output_dir: str | Path, runs: JobRuns | None = None):
    """A ``meta_trainer`` for run_pipeline that trains each objective on Ray workers.

    The base model is written once with save_pretrained; the workers load it
    (and a frozen copy as the LC teacher). ``runs``: the job's MLflow runs; each objective
    gets a child run that rank 0 logs per-step metrics to."""
    out = Path(output_dir).expanduser().resolve()
    job = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    base_dir = out / "ray" / f"base_model-{job}"

    def meta_trainer(model, tokenizer, train, test, cfg, objective, teacher, history):
        from raymeta.models import save_model

        if not (base_dir / "config.json").is_file():  # once per job: the base of every objective
            save_model(model, tokenizer, base_dir)
        with child_run(cfg, objective, out, runs) as (_, info):
            result = fit_objective(
                cfg,
                objective,
                base_dir,
                train,
                test,
                out,
                info,
                run_name=f"{cfg.name}-{objective}-{job}",
                history=history,
            )
            load_weights_into(model, result.model_dir, cfg)
        model.eval()

    return meta_trainer


@dataclass
class JobRuns:
    """The job's MLflow run and its objectives' child runs. A child run stays open until its
    model is evaluated (:meth:`log_result`), so it holds that model's eval metrics beside its
    per-step curves, and child runs of LG and LC compare column for column in the MLflow UI."""

    parent: Tracker | None
    """The job's run (None until it opens, once the job's inputs have passed their checks)."""
    tags: dict[str, str]
    """Tags every run of the job carries (the command line's overrides, the output directory)."""
    children: dict[str, Tracker] = field(default_factory=dict)
    """The open child run of each objective meta-trained and not yet evaluated."""

    def log_result(self, model: str, metrics: dict) -> None:
        """``model``'s eval metrics: ``<model>.<setting>.<metric>`` on the job's run and
        ``<setting>.<metric>`` on the model's child run, which then ends."""
        self.parent.log_metrics(eval_metrics(metrics, prefix=f"{model}."), step=0)
        child = self.children.pop(model, None)
        if child is not None:
            child.log_metrics(eval_metrics(metrics), step=0)
            child.finish()

    def end(self, status: str = "FINISHED") -> None:
        """End the child runs still open (a job stopped between a model's training and its
        evaluation), then the job's run, with ``status``."""
        for child in self.children.values():
            child.finish(status)
        self.children.clear()
        self.parent.finish(status)


def eval_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """``{prefix + "<setting>.<metric>": value}`` of one model's numeric eval metrics (not the
    triple count ``n``: a param, ``eval.n_examples``, says it)."""
    return {
        f"{prefix}{setting}.{k}": v
        for setting, m in metrics.items()
        for k, v in m.items()
        if isinstance(v, (int, float)) and k != "n"
    }


@contextlib.contextmanager
def child_run(cfg: RunConfig, objective: str, out: Path, runs: JobRuns | None):
    """Within the block, ``(tracker, worker info)`` of an MLflow child run of the job's run
    for ``objective`` (a no-op tracker without one). A block that raises ends it KILLED or
    FAILED; one that completes leaves it open in ``runs.children`` for the model's eval
    metrics (:meth:`JobRuns.log_result` ends it)."""
    from raymeta.train.tracking import Tracker, end_status, source_tags, start_run

    if runs is None or runs.parent is None or runs.parent.run_id is None:
        yield Tracker(), None
        return
    child = start_run(
        cfg.tracking,
        default_dir=out,
        run_name=f"{cfg.name}-{objective}",
        params={**to_dict(cfg), "objective": objective},  # filterable by config, as the job's
        tags={
            **run_tags(cfg, objective),
            **source_tags(sys.argv[0] or "jobs/metatrain.py"),
            **runs.tags,
            "mlflow.parentRunId": runs.parent.run_id,
        },
    )
    info = {
        "uri": child.uri,
        "experiment_id": child.experiment_id,
        "run_id": child.run_id,
        "spill_dir": str(out / "mlflow_spill"),
    }
    try:
        yield child, info
    except BaseException as e:
        child.finish(end_status(e))
        raise
    runs.children[objective] = child


def run_tags(cfg: RunConfig, model_kind: str) -> dict[str, str]:
    """The house tags: experiment, dataset, model_kind, setting."""
    return {
        "experiment": cfg.experiment,
        "dataset": cfg.data.dataset,
        "model_kind": model_kind,
        "setting": ",".join(cfg.eval.settings),
        "launcher": cfg.train.launcher,
    }


RAY_ONLY = (
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "zero_stage",
    "precision",
    "report_every",
    "eval_every",
    "checkpoint_every",
    "checkpoints_to_keep",
    "max_failures",
    "ray_address",
    "object_store_mb",
)
"""The ``train`` fields that only the Ray launcher uses."""


def changed_fields(section, prefix: str, names: Sequence[str]) -> list[str]:
    """``<prefix>.<field>=<value>`` of each of ``names`` that ``section`` (a config dataclass)
    sets away from its default."""
    default = type(section)()
    return [
        f"{prefix}.{k}={getattr(section, k)!r}"
        for k in names
        if getattr(section, k) != getattr(default, k)
    ]


def unused_by_local(train_cfg) -> list[str]:
    """``train.<field>=<value>`` of each Ray-only field set away from its default."""
    return changed_fields(train_cfg, "train", RAY_ONLY)


def unused_lora(lora_cfg) -> list[str]:
    """``model.lora.<field>=<value>`` of each LoRA field set while ``enabled`` is false."""
    if lora_cfg.enabled:
        return []
    return changed_fields(lora_cfg, "model.lora", ("rank", "alpha", "target_modules", "mode"))


def local_trainer_logged(output_dir: Path, runs: JobRuns):
    """The in-process meta_trainer; each objective's per-step metrics go to an MLflow child run
    of the job's run, as on the Ray launcher."""
    from raymeta.pipeline import local_trainer

    def meta_trainer(model, tokenizer, train, test, cfg, objective, teacher, history):
        with child_run(cfg, objective, output_dir, runs) as (child, _):

            def on_log(stats, step):
                child.log_metrics(
                    {k: v for k, v in stats.items() if k != "step" and isinstance(v, (int, float))},
                    step,
                )

            local_trainer(model, tokenizer, train, test, cfg, objective, teacher, history, on_log)

    return meta_trainer


def name_deepspeed_accelerator() -> None:
    """``DS_ACCELERATOR=cpu`` where torch sees no GPU and none is named: DeepSpeed's own
    choice there, without the warning it prints mid-job (at the first import, a model save)."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def run_job(cfg: RunConfig, output_dir: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The metatrain job: MLflow run, pipeline (Ray or in-process), results to MLflow.

    ``overrides`` (the command line's dotted overrides) and the output directory are tagged
    on the MLflow run, so runs of one config (one run name) can be told apart and repeated.

    The MLflow run opens once the data and the model have loaded and passed their checks (bad
    input stops the job with no run in the store; a tracking server that does not answer
    stops it before anything loads). It ends FINISHED, KILLED when interrupted (Ctrl-C, or
    SIGTERM made into SystemExit by the job), else FAILED; each model's eval metrics are logged
    as soon as it is evaluated, and a run that ends early still gets the result files written
    by then."""
    from raymeta.pipeline import run_pipeline
    from raymeta.train.tracking import check_server, end_status, source_tags, start_run

    name_deepspeed_accelerator()
    out = Path(output_dir).expanduser().resolve()
    check_inputs(cfg, out)
    check_server(cfg.tracking, out)  # a server that does not answer: before Ray, before loading
    if cfg.train.launcher == "ray":
        check_launchable(cfg)
        if cfg.meta.objectives:
            start_ray(cfg.train)  # a cluster the workers cannot fit: before any MLflow run
    kinds = ",".join(["BM", *cfg.meta.objectives])
    runs = JobRuns(None, {"overrides": " ".join(overrides), "output_dir": str(out)})
    evaluated: list[str] = []

    def open_run() -> None:
        runs.parent = start_run(
            cfg.tracking,
            default_dir=out,
            run_name=cfg.name,
            params=to_dict(cfg),
            tags={
                **run_tags(cfg, kinds),
                **source_tags(sys.argv[0] or "jobs/metatrain.py"),
                **runs.tags,
            },
        )

    def on_result(name: str, metrics: dict) -> None:
        evaluated.append(name)
        runs.log_result(name, metrics)

    try:
        if cfg.train.launcher == "ray":
            trainer = ray_trainer(out, runs)
        else:
            if unused := unused_by_local(cfg.train):
                print(
                    "[train] train.launcher=local meta-trains in this process; not used: "
                    + ", ".join(unused),
                    flush=True,
                )
            trainer = local_trainer_logged(out, runs)
        if unused := unused_lora(cfg.model.lora):
            print(
                "[model] model.lora.enabled=false (no adapter is added); not used: "
                + ", ".join(unused),
                flush=True,
            )
        results = run_pipeline(
            cfg, out, meta_trainer=trainer, on_result=on_result, on_ready=open_run
        )
        log_artifacts(runs.parent, out)
    except BaseException as e:
        if runs.parent is not None:  # (none yet: the inputs were refused, nothing was written)
            if evaluated:  # this job's files (an earlier job's were moved to previous/ by then)
                log_artifacts(runs.parent, out)
            runs.end(end_status(e))
        raise
    runs.end()
    return results


def log_artifacts(tracker, out: Path) -> None:
    """The results table, figure, summary, config and per-example records as artifacts."""
    from raymeta.pipeline import RESULT_FILES

    for name in RESULT_FILES:
        if (out / name).is_file():
            tracker.log_artifact(out / name)
    if (out / "records").is_dir():
        tracker.log_artifact(out / "records", "records")
