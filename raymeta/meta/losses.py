"""Token-level losses on logits (pure torch). Labels use -100 for unscored positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift(logits: torch.Tensor, labels: torch.Tensor):
    """Align next-token predictions: logits ``[..., T, V]`` → ``[..., T-1, V]``, labels ``[..., T-1]``."""
    return logits[..., :-1, :], labels[..., 1:]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL of the scored tokens and their count.

    logits ``[*lead, T, V]``, labels ``[*lead, T]`` (unshifted) → two tensors ``[*lead]``."""
    lg, lab = shift(logits, labels)
    mask = lab != IGNORE
    logp = F.log_softmax(upcast(lg), dim=-1)
    picked = logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * mask).sum(-1)
    return nll, mask.sum(-1)


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL over scored tokens: ``[*lead]`` (0 for rows with nothing scored)."""
    nll, n = token_nll(logits, labels)
    return nll / n.clamp(min=1)


def group_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all scored tokens of each group: logits ``[B, n, T, V]`` → ``[B]``.

    This is the inner step's loss: the n contexts of a task are one language-modelling batch."""
    nll, n = token_nll(logits, labels)
    return nll.sum(-1) / n.sum(-1).clamp(min=1)


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[*lead, T]``: positions whose logits predict a scored token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[..., :-1] = labels[..., 1:] != IGNORE
    return mask


def kl_teacher_student(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per position: ``[N, V]`` log-probs and logits → ``[N]`` (≥ 0)."""
    s = F.log_softmax(upcast(student_logits), dim=-1)
    t = upcast(teacher_logp)
    return (t.exp() * (t - s)).sum(-1)
