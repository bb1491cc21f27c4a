"""Rotary position embedding as one linear Function, for the fast-weights passes.

Hugging Face's ``apply_rotary_pos_emb`` computes ``y = x c + rot(x) s`` per head, with
``rot(x) = cat(-x₂, x₁)`` (x₁, x₂ the two halves of the last dim) and c, s ``[B, T, D]`` the
cosines and sines. Left to autograd, the engine's create_graph inner backward records that
decomposition (two slices, a negation, a concatenation, three elementwise ops, per q and k)
and the outer backward differentiates it again. The map is linear in x, so its derivative is
its transpose ``xᵀ ↦ g c + rotᵀ(g s)`` (``rotᵀ(y) = cat(y₂, -y₁)``), whose derivative is the
map itself: ``Rotate`` computes either direction and its backward is the other one, so every
order of differentiation is one node and three elementwise passes.

``patched_rotary(module_names)`` swaps the rotary function of the given transformers modeling
modules for ``apply_rotary`` while the engine's passes run (cos and sin must not require
grad, as Hugging Face's rotary embeddings never do; otherwise the original runs).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from raymeta.meta.fused import compilable

FUNCTION = "apply_rotary_pos_emb"
"""The name the modeling modules of ``attention.ATTENTION_CODES``' copies call the rotation
by."""


@compilable
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool):
    """``x c + rot(x) s`` (or, transposed, ``x c + rotᵀ(x s)``) for x ``[..., D]``.

    rot(x) s = cat(-x₂ s₁, x₁ s₂); rotᵀ(x s) = cat(x₂ s₂, -x₁ s₁)."""
    h = x.shape[-1] // 2
    s1, s2 = sin[..., :h], sin[..., h:]
    sign = 1 if transpose else -1
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], s2 if transpose else s1, value=sign)
    out[..., h:].addcmul_(x[..., :h], s1 if transpose else s2, value=-sign)
    return out


class Rotate(torch.autograd.Function):
    """``_rotate(x, cos, sin, transpose)`` with the other direction as its backward."""

    @staticmethod
    def forward(ctx, x, cos, sin, transpose: bool):
        ctx.save_for_backward(cos, sin)
        ctx.transpose = transpose
        return _rotate(x, cos, sin, transpose)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return Rotate.apply(g, cos, sin, not ctx.transpose), None, None, None


def apply_rotary(q, k, cos, sin, unsqueeze_dim: int = 1, original=None):
    """``(q_embed, k_embed)`` as Hugging Face's ``apply_rotary_pos_emb``, through ``Rotate``.

    q ``[B, H, T, D]``, k ``[B, H_kv, T, D]``, cos / sin ``[B, T, D]`` (unsqueezed at
    ``unsqueeze_dim``). Differentiable cos / sin go to ``original``."""
    if cos.requires_grad or sin.requires_grad or q.shape[-1] % 2:
        return original(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return Rotate.apply(q, cos, sin, False), Rotate.apply(k, cos, sin, False)


@contextlib.contextmanager
def patched_rotary(module_names):
    """While active, the modules named ``module_names`` call ``apply_rotary`` for ``FUNCTION``.

    Nests (each exit restores what its entry found)."""
    saved = []
    for name in sorted(set(module_names)):
        mod = sys.modules.get(name)
        original = getattr(mod, FUNCTION, None)
        if original is None:
            continue
        saved.append((mod, original))
        setattr(mod, FUNCTION, functools.partial(apply_rotary, original=original))
    try:
        yield
    finally:
        for mod, original in reversed(saved):
            setattr(mod, FUNCTION, original)
