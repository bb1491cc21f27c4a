"""The outer loop's building blocks, shared by the in-process and the Ray Train loops.

``step_loss`` turns one shard of task groups into the loss to back-propagate;
``meta_train_local`` is the single-process loop (torch Adam + clipping). The
distributed loop (raymeta.train) calls the same ``step_loss`` and lets a
DeepSpeed engine do backward, reduction, clipping and the Adam step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from raymeta.data.batches import Tokens, lm_batch, truncate
from raymeta.data.tasks import (
    Position,
    advance,
    check_meta_batch,
    group_facts,
    make_meta_batch,
    shard_batch,
    steps_per_epoch,
)
from raymeta.data.triples import Triple, utf8_lines
from raymeta.errors import InputError
from raymeta.meta.engines import Engine, select_engine
from raymeta.meta.inner import InnerSpec
from raymeta.meta.step import lc_targets, meta_loss
from raymeta.models import position_limit, resolve_inner_params
from raymeta.progress import Progress


def inner_spec(model, meta, lora=None, lr: float | None = None) -> InnerSpec:
    """The InnerSpec of a MetaConfig for ``model`` (``lr`` overrides meta.inner_lr)."""
    mode = lora.mode if lora is not None and lora.enabled else None
    names = tuple(resolve_inner_params(model, list(meta.inner_params), mode))
    return InnerSpec(
        lr=lr or meta.inner_lr,
        names=names,
        steps=meta.inner_steps,
        second_order=meta.second_order,
        checkpoint_inner=False if meta.checkpoint_inner == "none" else meta.checkpoint_inner,
        compile_ops=meta.compile_ops,
    )


def lm_sampler(
    cfg, tokenizer, train: Sequence[Triple], test: Sequence[Triple] = ()
) -> Callable[[int, int, int], Tokens] | None:
    """``f(step, rank, world)``: worker ``rank``'s share of step ``step``'s regulariser batch.

    None when λ = 0. The global batch (``meta.lm_batch_size`` texts) is a pure function of
    (seed, step), so a resumed run and any number of workers see the same texts; worker r
    takes its contiguous share. Sources (``meta.lm_source``): the training contexts, the
    tiny model's pretraining mix (raymeta.pretrain; test facts excluded), or a text file,
    one document a line."""
    meta = cfg.meta
    if meta.lm_weight <= 0:
        return None
    if meta.lm_source == "pretrain_mix":
        from raymeta.pretrain import TextSampler

        sampler = TextSampler(cfg.data.dataset, train, test, tokenizer, cfg.seed + 7)

        def texts(rng: random.Random) -> Tokens:
            sampler.rng = rng
            return sampler.batch(meta.lm_batch_size, meta.lm_mix or cfg.pretrain.mix)
    else:
        if meta.lm_source == "file":
            pool = read_lm_file(meta.lm_file)
        else:
            pool = [t.context for t in train]

        def texts(rng: random.Random) -> Tokens:
            return lm_batch(tokenizer, rng.choices(pool, k=meta.lm_batch_size), max_len=256)

    def share(step: int, rank: int = 0, world: int = 1) -> Tokens:
        if meta.lm_batch_size % world:
            raise ValueError(
                f"meta.lm_batch_size: {meta.lm_batch_size} is not divisible by {world} workers"
            )
        batch = texts(random.Random(f"{cfg.seed}-lm-{step}"))
        per = meta.lm_batch_size // world
        rows = slice(rank * per, (rank + 1) * per)
        return Tokens(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])

    return share


class MetaTrainingDiverged(RuntimeError):
    """A meta-training step gave a non-finite loss or gradient norm (jobs exit 4 on it)."""


def check_finite(stats: dict, step: int) -> None:
    """Raise MetaTrainingDiverged when a loss or the gradient norm in ``stats`` is nan or inf:
    later steps would only spread it through the weights."""
    bad = [
        f"{k}={stats[k]}"
        for k in ("outer_loss", "inner_loss", "lm_loss", "grad_norm")
        if k in stats and not math.isfinite(stats[k])
    ]
    if bad:
        raise MetaTrainingDiverged(
            f"meta-training diverged at step {step}: {', '.join(bad)}. Lower meta.outer_lr or "
            "meta.inner_lr, or keep meta.clip_norm > 0; float32 is safer than bfloat16"
        )


def read_lm_file(path: str) -> list[str]:
    """The documents of ``meta.lm_file`` (one a line, blank lines skipped); InputError naming
    the file when it is missing, not UTF-8 or holds no text."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"meta.lm_file: {path} not found (a text file, one document a line)")
    pool = [line.strip() for _, line in utf8_lines(file) if line.strip()]
    if not pool:
        raise InputError(f"meta.lm_file: {path} holds no text")
    return pool


