"""The benchmark script runs on CPU and writes its rows (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_meta_step_benchmark_prints_table_and_json(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        "bench/meta_step.py",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--dtype",
        "float32",
        "--meta-batch",
        "2",
        "--ctx",
        "8",
        "--query",
        "8",
        "--threads",
        "1",
        "--reps",
        "1",
        "--ref-reps",
        "1",
        "--contexts",
        "2",
        "--graph-memory",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| engine |" in proc.stdout
    rows = json.loads(out.read_text())
    assert {r["engine"] for r in rows} == {"reference", "fastweights"}
    assert all(r["tasks_per_s"] > 0 and "error" not in r for r in rows)
    assert all(r["contexts"] == 2 and 0 < r["kept_GiB_per_task"] < 0.01 for r in rows)
