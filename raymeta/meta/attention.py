"""Softmax attention with hand-written first and second derivatives, for the fast-weights passes.

``o = softmax(s · q kᵀ + mask) v`` per head. As for ``fused.GatedUnit``, the Function's backward
is a second Function (``AttentionGrad``) whose own backward is written out, so the second-order
graph the engine builds holds one node per attention call (its inputs, the probabilities and
the score gradient) instead of the decomposition of a matmul-softmax-matmul and its backward.
The matmuls run in the inputs' dtype (bf16 stays bf16, unlike SDPA's math kernel, which
upcasts to float32); the softmax and the [T, S] elementwise work run in float32 (or float64).

With P = softmax(S), S = s q kᵀ + mask, and dO the output gradient:

* first derivative: dP = dO vᵀ, δ = rowsum(dP ⊙ P), dS = P ⊙ (dP − δ),
  dq = s dS k, dk = s dSᵀ q, dv = Pᵀ dO;
* its derivative, for the gradients a_q, a_k, a_v of (dq, dk, dv): with
  G_dS = s (a_q kᵀ + q a_kᵀ), r = rowsum(G_dS ⊙ P),
  G_P = G_dS ⊙ (dP − δ) − r dP + dO a_vᵀ, G_dP = P ⊙ (G_dS − r),
  G_S = P ⊙ (G_P − rowsum(G_P ⊙ P)):
  ∂/∂q = s (dS a_k + G_S k), ∂/∂k = s (dSᵀ a_q + G_Sᵀ q), ∂/∂v = G_dPᵀ dO,
  ∂/∂dO = P a_v + G_dP v.

``attention_forward`` has the signature of a Hugging Face attention interface; it is
registered as ``raymeta_fused`` (with the additive float mask of HF's eager attention,
``additive_mask``) and selected by ``fastweights.ops.attention_for`` while the engine runs.
Calls it cannot take exactly (dropout, logit soft-capping, attention sinks) go to HF's eager
attention; a sliding window is part of the mask Hugging Face builds for this implementation,
as for its eager one.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch.autograd.function import once_differentiable

from raymeta.meta.fused import compilable, product

NAME = "raymeta_fused"
"""The attention implementation name registered with transformers."""


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def probabilities(q, k, mask, scale: float) -> torch.Tensor:
    """P = softmax(s q kᵀ + mask) ``[B, H, T, S]`` in the accumulation dtype.

    q ``[B, H, T, D]``, k ``[B, H, S, D]``, mask additive ``[B, 1, T, S]`` or None. The scores
    are scaled and masked in one pass (``mask + s · scores``, in the accumulation dtype)."""
    acc = _acc(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if mask is None:
        scores = scores.to(acc).mul_(scale)
    else:
        scores = torch.add(mask.to(acc), scores, alpha=scale)
    return torch.softmax(scores, -1)


@compilable
def attention_value(q, k, v, mask, scale: float):
    """``(P v, P)``."""
    p = probabilities(q, k, mask, scale)
    return torch.matmul(p.to(v.dtype), v), p


@compilable
def attention_grads(q, k, v, p, do, scale: float):
    """``(dq, dk, dv, δ)`` for the output gradient dO (δ = rowsum(dP ⊙ P) ``[B, H, T, 1]``)."""
    dt = q.dtype
    dp = torch.matmul(do, v.transpose(-1, -2))  # in dt; promoted to P's dtype as read
    delta = (dp * p).sum(-1, keepdim=True)
    ds = product(p, torch.sub(dp, delta), dt)  # P ⊙ (dP − δ)
    dq = torch.matmul(ds, k).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), q).mul_(scale)
    dv = torch.matmul(p.to(dt).transpose(-1, -2), do)
    return dq, dk, dv, delta


@compilable
def attention_second(q, k, v, p, do, delta, aq, ak, av, scale: float, needs):
    """``AttentionGrad``'s backward (formulas in the module docstring): the gradients of
    (q, k, v, dO) for those a_q, a_k, a_v of (dq, dk, dv) (or None); ``needs``: which
    are wanted, as ``ctx.needs_input_grad`` of (q, k, v, dO).

    G_P is taken without its term −r δ: a constant per row, which G_S = P ⊙ (G_P − ⟨G_P, P⟩)
    cancels (the rows of P sum to 1)."""
    dt = q.dtype
    centred = None  # dP − δ, needed with a_q or a_k
    if aq is not None or ak is not None:
        centred = torch.sub(torch.matmul(do, v.transpose(-1, -2)), delta)
    u = None  # a_q kᵀ + q a_kᵀ, one matmul when both are there
    if aq is not None and ak is not None:
        u = torch.matmul(torch.cat((aq, q), -1), torch.cat((k, ak), -1).transpose(-1, -2))
    elif aq is not None:
        u = torch.matmul(aq, k.transpose(-1, -2))
    elif ak is not None:
        u = torch.matmul(q, ak.transpose(-1, -2))
    g_p = g_dp = None
    if u is not None:
        w = u.to(p.dtype).mul_(scale)  # G_dS
        w.sub_((w * p).sum(-1, keepdim=True))  # G_dS − r
        g_dp = product(p, w, dt)
        g_p = w.mul_(centred)  # G_dS ⊙ (dP − δ) − r dP, less −r δ
    if av is not None:
        t = torch.matmul(do, av.transpose(-1, -2))
        g_p = t.to(p.dtype) if g_p is None else g_p.add_(t)
    g_s = None
    if g_p is not None:
        g_s = product(p, g_p.sub_((g_p * p).sum(-1, keepdim=True)), dt)
    need_q, need_k, need_v, need_do = needs
    ds = None if centred is None else product(p, centred, dt)
    gq = gk = gv = gdo = None
    if need_q:
        gq = _mm_sum(ds, ak, g_s, k, scale)
    if need_k:
        gk = _mm_sum(_t(ds), aq, _t(g_s), q, scale)
    if need_v and g_dp is not None:
        gv = torch.matmul(g_dp.transpose(-1, -2), do)
    if need_do:
        gdo = _mm_sum(p.to(dt), av, g_dp, v, 1.0)
    return gq, gk, gv, gdo


class Attention(torch.autograd.Function):
    """``o = P v`` ``[B, H, T, D]`` (see ``probabilities``); saves q, k, v and P."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        o, p = attention_value(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        dq, dk, dv = AttentionGrad.apply(q, k, v, p, do, ctx.scale)
        return dq, dk, dv, None, None


