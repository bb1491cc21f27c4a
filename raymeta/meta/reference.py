"""The reference engine: materialise θ' = θ - η ∇L_inner(θ) per task (textbook MAML).

Exact by construction and general (any module kind); memory and time grow with
model size × meta-batch. The fast-weights engine is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymeta.data.batches import Tokens
from raymeta.meta.inner import InnerSpec, call, check_tasks, context_loss


@dataclass
class ReferenceState:
    """Adapted parameters per task (``params[b]``: name → tensor) and the first inner loss ``[B]``."""

    params: list[dict[str, torch.Tensor]]
    inner_loss: torch.Tensor


def inner_leaves(model, names) -> dict[str, torch.Tensor]:
    """The inner parameters as tensors that require grad (frozen ones become fresh leaves)."""
    named = dict(model.named_parameters())
    return {
        n: named[n] if named[n].requires_grad else named[n].detach().requires_grad_() for n in names
    }


def adapt(model, contexts: Tokens, spec: InnerSpec) -> ReferenceState:
    """Run ``spec.steps`` SGD steps per task on its contexts ``[B, n, Tc]``."""
    base = inner_leaves(model, spec.names)
    states, first = [], []
    for b in range(contexts.input_ids.shape[0]):
        ctx = Tokens(contexts.input_ids[b], contexts.attention_mask[b], contexts.labels[b])
        params = dict(base)
        for k in range(spec.steps):
            logits = call(model, ctx, params)
            loss = context_loss(logits[None], ctx.view_lead(1, *ctx.input_ids.shape[:1]))[0]
            if k == 0:
                first.append(loss.detach())
            tensors = [params[n] for n in spec.names]
            grads = torch.autograd.grad(
                loss, tensors, create_graph=spec.second_order, allow_unused=True
            )
            params = {
                n: p if g is None else p - spec.lr * g
                for n, p, g in zip(spec.names, tensors, grads)
            }
        states.append(params)
    return ReferenceState(states, torch.stack(first))


def logits(model, state: ReferenceState, queries: Tokens) -> torch.Tensor:
    """Adapted logits ``[B, m, T, V]`` of queries ``[B, m, T]`` (row b uses task b's θ')."""
    check_tasks(queries, len(state.params))
    out = []
    for b, params in enumerate(state.params):
        q = Tokens(queries.input_ids[b], queries.attention_mask[b])
        out.append(call(model, q, params))
    return torch.stack(out)
