"""Outer objectives on adapted logits: LG (gold NLL), LC (KL to a prompted teacher), LM."""

from __future__ import annotations

import torch

from raymeta.data.batches import Tokens
from raymeta.meta.inner import call
from raymeta.meta.losses import (
    kl_teacher_student,
    mean_token_nll,
    scored_positions,
    upcast,
)


def lg_loss(adapted_logits: torch.Tensor, queries: Tokens) -> torch.Tensor:
    """Gold-label loss per task ``[B]``: mean over its m queries of the response's mean NLL.

    adapted_logits ``[B, m, T, V]``; queries ``[B, m, T]`` with labels on the response."""
    return mean_token_nll(adapted_logits, queries.labels).mean(-1)


@torch.no_grad()
def teacher_logprobs(teacher, scored: Tokens) -> torch.Tensor:
    """Teacher log-probabilities at the scored positions of ``scored`` ``[N, T]`` → ``[P, V]``."""
    logits = call(teacher, scored)
    return torch.log_softmax(upcast(logits[scored_positions(scored.labels)]), -1)


def lc_loss(
    adapted_logits: torch.Tensor, students: Tokens, teacher_logp: torch.Tensor
) -> torch.Tensor:
    """Learn-from-conditioning loss per task ``[B]``.

    For each query, the sum over answer positions j of KL(teacher(.|c+q+â_<j) ‖
    student(.|q+â_<j)); averaged over the task's m queries. ``students`` ``[B, m, T]``
    hold q + â with labels on â; ``teacher_logp`` ``[P, V]`` lists the teacher's
    distributions at the same positions in the same (row-major) order."""
    pos = scored_positions(students.labels)  # [B, m, T]
    kl = kl_teacher_student(teacher_logp, adapted_logits[pos])  # [P]
    per_pos = torch.zeros(pos.shape, dtype=kl.dtype, device=kl.device)
    per_pos[pos] = kl
    return per_pos.sum(-1).mean(-1)


def lm_loss(model, texts: Tokens) -> torch.Tensor:
    """Plain LM loss of θ (no adaptation): the mean over texts ``[N, T]`` of each text's
    mean token NLL (a mean over texts, so equal shares on W workers average to it)."""
    return mean_token_nll(call(model, texts), texts.labels).mean()
