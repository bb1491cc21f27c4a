"""The main job end to end in one process on a small config: data → tiny model → BM → LG/LC → eval."""

import getpass
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "train.launcher=local",
    "tracking.enabled=false",
    "threads=1",
    "data.n_train=120",
    "data.n_test=24",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "pretrain.steps=40",
    "pretrain.eval_every=20",
    "prepare.steps=4",
    "meta.steps=4",
    "meta.meta_batch_size=4",
    "meta.log_every=2",
    "eval.n_examples=16",
]


def run_job(tmp_path, *extra, out="out"):
    cmd = [
        sys.executable,
        "jobs/metatrain.py",
        "--config",
        "configs/tiny_char.yaml",
        "--output-dir",
        str(tmp_path / out),
        f"model.tiny_cache_dir={tmp_path / 'models'}",
        f"data.cache_dir={tmp_path / 'data'}",
        *SMALL,
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_metatrain_job_writes_results_in_the_documented_shape(tmp_path):
    proc = run_job(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"BM", "LG", "LC"}
    for model in results.values():
        assert set(model) == {"NC", "Prompt", "FT", "FT_irrelevant", "FT2"}
        for s in ("NC", "Prompt", "FT"):
            assert 0.0 <= model[s]["accuracy"] <= 1.0 and model[s]["nll"] > 0
        for s in ("FT_irrelevant", "FT2"):
            assert 0.0 <= model[s]["leak"] <= 1.0
    assert (tmp_path / "out" / "results.png").stat().st_size > 10_000  # the figure
    records = (tmp_path / "out" / "records" / "LC.jsonl").read_text().splitlines()
    assert len(records) == 5 * 16
    # progress was shown: stages, steps, tasks/s, ETA
    for marker in ("[pretrain]", "[prepare]", "[meta-train LG", "[meta-train LC", "tasks/s", "ETA"):
        assert marker in proc.stdout
    # each meta-trained model is saved, and evaluating the saved LG alone (no preparation, no
    # meta-training, and so no Ray instance on the Ray launcher) gives the LG results of the
    # job, figure for figure
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["models"] == {"LG": "models/LG", "LC": "models/LC"}
    assert summary["complete"] is True and set(summary["history"]) == {"LG", "LC"}
    assert summary["engines"] == {"BM": "fastweights", "LG": "fastweights", "LC": "fastweights"}
    assert "[eval LC] (fastweights engine) NC=" in proc.stdout and "(leak " in proc.stdout
    assert not list((tmp_path / "out").glob(".*.tmp*"))  # every file written whole
    saved = tmp_path / "out" / "models" / "LG"
    assert json.loads((saved / "raymeta.json").read_text())["objective"] == "LG"
    only = run_job(
        tmp_path,
        f"model.name_or_path={saved}",
        "meta.objectives=[]",
        "prepare.steps=0",
        "train.launcher=ray",
        out="eval",
    )
    assert only.returncode == 0, only.stderr[-3000:]
    assert "[meta-train" not in only.stdout and "[prepare]" not in only.stdout
    assert "Ray instance" not in only.stdout + only.stderr
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated == {"BM": results["LG"]}
    assert not (tmp_path / "eval" / "models").exists()
    # the pretrained tiny model is cached and reused by a second run into the same directory,
    # which keeps the first run's results
    first = (tmp_path / "out" / "results.json").read_text()
    again = run_job(tmp_path, "meta.objectives=[LG]", "tracking.enabled=true")
    assert "reusing the cached tiny model" in again.stdout
    kept = list((tmp_path / "out" / "previous").glob("*/results.json"))
    assert len(kept) == 1 and kept[0].read_text() == first
    assert (kept[0].parent / "models" / "LC" / "config.json").is_file()
    assert not (tmp_path / "out" / "models" / "LC").exists()
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())) == {"BM", "LG"}
    # tracked as on the Ray launcher: the job's run, and a child run of per-step metrics
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {parent.info.status, child.info.status} == {"FINISHED"}
    assert not (tmp_path / "out" / "mlflow_spill").exists()  # all sent: no spill files kept
    assert child.info.run_name == f"{parent.info.run_name}-LG"
    assert {"BM.FT.accuracy", "LG.FT2.leak"} <= set(parent.data.metrics)
    # the child run holds its model's eval metrics too (LG and LC children compare in the UI)
    lg = json.loads((tmp_path / "out" / "results.json").read_text())["LG"]
    assert child.data.metrics["FT2.accuracy"] == lg["FT2"]["accuracy"]
    assert child.data.metrics["FT_irrelevant.leak"] == lg["FT_irrelevant"]["leak"]
    assert child.data.tags["overrides"] == parent.data.tags["overrides"]
    assert child.data.tags["output_dir"] == parent.data.tags["output_dir"]
    assert child.data.params == {**parent.data.params, "objective": "LG"}
    history = client.get_metric_history(child.info.run_id, "outer_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # every step, as on the Ray launcher
    assert parent.data.tags["overrides"].endswith("meta.objectives=[LG] tracking.enabled=true")
    assert parent.info.user_id == child.info.user_id == getpass.getuser()
    assert parent.data.tags["mlflow.source.name"].endswith("metatrain.py")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clone is one)
        assert parent.data.tags["mlflow.source.git.commit"] == head.stdout.strip()


