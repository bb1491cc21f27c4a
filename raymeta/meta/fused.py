"""Fused SwiGLU and RMS normalisation with hand-written first and second derivatives.

The fast-weights engine takes its inner step with ``create_graph`` and differentiates that
backward once more in the outer backward. Left to autograd, ``silu(g) * u`` and an RMSNorm's
``x * rsqrt(mean(x²) + eps)`` (float32 casts included) record their backward as chains of
generic elementwise nodes (with grad mode on, silu's backward is its "infinitely
differentiable" decomposition), each differentiated again in the outer backward. Here each op
is a Function whose backward is a second Function (``SwiGLUGrad``, ``RMSNormaliseGrad``) with a
hand-written backward: the second-order graph is one node per op, holding only its inputs.

No third derivative is ever taken, so the ``*Grad`` backwards are ``once_differentiable``:
the outer backward is the last backward (nothing has ``create_graph`` there). Inner step k's
create_graph backward runs from its logits to its own hooked outputs only; the terms of steps
< k enter its forward as values, so it records new ``*Grad`` nodes but never runs an earlier
step's. ``BlockVJP`` / ``BlockForward`` recompute a block and take one (first-order) backward
through what they recorded; their own backwards are once_differentiable too.

Only the engine's passes use these (``fused_mlps`` while a pass runs; ``Hooks.normalised``);
the reference engine keeps torch's unfused ops, so the float64 equivalence tests check them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from raymeta.models import norm_full_precision

SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
"""MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""

SILU_ACTIVATIONS = frozenset({"SiLUActivation", "SiLU"})
"""Activation classes computing ``silu`` (transformers' ``SiLUActivation``, ``nn.SiLU``)."""

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

COMPILE = False
"""Run the bodies of the fused ops' Functions (here, in ``attention`` and ``rotary``) through
``torch.compile`` (dynamic shapes, one graph each): each body's chain of elementwise calls
becomes a few generated kernels (Triton on a GPU, C++ on a CPU), fewer launches and fewer
passes over memory. Off by default: exact on CPU (tests), GPU speed not yet measured
(``bench/meta_step.py --compile-ops``). The first call of each body compiles it (seconds)."""


RECOMPILE_LIMIT = 64
"""Variants of one body ``torch.compile`` may build (which gradients are None or wanted,
dtypes, broadcast shapes); past it, new variants run eagerly (same values)."""