class AttentionGrad(torch.autograd.Function):
    """``(dq, dk, dv)`` of ``Attention`` for the output gradient dO ``[B, H, T, D]``.

    P is an input taken as a value (its dependence on q and k is in the backward's formulas,
    see the module docstring). Saves q, k, v, P, dO and δ ``[B, H, T, 1]``; the backward
    recomputes dP = dO vᵀ (one small matmul) rather than keeping a second [B, H, T, S]."""

    @staticmethod
    def forward(ctx, q, k, v, p, do, scale):
        ctx.set_materialize_grads(False)
        dq, dk, dv, delta = attention_grads(q, k, v, p, do, scale)
        ctx.save_for_backward(q, k, v, p, do, delta)
        ctx.scale = scale
        return dq, dk, dv

    @staticmethod
    @once_differentiable
    def backward(ctx, aq, ak, av):
        need_q, need_k, need_v, _, need_do, _ = ctx.needs_input_grad
        needs = (need_q, need_k, need_v, need_do)
        gq, gk, gv, gdo = attention_second(*ctx.saved_tensors, aq, ak, av, ctx.scale, needs)
        return gq, gk, gv, None, gdo, None


def _t(x):
    return None if x is None else x.transpose(-1, -2)


def _mm_sum(a1, b1, a2, b2, scale: float):
    """``scale (a₁ b₁ + a₂ b₂)``; a term with a None factor is left out (None if both are)."""
    out = None
    for a, b in ((a1, b1), (a2, b2)):
        if a is None or b is None:
            continue
        t = torch.matmul(a, b)
        out = t if out is None else out.add_(t)
    return out if out is None or scale == 1.0 else out.mul_(scale)