@pytest.mark.integration
def test_bad_override_fails_before_any_work(tmp_path):
    proc = run_job(tmp_path, "meta.inner_lr=-3")
    assert proc.returncode == 2
    assert "meta.inner_lr" in proc.stderr and "-3" in proc.stderr
    assert not (tmp_path / "out").exists()


def save_squad_llama(path: Path) -> Path:
    """A random two-layer Llama with tied embeddings (as Llama 3.2 1B) and a word tokenizer of
    the offline SQuAD fixture, saved with save_pretrained."""
    from raymeta.config import DataConfig
    from raymeta.data.sets import load_task_set
    from raymeta.pretrain import tokenizer_texts
    from tests.helpers import save_tiny

    data = DataConfig(
        dataset="squad", source=str(ROOT / "examples/data/squad_tiny"), n_train=0, n_test=0
    )
    texts = tokenizer_texts("squad", *load_task_set(data))
    return save_tiny(path, texts, hidden=32, kv_heads=1, tie=True, positions=1024)


@pytest.mark.integration
def test_the_paper_recipe_config_runs_on_a_small_stand_in(tmp_path):
    """configs/paper_squad.yaml (Llama 3.2 1B on SQuAD on GPUs) with only what this machine
    lacks overridden (the model, the data, the GPU, the run's length): it runs to the end and
    keeps the paper's values (inner lr 1e-3, one context per update, one epoch, a label-free
    regulariser, answer budgets for SQuAD)."""
    model = save_squad_llama(tmp_path / "llama")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "jobs/metatrain.py",
        "--config",
        "configs/paper_squad.yaml",
        "--output-dir",
        str(out),
        f"model.name_or_path={model}",
        "data.source=examples/data/squad_tiny",
        f"data.cache_dir={tmp_path / 'data'}",
        "device=cpu",
        "train.use_gpu=false",
        "train.precision=fp32",
        "train.launcher=local",
        "tracking.enabled=false",
        "threads=1",
        "prepare.steps=1",
        "meta.steps=2",
        "meta.meta_batch_size=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"BM", "LG", "LC"}
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["meta"]["inner_lr"] == 1e-3 and cfg["eval"]["inner_lr"] == 0
    assert cfg["meta"]["contexts_per_update"] == 1 and cfg["meta"]["epochs"] == 1
    assert cfg["meta"]["lm_source"] == "contexts"
    assert cfg["eval"]["max_new_tokens"] == cfg["meta"]["max_answer_tokens"] == 24
    assert "(fastweights, second order" in proc.stdout, proc.stdout[-2000:]