def compilable(fn):
    """``fn``, run through ``torch.compile`` (compiled on first use) while ``COMPILE``.

    Tensor arguments are passed detached (the bodies run inside autograd Functions, without
    grad mode), so that whether they require grad does not make another variant."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not COMPILE:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)

    return run


# ---------------------------------------------------------------------------
# SwiGLU: z = silu(g) · u
# ---------------------------------------------------------------------------


@compilable
def swiglu_value(g, u):
    """``silu(g) · u``."""
    return F.silu(g).mul_(u)


@compilable
def swiglu_grads(g, u, dz):
    """``(dz · u · silu'(g), dz · silu(g))``."""
    return torch.ops.aten.silu_backward(dz * u, g), F.silu(g).mul_(dz)


@compilable
def swiglu_second(g, u, dz, a, b, need_g: bool, need_u: bool, need_dz: bool):
    """``SwiGLUGrad``'s backward: gradients of g, u, dz for those a, b of (dg, du) (or None)."""
    s = torch.sigmoid(g)  # the one transcendental pass
    silu = g * s
    d1 = torch.addcmul(silu, silu, s, value=-1).add_(s)  # silu' = s + silu (1 - s)
    gg = gu = gdz = None
    if a is not None and (need_u or need_dz):
        p = a * d1
        gdz = p * u if need_dz else None
        gu = p.mul_(dz) if need_u else None
    if b is not None and need_dz:
        gdz = b * silu if gdz is None else gdz.addcmul_(b, silu)
    if need_g and a is not None:
        curve = torch.add(g, silu, alpha=-2).add_(2)  # 2 + g - 2 silu
        gg = s.addcmul_(s, s, value=-1).mul_(curve).mul_(a).mul_(u)  # a u silu''
        if b is not None:
            gg.addcmul_(b, d1)
    elif need_g and b is not None:
        gg = b * d1
    return None if gg is None else gg.mul_(dz), gu, gdz


class SwiGLU(torch.autograd.Function):
    """``z = silu(g) · u`` for g, u ``[..., I]`` (same shape and dtype); saves g and u only.

    Computed with torch's own kernels in the input dtype (which take bf16/fp16 through float32
    internally, as ``F.silu`` does), so the value and its first derivative are those of the
    unfused ops. The backward is ``SwiGLUGrad``, itself differentiable (create_graph)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu_value(g, u)

    @staticmethod
    def backward(ctx, dz):
        g, u = ctx.saved_tensors
        return SwiGLUGrad.apply(g, u, dz)


class SwiGLUGrad(torch.autograd.Function):
    """``(dg, du) = (dz · u · silu'(g), dz · silu(g))``, all ``[..., I]``; saves g, u, dz.

    Backward, for the gradients a, b of dg, du (with s = σ(g), silu' = s (1 + g (1 - s)),
    silu'' = s (1 - s) (2 + g - 2 g s)):
    ``∂/∂g = dz (a u silu'' + b silu')``, ``∂/∂u = a dz silu'``, ``∂/∂dz = a u silu' + b silu``.
    Eager torch ops in the input dtype, in place where they can be (one pass each)."""

    @staticmethod
    def forward(ctx, g, u, dz):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, u, dz)
        return swiglu_grads(g, u, dz)

    @staticmethod
    @once_differentiable
    def backward(ctx, a, b):
        return swiglu_second(*ctx.saved_tensors, a, b, *ctx.needs_input_grad)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) · u`` ``[..., I]`` with fused first and second derivatives."""
    return SwiGLU.apply(g, u)


def is_swiglu_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is an unpatched Llama-style MLP with a SiLU activation."""
    cfg = getattr(module, "config", None)
    return (
        type(module).__name__ in SWIGLU_MLPS
        and "forward" not in module.__dict__
        and type(getattr(module, "act_fn", None)).__name__ in SILU_ACTIVATIONS
        and getattr(cfg, "hidden_act", None) in ("silu", "swish")
        and all(isinstance(getattr(module, k, None), nn.Module) for k in PROJECTIONS)
    )


def run_swiglu_mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward through ``swiglu``; calls the projections (their hooks fire)."""
    return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))


@contextlib.contextmanager
def fused_mlps(module: nn.Module):
    """While active, every SwiGLU MLP in ``module`` (``is_swiglu_mlp``) runs ``run_swiglu_mlp``.

    Nests: an MLP already patched (``forward`` in its ``__dict__``, by this or anything else)
    is left alone, and on exit only this context's patches are removed."""
    patched = [m for m in module.modules() if is_swiglu_mlp(m)]
    for m in patched:
        m.forward = functools.partial(run_swiglu_mlp, m)
    try:
        yield
    finally:
        for m in patched:
            del m.__dict__["forward"]


# ---------------------------------------------------------------------------
# RMS normalisation: n = x · rsqrt(mean(x²) + eps)
# ---------------------------------------------------------------------------


@compilable
def rms_value(x, eps: float, acc: torch.dtype):
    """``(x · r cast to x's dtype, r)`` with ``r = rsqrt(mean(x²) + eps)`` ``[..., 1]`` in acc."""
    h = x.to(acc)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * r).to(x.dtype), r  # Hugging Face's ops, in its order


@compilable
def rms_grad(x, r, dn):
    """``dx = r (dn - n ⟨dn, n⟩/d)`` in r's dtype, cast to x's."""
    n = x.to(r.dtype) * r
    d = dn.to(r.dtype)
    c = (d * n).mean(-1, keepdim=True)
    return d.addcmul(n, c, value=-1).mul_(r).to(x.dtype)


