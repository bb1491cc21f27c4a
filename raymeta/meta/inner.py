"""What every engine shares: the inner step's specification and its loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from raymeta.data.batches import Tokens
from raymeta.meta.losses import group_mean_nll


@dataclass(frozen=True)
class InnerSpec:
    """The inner loop: ``steps`` plain SGD steps of size ``lr`` on the parameters ``names``."""

    lr: float
    names: tuple[str, ...]
    steps: int = 1
    second_order: bool = True
    checkpoint_inner: bool | str = False
    """Activation checkpointing of the inner pass (fast-weights engine only): False, True or
    "vjp" (the inner backward per decoder block), "forward" (the inner forward's blocks)."""
    compile_ops: bool = False
    """The fast-weights engine's fused ops through ``torch.compile`` (``fused.COMPILE``, set by
    each ``adapt``: it holds through the outer backward that follows)."""


def check_tasks(queries: Tokens, tasks: int) -> None:
    """ValueError unless queries ``[B, m, T]`` hold as many tasks B as the adapted state."""
    if queries.input_ids.shape[0] != tasks:
        raise ValueError(
            f"queries hold {queries.input_ids.shape[0]} tasks, the adapted state {tasks}"
        )


def context_loss(logits: torch.Tensor, contexts: Tokens) -> torch.Tensor:
    """Per-task inner loss ``[B]``: mean next-token NLL over all tokens of the task's contexts.

    logits ``[B, n, Tc, V]``; contexts ``[B, n, Tc]`` with labels on real tokens."""
    return group_mean_nll(logits, contexts.labels)


def double_backward_attention():
    """Route SDPA to its math kernel, the only one with double backward (no-op for eager)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def call(model, batch: Tokens, params: dict | None = None) -> torch.Tensor:
    """Logits ``[N, T, V]`` of ``model`` on a flat batch, optionally with substituted params."""
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    if params is None:
        return model(**kwargs).logits
    return torch.func.functional_call(model, params, args=(), kwargs=kwargs).logits
