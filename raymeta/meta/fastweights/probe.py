"""Whether the fast-weights engine is exact for a model (``ineligibility``): the module kinds
(``uses.find_uses``), then one probe forward of ``PROBE_ROWS`` × ``PROBE_LENGTH`` tokens that
watches what the hooks assume (``probe``: parameters read only where their modules are
called, inputs laid out by row and token, outputs of the formula the update assumes, decoder
blocks that checkpointing can recompute)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch._subclasses.fake_tensor
import torch.nn.functional as F
import torch.utils._pytree

from raymeta.data.batches import Tokens
from raymeta.meta import fused
from raymeta.meta.experts import run_experts
from raymeta.meta.fastweights.calls import (
    METADATA_CALLS,
    LinearCall,
    Lookup,
    SinkCall,
    started,
    stopped,
)
from raymeta.meta.fastweights.checkpoint import (
    checkpoint_mode,
    decoder_blocks,
    differentiable_inputs,
)
from raymeta.meta.fastweights.hooks import Hooks
from raymeta.meta.fastweights.uses import (
    ROW_MAJOR,
    Ineligible,
    Use,
    find_uses,
    flattened,
    layout_problem,
)
from raymeta.meta.inner import InnerSpec, call
from raymeta.models import embedding_scale


def ineligibility(model, spec: InnerSpec) -> str | None:
    """None when the engine is exact for ``model`` and ``spec.names``, else why not."""
    try:
        uses = find_uses(model, spec.names)
    except Ineligible as e:
        return str(e)
    try:
        found = probe(model, uses)
    except Exception as e:  # a model the probe does not know how to call: no claim of exactness
        return f"its eligibility probe (a forward of 2 x 3 tokens) failed: {type(e).__name__}: {e}"
    if found.reason:
        return found.reason
    if checkpoint_mode(spec.checkpoint_inner) != "vjp":
        return None
    if found.block_output:
        return (
            f"its decoder blocks return a {found.block_output}, not a tensor, which "
            "checkpoint_inner='vjp' needs (checkpoint_inner='forward' checkpoints such blocks)"
        )
    if found.block_inputs:
        return (
            f"its decoder blocks {found.block_inputs}, which checkpoint_inner='vjp' cannot "
            "recompute (checkpoint_inner='forward' checkpoints such blocks)"
        )
    return None


PROBE_ROWS, PROBE_LENGTH = 2, 3
"""The probe forward's token ids ``[rows, length]`` (two numbers a layout check tells apart)."""


