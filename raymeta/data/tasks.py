"""Meta-training tasks: groups of facts updated on together, their order, and batches.

A task is a group of n triples (``meta.contexts_per_update``): the inner step
takes the n contexts together, the outer loss asks each of the n queries.
Sampling is deterministic: every group once per epoch, reshuffled by seed
each epoch, and split into balanced, disjoint shards for data parallelism.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from raymeta.data.batches import context_batch, prompt_batch, prompt_text, scoring_batch
from raymeta.data.triples import Triple
from raymeta.errors import InputError


def group_facts(triples: Sequence[Triple], n: int, seed: int) -> list[list[Triple]]:
    """Partition ``triples`` into groups of ``n`` (a seeded shuffle; the remainder is dropped)."""
    order = list(range(len(triples)))
    random.Random(seed).shuffle(order)
    return [[triples[i] for i in order[k : k + n]] for k in range(0, len(order) - n + 1, n)]


def check_task_count(n_train: int, contexts_per_update: int, meta_batch_size: int) -> int:
    """The number of tasks ``n_train`` training triples make; InputError naming the field
    when they fill no task or no meta-batch (see :func:`group_facts`)."""
    if contexts_per_update > n_train:
        raise InputError(
            f"meta.contexts_per_update: {contexts_per_update} exceeds the {n_train} training "
            "triples (a task holds that many facts)"
        )
    num_tasks = n_train // contexts_per_update
    check_meta_batch(
        meta_batch_size,
        num_tasks,
        f" ({n_train} training triples in groups of meta.contexts_per_update="
        f"{contexts_per_update})",
    )
    return num_tasks


def check_meta_batch(meta_batch_size: int, num_tasks: int, why: str = "") -> None:
    """InputError naming meta.meta_batch_size when it exceeds the ``num_tasks`` tasks (``why``:
    where they came from)."""
    if meta_batch_size > num_tasks:
        raise InputError(
            f"meta.meta_batch_size: {meta_batch_size} exceeds the {num_tasks} tasks{why}"
        )


def epoch_order(num_tasks: int, seed: int, epoch: int) -> list[int]:
    """The task order of one epoch: a permutation seeded by (seed, epoch)."""
    order = list(range(num_tasks))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


@dataclass(frozen=True)
class Position:
    """Where a sampler stands: ``epoch`` and the next global ``step`` within it."""

    epoch: int = 0
    step: int = 0


def steps_per_epoch(num_tasks: int, meta_batch_size: int) -> int:
    """Whole meta-batches in one epoch (the tail that does not fill one is dropped)."""
    return num_tasks // meta_batch_size


def shard_batch(
    num_tasks: int, meta_batch_size: int, rank: int, world: int, seed: int, pos: Position
) -> list[int]:
    """Task indices of worker ``rank`` for global step ``pos.step`` of ``pos.epoch``.

    The global meta-batch is the step's slice of the epoch order; worker r takes
    its r-th contiguous share (meta_batch_size / world tasks). Over an epoch every
    task is used exactly once across all workers."""
    if meta_batch_size % world:
        raise ValueError(f"meta batch {meta_batch_size} not divisible by {world} workers")
    if pos.step >= steps_per_epoch(num_tasks, meta_batch_size):
        raise IndexError(f"step {pos.step} is past the end of epoch {pos.epoch}")
    order = epoch_order(num_tasks, seed, pos.epoch)
    per = meta_batch_size // world
    start = pos.step * meta_batch_size + rank * per
    return order[start : start + per]


def advance(pos: Position, num_tasks: int, meta_batch_size: int) -> Position:
    """The position after one global step (rolling over to the next epoch)."""
    if pos.step + 1 >= steps_per_epoch(num_tasks, meta_batch_size):
        return Position(pos.epoch + 1, 0)
    return Position(pos.epoch, pos.step + 1)


def make_meta_batch(tokenizer, groups: Sequence[Sequence[Triple]], teacher_context: str = "own"):
    """Tokenise task groups into a MetaBatch (see raymeta.meta.step.MetaBatch).

    teacher_context: ``own`` = the LC teacher sees the query's own context;
    ``all`` = every context of the group (in group order)."""
    from raymeta.meta.step import MetaBatch

    contexts = context_batch(tokenizer, [[t.context for t in g] for g in groups])
    flat = [t for g in groups for t in g]
    queries = scoring_batch(tokenizer, [t.query for t in flat], [t.response for t in flat], True)
    b, m = len(groups), len(groups[0])
    students = prompt_batch(tokenizer, [t.query for t in flat])
    if teacher_context == "own":
        teacher_ctx = [t.context for t in flat]
    else:
        teacher_ctx = [" ".join(x.context for x in g) for g in groups for _ in g]
    teachers = prompt_batch(tokenizer, [prompt_text(c, t.query) for c, t in zip(teacher_ctx, flat)])
    return MetaBatch(contexts, queries.view_lead(b, m), students, teachers)