ATTENTION_CODES = (
    ("llama.modeling_llama", "LlamaAttention"),
    ("mistral.modeling_mistral", "MistralAttention"),
    ("qwen2.modeling_qwen2", "Qwen2Attention"),
    ("qwen3.modeling_qwen3", "Qwen3Attention"),
)
"""Attention modules that call their interface as ``f(self, q, k, v, mask, scaling=..., ...)``
with q ``[B, H, T, D]`` and k, v ``[B, H_kv, S, D]`` (``num_key_value_groups`` = H / H_kv)
after Llama's rotary embedding. transformers copies them into 40 classes (Gemma, Granite,
Mixtral, Qwen2/3-MoE, PhiMoE, MiniMax, ...: a scan of transformers 5.23 and 5.25); see
:func:`fused_attention_class`. Not Gemma 3's (Qwen3's with its q/k norms after the
transpose): with this attention's bf16 matmuls the tiny Gemma 3's bf16 meta-gradient was
2.2x as far from the float64 one as the reference engine's (0.102 against 0.046), where its
own (SDPA math, float32 inside) keeps it at 1.2x."""


@functools.cache
def fused_attention_class(cls: type) -> bool:
    """Whether ``attention_forward`` computes attention class ``cls``: its forward has the code
    of one of the ``ATTENTION_CODES``, and its modeling module's ``apply_rotary_pos_emb`` and
    ``rotate_half`` have Llama's (``rotary`` replaces the first) and it has an
    ``eager_attention_forward`` (the fallback)."""
    from transformers.models.llama import modeling_llama

    from raymeta.models import copies_code, same_code

    mod = sys.modules.get(cls.__module__)
    return (
        any(copies_code(cls, where, name, ("forward",)) for where, name in ATTENTION_CODES)
        and all(
            same_code(getattr(mod, f, None), getattr(modeling_llama, f))
            for f in ("apply_rotary_pos_emb", "rotate_half")
        )
        and callable(getattr(mod, "eager_attention_forward", None))
    )


def attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """``softmax(s q kᵀ + mask) v`` ``[B, H, T, D]`` with fused first and second derivatives."""
    return Attention.apply(q, k, v, mask, scale)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """A Hugging Face attention interface: ``(output [B, T, H, D], None)``.

    Falls back to the module's own eager attention for what ``attention`` does not model."""
    # a sliding window is in the mask (as for HF's eager attention, which ignores the argument)
    exotic = dropout or kw.get("softcap") or kw.get("s_aux")
    if exotic or not fused_attention_class(type(module)) or scaling is None:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    b, h, t, d = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    if groups > 1 and key.shape[1] * groups == h and (mask is None or mask.shape[1] == 1):
        # the query heads that share a key / value head side by side, [B, H_kv, groups·T, D]
        # (head j·groups + g's row t at g·T + t): no repeated keys and values, nor their
        # gradients summed back
        query = query.reshape(b, key.shape[1], groups * t, d)
        mask = None if mask is None else mask.repeat(1, 1, groups, 1)
    elif groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = attention(query, key, value, mask, float(scaling)).reshape(b, h, t, d)
    return out.transpose(1, 2).contiguous(), None


def attention_kinds(model) -> set[type]:
    """The classes of ``model``'s attention modules (by name: ``...Attention``)."""
    return {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")}


def modeling_modules(model) -> frozenset[str]:
    """The transformers modules defining ``model``'s attention classes when all of them are ones
    ``attention_forward`` computes (their rotary function is ``rotary``'s to replace); empty
    when the model has other attention modules, or none."""
    kinds = attention_kinds(model)
    if not kinds or not all(fused_attention_class(k) for k in kinds):
        return frozenset()
    return frozenset(k.__module__ for k in kinds)


def additive_mask(*, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """The mask of HF's eager attention (``masking_utils.eager_mask``), made on its device
    alone: ``sdpa_mask``'s boolean mask (never skipped as merely causal; the same keyword
    arguments) as 0 where a query attends and the dtype's min elsewhere, ``[B, 1, T, S]``, or
    None where no mask is needed. transformers 5.17's ``eager_mask`` makes its 0 from host data
    (``torch.tensor(0.0, device=...)``): a copy from host memory, which stops a CUDA graph's
    capture of the step."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(**kwargs)
    if mask is None:
        return None
    zero = torch.zeros((), device=mask.device, dtype=dtype)
    return torch.where(mask, zero, torch.finfo(dtype).min)


@functools.cache
def register() -> str:
    """Register ``attention_forward`` (and its mask, ``additive_mask``) with transformers
    (once); the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, additive_mask)
    return NAME
