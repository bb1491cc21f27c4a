"""One meta step's loss: inner adaptation on the contexts, outer objective on the queries.

    loss = mean_b L_outer(θ'_b) + λ · L_LM(θ),   θ'_b = θ - η ∇ L_inner(c_b; θ)  (k times)

The caller owns the optimizer: it calls ``loss.backward()`` (or a DeepSpeed
engine's backward), clips and steps. Per-task losses are averaged over the
tasks given; with data parallelism the reduction over workers averages them
again, which gives the global mean when every worker holds the same number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymeta.data.batches import Tokens, extend
from raymeta.meta.decode import greedy_decode, model_forward
from raymeta.meta.engines import Engine
from raymeta.meta.inner import InnerSpec, double_backward_attention
from raymeta.meta.objectives import lc_loss, lg_loss, lm_loss, teacher_logprobs


@dataclass
class MetaBatch:
    """Tensors of B tasks, each with n contexts updated on together and m = n queries.

    contexts ``[B, n, Tc]`` (labels on every real token); queries ``[B, m, T]``
    (query + gold response + EOS, labels on response + EOS); student_prompts
    ``[B*m, Tq]`` (query alone) and teacher_prompts ``[B*m, Tt]`` (context(s) +
    query), both right-padded, for LC."""

    contexts: Tokens
    queries: Tokens
    student_prompts: Tokens
    teacher_prompts: Tokens

    @property
    def size(self) -> int:
        return self.contexts.input_ids.shape[0]

    def to(self, device) -> MetaBatch:
        return MetaBatch(*(t.to(device) for t in vars(self).values()))


@dataclass
class LCTargets:
    """The teacher's side of LC for one batch: students ``[B, m, T]`` and teacher log-probs ``[P, V]``."""

    students: Tokens
    teacher_logp: torch.Tensor


@torch.no_grad()
def lc_targets(teacher, batch: MetaBatch, max_answer_tokens: int, eos_id, pad_id) -> LCTargets:
    """Greedy-decode the teacher's answers â to c + q and its distributions along them."""
    answers = greedy_decode(
        model_forward(teacher), batch.teacher_prompts, max_answer_tokens, eos_id, pad_id
    )
    scored = extend(batch.teacher_prompts, answers, pad_id)
    students = extend(batch.student_prompts, answers, pad_id)
    b, m = batch.queries.input_ids.shape[:2]
    return LCTargets(students.view_lead(b, m), teacher_logprobs(teacher, scored))


def meta_loss(
    model,
    engine: Engine,
    spec: InnerSpec,
    batch: MetaBatch,
    objective: str,
    lc: LCTargets | None = None,
    lm_texts: Tokens | None = None,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The outer loss of one meta-batch and its parts (floats, for logging)."""
    with double_backward_attention():
        state = engine.adapt(model, batch.contexts, spec)
        if objective == "LG":
            per_task = lg_loss(engine.logits(model, state, batch.queries), batch.queries)
        elif objective == "LC":
            if lc is None:
                raise ValueError("objective LC needs the teacher's targets (lc_targets)")
            per_task = lc_loss(
                engine.logits(model, state, lc.students), lc.students, lc.teacher_logp
            )
        else:
            raise ValueError(f"meta.objectives: unknown objective {objective!r}")
        outer = per_task.mean()
        stats = {"outer_loss": outer.item(), "inner_loss": state.inner_loss.mean().item()}
        loss = outer
        if lm_weight > 0 and lm_texts is not None:
            reg = lm_loss(model, lm_texts)
            loss = loss + lm_weight * reg
            stats["lm_loss"] = reg.item()
    stats["loss"] = loss.item()
    return loss, stats
