"""The main job in one process: data → (tiny model) → preparation → BM eval → meta-train → eval.

Writes ``DIR/results.json`` shaped ``{"BM"|"LG"|"LC": {setting: {"accuracy", "nll"|"leak", ...}}}``,
per-example records ``DIR/records/<model>.jsonl``, the resolved config, a table and the
meta-trained models (``DIR/models/<objective>``).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch

from raymeta.config import RunConfig, dump_config, to_dict
from raymeta.data.sets import load_task_set, save_task_set
from raymeta.data.tasks import check_task_count
from raymeta.errors import InputError
from raymeta.evaluate import SETTINGS, eval_partners, eval_triples, evaluate
from raymeta.finetune import prepare
from raymeta.meta.engines import select_engine
from raymeta.outer import MetaTrainingDiverged, inner_spec, lm_sampler, meta_train_local
from raymeta.paths import write_whole


def setup_torch(cfg: RunConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def prompt_accuracy_fn(tokenizer, device):
    """``f(model, triples) -> Prompt accuracy`` (used to watch the tiny model's pretraining)."""
    from raymeta.config import EvalConfig

    ecfg = EvalConfig(settings=["Prompt"], n_examples=0, max_new_tokens=4, batch_size=64)

    def f(model, triples):
        metrics, _ = evaluate(model, tokenizer, triples, ecfg, None, None, device, quiet=True)
        return metrics["Prompt"]["accuracy"]

    return f


def with_model_choices(cfg: RunConfig, model):
    """``model`` with the configured LoRA adapter (a model loaded with its adapter keeps that
    one); InputError when a LoRA target or a ``meta.inner_params`` pattern matches nothing in
    it, when the model holds an adapter but ``model.lora.enabled`` is false, or when
    ``meta.engine=fastweights`` cannot run it exactly (before any preparation or training;
    ``auto`` says then that it falls back)."""
    from raymeta.models import apply_lora, is_peft

    if is_peft(model) and not cfg.model.lora.enabled:
        mode = saved_config(cfg.model.name_or_path).get("model", {}).get("lora", {}).get("mode")
        raise InputError(
            f"model.name_or_path: {cfg.model.name_or_path} holds a LoRA adapter (adapter/); set "
            "model.lora.enabled=true"
            + (f" model.lora.mode={mode} (as it was meta-trained)" if mode else "")
            + " to evaluate it or go on training it, or give a model without one"
        )
    if cfg.model.lora.enabled and not is_peft(model):
        model = apply_lora(model, cfg.model.lora)
    select_engine(cfg.meta.engine, model, inner_spec(model, cfg.meta, cfg.model.lora))
    return model


SAVED_SETTINGS = (
    "meta.inner_lr",
    "meta.inner_steps",
    "meta.inner_params",
    "eval.inner_lr",
    "model.lora.enabled",
    "model.lora.mode",
    "model.lora.rank",
    "model.lora.alpha",
    "model.lora.target_modules",
)
"""Settings of a model saved by a job (its ``raymeta.json``) that its evaluation and further
training depend on; a job that loads it with others says so."""


def saved_config(path: str) -> dict:
    """The config tree a job saved with the model at ``path`` (``raymeta.json``), or {}."""
    info = Path(path).expanduser() / "raymeta.json"
    try:
        return json.loads(info.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}


def note_saved_settings(cfg: RunConfig, path: str) -> list[str]:
    """One printed line per :data:`SAVED_SETTINGS` value that differs from the one the model at
    ``path`` was meta-trained with (the returned lines). A loaded adapter keeps its own rank,
    alpha and targets whatever this job's ``model.lora`` says."""
    saved = saved_config(path)
    if not saved:
        return []
    from raymeta.config import flatten

    def norm(v):
        return sorted(v) if isinstance(v, list) else v

    then, now = flatten(saved), flatten(to_dict(cfg))
    lines = []
    for key in SAVED_SETTINGS:
        if key in then and norm(then[key]) != norm(now.get(key)):
            lines.append(
                f"[model] {path} was meta-trained with {key}={then[key]}; this job has "
                f"{now.get(key)}"
                + (
                    " (the saved adapter is used as it is)"
                    if key.rsplit(".", 1)[-1] in ("rank", "alpha", "target_modules")
                    else ""
                )
            )
    for line in lines:
        print(line, flush=True)
    return lines


def check_tokenizer(tokenizer, train, test, model: str) -> list[str]:
    """InputError when the tokenizer encodes a triple's context, query or response to no
    tokens (its loss would silently count as 0); the warnings printed (and returned) when it
    does not give back some of the responses it encodes (e.g. a vocabulary without their
    words). ``model``: the setting that names the model, for the messages."""
    for kind, triples in (("training", train), ("test", test)):
        for field_name in ("context", "query", "response"):
            texts = [" " + getattr(t, field_name).strip() for t in triples]
            unique = list(dict.fromkeys(texts))  # (SQuAD's contexts repeat per question)
            rows = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
            empty = {text for text, row in zip(unique, rows) if not row}
            if empty:
                i = next(i for i, text in enumerate(texts) if text in empty)
                raise InputError(
                    f"{model}: its tokenizer ({type(tokenizer).__name__}) encodes the "
                    f"{field_name} of {kind} triple {i} "
                    f"({texts[i].strip()!r}) to no tokens; is it the tokenizer this model "
                    "was saved with?"
                )
    responses = [t.response.strip() for t in (*train, *test)][:20]
    ids = tokenizer([" " + r for r in responses], add_special_tokens=False)["input_ids"]
    back = tokenizer.batch_decode(ids, skip_special_tokens=True)
    squash = lambda text: "".join(text.split())  # noqa: E731  (decoders differ in spaces)
    lost = [(r, b.strip()) for r, b in zip(responses, back) if squash(r) != squash(b)]
    if not lost:
        return []
    line = (
        f"[model] warning: {model}: its tokenizer does not give back {len(lost)} of "
        f"{len(responses)} responses (e.g. {lost[0][0]!r} decodes as {lost[0][1]!r}); "
        "answers are then scored on what it can represent"
    )
    print(line, flush=True)
    return [line]


def check_lengths(cfg: RunConfig, tokenizer, train, test, limit: int | None, model: str) -> None:
    """InputError, before any training, when a sequence the job would feed the model for its
    evaluated test triples or (if any objective is meta-trained) its training triples is longer
    than ``limit`` positions (``model``: the setting that names the model, for the message)."""
    from raymeta.data.batches import longest_sequences

    if limit is None:
        return
    settings = cfg.eval.settings
    checks = [
        (
            "test",
            eval_triples(test, cfg.eval),
            cfg.eval.max_new_tokens,
            int("Prompt" in settings),
            "eval.max_new_tokens",
        )
    ]
    if cfg.meta.objectives:  # LC's teacher reads the prompt; LG reads contexts and queries
        joined = cfg.meta.contexts_per_update if cfg.meta.lc_teacher_context == "all" else 1
        teacher = joined if "LC" in cfg.meta.objectives else 0
        checks.append(
            ("training", train, cfg.meta.max_answer_tokens, teacher, "meta.max_answer_tokens")
        )
    for kind, triples, answer, joined, answer_field in checks:
        length, index = longest_sequences(tokenizer, triples, answer, joined)
        if length > limit:
            raise InputError(
                f"{model} accepts sequences of at most {limit} positions, but {kind} triple "
                f"{index} needs up to {length} (with {answer} decoded answer tokens, "
                f"{answer_field}"
                + (", and contexts joined: meta.lc_teacher_context=all" if joined > 1 else "")
                + "): shorten the contexts (data.max_context_chars), lower the answer budget "
                "or use a model with more positions"
            )


def check_answer_budgets(cfg: RunConfig, tokenizer, train, test) -> list[str]:
    """The warnings printed (and returned) when responses take more tokens than the greedy
    budget that decodes them: an evaluated test response over ``eval.max_new_tokens`` can never
    be scored correct in any setting; a training response over ``meta.max_answer_tokens`` is cut
    in LC's teacher answers (only when LC is meta-trained)."""
    checks = [
        (
            "test",
            eval_triples(test, cfg.eval),
            cfg.eval.max_new_tokens,
            "eval.max_new_tokens",
            "no setting can score them correct",
        )
    ]
    if "LC" in cfg.meta.objectives:
        checks.append(
            (
                "training",
                train,
                cfg.meta.max_answer_tokens,
                "meta.max_answer_tokens",
                "LC's teacher answers are cut there",
            )
        )
    lines = []
    for kind, triples, budget, name, effect in checks:
        texts = [" " + t.response.strip() for t in triples]
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        over = [i for i, n in enumerate(counts) if n > budget]
        if not over:
            continue
        worst = max(over, key=counts.__getitem__)
        lines.append(
            f"[data] warning: {len(over)} of {len(triples)} {kind} responses take more than "
            f"{name}={budget} tokens (the longest, {kind} triple {worst}, "
            f"{texts[worst].strip()!r}, takes {counts[worst]}): {effect}; "
            f"{name}={counts[worst]} would fit them all"
        )
        print(lines[-1], flush=True)
    return lines


def load_base_model(cfg: RunConfig, train, test, device):
    """(model, tokenizer, path) of the configured model; builds the tiny one when asked
    (its LoRA targets and inner parameters checked on a random copy before pretraining)."""
    from raymeta.models import build_tiny_model, keep_float64, load_model, train_tokenizer
    from raymeta.pretrain import ensure_tiny_model, tokenizer_texts

    path = cfg.model.name_or_path
    if path == "tiny":
        tok = train_tokenizer(tokenizer_texts(cfg.data.dataset, train, test))
        check_lengths(
            cfg,
            tok,
            train,
            test,
            cfg.model.tiny.max_positions,
            f"model.tiny.max_positions={cfg.model.tiny.max_positions}: the tiny model",
        )
        with torch.random.fork_rng(devices=[]):  # the check leaves the global RNG as it was
            with_model_choices(cfg, build_tiny_model(cfg.model.tiny, len(tok)))
        accuracy = prompt_accuracy_fn(tok, device)
        path = str(ensure_tiny_model(cfg, train, test, device, accuracy, tokenizer=tok))
    note_saved_settings(cfg, path)
    model, tok = load_model(path, cfg.model.dtype, cfg.model.attn_implementation, device)
    check_tokenizer(tok, train, test, f"model.name_or_path: {path}")
    check_answer_budgets(cfg, tok, train, test)
    if cfg.model.name_or_path != "tiny":
        from raymeta.models import position_limit

        limit = position_limit(model.config)
        check_lengths(cfg, tok, train, test, limit, f"model.name_or_path: {path}")
    if cfg.model.dtype == "float64":
        keep_float64(model)
    return with_model_choices(cfg, model), tok, path


def format_table(results: dict) -> str:
    """results.json as a markdown table: model × setting (accuracy, and nll / leak)."""
    settings = [s for s in SETTINGS if any(s in r for r in results.values())]
    head = "| model | " + " | ".join(settings) + " |"
    lines = [head, "|" + " --- |" * (len(settings) + 1)]
    for name, res in results.items():
        cells = []
        for s in settings:
            m = res.get(s)
            if m is None:
                cells.append("-")
            elif "leak" in m:
                cells.append(f"{m['accuracy']:.3f} (leak {m['leak']:.3f})")
            else:
                cells.append(f"{m['accuracy']:.3f} (nll {m['nll']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_scores(metrics: dict) -> str:
    """One model's accuracy per setting on one line, with the leak of the controls."""
    return "  ".join(
        f"{s}={m['accuracy']:.3f}" + (f" (leak {m['leak']:.3f})" if "leak" in m else "")
        for s, m in metrics.items()
    )


def write_records(out: Path, name: str, records: list[dict]) -> None:
    (out / "records").mkdir(parents=True, exist_ok=True)
    with open(out / "records" / f"{name}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


RESULT_FILES = ("results.json", "results.md", "results.png", "summary.json", "config.yaml")


def keep_previous(out: Path) -> Path | None:
    """Move an earlier run's results in ``out`` to ``out/previous/<time>`` (never overwrite)."""
    if not (out / "results.json").exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((out / "results.json").stat().st_mtime))
    dest = out / "previous" / stamp
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*RESULT_FILES, "records", "data", "models"):
        if (out / name).exists():
            shutil.move(str(out / name), str(dest / name))
    print(f"[output] the earlier results in {out} were moved to {dest}", flush=True)
    return dest


def check_sizes(cfg: RunConfig, train, test) -> None:
    """InputError, before any training, when the triples fill no meta-batch of tasks (if any
    objective is to be meta-trained) or are too few to evaluate in ``eval.settings`` (or a
    test triple has no partner for its paired settings)."""
    if cfg.meta.objectives:
        check_task_count(len(train), cfg.meta.contexts_per_update, cfg.meta.meta_batch_size)
    eval_partners(eval_triples(test, cfg.eval), cfg.eval, cfg.seed)


def write_results(out: Path, results: dict) -> str:
    """``results.json`` and ``results.md`` (the table, returned) of the models evaluated so far."""
    table = format_table(results)
    write_whole(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_whole(out / "results.md", table + "\n")
    return table


def write_figure_and_summary(out: Path, results: dict, histories: dict, summary: dict) -> None:
    """``results.png`` (the models evaluated so far, their meta-training curves) and
    ``summary.json``, each replaced whole."""
    from raymeta.plots import plot_results

    ended = {o: "diverged" for o in summary.get("diverged", {})}
    ended.update({o: "stopped" for o in summary.get("stopped", {})})
    plot_results(results, histories, out / ".results.tmp.png", ended)
    (out / ".results.tmp.png").replace(out / "results.png")
    write_whole(out / "summary.json", json.dumps(summary, indent=1))


def describe_stop(error: BaseException, history: list[dict]) -> str:
    """How a meta-training stopped before its end, for ``summary.json``: the exception and the
    last step ``history`` holds, e.g. "KeyboardInterrupt after step 20", "SystemExit(143) after
    step 20" (SIGTERM), "RuntimeError after step 3: <its message>", on one line and cut at 300
    characters (a Ray worker's error carries its traceback)."""
    done = f"after step {history[-1]['step']}" if history else "before a step's record"
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code}) {done}"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text if len(text) <= 300 else text[:299] + "…"
    return f"{type(error).__name__} {done}" + (f": {text}" if text else "")


