"""The Ray Train loop: one worker's share of the distributed outer loop.

Every worker loads the base model from a ``save_pretrained`` directory, wraps
it in a DeepSpeed engine and runs the same steps as
:func:`raymeta.outer.meta_train_local`: at each global step it takes its own
disjoint shard of the global meta-batch (:func:`raymeta.data.tasks.shard_batch`),
computes :func:`raymeta.outer.step_loss` through ``engine.module``, and lets the
engine reduce, clip and apply Adam. Rank 0 prints progress, logs per-step
metrics to the run's MLflow child run, and evaluates on held-out data every
``train.eval_every`` steps. Metrics go to ``ray.train.report`` every
``train.report_every`` steps; checkpoints (engine + loop state) every
``train.checkpoint_every`` steps and at the end, where rank 0 also writes the
trained model with ``save_pretrained``. Rank 0 also appends each step's record to a
history beside the checkpoints, from which the driver shows the curve of a run that is
stopped. A restarted worker group resumes from the last checkpoint at the same step and
sampler position.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch

from raymeta.train.checkpoint import MODEL_DIR, LoopState, load_checkpoint, save_checkpoint

METRIC_KEYS = ("outer_loss", "inner_loss", "loss", "lm_loss", "grad_norm")


def quiet_report_logs() -> None:
    """Ray Train 2.x logs every ``ray.train.report`` at INFO ("Reporting training result N:
    TrainingReport(...)", the whole metrics dict), which buries the progress lines; its
    logger (named by its module's file) is raised to WARNING in this worker."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its messages stay as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer (see :func:`raymeta.train.launch.fit_objective`).

    ``config`` keys: ``cfg`` (the RunConfig as a dict), ``objective``, ``model_dir``,
    ``train``/``test`` (triples), ``tracking`` (MLflow child run or None), ``fault``
    (test hook: ``{"step", "rank", "flag"}`` kills this worker at that step once)."""
    import ray.train

    from raymeta.config import from_dict
    from raymeta.data.tasks import advance, group_facts, shard_batch
    from raymeta.meta.engines import select_engine
    from raymeta.outer import (
        MetaTrainingDiverged,
        check_finite,
        inner_spec,
        lm_sampler,
        step_loss,
        steps_note,
        total_steps,
        train_label,
    )
    from raymeta.progress import Progress
    from raymeta.train.engine import init_engine

    # Ray Train routes print() to its logger and, when a library has wrapped sys.stdout,
    # also tees to it: every progress line would show twice on the driver.
    sys.stdout = sys.__stdout__
    quiet_report_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    meta, objective = cfg.meta, config["objective"]
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    model, tok = _load(config["model_dir"], cfg, device, trainable=True)
    teacher = None
    if objective == "LC":
        teacher, _ = _load(config["model_dir"], cfg, device, trainable=False)
    train, test = config["train"], config["test"]
    groups = group_facts(train, meta.contexts_per_update, cfg.seed)
    steps = total_steps(meta, len(groups))
    spec = inner_spec(model, meta, cfg.model.lora)
    engine = select_engine(meta.engine, model, spec)
    ds = init_engine(model, cfg, world)
    lm_next = lm_sampler(cfg, tok, train, test)

    state = LoopState(objective)
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(ds, d)
            history = read_history(d)
        state.attempt += 1
        if rank == 0:
            print(
                f"[meta-train {objective}] resumed at step {state.step}/{steps} "
                f"(epoch {state.position.epoch}, batch {state.position.step}), "
                f"attempt {state.attempt}",
                flush=True,
            )
    steps_dir = config.get("steps_dir") if rank == 0 else None  # the driver reads it if stopped
    if steps_dir:
        write_history(steps_dir, history)  # (a restart: the steps up to its checkpoint)
    tracker = _attach_tracker(config.get("tracking")) if rank == 0 else None
    # a restart replays the steps after its checkpoint: the store keeps the first attempt's
    logged = tracker.last_step("outer_loss") if tracker is not None and state.attempt else 0
    if logged > state.step:
        steps_in = f"{state.step + 1}-{logged}" if logged > state.step + 1 else f"{logged}"
        print(
            f"[meta-train {objective}] step(s) {steps_in} are in MLflow from the attempt "
            "before; their replay is not logged again",
            flush=True,
        )
    if rank == 0 and (note := steps_note(meta, len(groups), steps)):
        print(note, flush=True)
    workers = f"{world} worker" + ("s" if world > 1 else "")
    prog = Progress(
        train_label(objective, engine, spec, workers, f"ZeRO-{cfg.train.zero_stage}"),
        steps,
        every=meta.log_every,
        stream=None if rank == 0 else open(os.devnull, "w"),
    )
    fault = config.get("fault")
    ds.module.train()
    while state.step < steps:
        step = state.step + 1
        _maybe_fail(fault, step, rank)
        idx = shard_batch(len(groups), meta.meta_batch_size, rank, world, cfg.seed, state.position)
        loss, stats = step_loss(
            ds.module,
            engine,
            spec,
            tok,
            [groups[i] for i in idx],
            objective,
            meta,
            teacher,
            lm_next(step, rank, world) if lm_next is not None else None,
            device,
        )
        ds.backward(loss)
        norm0 = _reduced_grad_norm(ds) if cfg.train.zero_stage == 0 else None
        ds.step()
        stats = _mean_over_workers(stats, world)
        stats["grad_norm"] = norm0 if norm0 is not None else _grad_norm(ds)
        try:
            check_finite(stats, step)  # the same figures on every rank: all stop together
        except MetaTrainingDiverged as e:  # reported, not raised: a retry would diverge again
            if tracker is not None:
                tracker.finish("FAILED")
            _report_divergence(str(e), step, rank)
            return
        state.step, state.position = (
            step,
            advance(state.position, len(groups), meta.meta_batch_size),
        )
        state.steps_log.append([step, state.attempt])
        printed = prog.update(
            step,
            meta.meta_batch_size,
            outer_loss=stats["outer_loss"],
            inner_loss=stats["inner_loss"],
            grad_norm=stats["grad_norm"],
        )
        record = {"step": step, **{k: stats[k] for k in METRIC_KEYS if k in stats}}
        if printed:  # the progress line's rate (since its previous line), as on the local launcher
            record["tasks_per_s"] = prog.rate
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
            record.update(_evaluate(ds.module, tok, test, cfg, engine, spec, device, rank, step))
        report_now = step % cfg.train.report_every == 0 or step == steps
        ckpt_now = step == steps or (
            cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
        )
        history.append(record)
        if tracker is not None and step > logged:
            tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step)
        if steps_dir:
            append_history(steps_dir, record)
        if ckpt_now:
            _report_checkpoint(ds, state, history, record, tok, rank, final=step == steps)
        elif report_now:
            ray.train.report(_reportable(record))
    ds.module.eval()
    if tracker is not None:
        tracker.finish()


# --------------------------------------------------------------------------- helpers


def _device(cfg) -> torch.device:
    if cfg.train.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _load(model_dir: str, cfg, device, trainable: bool):
    """(model, tokenizer) from the driver's ``save_pretrained`` directory.

    With LoRA the directory holds the base model and the adapter (see ``save_model``):
    only the adapter trains, as in the driver's model."""
    from raymeta.models import is_peft, keep_float64, load_model

    model, tok = load_model(model_dir, cfg.model.dtype, cfg.model.attn_implementation, device)
    if is_peft(model) != cfg.model.lora.enabled:
        raise ValueError(
            f"model.lora.enabled={cfg.model.lora.enabled}, but {model_dir} "
            + ("holds" if is_peft(model) else "does not hold")
            + " a LoRA adapter"
        )
    if cfg.model.dtype == "float64":
        keep_float64(model)
    if not trainable:
        model.requires_grad_(False).eval()
    elif not is_peft(model):
        model.requires_grad_(True)
    return model, tok


def _mean_over_workers(stats: dict, world: int) -> dict:
    """Average the float stats over workers (each worker holds an equal share of tasks)."""
    if world == 1:
        return dict(stats)
    import torch.distributed as dist

    keys = sorted(k for k, v in stats.items() if isinstance(v, float))
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {**stats, **{k: float(v) / world for k, v in zip(keys, t.tolist())}}


def _reduced_grad_norm(ds) -> float:
    """ZeRO-0: the global norm of the (already all-reduced) gradients, before clipping."""
    grads = [p.grad.detach().float().norm() for p in ds.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else float("nan")


def _grad_norm(ds) -> float:
    """The global norm of the reduced meta-gradient before clipping."""
    norm = ds.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)


def _evaluate(model, tok, test, cfg, engine, spec, device, rank: int, step: int) -> dict:
    """Held-out metrics on rank 0 (``eval/<setting>_accuracy``); other ranks return {}."""
    if rank != 0:
        return {}
    from raymeta.evaluate import evaluate
    from raymeta.outer import inner_spec

    eval_spec = inner_spec(
        model, cfg.meta, cfg.model.lora, lr=cfg.eval.inner_lr or cfg.meta.inner_lr
    )
    model.eval()
    metrics, _ = evaluate(
        model,
        tok,
        test,
        cfg.eval,
        engine,
        eval_spec,
        device,
        label=f"eval step {step}",
        seed=cfg.seed,
    )
    model.train()
    out = {f"eval_{s}_accuracy": float(m["accuracy"]) for s, m in metrics.items()}
    print(f"[eval step {step}] " + "  ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)
    return out


def _reportable(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()}


def _report_checkpoint(ds, state, history, record, tok, rank: int, final: bool) -> None:
    """Save the engine (all ranks) and loop state (rank 0), then ray.train.report it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raymeta-ckpt-") as d:
        save_checkpoint(ds, state, d, rank)
        if rank == 0:
            write_history(d, history)
            if final:
                from raymeta.models import save_model

                save_model(ds.module, tok, Path(d) / MODEL_DIR)
        ray.train.report(_reportable(record), checkpoint=ray.train.Checkpoint.from_directory(d))


DIVERGED = "diverged.txt"
"""The file of a checkpoint that reports a divergence (its text: the error)."""


def _report_divergence(message: str, step: int, rank: int) -> None:
    """Report the divergence as a checkpoint holding only its message (the driver's Result
    keeps checkpoints' reports, not plain ones), so fit_objective raises it; the steps before
    it are in rank 0's history beside the checkpoints."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raymeta-diverged-") as d:
        if rank == 0:
            Path(d, DIVERGED).write_text(message)
        checkpoint = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        ray.train.report({"step": step}, checkpoint=checkpoint)


HISTORY = "history.jsonl"
"""The file of a checkpoint holding the step records up to it, one JSON line per step (also
rank 0's record of the steps so far beside the checkpoints, appended to as it goes)."""


def write_history(directory, history: list[dict]) -> None:
    """``history`` (the step records) into ``directory``, replaced whole: a reader never sees
    half of it."""
    import json

    from raymeta.paths import write_whole

    Path(directory).mkdir(parents=True, exist_ok=True)
    write_whole(Path(directory, HISTORY), "".join(json.dumps(r) + "\n" for r in history))


def append_history(directory, record: dict) -> None:
    """One step's record appended to ``directory``'s history (written by :func:`write_history`)."""
    import json

    with open(Path(directory, HISTORY), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_history(directory) -> list[dict]:
    """The step records ``directory``'s ``HISTORY`` holds ([] without one; a last line still
    being appended is left out)."""
    import json

    path = Path(directory) / HISTORY
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # (the text after the last newline)


def _attach_tracker(info: dict | None):
    """Rank 0's tracker bound to the MLflow child run the driver opened (None = no tracking)."""
    if not info:
        return None
    try:
        from mlflow import MlflowClient

        from raymeta.train.tracking import MlflowTracker, disable_telemetry

        disable_telemetry()
        return MlflowTracker(
            MlflowClient(tracking_uri=info["uri"]),
            uri=info["uri"],
            experiment_id=info["experiment_id"],
            run_id=info["run_id"],
            spill_dir=Path(info["spill_dir"]),
        )
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
        print(
            f"[raymeta.tracking] rank 0 cannot log to MLflow ({e}); training continues", flush=True
        )
        return None


def _maybe_fail(fault: dict | None, step: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL this worker at ``fault['step']`` the first time."""
    if not fault or step != fault["step"] or rank != fault.get("rank", 0):
        return
    flag = Path(fault["flag"])
    if flag.exists():
        return
    import ray.train

    # Let the controller register the checkpoints reported so far (a report is processed
    # asynchronously; a crash right after one may otherwise restart from an older one). At
    # most 30 s: Ray 2.51's call takes no time limit and can block for good.
    waiter = threading.Thread(target=ray.train.get_all_reported_checkpoints, daemon=True)
    waiter.start()
    waiter.join(30)
    flag.write_text(f"killed pid {os.getpid()} at step {step}\n")
    print(f"[fault] killing worker rank {rank} (pid {os.getpid()}) at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