def step_loss(
    model,
    engine: Engine,
    spec: InnerSpec,
    tokenizer,
    groups,
    objective: str,
    meta,
    teacher=None,
    lm_texts: Tokens | None = None,
    device="cpu",
):
    """Loss and stats of one meta-batch shard (``groups``: task groups of triples;
    ``lm_texts``: this shard's regulariser texts ``[N, T]``)."""
    batch = make_meta_batch(tokenizer, groups, meta.lc_teacher_context).to(device)
    lc = None
    if objective == "LC":
        lc = lc_targets(
            teacher, batch, meta.max_answer_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
    if lm_texts is not None:  # plain LM texts: cut to the model's positions (several joined
        # facts of the pretraining mix can be longer than a short-context model takes)
        limit = position_limit(getattr(model, "config", None))
        lm_texts = truncate(lm_texts, limit).to(device)
    return meta_loss(model, engine, spec, batch, objective, lc, lm_texts, meta.lm_weight)


def train_label(objective: str, engine: Engine, spec: InnerSpec, *parts: str) -> str:
    """Progress header of meta-training: objective, engine, order, inner steps (when more than
    one), inner checkpointing, ``parts``; e.g. ``meta-train LG (fastweights, second order)``."""
    inner = ["second order" if spec.second_order else "first order"]
    if spec.steps > 1:
        inner.append(f"{spec.steps} inner steps")
    if spec.checkpoint_inner and engine.name == "fastweights":  # the reference ignores it
        inner.append(f"checkpoint_inner={engine.checkpoint_inner or spec.checkpoint_inner}")
    if spec.compile_ops and engine.name == "fastweights":
        inner.append("compiled ops")
    return f"meta-train {objective} ({', '.join([engine.name, *inner, *parts])})"


def steps_note(meta, num_tasks: int, steps: int) -> str | None:
    """A log line when ``meta.epochs`` capped ``meta.steps`` at ``steps`` (:func:`total_steps`;
    None when it did not)."""
    if not meta.steps or steps >= meta.steps:
        return None
    per_epoch = steps_per_epoch(num_tasks, meta.meta_batch_size)
    return (
        f"[meta-train] meta.steps={meta.steps} capped at {steps}: meta.epochs={meta.epochs} "
        f"passes over {num_tasks} tasks, {per_epoch} meta-batches of {meta.meta_batch_size} each"
    )


def total_steps(meta, num_tasks: int) -> int:
    """Outer steps: ``meta.steps`` capped at ``meta.epochs`` passes over the tasks."""
    check_meta_batch(meta.meta_batch_size, num_tasks)
    per_epoch = steps_per_epoch(num_tasks, meta.meta_batch_size)
    return min(meta.steps, meta.epochs * per_epoch) if meta.steps else meta.epochs * per_epoch


def meta_train_local(
    model,
    tokenizer,
    train: Sequence[Triple],
    cfg,
    objective: str,
    teacher=None,
    device="cpu",
    lm_next=None,
    on_log=None,
    history: list[dict] | None = None,
) -> list[dict]:
    """Meta-train ``model`` in place in this process; returns the history, one record per step
    (passed to ``on_log(record, step)`` too), as the Ray workers keep it: the step's losses and
    gradient norm, and at every ``meta.log_every``-th step ``tasks_per_s``, the rate since the
    previous one (the figure the progress line prints). Given ``history`` (a list), the records
    are appended to it as each step completes, so a caller whose run stops part-way (a signal,
    an error, a divergence) still holds the steps done."""
    meta = cfg.meta
    groups = group_facts(train, meta.contexts_per_update, cfg.seed)
    spec = inner_spec(model, meta, cfg.model.lora)
    engine = select_engine(meta.engine, model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=meta.outer_lr, fused=True)  # one pass per step
    steps = total_steps(meta, len(groups))
    if note := steps_note(meta, len(groups), steps):
        print(note, flush=True)
    prog = Progress(train_label(objective, engine, spec), steps, every=meta.log_every)
    pos = Position()
    history = [] if history is None else history
    model.train()
    for step in range(1, steps + 1):
        idx = shard_batch(len(groups), meta.meta_batch_size, 0, 1, cfg.seed, pos)
        loss, stats = step_loss(
            model,
            engine,
            spec,
            tokenizer,
            [groups[i] for i in idx],
            objective,
            meta,
            teacher,
            lm_next(step) if lm_next is not None else None,
            device,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            params, meta.clip_norm if meta.clip_norm > 0 else float("inf")
        )
        stats["grad_norm"] = float(norm)
        check_finite(stats, step)  # before the update: the model keeps its last finite weights
        opt.step()
        pos = advance(pos, len(groups), meta.meta_batch_size)
        record = {"step": step, **stats}  # every step, as the Ray workers log it
        if prog.update(
            step, len(idx), **{k: stats[k] for k in ("outer_loss", "inner_loss", "grad_norm")}
        ):  # a printed line: its rate, since the previous one
            record["tasks_per_s"] = prog.rate
        history.append(record)
        if on_log is not None:
            on_log(record, step)
    model.eval()
    return history
