"""The forward hooks of the engine's passes (``Hooks``): each adds the update terms'
correction to a hooked module's output (``correction``); in an inner pass each keeps the call
(``Record``), whose output gradient gives the new terms (``new_terms``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.meta import fused
from raymeta.meta.experts import run_experts
from raymeta.meta.fastweights import ops
from raymeta.meta.fastweights.calls import LinearCall, Lookup, SinkCall, started, stopped
from raymeta.meta.fastweights.terms import (
    Dense,
    LowRank,
    Routed,
    Rows,
    linear_delta,
    lookup_delta,
    routed_bias,
    routed_delta,
    vector_delta,
)
from raymeta.meta.fastweights.uses import ROW_MAJOR, Use, flattened, layout_problem
from raymeta.models import embedding_scale, norm_eps, normalise


@dataclass
class Record:
    """One hooked call in an inner forward: input (grouped ``[B, R, in]``, or ids ``[B, R]``),
    the normalised input of a norm (or None) and the output the rest of the model saw."""

    use: Use
    x: torch.Tensor
    nx: torch.Tensor | None
    out: torch.Tensor
    part: str | None = None
    """An experts module's projection (``gate_up_proj``, ``down_proj``, ...)."""
    experts: torch.Tensor | None = None
    """The expert of each (token, expert) pair of x ``[B, P]`` (experts modules)."""


