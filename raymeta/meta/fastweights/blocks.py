"""``checkpoint_inner="vjp"``: the inner backward checkpointed per decoder block. The inner
forward keeps only each block's input (``BlockCalls``, ``BlockForward``); each block's
create_graph VJP is one node that keeps no graph (``BlockVJP``) and recomputes its forward and
VJP in the outer backward (``Block``); ``inner_step_blocks`` is the whole inner step."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from raymeta.data.batches import Tokens
from raymeta.meta.fastweights.checkpoint import decoder_blocks, differentiable_inputs, draws_random
from raymeta.meta.fastweights.hooks import Hooks, new_terms
from raymeta.meta.fastweights.ops import engine_ops
from raymeta.meta.fastweights.seed import next_token_seed
from raymeta.meta.inner import call, double_backward_attention


def _fields(term) -> list[torch.Tensor]:
    return [getattr(term, f.name) for f in dataclasses.fields(term)]


def _key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class Block:
    """One decoder block's call in an inner forward, re-runnable from its input.

    ``run`` applies the update terms of the block's own parameters (given flat, so that
    they can be autograd inputs of ``BlockForward`` / ``BlockVJP``) through fresh hooks;
    ``vjp`` gives the block's input gradient and the new update terms of its layers."""

    def __init__(self, blk, orig, args, kwargs, uses, terms, shape):
        self.module, self.orig, self.args, self.kwargs = blk, orig, args, kwargs
        inside = {id(m) for m in blk.modules()}
        self.uses = [u for u in uses if id(u.module) in inside]
        names = sorted({n for u in self.uses for _, n in u.params() if terms.get(n)})
        self.terms = [(n, t) for n in names for t in terms[n]]
        self.flat = [x for _, t in self.terms for x in _fields(t)]
        self.params = [p for p in blk.parameters() if p.requires_grad]
        self.shape = shape  # tasks, rows, length
        self.layout: list | None = None  # (name, term class, output indices) per new term
        self.x: torch.Tensor | None = None
        self.random = draws_random(blk)
        self.rng: tuple | None = None  # the generators' state before its first run

    @contextlib.contextmanager
    def same_randomness(self, device: torch.device):
        """The first run draws as usual (dropout masks) and keeps the generators' state before
        it; every re-run draws the same numbers again without advancing the generators, so
        the recomputed block is the one that ran (as ``torch.utils.checkpoint`` does)."""
        if not self.random:
            yield
            return
        cuda = [device] if device.type == "cuda" else []
        if self.rng is None:
            self.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda])
            yield
            return
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self.rng[0])
            for d, state in zip(cuda, self.rng[1]):
                torch.cuda.set_rng_state(state, d)
            yield

    def rebuild(self, flat) -> dict[str, list]:
        out: dict[str, list] = {}
        i = 0
        for name, t in self.terms:
            k = len(dataclasses.fields(t))
            out.setdefault(name, []).append(type(t)(*flat[i : i + k]))
            i += k
        return out

    def run(self, x, flat, record=False):
        """The block's output (and the Records of its hooked calls) on input ``x``."""
        args, kwargs = self.args, dict(self.kwargs)
        if args:
            args = (x, *args[1:])
        else:
            kwargs["hidden_states"] = x
        hooks = Hooks(self.uses, self.rebuild(flat), *self.shape, inner=True, record=record)
        with hooks, double_backward_attention(), engine_ops(self.module):
            with self.same_randomness(x.device):
                y = self.orig(*args, **kwargs)
        if not isinstance(y, torch.Tensor):
            raise RuntimeError(
                "fast-weights checkpoint_inner='vjp': a decoder block returned "
                f"{type(y).__name__}, not a tensor"
            )
        return y, hooks.records

    def vjp(self, x, dy, flat, create_graph) -> list[torch.Tensor]:
        """``[dx, *tensors of the new terms]`` (shared tensors once) for output gradient ``dy``."""
        y, records = self.run(x, flat, record=True)
        ds = torch.autograd.grad(
            [y], [x, *(r.out for r in records)], [dy], create_graph=create_graph, allow_unused=True
        )
        outs = [torch.zeros_like(x) if ds[0] is None else ds[0]]
        index: dict = {}
        layout = []
        for rec, d in zip(records, ds[1:]):
            if d is None:
                continue
            for name, term in new_terms(rec, d):
                where = []
                for t in _fields(term):
                    k = _key(t)
                    if k not in index:
                        index[k] = len(outs)
                        outs.append(t)
                    where.append(index[k])
                layout.append((name, type(term), where))
        if self.layout is None:
            self.layout = layout
        elif [(n, c, len(w)) for n, c, w in layout] != [(n, c, len(w)) for n, c, w in self.layout]:
            raise RuntimeError("fast-weights: a recomputed decoder block recorded other calls")
        return outs

    def new_terms(self, outs) -> list[tuple[str, object]]:
        return [(n, cls(*(outs[i] for i in where))) for n, cls, where in self.layout]


