"""Which ops the fast-weights engine's passes run, switched on while a pass runs (``engine_ops``):
the attention (``ATTENTION``: ``raymeta.meta.attention`` for the modules it knows) and the
fused gated MLPs and RMS normalisation (``FUSED_OPS``: ``raymeta.meta.fused``).

The switches are read when a pass starts: set them on this module
(``fastweights.ops.FUSED_OPS = False``)."""

from __future__ import annotations

import contextlib
import weakref

import torch

from raymeta.meta import attention, fused, rotary

ATTENTION: str | None = "fused"
"""Attention in the engine's passes. "fused" (default): ``raymeta.meta.attention`` (hand-written
first and second derivatives, matmuls in the model's dtype) for models whose attention modules
it knows (Llama-style); others keep their own. "eager": Hugging Face's eager attention for a
bf16/fp16 model whose own is SDPA. None: always the model's own (SDPA runs its math kernel,
the only one with double backward)."""


FUSED_OPS = True
"""Run gated MLPs (SwiGLU, GeGLU) and the RMS normalisation through ``fused`` in the engine's
passes (False: torch's own ops, for comparisons)."""


_ATTENTION_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``attention.modeling_modules`` per module (asked on every pass, and per block in "vjp" mode)."""


def fused_attention_modules(model) -> frozenset[str]:
    """The modeling modules whose attention the fused passes take over (empty: none; see
    ``attention.modeling_modules``), or empty when ``ATTENTION`` is not "fused"."""
    if ATTENTION != "fused":
        return frozenset()
    found = _ATTENTION_MODULES.get(model)
    if found is None:
        found = _ATTENTION_MODULES[model] = attention.modeling_modules(model)
    return found


def engine_attention(model) -> str | None:
    """The attention implementation the engine's passes switch ``model`` to (None: keep)."""
    if fused_attention_modules(model):
        return attention.register()
    p = next(model.parameters(), None)
    if ATTENTION == "eager" and p is not None and p.dtype in (torch.bfloat16, torch.float16):
        return "eager"
    return None


def attention_run(model) -> str:
    """The attention the engine's passes run on ``model``: "fused" (``raymeta.meta.attention``),
    "eager", or the model's own implementation ("sdpa", ...)."""
    impl = engine_attention(model)
    own = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "fused" if impl == attention.NAME else impl or own or "the model's own"


def unfused_attention(model) -> str | None:
    """Why the passes do not run the fused attention on ``model`` though ``ATTENTION`` asks for
    it: the attention classes it does not know (None: it runs, or is not asked for)."""
    if ATTENTION != "fused" or attention_run(model) == "fused":
        return None
    kinds = attention.attention_kinds(model)
    unknown = sorted(k.__name__ for k in kinds if not attention.fused_attention_class(k))
    return ", ".join(unknown) or "no attention module found"


@contextlib.contextmanager
def attention_for(model):
    """While active, ``model``'s SDPA / eager attention is ``engine_attention(model)`` (and, with
    the fused attention, its rotary embedding is ``rotary.apply_rotary``)."""
    impl = engine_attention(model)
    if impl is None:
        yield
        return
    configs = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        old = getattr(c, "_attn_implementation_internal", None)
        if old in ("sdpa", "eager") and old != impl:
            configs[id(c)] = (c, old)
    for c, _ in configs.values():
        c._attn_implementation_internal = impl
    try:
        with rotary.patched_rotary(fused_attention_modules(model)):
            yield
    finally:
        for c, old in configs.values():
            c._attn_implementation_internal = old


@contextlib.contextmanager
def engine_ops(model):
    """While active, ``model`` runs the engine's ops: ``attention_for`` and, when ``FUSED_OPS``,
    ``fused.fused_mlps``."""
    mlps = fused.fused_mlps(model) if FUSED_OPS else contextlib.nullcontext()
    with attention_for(model), mlps:
        yield