class Hooks:
    """Forward hooks adding ``terms``' corrections during one forward of ``rows`` × ``length``
    tokens.

    ``inner``: the forward is an inner step's (outputs are made to require grad so that
    D can be taken w.r.t. them); ``record``: keep a Record per hooked call."""

    def __init__(self, uses, terms, tasks, rows, length, inner=False, record=False):
        self.uses, self.terms, self.tasks = uses, terms, tasks
        self.rows, self.length = rows, length
        self.inner, self.record = inner, record
        self.records: list[Record] = []
        self.handles = []
        self.busy = False
        self.lookups: dict[int, Lookup] = {}  # a Use.lookup module's, while it runs
        self.looks: dict[int, Lookup] = {}  # its finished Lookup, until ``hook`` takes it
        self.calls: dict[int, LinearCall | SinkCall] = {}  # a Use.call / sinks module's
        self.patched: list[tuple[nn.Module, object]] = []  # experts: (module, its own forward)
        self.last_group: tuple = (None, None)  # (input, its grouped view): the last ``group``
        self.products: tuple = (None, -1, {})  # (x, its version, {id(h): (h, x hᵀ)})

    def __enter__(self):
        for use in self.uses:
            m = use.module
            if use.kind == "experts":  # the update acts inside: the forward is the engine's
                self.patched.append((m, m.__dict__.get("forward")))
                m.forward = functools.partial(self.experts, use, m.forward)
                continue
            if use.call or use.kind == "sinks":  # the update acts on its F.linear call / sinks
                started_hook = functools.partial(self.call_started, use)
                ended_hook = functools.partial(self.call_ended, use)
                self.handles.append(m.register_forward_pre_hook(started_hook))
                self.handles.append(m.register_forward_hook(ended_hook, always_call=True))
                continue
            if use.lookup:  # registered first: its ids are there when ``hook`` runs
                self.handles.append(m.register_forward_pre_hook(self.look))
                self.handles.append(m.register_forward_hook(self.looked, always_call=True))
            self.handles.append(m.register_forward_hook(functools.partial(self.hook, use)))
        self.skips = fused.skipped_norms([u.module for u in self.uses if self.rebuilds(u)])
        self.skips.__enter__()
        return self

    def __exit__(self, *exc):
        self.skips.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.handles = []
        for m, own in reversed(self.patched):
            if own is None:
                del m.__dict__["forward"]
            else:
                m.forward = own
        self.patched = []

    @staticmethod
    def rebuilds(use: Use) -> bool:
        """Whether ``hook`` builds the module's output from its input alone (a norm without
        bias whose normalisation ``normalised`` computes itself): the module's forward can be
        skipped."""
        m = use.module
        if use.kind != "norm" or use.weight is None or getattr(m, "bias", None) is not None:
            return False
        return type(m) is nn.LayerNorm or Hooks.acc(use, m.weight.dtype) is not None

    @staticmethod
    def acc(use: Use, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a norm of a known style normalises ``dtype`` inputs in, as the module's
        own forward does, where ``normalised`` computes that itself (``fused.rms_normalise``,
        or ``models.normalise`` for Cohere's LayerNorm); None where it calls ``F.layer_norm``
        (``nn.LayerNorm``, Nemotron's) or the module (``FUSED_OPS`` off for an RMSNorm, an
        unknown forward patched on the instance)."""
        style = use.style
        if style is None or not style.upcast or not (ops.FUSED_OPS or style.centred):
            return None
        return fused.rms_dtype(use.module, dtype)

    def group(self, use: Use, x: torch.Tensor) -> torch.Tensor:
        """``[rows, ...]`` (or ``[rows · length, d]``) → ``[B, R, ...]`` (the n contexts of a
        task side by side)."""
        shape = tuple(x.shape)
        if flattened(use, shape, self.rows, self.length) and use.module in ROW_MAJOR:
            grouped = x.reshape(self.tasks, -1, shape[-1])  # row-major (``probe`` checked)
        elif problem := layout_problem(use, shape, self.rows, self.length):
            raise RuntimeError(f"fast-weights: {problem}")
        else:
            grouped = x.reshape(self.tasks, -1, *shape[2:])
        last_x, last = self.last_group
        if last_x is x and last.shape == grouped.shape:
            return last  # siblings (q / k / v, gate / up) read one input: one grouped tensor
        self.last_group = (x, grouped)
        return grouped

    def look(self, module, inputs):
        self.lookups[id(module)] = started(Lookup(module))

    def looked(self, module, inputs, output):
        self.looks[id(module)] = stopped(self.lookups.pop(id(module)))

    def call_started(self, use: Use, module, inputs):
        if use.kind == "sinks":
            self.calls[id(module)] = started(SinkCall(module, functools.partial(self.sunk, use)))
        else:
            adjust = functools.partial(self.adjusted, use)
            self.calls[id(module)] = started(LinearCall(module, adjust))

    def call_ended(self, use: Use, module, inputs, output):
        _, problem = stopped(self.calls.pop(id(module))).found(use)
        if problem and not self.busy and output is not None:  # (None: the forward raised)
            raise RuntimeError(f"fast-weights: {problem}")

    def sunk(self, use: Use, out: torch.Tensor) -> torch.Tensor:
        """An attention's sinks viewed as ``out`` ``[1, H, ...]``, made ``[rows, H, ...]``:
        each row its task's adapted sinks."""
        if self.busy:
            return out
        per_row = out.expand(self.rows, *out.shape[1:])
        g = vector_delta(self.terms.get(use.parts["sinks"], []))  # [B, H]
        if g is not None:
            g = g.repeat_interleave(self.rows // self.tasks, 0)
            per_row = per_row + g.view(self.rows, *out.shape[1:]).to(out.dtype)
        grouped = per_row.reshape(self.tasks, -1, out.shape[1])  # [B, rows per task, H]
        return self.kept(use, grouped, None, per_row)

    def adjusted(self, use: Use, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A ``Use.call`` module's ``F.linear`` output ``out`` on x, adapted."""
        if self.busy:
            return out
        x = self.group(use, x)
        delta = correction(use, self.terms, x, None, out.shape[-1], self.shared_products(x))
        out = out if delta is None else out + delta.reshape(out.shape).to(out.dtype)
        return self.kept(use, x, None, out)

    def experts(self, use: Use, own, hidden_states, top_k_index, top_k_weights, *rest, **kwargs):
        """An experts module's forward (``experts.run_experts``), each projection adapted."""
        if self.busy:
            return own(hidden_states, top_k_index, top_k_weights, *rest, **kwargs)
        if rest or kwargs:
            raise RuntimeError(f"fast-weights: experts module {use.path} called with more inputs")
        x = self.group(use, hidden_states)
        return run_experts(
            use.module, x, top_k_index, top_k_weights, functools.partial(self.routed, use)
        )

    def routed(self, use: Use, part: str, x, e, out) -> torch.Tensor:
        """An experts projection's output ``out`` ``[B, P, out]`` on pairs x ``[B, P, in]``
        routed to experts e ``[B, P]``, adapted."""
        w, b = use.parts.get(part), use.parts.get(f"{part}_bias")
        deltas = [routed_delta(t, x, e) for t in self.terms.get(w, [])] if w else []
        g = vector_delta(self.terms.get(b, [])) if b else None
        if g is not None:
            deltas.append(routed_bias(g, e))
        if deltas:
            out = out + functools.reduce(torch.add, deltas).to(out.dtype)
        if not (w or b):
            return out
        return self.kept(use, x, None, out, part, e)

    def kept(self, use: Use, x, nx, out, part=None, e=None) -> torch.Tensor:
        """``out`` as the rest of the forward sees it: in an inner forward, a tensor that
        requires grad (D is taken w.r.t. it), kept in a Record when recording."""
        if self.inner and torch.is_grad_enabled() and not out.requires_grad:
            out = out.detach().requires_grad_()
        if self.record and torch.is_grad_enabled():  # a call under no_grad adds no gradient
            self.records.append(Record(use, x, nx, out, part, e))
        return out

    def hook(self, use: Use, module, inputs, output):
        if self.busy:
            return None
        if use.lookup:
            ids, problem = self.looks.pop(id(module)).found(use)
            if problem:
                raise RuntimeError(f"fast-weights: {problem}")
            x = self.group(use, ids)
        else:
            x = self.group(use, inputs[0])
        nx = self.normalised(use, x) if use.kind == "norm" and use.weight else None
        if nx is not None and getattr(module, "bias", None) is None:
            # weight * nx is the module's own output; building it from nx lets the module's
            # graph go (a second normalisation kept for the second order costs ~1/4 of the
            # activations), and (w + Δw) * nx is exactly the adapted module
            w = vector_delta(self.terms.get(use.weight, []))
            scale = module.weight.to(nx.dtype) if use.style and use.style.wide else module.weight
            scale = scale + use.offset if use.offset else scale
            scale = scale if w is None else scale + per_task(w, nx)
            out = (scale * nx).to(output.dtype).reshape(output.shape)
        else:
            delta = correction(use, self.terms, x, nx, output.shape[-1], self.shared_products(x))
            out = output if delta is None else output + delta.reshape(output.shape).to(output.dtype)
        return self.kept(use, x, nx, out)

    def shared_products(self, x: torch.Tensor) -> dict:
        """The products ``x hᵀ`` of update terms taken on input x so far (siblings that read one
        input and were updated from one context input, as q / k / v are, share them)."""
        if self.products[0] is not x or self.products[1] != x._version:  # (x written since)
            self.products = (x, x._version, {})
        return self.products[2]

    def normalised(self, use: Use, x: torch.Tensor) -> torch.Tensor:
        """The norm's output with unit scale and no bias: ``[B, R, d]`` (a LayerNorm's through
        ``F.layer_norm`` or, for Cohere's, ``models.normalise``; an RMSNorm's through
        ``fused.rms_normalise`` where its arithmetic is known, else through its own forward).
        In x's dtype, but a wide style's (``NormStyle.wide``: Gemma's, OLMo-2's, Cohere's, ...)
        in its accumulation dtype: its forward scales there and rounds once, at the end (so
        does ``hook``)."""
        m, style = use.module, use.style
        if type(m) is nn.LayerNorm or (style and style.centred and not style.upcast):
            eps = m.eps if type(m) is nn.LayerNorm else norm_eps(m, style)
            return F.layer_norm(x, x.shape[-1:], None, None, eps)
        acc = self.acc(use, x.dtype)
        if acc is not None:
            eps = norm_eps(m, style)
            if style.centred:  # Cohere's: with its forward's operations
                nx = normalise(x.to(acc), eps, centred=True)
                return nx if style.wide else nx.to(x.dtype)
            return fused.rms_normalise(x.to(acc) if style.wide else x, eps, acc)
        self.busy = True
        try:  # the weight that makes the scale offset + weight one
            unit = {"weight": torch.full_like(m.weight, 1.0 - use.offset)}
            return torch.func.functional_call(m, unit, (x,))
        finally:
            self.busy = False


def correction(use: Use, terms, x, nx, out_dim, products=None) -> torch.Tensor | None:
    """The adapted module's output minus its plain output, grouped ``[B, R, out]`` (None: no
    change).

    ``products``: ``linear_delta``'s shared products on x (None: none shared)."""
    w_terms = terms.get(use.weight, []) if use.weight else []
    b_terms = terms.get(use.bias, []) if use.bias else []
    if use.kind == "norm":
        total = None
        w = vector_delta(w_terms)
        if w is not None:
            total = per_task(w, nx) * nx
        b = vector_delta(b_terms)
        if b is not None:  # x, not nx: nx is None when the scale is not an inner parameter
            bias = per_task(b, x)
            total = bias.expand(x.shape) if total is None else total + bias
        return total
    if use.kind == "embedding":
        parts = [lookup_delta(t, x) for t in w_terms]
        pad = use.module.padding_idx
        if pad is not None and parts:  # nn.Embedding sends no gradient into the padding row
            keep = (x == pad)[..., None]
            parts = [torch.where(keep, p.detach(), p) for p in parts]
        scale = embedding_scale(use.module)
        if scale is not None:  # a scaled embedding's output is scale · W[ids]
            parts = [p * scale for p in parts]
    else:
        parts = [linear_delta(t, x, out_dim, products) for t in w_terms]
    b = vector_delta(b_terms)
    if b is not None:  # expanded: a bias may be the layer's only inner parameter
        parts.append(b[:, None, :].expand(x.shape[0], x.shape[1], b.shape[-1]))
    if not parts:
        return None
    return functools.reduce(torch.add, parts)


def per_task(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-task ``[B, *S]`` (a norm's scale or bias: S ``[d]``, or Cohere's per-head
    ``[H, d]``) viewed to broadcast against ``like`` ``[B, R, ..., *S]``."""
    return v.view(v.shape[0], *[1] * (like.dim() - v.dim()), *v.shape[1:])


def new_terms(rec: Record, d: torch.Tensor):
    """(name, term) pairs of one hooked call's ``-η G`` given d = -η dL/d(out)
    ``[rows, length, out]``."""
    use = rec.use
    if use.kind == "sinks":  # d [rows, H, ...] → the task's sum [B, H]
        return [(use.parts["sinks"], Dense(d.reshape(rec.x.shape[0], -1, d.shape[1]).sum(1)))]
    if use.kind == "experts":  # d [B, P, out] at pairs routed to experts rec.experts [B, P]
        w, b = use.parts.get(rec.part), use.parts.get(f"{rec.part}_bias")
        out = [(w, Routed(d, rec.x, rec.experts))] if w else []
        if b:
            experts = getattr(use.module, rec.part).shape[0]
            index = rec.experts[..., None].expand_as(d)
            g = d.new_zeros(d.shape[0], experts, d.shape[-1]).scatter_add(1, index, d)
            out.append((b, Dense(g)))
        return out
    if use.kind == "norm":  # by the shape of its scale / bias: [d], or Cohere's per head [H, d]
        shape = getattr(use.module, "weight" if use.weight else "bias").shape
        d = d.reshape(rec.x.shape[0], -1, *shape)
    else:
        d = d.reshape(rec.x.shape[0], -1, d.shape[-1])
    out = []
    if use.kind in ("linear", "conv1d"):
        if use.weight:
            out.append((use.weight, LowRank(d, rec.x)))
        if use.bias:
            out.append((use.bias, Dense(d.sum(1))))
    elif use.kind == "embedding":
        pad = use.module.padding_idx
        if pad is not None:  # nn.Embedding gives the padding row no gradient
            d = d * (rec.x != pad)[..., None].to(d.dtype)
        scale = embedding_scale(use.module)
        out.append((use.weight, Rows(rec.x, d if scale is None else d * scale)))
    else:
        if use.weight:
            out.append((use.weight, Dense((d * rec.nx.reshape(d.shape)).sum(1))))
        if use.bias:
            out.append((use.bias, Dense(d.sum(1))))
    return out
