"""The benchmark script runs on CPU and writes its rows (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.parametrize(
    "family, extra",
    [("llama", []), ("gemma", []), ("opt", []), ("mixtral", []), ("llama", ["--compile-ops"])],
    ids=["llama", "gemma", "opt", "mixtral", "llama-compiled"],
)
def test_meta_step_benchmark_prints_table_and_json(tmp_path, family, extra):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        "bench/meta_step.py",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--family",
        family,
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
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| engine |" in proc.stdout
    rows = json.loads(out.read_text())
    assert {r["engine"] for r in rows} == {"reference", "fastweights"}
    assert {r["family"] for r in rows} == {family}
    assert all(r["tasks_per_s"] > 0 and "error" not in r for r in rows)
    assert all(r["contexts"] == 2 and 0 < r["kept_GiB_per_task"] < 0.01 for r in rows)
    (fast,) = [r for r in rows if r["engine"] == "fastweights"]
    (ref,) = [r for r in rows if r["engine"] == "reference"]
    assert fast["speedup"] == pytest.approx(fast["tasks_per_s"] / ref["tasks_per_s"])
    # --compile-ops compiles the fast engine's bodies; the reference engine runs none of them
    # (nor the fused ops or the fused attention)
    compiled = "--compile-ops" in extra
    assert (fast["compile_ops"], ref["compile_ops"]) == (compiled, False)
    # the attention the fast engine's passes ran: the fused one for Llama-style attention
    # classes (Gemma's, Mixtral's copy Llama's), OPT's own (SDPA) for OPT's
    run = "sdpa" if family == "opt" else "fused"
    assert (fast["fused_ops"], fast["fw_attention"]) == (True, run)
    assert f"fastweights attention: {run}" in proc.stdout
    assert (ref["fused_ops"], ref["fw_attention"]) == (False, None)
    assert ("| fastweights (compiled ops) |" in proc.stdout) == compiled
    assert "| reference (compiled ops) |" not in proc.stdout


BAD_ARGUMENTS = [
    (["--micro", "-1"], "argument --micro: -1 is not >= 0"),
    (["--threads", "-2"], "argument --threads: -2 is not >= 0"),
    (["--engines", "fastweights,fastweights"], "--engines: fastweights given twice"),
    (["--engines", "reference", "--ref-max-batch", "1", "--meta-batch", "2"], "nothing to measure"),
    (["--json", "/nonexistent/dir/rows.json"], "the folder /nonexistent/dir does not exist"),
    (["--json", "/tmp"], "/tmp is a directory"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS)
def test_bad_benchmark_arguments_stop_before_any_measurement(extra, message, capsys):
    """An argparse error (exit 2) that names the argument, at parse time: before the model is
    built or anything measured (the census checks its --json path the same way)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import meta_step
    import op_census

    with pytest.raises(SystemExit) as stop:
        meta_step.parse(["--device", "cpu", *extra])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    if extra[0] == "--json":
        with pytest.raises(SystemExit):
            op_census.parse(extra)
        assert message in capsys.readouterr().err


@pytest.mark.integration
def test_op_census_counts_what_a_real_step_runs():
    """The census on fake tensors (shapes only) counts exactly what the same step runs on
    real tensors; fast weights take far fewer calls per step than the reference engine."""
    sys.path.insert(0, str(ROOT / "bench"))
    import op_census

    args = op_census.parse(["--shape", "tiny", "--dtype", "float32", "--ctx", "12", "--query", "8"])
    rows = {}
    for variant in ("reference", "fused", "unfused", "vjp"):
        fake = op_census.census(args, variant, 4)
        real = op_census.census(args, variant, 4, fake=False)
        # Hugging Face builds the SDPA mask (the reference's and "unfused"'s attention) in
        # another way on fake tensors (a few calls); the fused attention's mask path is the same
        # "vjp" finds tensors shared between update terms by data pointer, which fake
        # tensors lack: it clones a few more there
        sdpa = op_census.VARIANTS[variant][1].get("ATTENTION") != "fused"
        rel = 0.05 if sdpa else 0.02 if variant == "vjp" else 1e-12
        for key in ("calls_per_step", "gflop_per_task", "gb_per_task", "optimizer_calls"):
            assert fake[key] == pytest.approx(real[key], rel=rel), (variant, key)
        rows[variant] = fake
    assert rows["fused"]["calls_per_step"] < rows["unfused"]["calls_per_step"]
    assert 3 * rows["fused"]["calls_per_step"] < rows["reference"]["calls_per_step"]  # 4 tasks
    assert rows["vjp"]["gflop_per_task"] > rows["fused"]["gflop_per_task"]  # recomputation
    assert "| reference | llama | tiny |" in op_census.table(list(rows.values()))


