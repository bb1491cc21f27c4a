"""Activation checkpointing of the inner pass: the ``checkpoint_inner`` modes, the decoder
blocks (``decoder_blocks``, what they take: ``differentiable_inputs``), and the "forward" mode
(each block's forward recomputed under the same hooks: ``checkpointed_blocks``, ``Replay``).
The "vjp" mode is in ``blocks``."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.utils._pytree
from torch import nn

from raymeta.meta.fastweights.hooks import Hooks
from raymeta.meta.fastweights.ops import engine_ops
from raymeta.meta.inner import double_backward_attention


def differentiable_inputs(forward, args: tuple, kwargs: dict) -> list[str]:
    """The names of the arguments (of ``forward``, a decoder block's) through which a call
    passes a tensor requiring grad other than the hidden states (the first argument, or
    ``hidden_states``), e.g. ["per_layer_input"]."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    try:
        sig = inspect.signature(forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
        named = []
        for name, value in bound.items():
            many = sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
            named.extend(value.items() if many else [(name, value)])
    except (TypeError, ValueError):  # no signature, or one the call does not fit
        named = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())
    found = []
    for where, value in named:
        leaves = torch.utils._pytree.tree_leaves(value)
        if any(isinstance(t, torch.Tensor) and t.requires_grad and t is not hidden for t in leaves):
            found.append(where)
    return found


def decoder_blocks(model) -> list[nn.Module]:
    """The repeated blocks: the ModuleList of one class holding the most parameters."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
    ]
    if not lists:
        return []
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def run_checkpointed(fn, context_fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs
    )


@contextlib.contextmanager
def checkpointed_blocks(model, enabled: bool, replay):
    """While active, each decoder block's forward runs under non-reentrant checkpointing;
    ``replay()`` gives the context of its recomputation (hooks as in this forward)."""
    if not enabled:
        yield
        return

    def context_fn():
        return contextlib.nullcontext(), replay()

    patched = []
    for blk in decoder_blocks(model):
        had = "forward" in blk.__dict__
        orig = blk.forward
        blk.forward = functools.partial(run_checkpointed, orig, context_fn)
        patched.append((blk, had, orig))
    try:
        yield
    finally:
        for blk, had, orig in patched:
            if had:
                blk.forward = orig
            else:
                del blk.__dict__["forward"]


class Replay:
    """The recomputation of a checkpointed inner block: same hooks, no records, math SDPA.

    Reusable: checkpointing may recompute a block more than once (inner and outer backward)."""

    def __init__(self, model, uses, terms, tasks, rows, length):
        self.model = model
        self.args = (uses, terms, tasks, rows, length)
        self.stack: list[contextlib.ExitStack] = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        stack.enter_context(Hooks(*self.args, inner=True))
        stack.enter_context(double_backward_attention())
        stack.enter_context(engine_ops(self.model))
        self.stack.append(stack)
        return self

    def __exit__(self, *exc):
        self.stack.pop().close()


CHECKPOINT_MODES = {
    False: None,
    None: None,
    "none": None,
    True: "vjp",
    "vjp": "vjp",
    "forward": "forward",
}
"""``InnerSpec.checkpoint_inner`` values: True / "vjp" checkpoints the inner *backward* per
decoder block (see ``BlockVJP``); "forward" only recomputes the inner forward's blocks (the
create_graph inner backward then keeps the recomputed activations)."""


def checkpoint_mode(value) -> str | None:
    try:
        return CHECKPOINT_MODES[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"checkpoint_inner={value!r}: expected False, True, 'none', 'vjp' or 'forward'"
        ) from None


def draws_random(module: nn.Module) -> bool:
    """Whether ``module``'s forward draws random numbers in its current mode: active dropout
    (a dropout module, or a Hugging Face attention's ``attention_dropout``, in training)."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        p = getattr(m, "attention_dropout", 0.0)
        if isinstance(p, float) and p > 0:
            return True
    return False