def run_pipeline(
    cfg: RunConfig, output_dir: str | Path, meta_trainer=None, on_result=None, on_ready=None
) -> dict:
    """Run the whole job; returns results (also written to ``output_dir/results.json``).

    ``meta_trainer(model, tokenizer, train, test, cfg, objective, teacher, history)`` replaces
    the in-process meta-training loop (the Ray Train path passes its own); it appends the step
    records to the list ``history`` as the steps complete, so that a job stopped part-way (a
    signal or an error) still writes the curve so far into ``summary.json`` and
    ``results.png``, with a ``stopped`` entry (a divergence, ``MetaTrainingDiverged``, gives a
    ``diverged`` one). ``on_ready()`` is called once the data and the model have loaded and
    passed their checks, before anything is written to ``output_dir`` (the job opens its MLflow
    run there, so that bad input opens none). Each model's results are written (results.json,
    results.md, records) and passed to ``on_result(name, metrics)`` as soon as it is
    evaluated, so a job that stops later keeps them."""
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch(cfg)
    device = torch.device(cfg.device)
    print(f"[data] {cfg.data.dataset}", flush=True)
    train, test = load_task_set(cfg.data)
    print(f"[data] {len(train)} train / {len(test)} test triples", flush=True)
    check_sizes(cfg, train, test)
    model, tok, path = load_base_model(cfg, train, test, device)
    print(f"[model] {path}", flush=True)
    if on_ready is not None:
        on_ready()
    # only once data and model have loaded: a re-run with bad inputs leaves the results in place
    source = model_source(path, out, keep_previous(out))
    dump_config(cfg, out / "config.yaml")
    save_task_set(out / "data", cfg.data, train, test)
    prep = prepare(model, tok, train, cfg.prepare, cfg.seed, device)
    eval_lr = cfg.eval.inner_lr or cfg.meta.inner_lr
    results, histories, saved, engines, diverged, stopped = {}, {}, {}, {}, {}, {}

    def write_summary(complete: bool) -> dict:
        summary = {
            "seconds": time.perf_counter() - t0,
            "complete": complete,
            "model": source,
            "prepare": prep,
            "models": saved,
            "engines": engines,
            "history": histories,
            "diverged": diverged,
            "stopped": stopped,
        }
        write_figure_and_summary(out, results, histories, summary)
        return summary

    def run_eval(name, m) -> dict:
        """Evaluate ``m``; its files are written at once (a job stopped later keeps them)."""
        spec = inner_spec(m, cfg.meta, cfg.model.lora, lr=eval_lr)
        engine = select_engine(cfg.meta.engine, m, spec)
        metrics, records = evaluate(
            m, tok, test, cfg.eval, engine, spec, device, label=f"eval {name}", seed=cfg.seed
        )
        results[name], engines[name] = metrics, engine.name
        write_records(out, name, records)
        write_results(out, results)
        summary = write_summary(complete=len(results) == 1 + len(cfg.meta.objectives))
        if on_result is not None:
            on_result(name, metrics)
        print(f"[eval {name}] ({engine.name} engine) {format_scores(metrics)}", flush=True)
        return summary

    base = model
    summary = run_eval("BM", base)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    trainer = meta_trainer or local_trainer
    for objective in cfg.meta.objectives:
        m = copy.deepcopy(base)
        lc_teacher = teacher if objective == "LC" else None
        histories[objective] = history = []
        try:
            trainer(m, tok, train, test, cfg, objective, lc_teacher, history)
        except MetaTrainingDiverged as e:  # its steps up to there: in the summary and figure
            diverged[objective] = str(e)
            write_summary(complete=False)
            raise
        except BaseException as e:  # a signal (see jobs/metatrain.py) or an error
            stopped[objective] = describe_stop(e, history)
            write_summary(complete=False)
            raise
        if cfg.save_models:
            saved[objective] = save_trained(m, tok, out, objective, source, cfg)
        summary = run_eval(objective, m)
    print("\n" + format_table(results) + "\n", flush=True)
    print(f"[done] {summary['seconds']:.0f} s; results in {out / 'results.json'}", flush=True)
    return results


