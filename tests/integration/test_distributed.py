"""Ray Train + DeepSpeed meta-training with real workers (no mocks).

* 2 CPU workers with B/2 tasks each reach the same parameters after a step as
  1 worker with B tasks, under ZeRO 0, 1 and 2.
* A worker process killed mid-run (SIGKILL) is restarted from the last
  checkpoint: the run finishes, every step is done exactly once, and the final
  metrics and weights match an uninterrupted run with the same seed.
* The fast-weights engine inside the DeepSpeed engine (2 workers, ZeRO-2) matches the
  reference engine (1 worker), with full weights and with a LoRA adapter.
* ZeRO-3 is refused with a clear message.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raymeta.config import ConfigError, from_dict
from raymeta.data.generate import generate
from raymeta.models import build_tiny_model, load_model, save_model, train_tokenizer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A small local Ray instance (2 CPUs, 256 MB object store) for this module."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tmp = Path(f"/tmp/rmd{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    ray.init(
        num_cpus=2,
        object_store_memory=256 * 1024**2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=str(tmp),
        log_to_driver=True,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tasks_and_model(tmp_path_factory):
    """Generated triples and a random tiny Llama written with save_pretrained."""
    train, test = generate("character_descriptions", 64, 8, 0)
    tok = train_tokenizer([t.context + " " + t.query + " " + t.response for t in train + test])
    cfg = small_cfg()
    model = build_tiny_model(cfg.model.tiny, len(tok), seed=0)
    path = save_model(model, tok, tmp_path_factory.mktemp("base") / "model")
    return train, test, path


def small_cfg(**train):
    """A RunConfig for quick distributed checks (random tiny model, no evaluation)."""
    return from_dict(
        {
            "seed": 0,
            "model": {
                "tiny": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "intermediate_size": 64,
                    "max_positions": 128,
                }
            },
            "meta": {
                "objectives": ["LG"],
                "inner_lr": 0.3,
                "outer_lr": 1e-3,
                "clip_norm": 1.0,
                "meta_batch_size": 4,
                "steps": 1,
                "log_every": 1,
                "engine": "reference",
            },
            "eval": {"settings": ["NC"], "n_examples": 4},
            "train": {"report_every": 1, **train},
        }
    )


def weights(path) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(path), "float32", "eager", "cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_workers_match_one_worker(ray_local, tasks_and_model, tmp_path):
    from raymeta.train.launch import fit_objective

    train, test, base = tasks_and_model
    before = weights(base)
    ref = fit_objective(
        small_cfg(num_workers=1, zero_stage=0), "LG", base, train, test, tmp_path / "w1"
    )
    ref_w = weights(ref.model_dir)
    moved = max_diff(before, ref_w)
    assert moved > 1e-4  # the step changed the parameters
    for stage in (0, 1, 2):
        got = fit_objective(
            small_cfg(num_workers=2, zero_stage=stage),
            "LG",
            base,
            train,
            test,
            tmp_path / f"w2z{stage}",
        )
        diff = max_diff(ref_w, weights(got.model_dir))
        print(f"ZeRO-{stage}: max |2 workers - 1 worker| = {diff:.2e} (step moved {moved:.2e})")
        assert diff < 1e-6, f"ZeRO-{stage}: parameters differ by {diff}"
        assert got.history[-1]["outer_loss"] == pytest.approx(
            ref.history[-1]["outer_loss"], rel=1e-5
        )


def with_adapter(base: Path, out: Path) -> Path:
    """``base`` plus a LoRA adapter (lora_B nonzero, as if trained) saved with save_model."""
    from raymeta.models import apply_lora

    model, tok = load_model(str(base), "float32", "eager", "cpu")
    model = apply_lora(model, lora_cfg())
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return save_model(model, tok, out)


def lora_cfg():
    from raymeta.config import LoraConfig

    return LoraConfig(enabled=True, rank=2, alpha=4.0, target_modules=["q_proj", "down_proj"])


@pytest.mark.parametrize(
    "lora, mode",
    [(False, None), (True, "adapter"), (True, "outer_lora_inner_full")],
    ids=["full", "lora", "lora_outer_full_inner_vjp"],
)
def test_fastweights_in_deepspeed_matches_reference(
    ray_local, tasks_and_model, tmp_path, lora, mode
):
    """2 workers, ZeRO-2, fastweights against 1 worker, reference: the same 3 steps. The last
    case also recomputes the inner pass (meta.checkpoint_inner=vjp, fastweights only)."""
    from raymeta.train.launch import fit_objective

    train, test, base = tasks_and_model
    if lora:
        base = with_adapter(base, tmp_path / "base")
    runs = {}
    for engine, workers, stage in (("reference", 1, 0), ("fastweights", 2, 2)):
        cfg = small_cfg(num_workers=workers, zero_stage=stage)
        cfg.meta.engine, cfg.meta.steps = engine, 3
        if lora:
            cfg.model.lora = lora_cfg()
            cfg.model.lora.mode = mode
        if mode == "outer_lora_inner_full" and engine == "fastweights":
            cfg.meta.checkpoint_inner = "vjp"
        runs[engine] = fit_objective(cfg, "LG", base, train, test, tmp_path / engine)
    ref, fast = runs["reference"], runs["fastweights"]
    for a, b in zip(ref.history, fast.history, strict=True):
        assert b["outer_loss"] == pytest.approx(a["outer_loss"], rel=1e-5)
    before, ref_w, fast_w = weights(base), weights(ref.model_dir), weights(fast.model_dir)
    assert ref_w.keys() == fast_w.keys() == before.keys()
    moved = {k for k in before if not torch.equal(before[k], ref_w[k])}
    if lora:  # only the adapter trains
        assert moved and all("lora_" in k for k in moved)
    diff, step = max_diff(ref_w, fast_w), max_diff(before, ref_w)
    print(f"lora={lora}: max |fastweights - reference| = {diff:.2e} (3 steps moved {step:.2e})")
    assert diff < 1e-2 * step
    if lora:  # the driver takes the trained adapter back into its own peft model
        from raymeta.train.launch import load_weights_into

        driver, _ = load_model(str(base), "float32", "eager", "cpu")
        load_weights_into(driver, fast.model_dir, cfg)
        assert max_diff(fast_w, driver.state_dict()) == 0
        # the final checkpoint's adapter names its own base (it was written in a worker's
        # temporary folder), so peft's own loader opens it too
        import json

        from peft import AutoPeftModelForCausalLM

        adapter = fast.model_dir / "adapter"
        named = json.loads((adapter / "adapter_config.json").read_text())
        assert named["base_model_name_or_path"] == str(fast.model_dir.resolve())
        assert (
            max_diff(fast_w, AutoPeftModelForCausalLM.from_pretrained(str(adapter)).state_dict())
            == 0
        )


def test_killed_worker_resumes_from_checkpoint(ray_local, tasks_and_model, tmp_path):
    from raymeta.train.launch import fit_objective

    train, test, base = tasks_and_model
    steps = 8
    cfg = small_cfg(num_workers=2, zero_stage=2, checkpoint_every=3, report_every=2, max_failures=1)
    cfg.meta.steps = steps
    flag = tmp_path / "killed.txt"
    fault = {"step": 5, "rank": 1, "flag": str(flag)}
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # rank 0 logs each step's metrics here
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("resume", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    info = {
        "uri": uri,
        "experiment_id": exp,
        "run_id": run.info.run_id,
        "spill_dir": str(tmp_path / "spill"),
    }
    hurt = fit_objective(cfg, "LG", base, train, test, tmp_path / "hurt", info, fault=fault)
    assert flag.is_file(), "the fault hook never fired"
    # the replayed step 4 (done before the kill, after the checkpoint at 3) is logged once
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "outer_loss")]
    assert sorted(logged) == list(range(1, steps + 1)), logged
    done = [s for s, _ in hurt.steps_log]
    assert done == list(range(1, steps + 1)), f"steps not done exactly once: {hurt.steps_log}"
    attempts = dict(hurt.steps_log)
    assert all(attempts[s] == 0 for s in (1, 2, 3)) and all(attempts[s] == 1 for s in range(4, 9))
    assert [h["step"] for h in hurt.history] == list(range(1, steps + 1))

    clean = fit_objective(cfg, "LG", base, train, test, tmp_path / "clean")
    assert [s for s, _ in clean.steps_log] == list(range(1, steps + 1))
    for a, b in zip(hurt.history, clean.history):
        assert a["outer_loss"] == pytest.approx(b["outer_loss"], rel=1e-5, abs=1e-6)
    assert max_diff(weights(hurt.model_dir), weights(clean.model_dir)) < 1e-5


def test_a_failed_fit_keeps_the_steps_rank_0_recorded(ray_local, tasks_and_model, tmp_path):
    """A worker killed at step 3 with no restart allowed: the fit fails, and the history the
    driver reads back from beside the checkpoints holds steps 1-2 (the job's summary.json and
    figure show them, with a one-line ``stopped`` entry)."""
    from raymeta.pipeline import describe_stop
    from raymeta.train.launch import fit_objective

    train, test, base = tasks_and_model
    cfg = small_cfg(num_workers=1, max_failures=0)
    cfg.meta.steps = 6
    fault = {"step": 3, "rank": 0, "flag": str(tmp_path / "killed.txt")}
    history: list[dict] = []
    with pytest.raises(Exception) as failed:
        fit_objective(cfg, "LG", base, train, test, tmp_path, fault=fault, history=history)
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(h["outer_loss"]) for h in history)
    line = describe_stop(failed.value, history)
    assert line.startswith(f"{type(failed.value).__name__} after step 2: ") and "\n" not in line
    assert len(line) < 400


def test_zero3_is_refused():
    from raymeta.train.launch import check_launchable

    with pytest.raises(ConfigError, match="zero_stage=3 is not supported"):
        check_launchable(small_cfg(zero_stage=3))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/metatrain.py"), "train.zero_stage=3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "train.zero_stage=3 is not supported" in proc.stderr
    assert "Use train.zero_stage=0, 1 or 2" in proc.stderr


FUSED_ADAM_CHECK = """
import torch
from tests.integration.test_distributed import small_cfg
from raymeta.models import build_tiny_model
from raymeta.train.engine import init_engine
for stage in (0, 1, 2):
    for precision in ("fp32", "bf16"):
        cfg = small_cfg(zero_stage=stage, precision=precision)
        engine = init_engine(build_tiny_model(cfg.model.tiny, 50, seed=0), cfg, 1)
        ids = torch.tensor([[5, 6, 7, 8]])
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        engine.backward(engine.module(input_ids=ids, labels=ids).loss)
        engine.step()  # (torch checks a fused optimizer's devices and dtypes at its first step)
        after = [p.detach().float() for p in engine.module.parameters()]
        moved = any(not torch.equal(a, b) for a, b in zip(before, after))
        opt = engine.optimizer
        while type(opt).__module__.startswith("deepspeed"):  # ZeRO / bf16 wrappers
            opt = opt.optimizer
        print(stage, precision, type(opt).__name__, opt.param_groups[0]["fused"], moved)
import atexit
import torch.distributed as dist
atexit._run_exitfuncs()  # what the interpreter runs first at exit
print("group left at exit:", dist.is_initialized())
"""


def test_the_outer_optimizer_is_torchs_fused_adam():
    """DeepSpeed builds torch's Adam with its fused kernel (as the local launcher does) under
    every supported ZeRO stage and precision, and it takes a step that moves the weights; in
    its own process, as DeepSpeed starts a process group. The one-rank group it starts is
    destroyed at exit (left to the interpreter, gloo can abort the finished process)."""
    proc = subprocess.run(
        [sys.executable, "-c", FUSED_ADAM_CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln[:1].isdigit()]
    assert lines == [f"{s} {p} Adam True True" for s in (0, 1, 2) for p in ("fp32", "bf16")]
    assert "group left at exit: False" in proc.stdout.splitlines()