@pytest.mark.integration
def test_op_census_counts_what_each_call_reads_and_writes():
    """A call writing into ``out=`` reads its inputs and writes ``out`` once; an in-place call
    reads and writes its tensor, also a foreach one, which returns nothing; ``copy_`` only
    writes its destination; the fused AdamW step reads the gradients and reads and writes the
    parameters and both moments (bytes: 4 per float32, 2 per bfloat16)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import op_census

    a, b = torch.ones(10), torch.ones(10)
    out = torch.empty(10, dtype=torch.bfloat16)
    with op_census.Census() as counted:
        torch.mul(a, b, out=out)
        a.mul_(b)
        torch._foreach_mul_([a, b], 2.0)
        a.copy_(b)
    assert dict(counted.bytes) == {
        "mul": 40 + 40 + 20,
        "mul_": 40 + 40 + 40,
        "_foreach_mul_": 2 * (40 + 40),
        "copy_": 40 + 40,
    }
    p = torch.nn.Parameter(torch.ones(1000))
    p.grad = torch.ones(1000)
    opt = torch.optim.AdamW([p], fused=True)
    opt.step()  # its state
    with op_census.Census() as counted:
        opt.step()
    assert counted.bytes["_fused_adamw_"] - 4 == 7 * 4000  # + its step counter, read
    assert counted.calls == 2  # the counter's increment and the fused kernel


@pytest.mark.integration
def test_op_census_names_the_call_sites_that_move_the_bytes(capsys):
    """``--sites``: every byte the census counts is put down to a call site, this project's
    code first (the fused ops' bodies), then autograd's own nodes (formulas and gradient
    accumulations), then the libraries and the benchmark; the sites are listed by bytes."""
    sys.path.insert(0, str(ROOT / "bench"))
    import op_census

    tiny = ["--shape", "tiny", "--dtype", "float32", "--ctx", "12", "--query", "8"]
    row = op_census.census(op_census.parse([*tiny, "--sites", "100000"]), "fused", 4)
    sites = row["sites"]
    assert sum(s["gb_per_task"] for s in sites) == pytest.approx(row["gb_per_task"], rel=1e-12)
    where = {s["site"].split(":")[0] for s in sites}
    assert "elsewhere" not in where, where
    assert {"raymeta/meta/fused.py", "raymeta/meta/attention.py", "bench/graph_step.py"} <= where
    assert "torch/optim/adam.py" in where  # the fused AdamW step
    accumulations = [s for s in sites if s["op"] == "add" and s["site"].startswith("autograd: ")]
    assert accumulations and all(s["calls"] > 0 for s in accumulations)
    gbs = [s["gb_per_task"] for s in sites]
    assert gbs == sorted(gbs, reverse=True)
    op_census.main([*tiny, "--meta-batch", "4", "--variants", "fused", "--sites", "3"])
    printed = capsys.readouterr().out
    assert "the call sites moving the most bytes" in printed
    listed = printed.split("| GB/task | calls/step | op | where |")[1].strip().splitlines()
    assert len(listed) == 1 + 3, listed  # the rule under the head, then 3 rows


@pytest.mark.integration
def test_op_census_counts_the_bodies_as_inductor_compiles_them():
    """``compiled``: each call of a ``fused.BODIES`` body is counted as the kernels inductor
    generates for it, by inductor's own count of each kernel's reads and writes; the rest of
    the step, matmuls included, as in ``fused``. A body fused into one kernel reads its input
    and writes its outputs once."""
    sys.path.insert(0, str(ROOT / "bench"))
    import op_census

    from raymeta.meta import fused

    x = torch.empty(4, 8, 64)
    key = tuple(map(op_census.argument_key, (x, 1e-5, torch.float32)))
    moved, kernels = op_census.compiled_cost(fused.rms_value.__wrapped__, key)
    assert (moved, kernels) == (2 * x.nbytes + 4 * 8 * 4, 1)  # x read; n, and r [4, 8, 1]

    tiny = ["--shape", "tiny", "--dtype", "float32", "--ctx", "12", "--query", "8"]
    args = op_census.parse([*tiny, "--sites", "100000"])
    eager, compiled = (op_census.census(args, v, 4) for v in ("fused", "compiled"))
    assert compiled["gflop_per_task"] == eager["gflop_per_task"]  # the matmuls stay
    assert compiled["calls_per_step"] < eager["calls_per_step"]
    assert compiled["gb_per_task"] < eager["gb_per_task"]
    sites = compiled["sites"]
    assert sum(s["gb_per_task"] for s in sites) == pytest.approx(compiled["gb_per_task"])
    bodies = {b.__name__ for b in fused.BODIES}
    counted = {s["site"].split("(")[1].split(",")[0] for s in sites if s["op"] == "compiled"}
    assert counted == bodies  # the step runs every body, each counted compiled ...
    eager_calls = [s for s in sites if s["op"] != "compiled" and "(" in s["site"]]
    left = [s for s in eager_calls if s["site"].split("(")[1][:-1] in bodies | {"product"}]
    assert not left, left  # ... and none of their calls (nor product's, theirs) eagerly