def model_source(path: str, out: Path, moved_to: Path | None) -> str:
    """Where the job's base model ``path`` lives once the job runs: a local one as an absolute
    path, at its new place if :func:`keep_previous` just moved it (a model of this output dir's
    ``models/`` trained on again), copied to ``out/models/base`` if it lies in Ray's copy of a
    submitted job's working dir (the tiny model's default cache under ``ray job submit``); a
    hub name as given."""
    from raymeta.paths import in_ray_working_dir, looks_local

    if not looks_local(path):
        return path
    where = Path(path).expanduser().resolve()
    if moved_to is not None and where.is_relative_to(out.resolve() / "models"):
        return str(moved_to.resolve() / where.relative_to(out.resolve()))
    if in_ray_working_dir(where):  # Ray deletes it after the job: keep a copy with the results
        dest = out.resolve() / "models" / "base"
        shutil.copytree(where, dest, dirs_exist_ok=True)
        print(
            f"[model] {where} lies in this job's copy of the working dir, which Ray deletes "
            f"after the job: copied to {dest}, the base model the results name",
            flush=True,
        )
        return str(dest)
    return str(where)


def save_trained(model, tokenizer, out: Path, objective: str, base: str, cfg: RunConfig) -> str:
    """Write a meta-trained model to ``out/models/<objective>`` (see
    :func:`raymeta.models.save_model`; ``raymeta.json`` there names the objective, the base
    model, the run name and the job's resolved config); returns the path relative to ``out``."""
    from raymeta.models import is_peft, save_model

    dest = out / "models" / objective
    info = {"objective": objective, "base_model": base, "run": cfg.name, "config": to_dict(cfg)}
    if is_peft(model):  # the adapter as it is (one loaded with the base keeps its own shape)
        lora = model.peft_config["default"]
        info["config"]["model"]["lora"].update(
            rank=lora.r, alpha=float(lora.lora_alpha), target_modules=sorted(lora.target_modules)
        )
    save_model(model, tokenizer, dest, info=info)
    print(f"[model] {objective} saved to {dest}", flush=True)
    return str(dest.relative_to(out))


def local_trainer(model, tokenizer, train, test, cfg, objective, teacher, history, on_log=None):
    """Meta-train in this process (see raymeta.outer.meta_train_local)."""
    lm_next = lm_sampler(cfg, tokenizer, train, test)
    meta_train_local(
        model, tokenizer, train, cfg, objective, teacher, cfg.device, lm_next, on_log, history
    )
