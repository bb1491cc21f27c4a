"""``bench/gpu_targets.sh`` runs only where CUDA is (its GPU time is short and precious), so its
command lines are checked here: the script runs with a ``PYTHON`` that records each call, and
every recorded ``meta_step.py`` / ``op_census.py`` command line must pass that script's own
argument checks (CUDA made visible to ``meta_step.parse`` alone: the parser is what is tested).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import meta_step  # noqa: E402
import op_census  # noqa: E402

TARGETS = ["--device", "cuda", "--shape", "llama-1b", "--dtype", "bfloat16"]
"""Every meta_step run of the script: the targets' GPU, shape and dtype (ctx 192, query 32)."""


def recorded_calls(tmp_path: Path, mode: str | None) -> list[list[str]]:
    """The script's calls of ``$PYTHON`` (each its argv), run in ``mode``, with a PYTHON that
    records its arguments and succeeds (so ``-c`` checks for torch and CUDA pass)."""
    log = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\n{ printf "%s\\x1f" "$@"; echo; } >> "$CALLS"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(python), "CALLS": str(log), "PATH": "/usr/bin:/bin"}
    args = ["bash", str(ROOT / "bench" / "gpu_targets.sh"), str(out), *([mode] if mode else [])]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    return [c for c in calls if c[0] != "-c"]


@pytest.mark.parametrize("mode", [None, "compile", "graph"])
def test_every_command_line_of_the_script_is_accepted(tmp_path, monkeypatch, mode):
    calls = recorded_calls(tmp_path, mode)
    assert calls, "the script ran no benchmark"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    outputs = []
    for argv in calls:
        script, rest = argv[0], argv[1:]
        assert script in ("bench/meta_step.py", "bench/op_census.py"), argv
        args = (meta_step if script.endswith("meta_step.py") else op_census).parse(rest)
        assert (args.shape, args.ctx, args.query) in (
            ("llama-1b", 192, 32),
            ("llama-1b", [192], 32),
        )
        if script.endswith("meta_step.py"):
            assert all(flag in rest for flag in TARGETS)
        assert Path(args.json).parent == tmp_path / "out"
        outputs.append(args.json)
    assert len(set(outputs)) == len(outputs)  # no run overwrites another's rows


def test_graph_mode_runs_the_targets_row_first(tmp_path, monkeypatch):
    """A call stopped at its time limit keeps the run most likely to meet the 30x target: the
    reference and compiled fastweights, eager and graphed, at meta-batch 16, in one run."""
    first = recorded_calls(tmp_path, "graph")[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = meta_step.parse(first[1:])
    assert args.meta_batch == [16]
    assert args.engines == "reference,fastweights"
    assert args.ref_max_batch >= 16  # the reference row is measured, not skipped
    assert args.compile_ops and args.cuda_graph == "also"
    assert meta_step.graph_modes(args.cuda_graph, "fastweights") == [False, True]


def test_without_cuda_the_script_says_so(tmp_path):
    """The real interpreter on this machine: no CUDA, so the script stops before any run."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    env = {**os.environ, "PYTHON": sys.executable}
    args = ["bash", str(ROOT / "bench" / "gpu_targets.sh"), str(tmp_path / "out"), "graph"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()
