"""The inner loss's gradient w.r.t. the logits, ``-η dL/dz``, as one lean node
(``NextTokenSeed``): every layer's D of an inner step comes out of it already scaled."""

from __future__ import annotations

import torch

from raymeta.meta.fused import compilable

SEED_CHUNK = 2**26
"""Elements of one chunk of float32 work over the vocabulary (256 MiB)."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def row_chunks(z: torch.Tensor) -> list[slice]:
    """Slices of z's rows ``[M, V]``, each of at most ``SEED_CHUNK`` elements (one row at least)."""
    rows = max(1, SEED_CHUNK // z.shape[-1])
    return [slice(lo, lo + rows) for lo in range(0, z.shape[0], rows)]


class NextTokenSeed(torch.autograd.Function):
    """``seed = w ⊙ (softmax(z) - onehot(y))`` per row of z ``[M, V]`` and the rows' NLL ``[M]``.

    This is ``w ⊙ dNLL/dz``; its derivative is ``w ⊙ (p ⊙ g - p (p·g))``. Both are taken in
    float32 (or z's dtype if wider) over row chunks, so no ``[M, V]`` float32 tensor is
    kept, and the second-order graph is this one node holding z (instead of the
    upcast, the log-softmax and their backward's intermediates)."""

    @staticmethod
    def forward(ctx, z, y, w):
        acc = _acc_dtype(z.dtype)
        w = w.to(acc)  # (the bodies compute in w's dtype)
        seed = torch.empty_like(z)
        nll = torch.empty(z.shape[0], dtype=acc, device=z.device)
        for s in row_chunks(z):
            seed_rows(z[s], y[s], w[s], seed[s], nll[s])
        ctx.save_for_backward(z, w)
        ctx.mark_non_differentiable(nll)
        return seed, nll

    @staticmethod
    @torch.autograd.function.once_differentiable  # the outer backward is the last one
    def backward(ctx, g, _unused):
        z, w = ctx.saved_tensors
        out = torch.empty_like(z)
        for s in row_chunks(z):
            seed_rows_vjp(z[s], g[s], w[s], out[s])
        return out, None, None


@compilable
def seed_rows(z, y, w, seed, nll):
    """``NextTokenSeed``'s value on rows z ``[m, V]``, labels y ``[m]``, weights w ``[m]``
    (acc): writes the seed into ``seed`` ``[m, V]`` (z's dtype) and the NLL into ``nll``
    ``[m]`` (acc)."""
    log_p = torch.log_softmax(z, -1, dtype=w.dtype)
    yc = y[:, None]
    nll.copy_(log_p.gather(-1, yc)[:, 0]).neg_()
    if torch.compiler.is_compiling():  # the one-hot as a comparison: all one generated kernel
        hit = torch.arange(z.shape[-1], device=z.device) == yc  # (a scatter would be another)
        torch.mul(log_p.exp() - hit.to(w.dtype), w[:, None], out=seed)
        return
    p = log_p.exp_()  # eagerly: in place, the one-hot a scatter (one element a row)
    p.scatter_add_(-1, yc, torch.full_like(yc, -1, dtype=w.dtype))
    torch.mul(p, w[:, None], out=seed)


@compilable
def seed_rows_vjp(z, g, w, out):
    """``NextTokenSeed``'s VJP on rows z ``[m, V]`` for g ``[m, V]``: writes ``w ⊙ (p ⊙ g -
    p (p·g))`` into ``out`` ``[m, V]`` (z's dtype), computed in w's dtype (acc)."""
    p = torch.softmax(z, -1, dtype=w.dtype)
    pg = p * g  # in acc (g promoted as read)
    pg.addcmul_(p, pg.sum(-1, keepdim=True), value=-1)  # p ⊙ (g − p·g)
    torch.mul(pg, w[:, None], out=out)


def next_token_seed(logits: torch.Tensor, labels: torch.Tensor, scale: float):
    """``scale · dL/dlogits`` ``[rows, Tc, V]`` and the per-task inner loss ``[B]`` (detached).

    L = Σ_b context_loss (the mean next-token NLL over each task's scored tokens, as in
    ``inner.context_loss``); labels ``[B, n, Tc]``, logits ``[B*n, Tc, V]``."""
    b = labels.shape[0]
    v = logits.shape[-1]
    target = torch.full_like(labels, -100)
    target[..., :-1] = labels[..., 1:]
    mask = target != -100
    count = mask.reshape(b, -1).sum(-1).clamp(min=1)
    acc = _acc_dtype(logits.dtype)
    w = mask.to(acc) * (scale / count.to(acc)).view(b, *[1] * (labels.dim() - 1))
    seed, nll = NextTokenSeed.apply(
        logits.reshape(-1, v), target.clamp(min=0).reshape(-1), w.reshape(-1)
    )
    loss = (nll.view(b, -1) * mask.reshape(b, -1)).sum(-1) / count
    return seed.view(logits.shape), loss