def _inputs(ctx, first: int, tensors):
    """Detached copies of saved ``tensors``, requiring grad where the Function's input does."""
    out = []
    for i, t in enumerate(tensors):
        t = t.detach()
        if ctx.needs_input_grad[first + i] and t.is_floating_point():
            t.requires_grad_()
        out.append(t)
    return out


def _grads(outputs, grad_outputs, wrt):
    """Gradients for ``wrt`` (None where it does not require grad or is unreached)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    need = [t for t in wrt if t.requires_grad]
    got = iter(
        torch.autograd.grad([o for o, _ in pairs], need, [g for _, g in pairs], allow_unused=True)
        if pairs and need
        else [None] * len(need)
    )
    return [next(got) if t.requires_grad else None for t in wrt]


class BlockForward(torch.autograd.Function):
    """A block's output, computed without keeping its activations; the backward recomputes it
    (first order: the outer backward's path through the inner forward)."""

    @staticmethod
    def forward(ctx, block: Block, x, *rest):
        ctx.block = block
        ctx.save_for_backward(x, *rest[: len(block.flat)])
        with torch.no_grad():
            y, _ = block.run(x, list(rest[: len(block.flat)]))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        block = ctx.block
        x, flat = _inputs(ctx, 1, ctx.saved_tensors[:1])[0], _inputs(ctx, 2, ctx.saved_tensors[1:])
        with torch.enable_grad():
            y, _ = block.run(x, flat)
            grads = _grads([y], [gy], [x, *flat, *block.params])
        return None, *grads


class BlockVJP(torch.autograd.Function):
    """``Block.vjp`` as one node: its forward keeps no graph (only x, dy and the terms it reads
    are saved); its backward recomputes the block's forward and create_graph VJP and
    differentiates them (the second-order part of the outer backward, one block at a time)."""

    @staticmethod
    def forward(ctx, block: Block, x, dy, *rest):
        ctx.block = block
        ctx.set_materialize_grads(False)
        n = len(block.flat)
        ctx.save_for_backward(x, dy, *rest[:n])
        with torch.enable_grad():
            xs = x.detach().requires_grad_()
            outs = block.vjp(xs, dy.detach(), [t.detach() for t in rest[:n]], False)
        ptrs = {x.data_ptr(), dy.data_ptr()}
        # no output may alias an input (a layer whose output is the block's gets d = dy)
        return tuple(o.detach().clone() if o.data_ptr() in ptrs else o.detach() for o in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts):
        block = ctx.block
        x, dy, *flat = _inputs(ctx, 1, ctx.saved_tensors)
        x.requires_grad_()  # the VJP is taken w.r.t. x even when x needs no gradient
        with torch.enable_grad():
            outs = block.vjp(x, dy, flat, True)
            grads = _grads(outs, gouts, [x, dy, *flat, *block.params])
        if not ctx.needs_input_grad[1]:
            grads[0] = None
        return None, *grads


class BlockCalls:
    """While active, each decoder block's call in an inner forward runs as a ``BlockForward``
    (the outer hooks pause inside it; blocks must be chained: each one's input is the
    previous one's output). ``blocks``: the Block of each call, in order; ``first``: the
    number of records taken before the first block."""

    def __init__(self, model, hooks: Hooks):
        self.model, self.hooks = model, hooks
        self.blocks: list[Block] = []
        self.outputs: list[torch.Tensor] = []
        self.first = 0
        self.patched = []

    def __enter__(self):
        blocks = decoder_blocks(self.model)
        if not blocks:
            raise RuntimeError("fast-weights checkpoint_inner='vjp': no decoder blocks found")
        for blk in blocks:
            had = "forward" in blk.__dict__
            orig = blk.forward
            blk.forward = functools.partial(self.call, blk, orig)
            self.patched.append((blk, had, orig))
        return self

    def __exit__(self, *exc):
        for blk, had, orig in self.patched:
            if had:
                blk.forward = orig
            else:
                del blk.__dict__["forward"]
        self.patched = []

    def call(self, blk, orig, *args, **kwargs):
        h = self.hooks
        x = args[0] if args else kwargs["hidden_states"]
        if self.outputs and x is not self.outputs[-1]:
            raise RuntimeError(
                "fast-weights checkpoint_inner='vjp': a decoder block's input is not the "
                "previous block's output"
            )
        if extra := differentiable_inputs(orig, args, kwargs):
            raise RuntimeError(
                "fast-weights checkpoint_inner='vjp': a decoder block got a differentiable "
                f"input other than its hidden states ({extra[0]})"
            )
        if not self.blocks:
            self.first = len(h.records)
        block = Block(blk, orig, args, kwargs, h.uses, h.terms, (h.tasks, h.rows, h.length))
        block.x = x
        h.busy = True
        try:
            y = BlockForward.apply(block, x, *block.flat, *block.params)
        finally:
            h.busy = False
        self.blocks.append(block)
        self.outputs.append(y)
        return y


def inner_step_blocks(model, uses, terms, contexts: Tokens, labels, tasks, lr, second_order):
    """One inner step with the inner backward checkpointed per decoder block.

    The forward keeps only each block's input; the backward through the head is taken as
    usual, then each block's ``BlockVJP`` (top to bottom) gives the gradient of its input
    and its layers' terms, and the layers before the first block are differentiated last.
    Returns (new (name, term) pairs in forward order, per-task inner loss)."""
    rows, length = contexts.input_ids.shape
    snapshot = {k: list(v) for k, v in terms.items()}
    hooks = Hooks(uses, snapshot, tasks, rows, length, inner=True, record=True)
    calls = BlockCalls(model, hooks)
    with hooks, calls, engine_ops(model):
        logits = call(model, contexts)
    pre, post = hooks.records[: calls.first], hooks.records[calls.first :]
    seed, loss = next_token_seed(logits, labels, -lr)
    top = calls.outputs[-1]
    *d_post, dy = torch.autograd.grad(
        [logits],
        [*(r.out for r in post), top],
        grad_outputs=[seed],
        create_graph=second_order,
        allow_unused=True,
    )
    del logits, seed
    if dy is None:
        dy = torch.zeros_like(top)
    per_block = []
    with contextlib.nullcontext() if second_order else torch.no_grad():
        for block in reversed(calls.blocks):
            outs = BlockVJP.apply(block, block.x, dy, *block.flat, *block.params)
            dy = outs[0]
            per_block.append(block.new_terms(outs))
    new = []
    if pre:
        x0 = calls.blocks[0].x
        d_pre = (
            torch.autograd.grad(
                [x0], [r.out for r in pre], [dy], create_graph=second_order, allow_unused=True
            )
            if x0.requires_grad
            else [None] * len(pre)
        )
        new += [nt for rec, d in zip(pre, d_pre) if d is not None for nt in new_terms(rec, d)]
    for pairs in reversed(per_block):
        new += pairs
    new += [nt for rec, d in zip(post, d_post) if d is not None for nt in new_terms(rec, d)]
    return new, loss
