"""The algebra of the fast-weights engine: inner gradients as per-task low-rank terms.

Every weight is seen in "linear layout" ``[out, in]`` (``y = x W^T``; an embedding
table ``[V, d]`` is out = V, in = d; a transformers Conv1D ``[in, out]`` is
transposed). One inner step's update ``-η G`` of a weight is a sum of terms, each
already scaled by ``-η``, with R = the task's context tokens (n·Tc):

* ``LowRank(a, h)``: ``-η G = Σ_r a_r h_r^T`` with a ``[B, R, out]``, h ``[B, R, in]``
  (a linear layer: a = -η dL/dy, h = its input);
* ``Rows(ids, d)``: ``-η G = Σ_r onehot(ids_r) d_r^T`` with ids ``[B, R]``, d ``[B, R, in]``
  (an embedding lookup: d = -η dL/d(looked-up rows));
* ``Dense(g)``: ``-η G = g`` with g ``[B, *shape]`` (biases and norm scales).

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


def linear_delta(term, x: torch.Tensor, out: int) -> torch.Tensor:
    """``x ΔW^T`` for one term: x ``[B, Q, in]`` → ``[B, Q, out]``."""
    if isinstance(term, LowRank):
        return (x @ term.h.mT) @ term.a
    if isinstance(term, Rows):
        scores = x @ term.d.mT  # [B, Q, R]
        index = term.ids[:, None, :].expand_as(scores)
        return scores.new_zeros(*x.shape[:2], out).scatter_add(-1, index, scores)
    raise TypeError(f"a {type(term).__name__} term cannot update a matrix")


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
    return Dense(term.g.detach())
