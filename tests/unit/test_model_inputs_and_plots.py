"""Bad model inputs are InputErrors naming the field; the results figure's colours; the
benchmark's help text."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from raymeta.config import LoraConfig
from raymeta.errors import InputError
from raymeta.models import apply_lora, check_model_path, load_model, resolve_inner_params
from raymeta.plots import draw_results
from tests.helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_local_model_path_without_a_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, problem in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "is a directory without config.json"),
        (tmp_path / "file", "is a file"),
    ]:
        with pytest.raises(InputError, match=re.escape(f"model.name_or_path: {path} {problem}")):
            load_model(str(path))


def test_relative_paths_count_as_local_and_hub_names_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("./nothing", "../nothing", "models"):
        with pytest.raises(InputError, match="model.name_or_path"):
            check_model_path(path)
    for name in ("tiny", "org/some-model", "gpt2"):
        check_model_path(name)  # a hub name is left to from_pretrained


def test_unknown_lora_target_and_inner_params_are_input_errors():
    model = tiny_llama()
    with pytest.raises(InputError, match=r"model\.lora\.target_modules=\['nosuch'\]"):
        apply_lora(model, LoraConfig(enabled=True, target_modules=["nosuch"]))
    with pytest.raises(InputError, match="meta.inner_params"):
        resolve_inner_params(model, ["nosuch"])


def test_each_model_has_one_colour_in_both_panels():
    metrics = {"NC": {"accuracy": 0.5, "nll": 1.0}, "FT2": {"accuracy": 0.2, "leak": 0.1}}
    results = {"BM": metrics, "LG": metrics, "LC": metrics}
    history = [{"step": 1, "outer_loss": 2.0}, {"step": 2, "outer_loss": 1.0}]
    fig = draw_results(results, {"LG": history, "LC": history})
    ax, bx = fig.axes
    bars = {c.get_label(): c.patches[0].get_facecolor() for c in ax.containers}
    bars = {name: to_hex(colour) for name, colour in bars.items() if not name.startswith("_")}
    lines = {line.get_label(): to_hex(line.get_color()) for line in bx.get_lines()}
    hatched = {to_hex(p.get_edgecolor()) for p in ax.patches if not p.get_fill()}
    assert set(bars) == {"BM", "LG", "LC"} and len(set(bars.values())) == 3
    assert lines == {"LG": bars["LG"], "LC": bars["LC"]}
    assert hatched == set(bars.values())
    only = draw_results({"BM": metrics}, {})  # an evaluation-only job: no empty curve panel
    assert len(only.axes) == 1 and only.axes[0].get_title() == "evaluation"


def test_a_diverged_objective_keeps_its_curve_and_says_where_it_stopped():
    """LG diverged at step 3 (its history: steps 1-2), LC at step 1 (no steps), a third at
    step 2 (one step, drawn with a marker to be seen); a finished one is labelled plainly."""
    metrics = {"NC": {"accuracy": 0.5, "nll": 1.0}}
    two = [{"step": 1, "outer_loss": 2.0}, {"step": 2, "outer_loss": 1.0}]
    histories = {"LG": two, "LC": [], "XX": two[:1], "YY": two}
    results = {"BM": metrics}
    diverged = {"LG": "diverged", "LC": "diverged", "XX": "diverged"}
    _, bx = draw_results(results, histories, ended=diverged).axes
    lines = {line.get_label(): line for line in bx.get_lines()}
    assert set(lines) == {
        "LG (diverged at step 3)",
        "LC (diverged at step 1)",
        "XX (diverged at step 2)",
        "YY",
    }
    assert list(lines["LG (diverged at step 3)"].get_xdata()) == [1, 2]
    assert lines["XX (diverged at step 2)"].get_marker() == "o"
    assert lines["YY"].get_marker() in ("None", None, "")
    assert [t.get_text() for t in bx.get_legend().get_texts()] == list(lines)
    assert bx.get_yscale() == "log"
    # diverged at its first step: no curve, the label alone; the figure still renders
    fig = draw_results(results, {"LG": []}, ended={"LG": "diverged"})
    fig.savefig(io.BytesIO(), format="png")
    (line,) = fig.axes[1].get_lines()
    assert line.get_label() == "LG (diverged at step 1)" and len(line.get_xdata()) == 0


def test_a_stopped_objective_keeps_its_curve_and_says_its_last_step():
    """Stopped by a signal: labelled with the last step its history holds (a Ray run's history
    may lag the step it was stopped in), or as having none."""
    metrics = {"NC": {"accuracy": 0.5, "nll": 1.0}}
    two = [{"step": 1, "outer_loss": 2.0}, {"step": 2, "outer_loss": 1.0}]
    fig = draw_results(
        {"BM": metrics}, {"LG": two, "LC": []}, ended={"LG": "stopped", "LC": "stopped"}
    )
    fig.savefig(io.BytesIO(), format="png")
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert set(lines) == {"LG (stopped after step 2)", "LC (stopped, no step)"}
    assert list(lines["LG (stopped after step 2)"].get_xdata()) == [1, 2]


def test_a_leak_shows_on_top_of_the_accuracy_whatever_its_size():
    """FT2's leak (0.1) below its accuracy (0.2) was drawn from 0, inside the solid bar."""
    results = {"BM": {"FT2": {"accuracy": 0.2, "leak": 0.1}, "NC": {"accuracy": 0.5, "nll": 1}}}
    (ax,) = draw_results(results, {}).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["NC", "FT2"]  # the table's order
    solid = [p for p in ax.patches if p.get_fill()]
    hatched = [p for p in ax.patches if not p.get_fill() and p.get_height() > 0]
    assert [round(p.get_height(), 6) for p in solid] == [0.5, 0.2]
    (leak,) = hatched
    assert (round(leak.get_y(), 6), round(leak.get_height(), 6)) == (0.2, 0.1)


