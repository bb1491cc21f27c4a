"""Mixture-of-experts layers as the fast-weights engine runs them: pure tensor code.

transformers' experts classes (``@use_experts_implementation``: Mixtral's, Qwen2/3-MoE's,
OLMoE's, ...) hold every expert's weights as one tensor, ``[E, out, in]`` (``[E, in, out]``
when ``is_transposed``), and take the tokens flattened to ``[N, d]`` with the k experts each
token is routed to (``top_k_index`` ``[N, k]``) and their weights (``top_k_weights``).
``run_experts`` computes the same as the class's forward (any of its implementations: eager,
``batched_mm``, ``grouped_mm``), with each expert projection's output passed through a hook,
where the engine adds its fast-weight update and keeps what the inner step needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
"""What ``use_experts_implementation`` sets on an experts module: its layout. Newer
transformers (5.23) also set ``has_post_expert_norm``; 5.17's has no norm after the experts
and no such flag."""


def projections(module: nn.Module) -> tuple[str, str] | None:
    """The names of an experts module's two stacked projections, (``gate_up_proj`` or
    ``up_proj``, ``down_proj``), or None where it is not a transformers experts class this
    code computes (no ``use_experts_implementation`` layout, a norm after each expert, or
    weights that are not ``[E, ., .]`` parameters)."""
    if not all(hasattr(module, f) for f in FLAGS) or getattr(module, "has_post_expert_norm", False):
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    for name in (first, "down_proj"):
        w = module._parameters.get(name)
        if w is None or w.dim() != 3:
            return None
    if module.has_gate and not callable(getattr(module, "_apply_gate", None)):
        return None
    if not module.has_gate and not callable(getattr(module, "act_fn", None)):
        return None
    return first, "down_proj"


def parameter_names(module: nn.Module) -> tuple[str, ...]:
    """The parameters ``run_experts`` reads: the projections and, with ``has_bias``, their
    ``*_bias``."""
    names = projections(module) or ()
    return names + tuple(f"{n}_bias" for n in names) if module.has_bias else names


def expert_linear(x: torch.Tensor, weight: torch.Tensor, e: torch.Tensor, bias, transposed):
    """Each pair's input through its expert's projection: x ``[..., P, in]``, e ``[..., P]``
    (expert ids), weight ``[E, out, in]`` (``[E, in, out]`` transposed), bias ``[E, out]`` or
    None → ``[..., P, out]``. Pairs are sorted by expert, one matmul per expert hit."""
    experts = weight.shape[0]
    flat, ids = x.reshape(-1, x.shape[-1]), e.reshape(-1)
    if ids.numel() and int(ids.max()) >= experts:
        raise ValueError(f"expert id {int(ids.max())} out of range for {experts} experts")
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts).tolist()
    parts = flat[order].split(counts)
    outs = [
        (p @ weight[i]) if transposed else F.linear(p, weight[i])
        for i, p in enumerate(parts)
        if counts[i]
    ]
    y = torch.cat(outs)[torch.argsort(order)]
    if bias is not None:
        y = y + bias[ids]
    return y.view(*x.shape[:-1], y.shape[-1])


Project = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(projection name, input ``[B, P, in]``, expert ids ``[B, P]``, output ``[B, P, out]``) →
the output the rest of the layer sees."""


def run_experts(module: nn.Module, x: torch.Tensor, top_k_index, top_k_weights, project: Project):
    """The experts layer's output ``[B·R, d]`` for tokens x ``[B, R, d]`` (the layer's input
    ``[N, d]`` grouped by task, N = B·R row by row), ``top_k_index`` / ``top_k_weights``
    ``[N, k]``; each projection's output goes through ``project``."""
    first, second = projections(module)
    b, r, d = x.shape
    k = top_k_index.shape[-1]
    e = top_k_index.reshape(b, r * k)  # pair r·k + j: token r's j-th expert
    pairs = x.repeat_interleave(k, dim=1)  # [B, P, d]

    def linear(name, inp):
        bias = getattr(module, f"{name}_bias") if module.has_bias else None
        out = expert_linear(inp, getattr(module, name), e, bias, module.is_transposed)
        return project(name, inp, e, out)

    h = linear(first, pairs)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = linear(second, h) * top_k_weights.reshape(b, r * k, 1)
    return y.view(b * r, k, -1).sum(1).to(x.dtype)
