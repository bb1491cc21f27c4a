"""The fast-weights engine: exact, batched inner SGD steps that never build θ'.

For a linear layer the inner gradient over a task's context tokens is
``G = Σ_t d_t h_t^T`` (h: the layer's input, d = dL_inner/dy), so the adapted
layer's output on a query is ``x W^T - η (x H^T) D``. Forward hooks add such
corrections (see ``terms``) to every module that holds an inner
parameter; D comes from ``torch.autograd.grad`` of the inner loss w.r.t. the
modules' outputs (with ``create_graph`` for the second order), so the inner step
never writes parameter ``.grad`` and the outer backward is the only backward
into the parameters. Design notes: ``docs/fastweights.md``.

Covered module kinds: ``nn.Linear`` (weight, bias; includes peft's lora_A/lora_B
and base layers, and Falcon's subclass: ``models.LINEARS``), transformers ``Conv1D``,
``nn.Embedding`` (also tied to an LM head: the cross terms are included; also scaled,
``models.embedding_scale``: Gemma's, BioGPT's; also subclasses whose forward derives the
ids, as OPT's learned positions do: ``Lookup`` takes them from the table lookup),
``nn.LayerNorm`` and the scales of the norms of the styles in ``models.NORMS``
(``(offset + weight) * n(x)``: Llama's, Gemma's, OLMo-2's RMSNorms, ..., Cohere's and
Nemotron's LayerNorms), transformers' mixture-of-experts layers (``experts``: each expert's
update is low-rank over the context's tokens routed to it, ``Routed``) and any other module
whose forward reads its ``[out, in]`` weight only through one ``F.linear`` call (the routers of
those layers, ``nn.Linear`` subclasses with their own forward: ``LinearCall`` adapts that call),
attention sinks broadcast as one ``[1, H, ...]`` view over the rows (``SinkCall``).
A parameter also held by a module of another kind is adapted where the known module reads it
(the probe refuses it if the other holder reads it too). Anything else makes ``ineligibility``
return a reason. Inputs are grouped by task from ``[rows, tokens, ...]``, or from tokens
flattened row by row (OPT's MLP), which ``probe`` verifies (``ROW_MAJOR``).

The engine's passes run gated MLPs (SwiGLU, GeGLU) and the RMS normalisation through
``fused``, and Llama-style attention through ``attention`` and its rotary embedding through
``rotary`` (Functions with hand-written first and second derivatives: a leaner second-order
graph; ``ops.ATTENTION`` selects the attention). Norms whose output a hook rebuilds from the
input skip their own forward (``fused.skipped_norms``).

This module is the engine (``adapt``, ``logits``); its parts:

* ``terms``: the update terms (low-rank, row, dense, routed) and their corrections;
* ``uses``: the modules that hold the inner parameters (``find_uses``), their inputs' layout;
* ``probe``: whether the engine is exact for a model (``ineligibility``, ``probe``);
* ``calls``: torch-function modes that watch a module's forward from the inside;
* ``hooks``: the forward hooks of every pass (``Hooks``) and the new terms of a step;
* ``seed``: the inner loss's gradient w.r.t. the logits (``NextTokenSeed``);
* ``ops``: which attention and fused ops the passes run (``ATTENTION``, ``FUSED_OPS``);
* ``checkpoint``: ``checkpoint_inner`` modes and the "forward" mode's recomputation;
* ``blocks``: the "vjp" mode, the inner backward checkpointed per decoder block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from raymeta.data.batches import Tokens
from raymeta.meta import fused
from raymeta.meta.fastweights.blocks import inner_step_blocks
from raymeta.meta.fastweights.checkpoint import Replay, checkpoint_mode, checkpointed_blocks
from raymeta.meta.fastweights.hooks import Hooks, new_terms
from raymeta.meta.fastweights.ops import engine_ops
from raymeta.meta.fastweights.probe import ineligibility
from raymeta.meta.fastweights.seed import next_token_seed
from raymeta.meta.fastweights.terms import detach
from raymeta.meta.fastweights.uses import Ineligible, Use, find_uses
from raymeta.meta.inner import InnerSpec, call, check_tasks

__all__ = ["FastState", "Ineligible", "adapt", "checkpoint_mode", "ineligibility", "logits"]


@dataclass
class FastState:
    """What ``logits`` needs: the hooked modules, the update terms per parameter name
    (each ``[B, ...]``, see ``terms``), the task count and the first inner loss ``[B]``."""

    uses: list[Use]
    terms: dict[str, list] = field(default_factory=dict)
    tasks: int = 0
    inner_loss: torch.Tensor | None = None


def inner_forward(model, uses, terms, contexts: Tokens, tasks: int, checkpoint: bool):
    """Logits ``[B*n, Tc, V]`` of the contexts with ``terms`` applied, and the Records."""
    rows, length = contexts.input_ids.shape
    snapshot = {k: list(v) for k, v in terms.items()}
    replay = functools.partial(Replay, model, uses, snapshot, tasks, rows, length)
    hooks = Hooks(uses, snapshot, tasks, rows, length, inner=True, record=True)
    ckpt = checkpointed_blocks(model, checkpoint, replay)
    with hooks, ckpt, engine_ops(model):
        logits = call(model, contexts)
    return logits, hooks.records


def adapt(model, contexts: Tokens, spec: InnerSpec) -> FastState:
    """``spec.steps`` SGD steps per task on its contexts ``[B, n, Tc]`` (kept as update terms;
    the fused ops compiled or not as ``spec.compile_ops`` says, from here on)."""
    try:
        uses = find_uses(model, spec.names)
    except Ineligible as e:
        raise ValueError(f"fast-weights engine: {e}") from None
    b, n, tc = contexts.input_ids.shape
    flat = contexts.flat()
    state = FastState(uses, {}, b)
    fused.COMPILE = spec.compile_ops  # (read again by this step's outer backward)
    mode = checkpoint_mode(spec.checkpoint_inner)
    with torch.enable_grad():
        for k in range(spec.steps):
            if mode == "vjp":
                pairs, loss = inner_step_blocks(
                    model, uses, state.terms, flat, contexts.labels, b, spec.lr, spec.second_order
                )
                if k == 0:
                    state.inner_loss = loss
                for name, term in pairs:
                    term = term if spec.second_order else detach(term)
                    state.terms.setdefault(name, []).append(term)
                continue
            logits, records = inner_forward(model, uses, state.terms, flat, b, mode == "forward")
            # seed = -η dL_inner/dlogits (exact, lean; see next_token_seed): every D below
            # comes out already scaled by -η, so no layer's D is copied to scale it
            seed, loss = next_token_seed(logits, contexts.labels, -spec.lr)
            if k == 0:
                state.inner_loss = loss
            ds = torch.autograd.grad(
                [logits],
                [r.out for r in records],
                grad_outputs=[seed],
                create_graph=spec.second_order,
                allow_unused=True,
            )
            for rec, d in zip(records, ds):
                if d is None:
                    continue
                for name, term in new_terms(rec, d):
                    term = term if spec.second_order else detach(term)
                    state.terms.setdefault(name, []).append(term)
            del logits, seed, loss, records, ds
    return state


def logits(model, state: FastState, queries: Tokens) -> torch.Tensor:
    """Adapted logits ``[B, m, T, V]`` of queries ``[B, m, T]`` (row b uses task b's θ')."""
    check_tasks(queries, state.tasks)
    b, m, t = queries.input_ids.shape
    with Hooks(state.uses, state.terms, b, b * m, t), engine_ops(model):
        out = call(model, queries.flat())
    return out.view(b, m, t, -1)
