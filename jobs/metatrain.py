"""Meta-train LG and LC models and evaluate them against the base model.

    python jobs/metatrain.py --config configs/tiny_char.yaml --output-dir runs/demo [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/metatrain.py --config configs/tiny_char_ray.yaml --output-dir /abs/runs/demo
    (token authentication, excludes and the rest: docs/cluster.md)

Meta-training runs on Ray Train workers with DeepSpeed (``train.launcher=ray``,
the default): against ``train.ray_address`` / ``$RAY_ADDRESS`` (set by ``ray job
submit``), else the cluster a `ray start` left running on this machine, else a private
Ray instance started here (never another job's).
``train.launcher=local`` keeps everything in this process. MLflow: the run goes
to ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else to a sqlite store in
the output directory. With no --config the embedded defaults run (tiny model,
generated character descriptions). Overrides are dotted config keys, e.g.
``meta.inner_lr=0.3``; every field, with its docstring: raymeta/config.py. Each meta-trained
model is saved to DIR/models/<objective> (``save_models=false``: not); evaluate one alone with
``model.name_or_path=DIR/models/LG 'meta.objectives=[]' prepare.steps=0``. See README.md and
docs/cluster.md.

Exit status: 0 done; 2 bad config or input (one ``config error:`` / ``error:`` line);
3 tracking store unusable; 4 meta-training diverged (a nan or inf loss: the line names the
step and the figures; the models evaluated before it keep their results); 143 stopped by
SIGTERM (``ray job stop``, a scheduler), 130 by Ctrl-C (one ``stopped by`` line; the MLflow
runs end KILLED).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymeta.config import ConfigError, load_config  # noqa: E402
from raymeta.errors import InputError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML config (default: the embedded defaults)")
    p.add_argument(
        "--output-dir",
        default="runs/metatrain",
        help="where results, records, saved models, checkpoints and the local MLflow store go "
        "(default: %(default)s; use an absolute path with `ray job submit`)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. meta.inner_lr=1e-3")
    return p.parse_intermixed_args(argv)  # options may follow the overrides


STOPPED_BY: list[int] = []
"""The signal that stopped the job (SIGTERM, SIGINT), once one has."""


def stop_on_signals() -> None:
    """Make SIGTERM raise SystemExit and Ctrl-C KeyboardInterrupt, so the job's cleanup ends its
    MLflow runs (KILLED) before the process exits, and remember the signal: raised inside
    ``ray.get`` either comes back as ``SystemExit(1)``, so the exit status is taken from the
    signal. Further signals during that cleanup are ignored."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        STOPPED_BY.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def shutdown_ray() -> None:
    """Disconnect from Ray if this job connected, so that no worker log line streamed to this
    process comes after the job's last line."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    from raymeta.outer import MetaTrainingDiverged
    from raymeta.train.tracking import TrackingError

    known = [
        (ConfigError, "config error", 2),
        (InputError, "error", 2),
        (TrackingError, "tracking error", 3),
        (MetaTrainingDiverged, "error", 4),
    ]
    try:
        cfg = load_config(args.config, args.overrides)
        from raymeta.train.launch import run_job

        run_job(cfg, args.output_dir, args.overrides)
        if not STOPPED_BY:
            return 0
    except BaseException as e:
        label, code = next(((lab, c) for kind, lab, c in known if isinstance(e, kind)), ("", 0))
        if not code and not STOPPED_BY:
            raise
        line = f"{label}: {e}"
    if STOPPED_BY:
        signum = STOPPED_BY[0]
        line, code = f"stopped by {signal.Signals(signum).name}", 128 + signum
    shutdown_ray()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