@dataclass
class Findings:
    """What the eligibility probe's forward saw."""

    reason: str | None = None
    """Why the hooks would miss part of an inner parameter's effect or could not group a
    module's inputs by task (None: neither)."""
    block_output: str | None = None
    """The type of a decoder block's output when it is not a tensor (tuple-returning blocks)."""
    block_inputs: str | None = None
    """What, first in call order, the decoder blocks get besides the previous block's output:
    "get a differentiable input besides their hidden states (per_layer_input)" (Gemma 4's
    per-layer inputs, key/value states shared across layers), "are not chained (the input of
    ... is not the output of ...)" (blocks run in cycles, as HRM's; sliced hidden states; a
    list that is not one of blocks, as the feed-forward layers the engine finds in XLM)."""


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``probe`` per model, per tuple of inner parameter names (one probe forward each)."""


class ParameterReads(torch.overrides.TorchFunctionMode):
    """Records the first torch call reading each watched parameter's values outside the modules
    that own it (``stack``: the modules whose forward is running, innermost last)."""

    def __init__(self, watched: dict[int, tuple[str, frozenset[int]]]):
        super().__init__()
        self.watched = watched  # id(parameter) -> (name, ids of the modules holding it)
        self.stack: list[int] = []
        self.strays: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) not in METADATA_CALLS:
            for a in torch.utils._pytree.tree_leaves((args, kwargs)):
                hit = self.watched.get(id(a)) if isinstance(a, torch.Tensor) else None
                if hit is not None and (not self.stack or self.stack[-1] not in hit[1]):
                    where = getattr(func, "__qualname__", None) or repr(func)
                    self.strays.setdefault(hit[0], where)
        return func(*args, **kwargs)


def probe(model, uses: list[Use]) -> Findings:
    """One forward of ``PROBE_ROWS`` × ``PROBE_LENGTH`` tokens watching what the engine assumes
    (cached per model and inner parameters):

    * the engine adds each inner parameter's update where the modules holding it are called;
      a forward that reads one of their weights elsewhere (``F.linear(x, self.proj.weight)``
      in a parent module, a head built on ``embed.weight``) would leave that read unadapted
      (``ParameterReads`` finds such reads);
    * each such module's input must be laid out by row and token (``layout_problem``);
    * each such module's output must be what the engine's algebra assumes of its kind
      (``misfit``: e.g. ``(offset + weight) * normalise(x) + bias`` for a norm);
    * the decoder blocks' output type, other differentiable inputs and chaining
      (``checkpoint_inner="vjp"`` needs tensors in and out, each block's input the output of
      the block called before it).

    The forward runs with gradients on and the inner parameters requiring grad (as the
    engine's update terms make them), so that what depends on them shows."""
    table = model.get_input_embeddings()
    if table.weight.is_meta or torch._subclasses.fake_tensor.is_fake(table.weight):
        return Findings()  # shapes only (bench/op_census.py): nothing to probe
    watched: dict[int, tuple[str, frozenset[int]]] = {}  # find_uses made a Use per holder
    for u in uses:
        for attr, name in u.params():
            p = getattr(u.module, attr)
            _, held = watched.get(id(p), (name, frozenset()))
            watched[id(p)] = (name, held | {id(u.module)})
    names = tuple(sorted(name for name, _ in watched.values()))
    cache = _PROBES.setdefault(model, {})
    if names in cache:
        return cache[names]
    reads = ParameterReads(watched)
    used = {id(u.module): u for u in uses}
    blocks = {id(b) for b in decoder_blocks(model)}
    paths = {id(m): p for p, m in model.named_modules() if id(m) in blocks}
    algebra = Hooks(uses, {}, 1, 1, 2)  # for its ``normalised`` (busy while it calls a norm)
    problems: list[str] = []
    outputs: list[str] = []
    inputs: list[str] = []
    last: list = [None, ""]  # the output of the block called last, its path
    lookups: dict[int, Lookup | LinearCall | SinkCall] = {}  # a lookup / call / sinks module's
    sink_calls: dict[int, tuple] = {}  # a sinks module's call (args, kwargs), for sink_problem
    flat: list[tuple[Use, torch.Tensor]] = []  # calls on flattened tokens, in order

    def block_called(m, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if last[0] is not None and hidden is not last[0]:
            inputs.append(
                f"are not chained (the input of {paths[id(m)]} is not the output of {last[1]})"
            )
        elif extra := differentiable_inputs(m.forward, args, kwargs):
            inputs.append(f"get a differentiable input besides their hidden states ({extra[0]})")

    def laid_out(use: Use, x) -> None:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if shape is None:
            problems.append(f"module {use.path} is called without its input as a tensor")
        elif flattened(use, shape, PROBE_ROWS, PROBE_LENGTH):
            flat.append((use, x.detach().clone()))  # its row order: checked below
        elif problem := layout_problem(use, shape, PROBE_ROWS, PROBE_LENGTH):
            problems.append(problem)

    def enter(m, args, kwargs):
        reads.stack.append(id(m))
        if id(m) in blocks and not inputs:
            block_called(m, args, kwargs)
        use = used.get(id(m))
        if use is not None and use.kind == "sinks":
            if not algebra.busy:  # (busy: sink_problem's own calls of it)
                lookups[id(m)] = started(SinkCall(m))
                sink_calls[id(m)] = (args, kwargs)
        elif use is not None and (use.lookup or use.call):
            lookups[id(m)] = started((Lookup if use.lookup else LinearCall)(m))
        elif use is not None and not algebra.busy and not problems:
            laid_out(use, args[0] if args else None)

    def leave(m, args, out):  # returns None: the module's output stays
        use = used.get(id(m))
        x, problem = args[0] if args else None, None
        if use is not None and use.kind == "sinks" and not algebra.busy:
            _, problem = stopped(lookups.pop(id(m))).found(use)
            call_args, call_kwargs = sink_calls.pop(id(m))
            if not problem and not problems:
                problem = sink_problem(algebra, use, call_args, call_kwargs, out)
        elif use is not None and (use.lookup or use.call):  # their call's input: the ids, x
            x, problem = stopped(lookups.pop(id(m))).found(use)
        if use is not None and not algebra.busy and not problems:
            if problem:
                problems.append(problem)
            elif use.lookup or use.call:
                laid_out(use, x)
        if use is not None and not algebra.busy and not problems:
            with torch.no_grad():
                problems.extend(misfit(algebra, use, x, out, args))
        if id(m) in blocks:
            last[:] = [out if isinstance(out, torch.Tensor) else None, paths[id(m)]]
            if last[0] is None and not outputs:
                outputs.append(type(out).__name__)
        reads.stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(m.register_forward_hook(leave, always_call=True))
    # (shape, not num_embeddings: peft's LoRA wrapper of an embedding has no such attribute)
    n = PROBE_ROWS * PROBE_LENGTH
    ids = torch.arange(n, device=table.weight.device).view(PROBE_ROWS, PROBE_LENGTH)
    ids = ids % table.weight.shape[0]
    frozen = [p for p in model.parameters() if id(p) in watched and not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad(), reads, fused.eager():  # (the mode is not traced)
            call(model, Tokens(ids, torch.ones_like(ids)))  # as the engine's passes call it
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    if flat and not problems:
        problems.extend(row_order_problems(model, flat, ids))
    reason = problems[0] if problems else None
    if reads.strays:
        name, where = next(iter(reads.strays.items()))
        reason = (
            f"inner parameter {name} is read outside the module that holds it (by a call to "
            f"{where} in the model's forward), where the engine's update would not reach it"
        )
    found = Findings(reason, outputs[0] if outputs else None, inputs[0] if inputs else None)
    cache[names] = found
    return found


def row_order_problems(model, flat: list[tuple[Use, torch.Tensor]], ids) -> list[str]:
    """[why] one of the probe's calls on flattened tokens (``flat``: (Use, input) in call
    order, from a forward of ``ids``) is not row-major, else [] (and the modules go into
    ``ROW_MAJOR``). A second forward changes the last row's tokens: of a row-major input, only
    the last row's block changes."""
    again: list[torch.Tensor] = []
    uses = {id(u.module): u for u, _ in flat}
    calls: dict[int, LinearCall] = {}

    def seen(x, use: Use):
        if isinstance(x, torch.Tensor) and flattened(use, tuple(x.shape), *ids.shape):
            again.append(x.detach().clone())

    def before(m, args):
        if uses[id(m)].call:  # its F.linear call's input
            calls[id(m)] = started(LinearCall(m))
        else:
            seen(args[0] if args else None, uses[id(m)])

    def after(m, args, out):
        if id(m) in calls:
            seen(stopped(calls.pop(id(m))).found(uses[id(m)])[0], uses[id(m)])

    changed = ids.clone()
    changed[-1] = (changed[-1] + 1) % model.get_input_embeddings().weight.shape[0]
    handles = [u.module.register_forward_pre_hook(before) for u in uses.values()]
    handles += [u.module.register_forward_hook(after, always_call=True) for u in uses.values()]
    try:
        with torch.no_grad():
            call(model, Tokens(changed, torch.ones_like(changed)))
    finally:
        for h in handles:
            h.remove()
    if len(again) != len(flat):
        return [
            f"module {flat[0][0].path} and other modules on flattened tokens are called "
            f"{len(again)} times in a second probe forward, {len(flat)} in the first"
        ]
    for (use, first), second in zip(flat, again):
        if problem := row_order_problem(use, first, second):
            return [problem]
    ROW_MAJOR.update(use.module for use, _ in flat)
    return []


def row_order_problem(use: Use, first: torch.Tensor, second: torch.Tensor) -> str | None:
    """Why module ``use``'s flattened probe inputs (``first``; ``second``: the same call with
    the probe's last row of tokens changed) are not in row-major order (None: they are)."""
    a = first.reshape(PROBE_ROWS, PROBE_LENGTH, -1).double()
    b = second.reshape(PROBE_ROWS, PROBE_LENGTH, -1).double()
    kept = float((a[:-1] - b[:-1]).abs().max())
    moved = float((a[-1] - b[-1]).abs().max())
    if moved > 0 and kept <= 1e-3 * moved:
        return None
    return (
        f"module {use.path} ({type(use.module).__name__}) gets its tokens flattened to "
        f"{tuple(first.shape)}, and changing the probe's last row of tokens "
        + ("changed other rows' part of that input" if kept > 0 else "left that input unchanged")
        + ": the engine cannot tell that it is row-major, so it cannot group it by task"
    )


def sink_problem(algebra: Hooks, use: Use, args: tuple, kwargs: dict, out) -> str | None:
    """Why each row of attention module ``use`` would not see its own sinks when the engine
    broadcasts one row of sinks per batch row (``SinkCall``), or None: called again on its
    probe inputs (``args``, ``kwargs``; ``out`` its output) with every row's sinks as they are,
    the output must be the same; with the last row's sinks raised by 1, that row's output alone
    must change."""
    m = use.module
    first = (out if isinstance(out, torch.Tensor) else out[0]).detach()
    heads = m.sinks.shape[0]

    def again(shift: torch.Tensor) -> torch.Tensor:
        def per_row(view):
            rows = view.expand(PROBE_ROWS, *view.shape[1:])
            return rows + shift.view(PROBE_ROWS, heads, *[1] * (view.dim() - 2)).to(view.dtype)

        mode = started(SinkCall(m, per_row))
        algebra.busy = True
        try:
            with torch.no_grad():
                y = m(*args, **kwargs)
        finally:
            stopped(mode)
            algebra.busy = False
        return y if isinstance(y, torch.Tensor) else y[0]

    shift = torch.zeros(PROBE_ROWS, heads, device=m.sinks.device)
    same = again(shift)
    shift[-1] = 1.0
    moved = again(shift)
    where = f"module {use.path} ({type(m).__name__})"
    if same.shape != first.shape or first.shape[0] != PROBE_ROWS:
        return f"{where} returns {tuple(first.shape)}, not one row per batch row"
    scale = float(first.double().abs().max()) or 1.0
    tol = 0.1 if first.dtype in (torch.float16, torch.bfloat16) else 1e-6
    kept = float((moved[:-1] - first[:-1]).double().abs().max())
    changed = float((moved[-1] - first[-1]).double().abs().max())
    if float((same - first).double().abs().max()) <= tol * scale and kept <= 1e-3 * changed > 0:
        return None
    return (
        f"{where} does not give each row the output of its own sinks when they are broadcast "
        "one row per batch row: the engine cannot adapt them"
    )


def formula(use: Use) -> str:
    """What the engine's update assumes module ``use`` computes (``misfit`` checks it)."""
    if use.kind == "norm":
        scale = f"({use.offset:g} + weight)" if use.offset else "weight"
        return f"{scale} * normalise(x) + bias"
    if use.kind == "embedding":
        return "W[ids]" if embedding_scale(use.module) is None else "embed_scale * W[ids]"
    if use.kind == "experts":
        return "its experts class's layout (experts.run_experts)"
    return "x W^T + b" if use.kind == "linear" else "x W + b"


def misfit(algebra: Hooks, use: Use, x: torch.Tensor, out: torch.Tensor, args=()) -> list[str]:
    """[why] when module ``use``'s output ``out`` on ``x`` (its call's ``args``) is not
    ``formula(use)`` (e.g. a forward patched on the instance that scales by ``1 + weight``),
    with the engine's normalisation for a norm and the module's ``embedding_scale`` (else 1),
    else []. A ``Use.call`` module's one ``F.linear`` call is that formula by construction."""
    m = use.module
    if use.call or use.kind == "sinks":  # (sinks: ``sink_problem``)
        return []
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if use.kind == "experts":  # (hidden [N, d], top_k_index, top_k_weights): as one task
        if len(args) != 3 or x.dim() != 2:
            return [f"module {use.path} ({type(m).__name__}) is not called as experts are"]
        w = b = None
        expected = run_experts(m, x[None], args[1], args[2], lambda name, h, e, y: y)
    elif use.kind == "norm":
        expected = (w + use.offset) * algebra.normalised(use, x)
    elif use.kind == "embedding":
        expected = F.embedding(x, w, m.padding_idx)
        scale = embedding_scale(m)
        expected = expected if scale is None else expected * scale
    elif use.kind == "linear":
        expected = F.linear(x, w)
    else:  # conv1d: weight [in, out]
        expected = x @ w
    if b is not None:
        expected = expected + b
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)
        return [
            f"module {use.path} ({type(m).__name__}) returns {got}, not {tuple(expected.shape)}"
        ]
    err = float((out.float() - expected.float()).norm() / out.float().norm().clamp_min(1e-30))
    tol = 0.1 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if err <= tol:
        return []
    return [
        f"module {use.path} ({type(m).__name__}) does not compute {formula(use)} "
        f"(relative difference {err:.2g} on a probe input), which the engine's update assumes"
    ]
