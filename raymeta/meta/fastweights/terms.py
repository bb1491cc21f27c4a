"""The algebra of the fast-weights engine: inner gradients as per-task low-rank terms.

Every weight is seen in "linear layout" ``[out, in]`` (``y = x W^T``; an embedding
table ``[V, d]`` is out = V, in = d; a transformers Conv1D ``[in, out]`` is
transposed). One inner step's update ``-η G`` of a weight is a sum of terms, each
already scaled by ``-η``, with R = the task's context tokens (n·Tc):

* ``LowRank(a, h)``: ``-η G = Σ_r a_r h_r^T`` with a ``[B, R, out]``, h ``[B, R, in]``
  (a linear layer: a = -η dL/dy, h = its input);
* ``Rows(ids, d)``: ``-η G = Σ_r onehot(ids_r) d_r^T`` with ids ``[B, R]``, d ``[B, R, in]``
  (an embedding lookup: d = -η dL/d(looked-up rows));
* ``Dense(g)``: ``-η G = g`` with g ``[B, *shape]`` (biases and norm scales);
* ``Routed(a, h, e)``: one expert's ``-η G_e = Σ_{r: e_r = e} a_r h_r^T`` for every expert e
  of a mixture-of-experts weight ``[E, out, in]``, with a ``[B, P, out]``, h ``[B, P, in]`` and
  e ``[B, P]`` over the task's P (token, expert) pairs (R tokens × the k experts each is
  routed to; a = -η dL/dy of the pair's expert projection, h its input).

The query pass never builds ``W - η G``: it adds ``linear_delta`` to a linear
layer's output and ``lookup_delta`` to an embedding's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    a: torch.Tensor
    h: torch.Tensor


@dataclass
class Rows:
    ids: torch.Tensor
    d: torch.Tensor


@dataclass
class Dense:
    g: torch.Tensor


@dataclass
class Routed:
    a: torch.Tensor
    h: torch.Tensor
    e: torch.Tensor


def linear_delta(term, x: torch.Tensor, out: int, products: dict | None = None) -> torch.Tensor:
    """``x ΔW^T`` for one term: x ``[B, Q, in]`` → ``[B, Q, out]``.

    ``products``: ``{id(h): (h, x hᵀ)}`` of terms already taken on this x (read, and added to):
    a LowRank term whose h is among them reuses ``x hᵀ`` ``[B, Q, R]``."""
    if isinstance(term, LowRank):  # (x in another dtype: a router's F.linear on a cast)
        _, scores = (products or {}).get(id(term.h), (None, None))
        if scores is None:
            scores = x @ as_dtype(term.h, x.dtype).mT
            if products is not None:
                products[id(term.h)] = (term.h, scores)
        return scores @ as_dtype(term.a, x.dtype)
    if isinstance(term, Rows):
        scores = x @ term.d.mT  # [B, Q, R]
        index = term.ids[:, None, :].expand_as(scores)
        return scores.new_zeros(*x.shape[:2], out).scatter_add(-1, index, scores)
    raise TypeError(f"a {type(term).__name__} term cannot update a matrix")


def routed_delta(term: Routed, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x ΔW_e^T`` for one term at pairs routed to experts e: x ``[B, Q, in]``, e ``[B, Q]`` →
    ``[B, Q, out]`` (a pair sees the context pairs of its own task and expert alone)."""
    h, a = as_dtype(term.h, x.dtype), as_dtype(term.a, x.dtype)
    same = (e[:, :, None] == term.e[:, None, :]).to(x.dtype)  # [B, Q, P]
    return ((x @ h.mT) * same) @ a


def routed_bias(g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Rows e of a per-expert bias update g ``[B, E, out]``: e ``[B, Q]`` → ``[B, Q, out]``."""
    return g.gather(1, e[..., None].expand(*e.shape, g.shape[-1]))


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lookup_delta(term, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ΔW for one term: ids ``[B, Q]`` → ``[B, Q, in]``."""
    if isinstance(term, LowRank):
        index = ids[:, None, :].expand(-1, term.a.shape[1], -1)  # [B, R, Q]
        return term.a.gather(-1, index).mT @ term.h
    if isinstance(term, Rows):
        match = (ids[:, :, None] == term.ids[:, None, :]).to(term.d.dtype)  # [B, Q, R]
        return match @ term.d
    raise TypeError(f"a {type(term).__name__} term cannot update an embedding table")


def vector_delta(terms) -> torch.Tensor | None:
    """Sum of Dense terms ``[B, *shape]`` (None when there are none)."""
    total = None
    for t in terms:
        total = t.g if total is None else total + t.g
    return total


def detach(term):
    """The term as a constant (first-order inner steps)."""
    if isinstance(term, LowRank):
        return LowRank(term.a.detach(), term.h.detach())
    if isinstance(term, Rows):
        return Rows(term.ids, term.d.detach())
    if isinstance(term, Routed):
        return Routed(term.a.detach(), term.h.detach(), term.e)
    return Dense(term.g.detach())
