"""What a CUDA-graph capture of the meta-step needs, checked on CPU (bench/graph_step.py).

A graph can be captured only from a step that never reads a device value on the host; the
fast-weights step is such a step (every checkpoint mode, k = 2, padded contexts, LoRA), the
reference engine on an SDPA model is not (Hugging Face's SDPA mask reads the padding mask),
and ``host_syncs`` tells them apart. Nor may the step copy from host memory: on the CPU that
is no copy, so those tests run the step on the meta device, the GPU's stand-in. The graphed
step is the bench's eager step without its logging reads, and the replay check restores
parameters and optimizer state exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from raymeta.meta import attention
from raymeta.meta.engines import select_engine
from raymeta.meta.inner import InnerSpec
from raymeta.meta.step import MetaBatch
from tests.unit.fastweights_models import MODELS, batch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import graph_step  # noqa: E402
import meta_step  # noqa: E402


def meta_batch(n=2, seed=1) -> MetaBatch:
    ctx, q = batch(n, seed)
    flat = q.flat()
    return MetaBatch(ctx, q, flat, flat)


def build_step(kind="llama_tied", checkpoint_inner=False, engine="fastweights", steps=1):
    """A tiny model, its InnerSpec and engine. (Not named ``setup``: pytest 8.0 calls a
    module-level ``setup`` with the module before the module's tests, nose-style.)"""
    build, names = MODELS[kind]
    model = build()
    spec = InnerSpec(lr=0.1, names=names(model), steps=steps, checkpoint_inner=checkpoint_inner)
    return model, spec, select_engine(engine, model, spec)


def test_host_syncs_names_the_read_and_its_caller():
    x = torch.ones(3)

    def reads_a_value():
        return (x * 2).sum().item()

    found = graph_step.host_syncs(reads_a_value)
    assert list(found) == ["_local_scalar_dense (cpu)"]
    assert "reads_a_value" in found["_local_scalar_dense (cpu)"]
    assert graph_step.host_syncs(lambda: (x * 2).sum()) == {}


def test_host_syncs_names_copies_from_host_memory_on_a_device():
    """On the meta device (the GPU's stand-in: no tensor in host memory) a copy from the host
    shows, through the dispatcher (``.to``) or from Python data (``torch.tensor``,
    ``new_tensor``, which the dispatcher does not see); a read, which the meta device cannot
    do, stops the call and is named; work on the device and a CPU scalar operand are not."""
    x = torch.ones(3, device="meta")
    cases = {
        "_to_copy (cpu, meta)": lambda: torch.arange(3).to("meta"),
        "tensor (cpu, meta)": lambda: x + torch.tensor([1.0, 2.0, 3.0], device="meta"),
        "new_tensor (cpu, meta)": lambda: x.new_tensor([1.0]),
        "_local_scalar_dense (meta)": lambda: (x.sum().item(), torch.arange(3).to("meta")),
    }
    for call, fn in cases.items():
        assert list(graph_step.host_syncs(fn)) == [call]
    on_device = lambda: x * torch.tensor(2.0) + torch.full((3,), 2.0, device="meta")  # noqa: E731
    assert graph_step.host_syncs(on_device) == {}


@pytest.mark.parametrize("mode", [False, "vjp", "forward"])
@pytest.mark.parametrize("kind", ["llama_tied", "qwen3", "mistral_window", "lora_adapter"])
def test_fastweights_step_never_reads_the_device(kind, mode):
    model, spec, engine = build_step(kind, mode, steps=2)
    assert engine.name == "fastweights"
    found = graph_step.host_syncs(graph_step.meta_backward, model, engine, spec, meta_batch(3), 2)
    assert found == {}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", [False, "vjp", "forward"])
@pytest.mark.parametrize("kind", ["llama_tied", "qwen3", "lora_adapter", "gemma"])
def test_fastweights_step_copies_nothing_from_the_host(kind, mode):
    """The same step on the meta device: no copy from host memory either (on a GPU one stops
    the capture; on the CPU it is no copy, so the test above cannot see it)."""
    model, spec, engine = build_step(kind, mode, steps=2)
    model.to("meta")
    step = (graph_step.meta_backward, model, engine, spec, meta_batch(3).to("meta"), 2)
    assert graph_step.host_syncs(*step) == {}
    assert all(p.grad.is_meta for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("engine", ["fastweights", "reference"])
def test_the_gpu_targets_step_on_the_meta_device(engine):
    """The step ``gpu_targets.sh`` captures (the bench's Llama in bf16, tiny widths; its fused
    AdamW and clipping are torch's own) on the meta device: nothing read or copied from the
    host. The positive control: the reference engine's SDPA mask reads the padding, named."""
    model = meta_step.build_model("tiny", torch.bfloat16, "meta")
    spec = InnerSpec(lr=1e-3, names=meta_step.inner_names(model, "all"))
    chosen = select_engine(engine, model, spec)
    assert chosen.name == engine
    batch = meta_step.random_batch(4, 16, 8, model.config.vocab_size, "meta")
    micro = 4 if engine == "fastweights" else 1
    found = graph_step.host_syncs(graph_step.meta_backward, model, chosen, spec, batch, micro)
    if engine == "fastweights":
        assert found == {}
        assert all(p.grad.is_meta for p in model.parameters())
    else:
        assert list(found) == ["_local_scalar_dense (meta)"]
        assert "masking_utils" in found["_local_scalar_dense (meta)"]


def test_reference_engine_on_sdpa_reads_the_padding_mask():
    """The positive control: Hugging Face's SDPA mask checks the padding on the host."""
    model, spec, engine = build_step(engine="reference")
    found = graph_step.host_syncs(graph_step.meta_backward, model, engine, spec, meta_batch(), 1)
    assert "_local_scalar_dense (cpu)" in found
    assert "masking_utils" in found["_local_scalar_dense (cpu)"]


def test_the_bench_optimizer_step_never_reads_the_device():
    """The bench's fused AdamW keeps its step counter with the parameters and reads nothing on
    the host; the positive control: torch's default (single-tensor) AdamW reads its counter."""
    default = lambda model: torch.optim.AdamW(model.parameters())  # noqa: E731
    for optimizer, reads in ((meta_step.outer_optimizer, False), (default, True)):
        model, spec, engine = build_step()
        opt = optimizer(model)
        graph_step.meta_backward(model, engine, spec, meta_batch(), 2)
        found = graph_step.host_syncs(opt.step)
        assert ("_local_scalar_dense (cpu)" in found) is reads, found
        assert any(p.grad is not None for p in model.parameters())


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_sync_free_step_is_the_bench_step():
    model, spec, engine = build_step()
    opt = meta_step.outer_optimizer(model)
    start = snapshot(model)
    meta_step.outer_step(model, opt, engine, spec, meta_batch(), 1)
    meta_step.outer_step(model, opt, engine, spec, meta_batch(seed=2), 2)
    eager = snapshot(model)

    model2, spec2, engine2 = build_step()
    opt2 = meta_step.outer_optimizer(model2)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model2), start))
    for seed, micro in ((1, 1), (2, 2)):
        graph_step.sync_free_step(model2, opt2, engine2, spec2, meta_batch(seed=seed), micro)
        opt2.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model2), eager))
    assert any(not torch.equal(a, b) for a, b in zip(eager, start))


