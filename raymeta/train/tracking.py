"""MLflow wiring for rank 0 of training jobs, sweeps and evaluation jobs.

:func:`start_run` checks that the tracking store is reachable *before* training
starts, creates the experiment (with an absolute artifact location for local
stores, so Ray Tune's chdir cannot scatter artifacts), logs the flattened
config as params and returns a :class:`Tracker`.

A tracker never lets a dead tracking server stop or stall training: metrics and
artifacts are buffered in memory, appended to a JSONL spill file under the
output directory, and sent with short timeouts and no client-side retries.
Whatever could not be sent is retried on later calls and at :meth:`Tracker.finish`;
if it still cannot be sent, the spill file is kept and :func:`replay_spill`
sends it later. The SQL store ignores metric rows it already holds, so a resend
after an ambiguous timeout does not duplicate points.

``import mlflow`` happens inside functions only: ``import raymeta`` stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import posixpath
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raymeta.config import TrackingConfig

MAX_PARAM_VALUE = 6000
"""MLflow's limit on a param value (characters)."""
MAX_TAG_VALUE = 8000
"""MLflow's limit on a tag value (characters)."""
MAX_KEY = 250
"""MLflow's limit on a param, tag or metric key (characters)."""
_BATCH_METRICS = 1000
_BATCH_PARAMS_TAGS = 100
_TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
# MlflowException error codes that will not go away by resending the same request.
_PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the fix."""


# --------------------------------------------------------------------------- helpers


def disable_telemetry() -> None:
    """Turn MLflow's usage telemetry off unless the user set it explicitly."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(configured: str, default_dir: str | Path) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs dir>/mlflow.db``."""
    if configured and configured.strip():
        return configured.strip()
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(default_dir).expanduser().resolve() / 'mlflow.db'}"


def is_http(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (http or https)."""
    return uri.startswith(("http://", "https://"))


def sanitize_key(key: str) -> str:
    """A key MLflow accepts: bad characters become ``_``, no path tricks, at most 250 chars."""
    key = _BAD_KEY_CHARS.sub("_", str(key)) or "_"
    norm = posixpath.normpath(key)
    if norm != key or norm in (".", "..") or norm.startswith(("/", "..")):
        key = key.replace("/", "_")
        if key in (".", ".."):
            key = key.replace(".", "_")
    return key[:MAX_KEY]


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, marked when cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (or dataclasses) → ``{"meta.inner_lr": "0.001"}``, valid MLflow params.

    Lists, None and other leaves become ``str(value)``; values are cut to 6000
    characters and keys are sanitized (see :func:`sanitize_key`).
    """
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, key + "."))
        else:
            out[sanitize_key(key)] = truncate(str(v), MAX_PARAM_VALUE)
    return out


def check_reachable(uri: str, timeout_s: float = 5.0, tries: int = 2) -> None:
    """GET ``<uri>/health`` of a tracking server; raise :class:`TrackingError` if it fails."""
    if not is_http(uri):
        return
    url = uri.rstrip("/") + "/health"
    error: Exception | None = None
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                error = RuntimeError(f"HTTP {response.status}")
        except (urllib.error.URLError, OSError) as e:
            error = e
        if attempt + 1 < tries:
            time.sleep(1.0)
    raise TrackingError(_store_message(uri, f"is not reachable: {error}"))


def _store_message(uri: str, problem: str) -> str:
    """The error text for a tracking store that cannot be used: ``problem`` and the fixes."""
    source = " (from $MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") == uri else ""
    return (
        f"MLflow tracking store {uri}{source} {problem}. Fix one of: point tracking.tracking_uri "
        "(or $MLFLOW_TRACKING_URI) at a running server (e.g. `mlflow server --backend-store-uri "
        "sqlite:///<dir>/mlflow.db --default-artifact-root <abs dir>/artifacts --host 127.0.0.1 "
        "--port 5000`) or at a sqlite:///<abs dir>/mlflow.db store; or unset both to log to a "
        "local store in the output directory; or set tracking.enabled=false."
    )


