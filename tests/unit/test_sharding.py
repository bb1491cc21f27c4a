"""Task sharding for data parallelism: disjoint, balanced, every task once per epoch, reshuffled."""

from __future__ import annotations

import pytest

from raymeta.data.tasks import Position, advance, epoch_order, shard_batch, steps_per_epoch


def epoch_shards(num_tasks: int, batch: int, world: int, seed: int, epoch: int):
    """{rank: [indices of every step of ``epoch``]} and the per-step shards."""
    per_rank: dict[int, list[int]] = {r: [] for r in range(world)}
    steps = []
    pos = Position(epoch, 0)
    for _ in range(steps_per_epoch(num_tasks, batch)):
        shards = [shard_batch(num_tasks, batch, r, world, seed, pos) for r in range(world)]
        steps.append(shards)
        for r, s in enumerate(shards):
            per_rank[r].extend(s)
        pos = advance(pos, num_tasks, batch)
    assert pos == Position(epoch + 1, 0)
    return per_rank, steps


@pytest.mark.parametrize(
    "num_tasks,batch,world", [(64, 8, 2), (100, 12, 4), (37, 6, 3), (16, 4, 1)]
)
def test_disjoint_balanced_each_task_once(num_tasks, batch, world):
    per_rank, steps = epoch_shards(num_tasks, batch, world, seed=3, epoch=0)
    for shards in steps:
        assert all(len(s) == batch // world for s in shards)  # balanced
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat)  # disjoint within a step
    used = [i for r in per_rank.values() for i in r]
    assert len(used) == len(set(used))  # no task twice in an epoch
    full = steps_per_epoch(num_tasks, batch) * batch
    assert len(used) == full
    if num_tasks % batch == 0:
        assert sorted(used) == list(range(num_tasks))  # every task once


def test_world_split_matches_single_worker_batch():
    """The union of the workers' shards of a step is the single worker's meta-batch."""
    pos = Position(1, 3)
    single = shard_batch(64, 8, 0, 1, 5, pos)
    split = shard_batch(64, 8, 0, 2, 5, pos) + shard_batch(64, 8, 1, 2, 5, pos)
    assert split == single


def test_deterministic_and_reshuffled_per_epoch():
    assert epoch_order(50, 7, 0) == epoch_order(50, 7, 0)
    assert epoch_order(50, 7, 0) != epoch_order(50, 7, 1)
    assert epoch_order(50, 7, 0) != epoch_order(50, 8, 0)
    a, _ = epoch_shards(48, 8, 2, seed=1, epoch=0)
    b, _ = epoch_shards(48, 8, 2, seed=1, epoch=1)
    assert a[0] != b[0]
    assert sorted(a[0] + a[1]) == sorted(b[0] + b[1]) == list(range(48))


def test_resume_position_continues_the_same_sequence():
    """Stopping at any position and resuming from it yields the same remaining shards."""
    seq, pos = [], Position()
    for _ in range(10):
        seq.append(shard_batch(20, 4, 1, 2, 0, pos))
        pos = advance(pos, 20, 4)
    pos = Position()
    for _ in range(6):
        pos = advance(pos, 20, 4)
    resumed = []
    for _ in range(4):
        resumed.append(shard_batch(20, 4, 1, 2, 0, pos))
        pos = advance(pos, 20, 4)
    assert resumed == seq[6:]


def test_indivisible_batch_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(20, 5, 0, 2, 0, Position())


def test_a_step_count_capped_by_epochs_is_said():
    from raymeta.config import load_config
    from raymeta.outer import steps_note, total_steps

    meta = load_config(None, ["meta.steps=400", "meta.epochs=3", "meta.meta_batch_size=4"]).meta
    assert total_steps(meta, 100) == 75
    assert steps_note(meta, 100, total_steps(meta, 100)) == (
        "[meta-train] meta.steps=400 capped at 75: meta.epochs=3 passes over 100 tasks, "
        "25 meta-batches of 4 each"
    )
    assert (
        steps_note(meta, 1000, total_steps(meta, 1000)) is None
    )  # 750 steps available: not capped
    uncapped = load_config(None, ["meta.steps=0", "meta.epochs=3", "meta.meta_batch_size=4"])
    assert (
        steps_note(uncapped.meta, 100, total_steps(uncapped.meta, 100)) is None
    )  # 0 = all epochs, nothing to cap


def test_progress_header_names_engine_order_inner_steps_and_checkpointing():
    from raymeta.meta.engines import select_engine
    from raymeta.meta.inner import InnerSpec
    from raymeta.outer import train_label
    from tests.helpers import tiny_llama

    model = tiny_llama()
    names = tuple(n for n, _ in model.named_parameters())
    for ckpt, label in (
        (False, "fastweights, second order"),
        ("vjp", "fastweights, second order, checkpoint_inner=vjp"),
    ):
        spec = InnerSpec(lr=0.1, names=names, checkpoint_inner=ckpt)
        engine = select_engine("fastweights", model, spec)
        assert train_label("LG", engine, spec) == f"meta-train LG ({label})"
    assert train_label("LC", engine, spec, "1 worker", "ZeRO-0") == (
        "meta-train LC (fastweights, second order, checkpoint_inner=vjp, 1 worker, ZeRO-0)"
    )
    first = InnerSpec(lr=0.1, names=names, steps=2, second_order=False)
    assert (
        train_label("LG", engine, first)
        == "meta-train LG (fastweights, first order, 2 inner steps)"
    )
    # the reference engine (auto's fallback) ignores checkpoint_inner: the header does not claim it
    reference = select_engine("reference", model, spec)
    assert train_label("LG", reference, spec) == "meta-train LG (reference, second order)"
    # auto on blocks vjp cannot recompute (Bloom's return tuples) runs "forward": the header says so
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=48, hidden_size=16, n_layer=2, n_head=2))
    vjp = InnerSpec(
        lr=0.1, names=tuple(n for n, _ in bloom.named_parameters()), checkpoint_inner="vjp"
    )
    assert train_label("LG", select_engine("auto", bloom, vjp), vjp) == (
        "meta-train LG (fastweights, second order, checkpoint_inner=forward)"
    )