def test_check_replay_restores_parameters_and_optimizer_state():
    model, spec, engine = build_step()
    opt = meta_step.outer_optimizer(model)
    static = meta_batch()

    def step():
        graph_step.sync_free_step(model, opt, engine, spec, static, 2)

    step()  # AdamW's state exists: the second step depends on it
    opt.zero_grad(set_to_none=True)
    start = snapshot(model)
    check, noise, out = graph_step.check_replay(model, opt, step, lambda: step() or "replayed")
    assert (check, noise, out) == (0.0, 0.0, "replayed")  # a CPU step repeats exactly
    assert any(not torch.equal(a, b) for a, b in zip(snapshot(model), start))

    graph_step.restore(list(model.parameters()), start)
    check, noise, _ = graph_step.check_replay(model, opt, step, lambda: None)
    assert (check, noise) == (1.0, 0.0)  # a replay that does not step is caught


def test_copy_batch_fills_the_captured_tensors_in_place():
    torch.manual_seed(0)
    static, fresh = (meta_step.random_batch(2, 8, 6, 48, "cpu", n=2) for _ in range(2))
    ids = static.contexts.input_ids
    graph_step.copy_batch(static, fresh)
    assert static.contexts.input_ids is ids
    assert torch.equal(ids, fresh.contexts.input_ids)
    assert torch.equal(static.queries.labels, fresh.queries.labels)


def test_only_fast_weights_rows_are_graphed_and_cpu_is_refused(capsys):
    assert meta_step.graph_modes(None, "fastweights") == [False]
    assert meta_step.graph_modes("only", "fastweights") == [True]
    assert meta_step.graph_modes("also", "fastweights") == [False, True]
    assert meta_step.graph_modes("also", "reference") == [False]
    with pytest.raises(SystemExit):
        meta_step.parse(["--cuda-graph"])
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        meta_step.parse(["--device", "cuda"])
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_fused_attention_mask_is_hugging_faces_eager_mask(dtype):
    """``additive_mask`` (registered for the fused attention) gives HF's eager mask bit for bit
    (causal, a sliding window, offsets, padding, and no mask where none is needed), made on the
    mask's device: on the meta device no tensor is made from host data, where transformers
    5.17's ``eager_mask`` makes its 0 so (a copy that stops a CUDA graph's capture)."""
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        eager_mask,
        sliding_window_causal_mask_function,
    )

    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :2] = False  # row 1 left-padded
    cases = [
        dict(mask_function=causal_mask_function, attention_mask=None),
        dict(mask_function=causal_mask_function, attention_mask=padding),
        dict(mask_function=sliding_window_causal_mask_function(3), attention_mask=padding),
        dict(mask_function=causal_mask_function, attention_mask=padding[:, :5], q_offset=2),
        dict(
            mask_function=bidirectional_mask_function,
            attention_mask=None,
            allow_is_bidirectional_skip=True,
        ),
    ]
    for case in cases:
        length = 7 if case["attention_mask"] is None else case["attention_mask"].shape[1]
        q = length - case.get("q_offset", 0)
        kw = dict(batch_size=2, q_length=q, kv_length=length, dtype=dtype, **case)
        ours = attention.additive_mask(allow_is_causal_skip=True, device="cpu", **kw)
        theirs = eager_mask(allow_is_causal_skip=True, device="cpu", **kw)
        if theirs is None:
            assert ours is None
            continue
        assert ours.dtype == dtype and ours.shape == (2, 1, q, length)
        assert torch.equal(ours, theirs)
        assert (ours == 0).any() and (ours == torch.finfo(dtype).min).any()
        on_meta = case["attention_mask"]
        meta = dict(kw, attention_mask=None if on_meta is None else on_meta.to("meta"))
        assert graph_step.host_syncs(attention.additive_mask, device="meta", **meta) == {}