@contextlib.contextmanager
def fast_http(timeout_s: float, retries: int = 0) -> Iterator[None]:
    """Within the block, MLflow HTTP calls time out after ``timeout_s`` and do not retry.

    MLflow reads these variables on every request; its defaults (7 retries with
    backoff, 120 s timeout) make one call against a dead server hang for minutes.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s))),
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def local_artifact_root(uri: str, default_dir: str | Path) -> Path | None:
    """Absolute artifact root for a store without a server; None for tracking servers."""
    if is_http(uri) or uri.startswith("databricks"):
        return None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return db.expanduser().resolve().parent / "artifacts"
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file://") :] if uri.startswith("file://") else uri.removeprefix("file:")
        return Path(path).expanduser().resolve() / "artifacts"
    return Path(default_dir).expanduser().resolve() / "artifacts"


def ensure_experiment(client: Any, name: str, artifact_root: Path | None) -> str:
    """The id of experiment ``name``, created (under ``artifact_root``/name if given) if missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if artifact_root is not None:
        location = (artifact_root / sanitize_key(name).replace("/", "_")).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another trial created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def _chunks(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _warn(message: str) -> None:
    """One line on stderr (Ray forwards worker stderr to the driver)."""
    print(f"[raymeta.tracking] {message}", file=sys.stderr, flush=True)


@functools.cache
def source_tags(script: str | Path) -> dict[str, str]:
    """MLflow's own user and source tags for a run started by ``script`` (its fluent API sets
    them; the client does not): the user, the script, and the git commit of its checkout when
    there is one, else ``$RAYMETA_GIT_COMMIT`` (a ``ray job submit`` working dir has no .git:
    pass the commit through the runtime env's ``env_vars``)."""
    import getpass
    import subprocess

    tags = {"mlflow.source.name": str(script), "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(script).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            tags["mlflow.source.git.commit"] = commit
    given = os.environ.get("RAYMETA_GIT_COMMIT", "").strip().lower()
    if "mlflow.source.git.commit" not in tags and re.fullmatch(r"[0-9a-f]{7,40}", given):
        tags["mlflow.source.git.commit"] = given
    return tags


def end_status(error: BaseException | None) -> str:
    """The status a run ends with after ``error``: FINISHED (none), KILLED (interrupted:
    Ctrl-C, or SIGTERM turned into SystemExit), else FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


# --------------------------------------------------------------------------- trackers


class Tracker:
    """The tracker of a run with tracking disabled: every method does nothing."""

    run_id: str | None = None
    """MLflow run id (None when tracking is disabled)."""
    url: str | None = None
    """UI URL of the run when the tracking URI is http(s), else None."""
    spill_path: Path | None = None
    """The JSONL spill file of the run (None when tracking is disabled)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload the file or directory ``path`` under ``artifact_path``."""

    def log_dict(self, obj: Any, name: str) -> None:
        """Store ``obj`` as the JSON artifact ``name`` (e.g. ``eval/results.json``)."""

    def log_figure(self, figure: Any, name: str) -> None:
        """Store a matplotlib figure, or a PNG file path, as the artifact ``name``."""

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run with ``status``; True when everything reached the store."""
        return True

    def last_step(self, key: str) -> int:
        """The highest step of metric ``key`` the store holds for this run (0: none, or the
        store does not answer)."""
        return 0

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(end_status(exc))


class MlflowTracker(Tracker):
    """Buffers metrics and artifacts of one MLflow run and sends them when the store answers."""

    def __init__(
        self,
        client: Any,
        *,
        uri: str,
        experiment_id: str,
        run_id: str,
        spill_dir: Path,
        request_timeout_s: float = 5.0,
        retry_interval_s: float = 5.0,
        flush_timeout_s: float = 60.0,
    ) -> None:
        self._client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.url = (
            f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
            if is_http(uri)
            else None
        )
        self.spill_path = spill_dir / f"{run_id}.jsonl"
        self._staging = spill_dir / run_id
        self.request_timeout_s = request_timeout_s
        self.retry_interval_s = retry_interval_s
        self.flush_timeout_s = flush_timeout_s
        self._metrics: list[Any] = []  # mlflow.entities.Metric, in logging order
        self._artifacts: list[tuple[str, str | None]] = []
        self._down = False
        self._next_try = 0.0
        self._finished = False
        spill_dir.mkdir(parents=True, exist_ok=True)
        self._spill = open(self.spill_path, "a", encoding="utf-8")  # noqa: SIM115
        self._write_spill(
            {"kind": "run", "tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
        )

    # ------------------------------------------------------------------ public

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``, spill them to disk and try to send the buffer."""
        from mlflow.entities import Metric

        if self._finished:
            return
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            metric = Metric(sanitize_key(key), float(value), timestamp, int(step))
            self._metrics.append(metric)
            self._write_spill(
                {
                    "kind": "metric",
                    "key": metric.key,
                    "value": metric.value,
                    "timestamp": timestamp,
                    "step": metric.step,
                }
            )
        self._try_flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue the file or directory ``path`` for upload and try to send the queue."""
        if self._finished:
            return
        local = str(Path(path).expanduser().resolve())
        self._artifacts.append((local, artifact_path))
        self._write_spill({"kind": "artifact", "local_path": local, "artifact_path": artifact_path})
        self._try_flush()

    def log_dict(self, obj: Any, name: str) -> None:
        """Write ``obj`` as JSON to the staging dir and queue it as the artifact ``name``."""
        target = self._stage(name)
        target.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
        self.log_artifact(target, posixpath.dirname(name) or None)

    def log_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib figure (or copy a PNG path) as the artifact ``name``."""
        target = self._stage(name)
        if hasattr(figure, "savefig"):
            figure.savefig(target)
        else:
            shutil.copyfile(figure, target)
        self.log_artifact(target, posixpath.dirname(name) or None)

    def finish(self, status: str = "FINISHED") -> bool:
        """Flush with retries for up to ``flush_timeout_s``, end the run, clean up the spill.

        Returns True when every metric and artifact reached the store and the
        run was ended; otherwise the spill file is kept and its path printed.
        """
        if self._finished:
            return True
        self._finished = True
        self._write_spill({"kind": "end", "status": status})
        ok = self._flush_until(time.monotonic() + self.flush_timeout_s)
        if ok:
            ok = self._terminate(status)
        self._spill.close()
        if ok:
            self.spill_path.unlink(missing_ok=True)
            shutil.rmtree(self._staging, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last run to end leaves no empty folder
                self.spill_path.parent.rmdir()
        else:
            _warn(
                f"could not send {len(self._metrics)} metrics and {len(self._artifacts)} "
                f"artifacts of run {self.run_id} to {self.uri} within {self.flush_timeout_s:.0f} s "
                f"(or end the run). They are kept in {self.spill_path}; send them later with "
                f"`python -m raymeta.train.tracking replay {self.spill_path}`."
            )
        return ok

    def last_step(self, key: str) -> int:
        try:
            with fast_http(self.request_timeout_s):
                history = self._client.get_metric_history(self.run_id, sanitize_key(key))
        except Exception:  # noqa: BLE001 - unknown: the caller logs every step again
            return 0
        return max((m.step for m in history), default=0)

    # ------------------------------------------------------------------ internals

    def _stage(self, name: str) -> Path:
        """A local path for the artifact ``name`` inside this run's staging dir."""
        target = self._staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _write_spill(self, record: dict) -> None:
        """Append one JSON line to the spill file (flushed, survives a crash of this process)."""
        self._spill.write(json.dumps(record) + "\n")
        self._spill.flush()

    def _try_flush(self) -> None:
        """Send the buffers unless the store failed less than ``retry_interval_s`` ago."""
        if self._down and time.monotonic() < self._next_try:
            return
        self._flush()

    def _flush_until(self, deadline: float) -> bool:
        """Send the buffers, retrying until they are empty or ``deadline`` passes."""
        while True:
            if self._flush():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(2.0, left))

    def _flush(self) -> bool:
        """Send buffered metrics (in order, batched) then artifacts; True when all went."""
        try:
            with fast_http(self.request_timeout_s):
                self._send_metrics()
                self._send_artifacts()
        except Exception as e:  # noqa: BLE001 - a tracking failure must never stop training
            self._mark_down(e)
            return False
        self._mark_up()
        return True

    def _send_metrics(self) -> None:
        """log_batch the metric buffer front to back; drop a chunk only once accepted."""
        while self._metrics:
            chunk = self._metrics[:_BATCH_METRICS]
            try:
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as e:
                if not _is_permanent(e):
                    raise
                _warn(f"MLflow rejected {len(chunk)} metrics, dropping them: {e}")
            del self._metrics[: len(chunk)]

    def _send_artifacts(self) -> None:
        """Upload queued artifacts in order; drop each once uploaded (or missing)."""
        while self._artifacts:
            local, artifact_path = self._artifacts[0]
            path = Path(local)
            try:
                if path.is_dir():
                    self._client.log_artifacts(self.run_id, local, artifact_path)
                elif path.exists():
                    self._client.log_artifact(self.run_id, local, artifact_path)
                else:
                    _warn(f"artifact {local} no longer exists, skipping it")
            except Exception as e:
                if not _is_permanent(e):
                    raise
                _warn(f"MLflow rejected artifact {local}, dropping it: {e}")
            self._artifacts.pop(0)

    def _terminate(self, status: str) -> bool:
        """End the run with ``status``; False if the store did not answer."""
        try:
            with fast_http(self.request_timeout_s, retries=2):
                self._client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            _warn(f"could not end run {self.run_id} as {status}: {e}")
            return False
        return True

    def _mark_down(self, error: BaseException) -> None:
        """Remember the failure, warn once, and wait ``retry_interval_s`` before retrying."""
        self._next_try = time.monotonic() + self.retry_interval_s
        if not self._down:
            self._down = True
            _warn(
                f"tracking store {self.uri} unreachable ({type(error).__name__}: "
                f"{str(error)[:300]}); buffering metrics (spill file {self.spill_path}) and "
                "retrying; training continues"
            )

    def _mark_up(self) -> None:
        """Warn once that the store answers again after having been down."""
        if self._down:
            self._down = False
            _warn(f"tracking store {self.uri} reachable again; buffered metrics sent")


def _is_permanent(error: BaseException) -> bool:
    """Whether resending the request that raised ``error`` cannot succeed."""
    return getattr(error, "error_code", None) in _PERMANENT_ERRORS


# --------------------------------------------------------------------------- entry points


def check_server(cfg: TrackingConfig, default_dir: str | Path) -> None:
    """Raise :class:`TrackingError` now if tracking goes to a server (``tracking.tracking_uri``,
    ``$MLFLOW_TRACKING_URI``) that does not answer, so the job stops before it starts Ray.
    Writes nothing: a local store is made (and checked) by :func:`start_run`."""
    if cfg.enabled:
        check_reachable(resolve_tracking_uri(cfg.tracking_uri, default_dir))


def start_run(
    cfg: TrackingConfig,
    *,
    default_dir: str | Path,
    run_name: str,
    params: dict | None = None,
    tags: dict | None = None,
    request_timeout_s: float = 5.0,
    retry_interval_s: float = 5.0,
    flush_timeout_s: float = 60.0,
) -> Tracker:
    """Open an MLflow run for this job, or a do-nothing :class:`Tracker` if tracking is off.

    Raises :class:`TrackingError` (naming the URI and the fix) when the store
    cannot be reached, so a job fails before training rather than after.
    """
    if not cfg.enabled:
        return Tracker()
    disable_telemetry()
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    default_dir = Path(default_dir).expanduser().resolve()
    uri = resolve_tracking_uri(cfg.tracking_uri, default_dir)
    if not is_http(uri):
        default_dir.mkdir(parents=True, exist_ok=True)
    check_reachable(uri, timeout_s=request_timeout_s)
    try:  # MLflow refuses some stores here (a bare directory: its deprecated file store)
        client = MlflowClient(tracking_uri=uri)
    except Exception as e:
        raise TrackingError(_store_message(uri, f"cannot be used: {e}")) from e
    tag_list = [
        RunTag(sanitize_key(k), truncate(str(v), MAX_TAG_VALUE)) for k, v in (tags or {}).items()
    ]
    param_list = [Param(k, v) for k, v in flatten_params(params or {}).items()]
    try:
        with fast_http(max(request_timeout_s, 10.0), retries=2):
            experiment_id = ensure_experiment(
                client, cfg.experiment, local_artifact_root(uri, default_dir)
            )
            user = {k: v for k, v in (tags or {}).items() if k == "mlflow.user"}
            run = client.create_run(experiment_id, run_name=run_name, tags=user)  # its user_id
            run_id = run.info.run_id
            for chunk in _chunks(param_list, _BATCH_PARAMS_TAGS):
                client.log_batch(run_id, params=chunk, synchronous=True)
            for chunk in _chunks(tag_list, _BATCH_PARAMS_TAGS):
                client.log_batch(run_id, tags=chunk, synchronous=True)
    except Exception as e:
        raise TrackingError(_store_message(uri, f"cannot be used: {e}")) from e
    tracker = MlflowTracker(
        client,
        uri=uri,
        experiment_id=experiment_id,
        run_id=run_id,
        spill_dir=default_dir / "mlflow_spill",
        request_timeout_s=request_timeout_s,
        retry_interval_s=retry_interval_s,
        flush_timeout_s=flush_timeout_s,
    )
    _warn(
        f"MLflow run {run_id} ({run_name}) in {uri}" + (f": {tracker.url}" if tracker.url else "")
    )
    return tracker


def replay_spill(spill_path: str | Path, tracking_uri: str = "") -> str:
    """Send a kept spill file to its run (or to ``tracking_uri``); returns the run id.

    Metrics are resent with their original timestamps, which the SQL stores
    skip when already present; the run is ended if the spill records an end.
    """
    disable_telemetry()
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    records = [json.loads(line) for line in Path(spill_path).read_text().splitlines() if line]
    header = next(r for r in records if r["kind"] == "run")
    run_id = header["run_id"]
    client = MlflowClient(tracking_uri=tracking_uri or header["tracking_uri"])
    metrics = [
        Metric(r["key"], r["value"], r["timestamp"], r["step"])
        for r in records
        if r["kind"] == "metric"
    ]
    for chunk in _chunks(metrics, _BATCH_METRICS):
        client.log_batch(run_id, metrics=chunk, synchronous=True)
    for r in records:
        if r["kind"] == "artifact" and Path(r["local_path"]).exists():
            if Path(r["local_path"]).is_dir():
                client.log_artifacts(run_id, r["local_path"], r["artifact_path"])
            else:
                client.log_artifact(run_id, r["local_path"], r["artifact_path"])
    ends = [r["status"] for r in records if r["kind"] == "end"]
    if ends:
        client.set_terminated(run_id, status=ends[-1])
    return run_id


def main(argv: list[str] | None = None) -> int:
    """``python -m raymeta.train.tracking replay SPILL [TRACKING_URI]``: send what a job could
    not (its spill file, or every one in a spill directory such as
    ``<output-dir>/mlflow_spill``) to the tracking store."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m raymeta.train.tracking", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="send a kept spill file (or a directory of them)")
    replay.add_argument("spill", help="a spill .jsonl file, or a directory holding them")
    replay.add_argument("tracking_uri", nargs="?", default="", help="default: the spill's own")
    args = p.parse_args(argv)
    path = Path(args.spill).expanduser()
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not path.exists() or not files:
        print(f"error: {path}: no spill file (.jsonl) there", file=sys.stderr)
        return 2
    for f in files:
        run_id = replay_spill(f, args.tracking_uri)
        print(f"replayed {f} into run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
