"""Meta-train LG and LC models and evaluate them against the base model.

    python jobs/metatrain.py --config configs/tiny_char.yaml --output-dir runs/demo [key=value ...]
    ray job submit --working-dir . -- python jobs/metatrain.py --config configs/tiny_char_ray.yaml \\
        --output-dir /abs/runs/demo

Meta-training runs on Ray Train workers with DeepSpeed (``train.launcher=ray``,
the default): against ``train.ray_address`` / ``$RAY_ADDRESS`` (set by ``ray job
submit``), else a running local cluster, else a local Ray instance started here.
``train.launcher=local`` keeps everything in this process. MLflow: the run goes
to ``$MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri``, else to a sqlite store in
the output directory. With no --config the embedded defaults run (tiny model,
generated character descriptions). Overrides are dotted config keys, e.g.
``meta.inner_lr=0.3``. See docs/cluster.md.

Exit status: 0 done; 2 bad config or input (one ``config error:`` / ``error:`` line);
3 tracking store unusable; 143 stopped by SIGTERM (``ray job stop``, a scheduler; the
MLflow run ends KILLED, as it does on Ctrl-C).
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
        help="where results, records, checkpoints and the local MLflow store go "
        "(use an absolute path with `ray job submit`)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. meta.inner_lr=1e-3")
    return p.parse_args(argv)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143), so the job's cleanup ends its MLflow run (KILLED)
    before the process exits; further SIGTERMs during that cleanup are ignored."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    from raymeta.train.tracking import TrackingError

    try:
        cfg = load_config(args.config, args.overrides)
        from raymeta.train.launch import run_job

        run_job(cfg, args.output_dir, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrackingError as e:
        print(f"tracking error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
