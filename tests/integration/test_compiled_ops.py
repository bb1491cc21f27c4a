"""fused.COMPILE: the fused ops' bodies through torch.compile (inductor's C++ backend on CPU)
give the same values, first and second derivatives, and the same meta-gradients."""

import pytest
import torch

from raymeta.meta import fused
from raymeta.meta.inner import InnerSpec
from tests.unit import fastweights_models as fw
from tests.unit import test_fused_ops


@pytest.mark.integration
def test_compiled_bodies_are_exact(monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(fused, "COMPILE", True)
    for op in test_fused_ops.OPS:  # value, VJP and its derivative against torch's own ops, float64
        test_fused_ops.test_fused_op_matches_torch(op)
    for build in (fw.llama_tied, fw.qwen3):
        model = build()
        ctx, q = fw.batch(2)
        for mode in (False, "vjp"):
            spec = InnerSpec(lr=0.5, names=fw.all_names(model), steps=2, checkpoint_inner=mode)
            fw.compare(model, spec, ctx, q)  # meta-gradients within 1e-8 of the reference
    # ten bodies (and variants of them: None gradients, dtypes) ran compiled, in one graph each
    assert counters["stats"]["unique_graphs"] >= 10, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