def test_meta_step_help_shows_the_continued_command():
    proc = subprocess.run(
        [sys.executable, "bench/meta_step.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--dtype bfloat16 \\\n        --meta-batch 16,64" in proc.stdout


def char_bpe(texts):
    """A BPE tokenizer with no unknown token, trained on ``texts``: characters it never saw
    encode to nothing (as a wrong tokenizer does to a data set)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_a_tokenizer_that_loses_a_response_is_refused_and_one_that_garbles_is_named(capsys):
    from raymeta.data.triples import Triple
    from raymeta.models import train_tokenizer
    from raymeta.pipeline import check_tokenizer

    train = [Triple("Ada is a baker.", "Who is a baker?", "Ada"), Triple("Bo sings.", "Who?", "Bo")]
    test = [Triple("Cy is a cook.", "Who is a cook?", "Xu")]
    whole = train_tokenizer([f"{t.context} {t.query} {t.response}" for t in train + test])
    assert check_tokenizer(whole, train, test, "tiny") == []
    lossy = char_bpe(["Ada is a baker. Who is a baker? Bo sings. Cy cook"])
    with pytest.raises(InputError) as e:  # "Xu": no character of it was seen in training
        check_tokenizer(lossy, train, test, "model.name_or_path: m")
    assert str(e.value) == (
        f"model.name_or_path: m: its tokenizer ({type(lossy).__name__}) encodes the response of "
        "test triple 0 ('Xu') to no tokens; is it the tokenizer this model was saved with?"
    )
    partial = train_tokenizer(["Ada is a baker . Who ? Bo sings Cy cook"])  # no "Xu": <unk>
    (line,) = check_tokenizer(partial, train, test, "model.name_or_path: m")
    assert line == (
        "[model] warning: model.name_or_path: m: its tokenizer does not give back 1 of 3 "
        "responses (e.g. 'Xu' decodes as ''); answers are then scored on what it can represent"
    )
    assert line in capsys.readouterr().out


def test_a_meta_training_that_stops_keeps_its_curve_in_the_summary(tmp_path):
    """A trainer that fails (or is stopped by a signal) after two steps: the job re-raises it,
    and summary.json and results.png keep the base model's results, the two steps, and how the
    run stopped."""
    import json

    from raymeta.config import load_config
    from raymeta.data.generate import generate
    from raymeta.pipeline import run_pipeline
    from raymeta.pretrain import tokenizer_texts
    from tests.helpers import save_tiny

    train, test = generate("character_descriptions", 40, 8, seed=0)
    texts = tokenizer_texts("character_descriptions", train, test)
    model = save_tiny(tmp_path / "m", texts, hidden=16, positions=128)
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model}",
            "data.n_train=40",
            "data.n_test=8",
            "prepare.steps=0",
            "eval.n_examples=4",
            "meta.objectives=[LG]",
        ],
    )

    def trainer(model, tokenizer, train, test, cfg, objective, teacher, history):
        history += [{"step": 1, "outer_loss": 2.0}, {"step": 2, "outer_loss": 1.5}]
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_pipeline(cfg, tmp_path / "out", meta_trainer=trainer)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] is False and list(summary["engines"]) == ["BM"]
    assert [h["step"] for h in summary["history"]["LG"]] == [1, 2]
    assert summary["stopped"] == {"LG": "RuntimeError after step 2: worker lost"}
    assert summary["diverged"] == {}
    assert (tmp_path / "out" / "results.png").stat().st_size > 10_000


def test_a_ray_run_history_reads_back_whole_steps_only(tmp_path):
    """Rank 0 appends a line per step beside the checkpoints; the driver reads it when the fit
    stops, maybe while a line is half written: that one is left out. A restart rewrites it
    with its checkpoint's steps."""
    from raymeta.train.worker import HISTORY, append_history, read_history, write_history

    assert read_history(tmp_path / "none") == []
    write_history(tmp_path / "run", [{"step": 1, "outer_loss": 2.0}])
    append_history(tmp_path / "run", {"step": 2, "outer_loss": 1.5})
    with open(tmp_path / "run" / HISTORY, "a") as f:
        f.write('{"step": 3, "outer_')
    assert read_history(tmp_path / "run") == [
        {"step": 1, "outer_loss": 2.0},
        {"step": 2, "outer_loss": 1.5},
    ]
    write_history(tmp_path / "run", [{"step": 1, "outer_loss": 2.0}])
    assert [r["step"] for r in read_history(tmp_path / "run")] == [1]
