"""The meta-gradient of the reference engine against finite differences, in float64."""

import pytest
import torch

from raymeta.meta.engines import select_engine
from raymeta.meta.inner import InnerSpec, double_backward_attention
from raymeta.meta.objectives import lg_loss
from tests.helpers import random_contexts, random_queries, tiny_llama


def outer(model, engine, spec, ctx, q):
    with double_backward_attention():
        return adapted_lg(model, engine, spec, ctx, q)


def adapted_lg(model, engine, spec, ctx, q):
    state = engine.adapt(model, ctx, spec)
    return lg_loss(engine.logits(model, state, q), q).mean()


def set_entry(p, i, value):
    with torch.no_grad():
        p.view(-1)[i] = value


def loss_at(model, engine, spec, ctx, q, p, i, value):
    set_entry(p, i, value)
    return outer(model, engine, spec, ctx, q).item()


def probe_indices(p, k, gen):
    return torch.randint(0, p.numel(), (k,), generator=gen).tolist()


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_gradient_matches_finite_differences(steps):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ctx, q = random_contexts(3, 2, 48, gen), random_queries(3, 2, 48, gen)
    names = tuple(n for n, _ in model.named_parameters())
    spec = InnerSpec(lr=0.5, names=names, steps=steps)
    engine = select_engine("reference", model, spec)
    loss = outer(model, engine, spec, ctx, q)
    loss.backward()
    params = dict(model.named_parameters())
    checked = 0
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        p = params[name]
        for i in probe_indices(p, 3, gen):
            eps = 1e-5
            old = p.view(-1)[i].item()
            up = loss_at(model, engine, spec, ctx, q, p, i, old + eps)
            down = loss_at(model, engine, spec, ctx, q, p, i, old - eps)
            set_entry(p, i, old)
            fd = (up - down) / (2 * eps)
            assert p.grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, i)
            checked += 1
    assert checked == 15
    # the adaptation matters: the adapted loss differs from the unadapted one
    with torch.no_grad():
        unadapted = lg_loss(
            model(
                input_ids=q.flat().input_ids,
                attention_mask=q.flat().attention_mask,
                position_ids=q.flat().position_ids,
            ).logits.view(3, 2, *q.input_ids.shape[2:], -1),
            q,
        ).mean()
    assert abs(unadapted.item() - loss.item()) > 1e-3
