"""fused.COMPILE: the fused ops' bodies through torch.compile (inductor's C++ backend on CPU)
give the same values, first and second derivatives, and the same meta-gradients."""

import pytest
import torch

from raymeta.meta import fused
from raymeta.meta.inner import InnerSpec
from raymeta.meta.step import MetaBatch
from tests.unit import fastweights_models as fw
from tests.unit import test_fused_ops


def cache_entries(fn) -> list:
    """torch.compile's compiled variants of ``fn`` (its code's cache entries)."""
    return torch._dynamo.eval_frame._debug_get_cache_entry_list(fn)


@pytest.mark.integration
def test_compiled_bodies_are_exact(monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(fused, "COMPILE", True)
    for op in test_fused_ops.OPS:  # value, VJP and its derivative against torch's own ops, float64
        test_fused_ops.test_fused_op_matches_torch(op)
    fused.COMPILE = False  # from here on, set by each adapt from its spec
    for build in (fw.llama_tied, fw.qwen3):
        model = build()
        ctx, q = fw.batch(2)
        for mode in (False, "vjp"):
            spec = InnerSpec(
                lr=0.5, names=fw.all_names(model), steps=2, checkpoint_inner=mode, compile_ops=True
            )
            fw.compare(model, spec, ctx, q)  # meta-gradients within 1e-8 of the reference
    # every body (and variants of it: None gradients, dtypes) ran compiled, in one graph each
    uncompiled = [b.__name__ for b in fused.BODIES if not cache_entries(b.__wrapped__)]
    assert len(fused.BODIES) >= 12 and not uncompiled, uncompiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.integration
def test_the_probe_runs_the_bodies_uncompiled(monkeypatch):
    """The eligibility probe watches every call through a torch-function mode, which
    torch.compile would trace into each body with a guard on its input's identity: one more
    compile per call, dead with its input. The probe runs the bodies eagerly; the engine's
    passes after it compile them."""
    from torch._dynamo.utils import counters

    from raymeta.meta import fastweights

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(fused, "COMPILE", True)
    model = fw.llama_tied()
    spec = InnerSpec(lr=0.5, names=fw.all_names(model), compile_ops=True)
    assert fastweights.ineligibility(model, spec) is None
    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])
    ctx, q = fw.batch(1)
    fw.run(fastweights, model, spec, ctx, q)
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.integration
def test_meta_compile_ops_runs_the_job_s_step_compiled(monkeypatch):
    """``meta.compile_ops=true`` reaches the inner spec; the step the job runs (engine chosen
    by ``meta.engine=auto``, ``meta_loss``, backward) compiles the bodies and gives the eager
    step's loss and gradients; its progress header says so; off, nothing compiles."""
    from raymeta.config import load_config
    from raymeta.meta.engines import select_engine
    from raymeta.meta.step import meta_loss
    from raymeta.outer import inner_spec, train_label
    from tests.helpers import tiny_llama

    monkeypatch.setattr(fused, "COMPILE", False)
    model = tiny_llama(vocab=fw.VOCAB, tie=True)
    ctx, q = fw.batch(2)
    results = {}
    for on in (False, True):
        torch._dynamo.reset()
        meta = load_config(None, [f"meta.compile_ops={str(on).lower()}", "meta.inner_lr=0.5"]).meta
        spec = inner_spec(model, meta)
        assert spec.compile_ops is on
        engine = select_engine(meta.engine, model, spec)
        assert ("compiled ops" in train_label("LG", engine, spec)) is on
        model.zero_grad(set_to_none=True)
        loss, _ = meta_loss(model, engine, spec, MetaBatch(ctx, q, q.flat(), q.flat()), "LG")
        loss.backward()
        compiled = [b.__name__ for b in fused.BODIES if cache_entries(b.__wrapped__)]
        assert bool(compiled) is on and fused.COMPILE is on, compiled
        results[on] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    assert fw.max_rel_error(results[False][1], results[True][1]) < fw.TOL
    torch._dynamo.reset()