@compilable
def rms_second(x, r, dn, a, need_x: bool, need_dn: bool):
    """``RMSNormaliseGrad``'s backward (formulas in its docstring): (∂/∂x, ∂/∂dn) or None."""
    n = x.to(r.dtype) * r
    a = a.to(r.dtype)
    big_a = (a * n).mean(-1, keepdim=True)
    gx = gdn = None
    if need_dn:
        gdn = torch.addcmul(a, n, big_a, value=-1).mul_(r).to(dn.dtype)
    if need_x:
        d = dn.to(r.dtype)
        big_b = (d * n).mean(-1, keepdim=True)
        big_c = (a * d).mean(-1, keepdim=True)
        gx = n.mul_(big_a * big_b * 3 - big_c).addcmul_(big_a, d, value=-1)
        gx = gx.addcmul_(big_b, a, value=-1).mul_(r * r).to(x.dtype)
    return gx, gdn


class RMSNormalise(torch.autograd.Function):
    """``n = x · r`` with ``r = rsqrt(mean(x²) + eps)`` over the last dim, x ``[..., d]``.

    As Hugging Face's RMSNorm (without its scale): computed in ``acc``, the result cast to
    x's dtype. Saves x and r ``[..., 1]`` (acc). The backward is ``RMSNormaliseGrad``."""

    @staticmethod
    def forward(ctx, x, eps: float, acc: torch.dtype):
        n, r = rms_value(x, eps, acc)
        ctx.save_for_backward(x, r)
        return n

    @staticmethod
    def backward(ctx, dn):
        x, r = ctx.saved_tensors
        return RMSNormaliseGrad.apply(x, r, dn), None, None


class RMSNormaliseGrad(torch.autograd.Function):
    """``dx = r (dn - n ⟨dn, n⟩/d)`` ``[..., d]`` for x, dn ``[..., d]`` and r of ``RMSNormalise``.

    r is taken as a value (not differentiated): the backward's x-derivative includes r's
    dependence on x. For the gradient a of dx, with A = ⟨a, n⟩/d, B = ⟨dn, n⟩/d,
    C = ⟨a, dn⟩/d: ``∂/∂dn = r (a - n A)``, ``∂/∂x = r² (n (3AB - C) - A dn - B a)``.
    Computed in r's dtype, cast to those of dn and x."""

    @staticmethod
    def forward(ctx, x, r, dn):
        ctx.save_for_backward(x, r, dn)
        return rms_grad(x, r, dn)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        x, r, dn = ctx.saved_tensors
        need_x, _, need_dn = ctx.needs_input_grad
        gx, gdn = rms_second(x, r, dn, a, need_x, need_dn)
        return gx, None, gdn


def rms_normalise(x: torch.Tensor, eps: float, acc: torch.dtype) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps)`` ``[..., d]``, computed in ``acc``, in x's dtype."""
    return RMSNormalise.apply(x, eps, acc)


def rms_dtype(module: nn.Module, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a norm module (of a ``models.NORMS`` style that upcasts) normalises ``dtype``
    inputs in: float32 for Hugging Face's forward, float32 or wider under
    ``models.keep_float64``; None for any other instance-patched forward (whose arithmetic is
    unknown). Sees through ``skipped_norms``."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is _passthrough:
        forward = forward.args[0]
    if forward is None:
        return torch.float32
    if getattr(forward, "__func__", None) is norm_full_precision:
        return torch.promote_types(dtype, torch.float32)
    return None


def _passthrough(replaced, x, *args, **kwargs):
    return x


@contextlib.contextmanager
def skipped_norms(modules):
    """While active, each module in ``modules`` returns its input unchanged (no arithmetic).

    For norms whose output a forward hook rebuilds from the input anyway (``fastweights.Hooks``
    builds ``(w + Δw) · rms_normalise(x)``): the module's own normalisation would be computed
    and discarded. Nests (a module skipped already is left alone); ``rms_dtype`` still sees
    the forward that was replaced."""
    patched = []
    for m in modules:
        forward = m.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _passthrough:
            continue
        m.forward = functools.partial(_passthrough, forward)
        patched.append((m, forward))
    try:
        yield
    finally:
        for m, forward in patched:
            if forward is None:
                del m.__dict__["forward"]
            else:
                m.forward = forward
