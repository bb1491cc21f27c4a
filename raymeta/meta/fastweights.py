"""The fast-weights engine: exact, batched inner SGD steps that never build θ'.

For a linear layer the inner gradient over a task's context tokens is
``G = Σ_t d_t h_t^T`` (h: the layer's input, d = dL_inner/dy), so the adapted
layer's output on a query is ``x W^T - η (x H^T) D``. Forward hooks add such
corrections (see ``fastweights_terms``) to every module that holds an inner
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
return a reason. Inputs are
grouped by task from ``[rows, tokens, ...]``, or from tokens flattened row by row (OPT's
MLP), which ``probe`` verifies (``ROW_MAJOR``).

The engine's passes run gated MLPs (SwiGLU, GeGLU) and the RMS normalisation through
``fused``, and Llama-style attention through ``attention`` and its rotary embedding through
``rotary`` (Functions with hand-written first and second derivatives: a leaner second-order
graph; ``ATTENTION`` selects the attention). Norms whose output a hook rebuilds from the input skip
their own forward (``fused.skipped_norms``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch._subclasses.fake_tensor
import torch.nn.functional as F
import torch.utils._pytree
from torch import nn

from raymeta.data.batches import Tokens
from raymeta.meta import fused, rotary
from raymeta.meta.experts import parameter_names, projections, run_experts
from raymeta.meta.fastweights_terms import (
    Dense,
    LowRank,
    Routed,
    Rows,
    detach,
    linear_delta,
    lookup_delta,
    routed_bias,
    routed_delta,
    vector_delta,
)
from raymeta.meta.inner import InnerSpec, call, check_tasks, double_backward_attention
from raymeta.models import NormStyle, embedding_scale, is_linear, norm_style, normalise

ATTENTION: str | None = "fused"
"""Attention in the engine's passes. "fused" (default): ``raymeta.meta.attention`` (hand-written
first and second derivatives, matmuls in the model's dtype) for models whose attention modules
it knows (Llama-style); others keep their own. "eager": Hugging Face's eager attention for a
bf16/fp16 model whose own is SDPA. None: always the model's own (SDPA runs its math kernel,
the only one with double backward)."""


FUSED_OPS = True
"""Run gated MLPs (SwiGLU, GeGLU) and the RMS normalisation through ``fused`` in the engine's
passes (False: torch's own ops, for comparisons)."""


_ATTENTION_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``attention.modeling_modules`` per module (asked on every pass, and per block in "vjp" mode)."""


def fused_attention_modules(model) -> frozenset[str]:
    """The modeling modules whose attention the fused passes take over (empty: none; see
    ``attention.modeling_modules``), or empty when ``ATTENTION`` is not "fused"."""
    if ATTENTION != "fused":
        return frozenset()
    from raymeta.meta import attention

    found = _ATTENTION_MODULES.get(model)
    if found is None:
        found = _ATTENTION_MODULES[model] = attention.modeling_modules(model)
    return found


def engine_attention(model) -> str | None:
    """The attention implementation the engine's passes switch ``model`` to (None: keep)."""
    if fused_attention_modules(model):
        from raymeta.meta import attention

        return attention.register()
    p = next(model.parameters(), None)
    if ATTENTION == "eager" and p is not None and p.dtype in (torch.bfloat16, torch.float16):
        return "eager"
    return None


@contextlib.contextmanager
def attention_for(model):
    """While active, ``model``'s SDPA / eager attention is ``engine_attention(model)`` (and, with
    the fused attention, its rotary embedding is ``rotary.apply_rotary``)."""
    impl = engine_attention(model)
    if impl is None:
        yield
        return
    configs = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        old = getattr(c, "_attn_implementation_internal", None)
        if old in ("sdpa", "eager") and old != impl:
            configs[id(c)] = (c, old)
    for c, _ in configs.values():
        c._attn_implementation_internal = impl
    try:
        with rotary.patched_rotary(fused_attention_modules(model)):
            yield
    finally:
        for c, old in configs.values():
            c._attn_implementation_internal = old


@contextlib.contextmanager
def engine_ops(model):
    """While active, ``model`` runs the engine's ops: ``attention_for`` and, when ``FUSED_OPS``,
    ``fused.fused_mlps``."""
    mlps = fused.fused_mlps(model) if FUSED_OPS else contextlib.nullcontext()
    with attention_for(model), mlps:
        yield


class Ineligible(ValueError):
    """The fast-weights engine would not be exact for this model and these parameters."""


@dataclass
class Use:
    """A module holding inner parameters: its kind and the inner names of its weight and bias."""

    module: nn.Module
    path: str
    kind: str  # linear | conv1d | embedding | norm | experts | sinks
    weight: str | None = None
    bias: str | None = None
    style: NormStyle | None = None
    """A norm's arithmetic (``models.NORMS``); None for other kinds and ``nn.LayerNorm``."""
    lookup: bool = False
    """An embedding whose forward derives the ids itself (OPT's learned positions count them
    from the attention mask): the hooks take the ids from its table lookup (``Lookup``)."""
    call: bool = False
    """A linear module of unknown code (a mixture-of-experts router, an ``nn.Linear`` subclass
    with its own forward): its forward's one ``F.linear`` call on its weight is adapted
    (``LinearCall``)."""
    parts: dict[str, str] = field(default_factory=dict)
    """An experts module's inner parameters: attribute (``gate_up_proj``, ``down_proj``,
    ``*_bias``) → inner name; an attention module's ``sinks`` → inner name."""

    def params(self) -> list[tuple[str, str]]:
        """(attribute, inner name) of each inner parameter the module holds."""
        named = [("weight", self.weight), ("bias", self.bias), *self.parts.items()]
        return [(attr, name) for attr, name in named if name]

    @property
    def offset(self) -> float:
        """A norm's output is ``(offset + weight) · normalise(x) + bias`` (Gemma's RMSNorm: 1)."""
        return self.style.offset if self.style else 0.0


@dataclass
class FastState:
    """What ``logits`` needs: the hooked modules, the update terms per parameter name
    (each ``[B, ...]``, see fastweights_terms), the task count and the first inner loss ``[B]``."""

    uses: list[Use]
    terms: dict[str, list] = field(default_factory=dict)
    tasks: int = 0
    inner_loss: torch.Tensor | None = None


# ---------------------------------------------------------------------------
# eligibility
# ---------------------------------------------------------------------------


def module_kind(module: nn.Module) -> str | None:
    """linear / conv1d / embedding / norm / experts / sinks, or None for a module kind this
    engine does not know."""
    t = type(module)
    if is_linear(module):  # nn.Linear, or Falcon's subclass (its forward: the same formula)
        return "linear"
    if isinstance(module, nn.Embedding):  # a subclass's own forward: see derives_ids
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if plain else None
    if t is nn.LayerNorm:
        return "norm" if len(module.normalized_shape) == 1 else None
    if norm_style(module) is not None:
        return "norm"
    if t.__name__ == "Conv1D" and t.__module__.startswith("transformers."):
        return "conv1d"
    if projections(module) is not None:
        return "experts"
    sinks = module._parameters.get("sinks")
    if sinks is not None and sinks.dim() == 1:  # an attention's per-head sink logits
        return "sinks"
    if calls_linear(module):
        return "linear"
    return None


def calls_linear(module: nn.Module) -> bool:
    """Whether ``module`` may be a linear layer whose forward calls ``F.linear`` on its weight
    (a router, an ``nn.Linear`` subclass with its own forward): it holds a 2-D ``weight`` and
    maybe a 1-D ``bias`` (other parameters of it may not be inner: ``find_uses``). The probe
    then checks that its forward reads them through one ``F.linear`` call alone
    (``LinearCall``)."""
    w, b = module._parameters.get("weight"), module._parameters.get("bias")
    return w is not None and w.dim() == 2 and (b is None or b.dim() == 1)


def derives_ids(module: nn.Module) -> bool:
    """Whether an embedding's forward computes the ids it looks up (an ``nn.Embedding``
    subclass with its own forward, not a ``models.embedding_scale`` one: OPT's, BioGPT's and
    Bart's learned positions), so that its call's input is not the ids."""
    own = type(module).forward is not nn.Embedding.forward
    return own and embedding_scale(module) is None


def module_reason(model) -> str | None:
    """A model-wide reason to refuse (HF gradient checkpointing, peft variants), or None."""
    for path, m in model.named_modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            return (
                f"module {path or type(m).__name__} has Hugging Face gradient checkpointing on, "
                "whose recomputation would run without the fast-weights corrections "
                "(use InnerSpec.checkpoint_inner instead)"
            )
        if getattr(m, "lora_variant", None):
            return (
                f"peft layer {path} uses a LoRA variant (e.g. DoRA) that this engine does not model"
            )
    return None


def find_uses(model, names) -> list[Use]:
    """The modules holding the inner parameters ``names``; raises Ineligible with a reason."""
    reason = module_reason(model)
    if reason:
        raise Ineligible(reason)
    named = dict(model.named_parameters())
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((path, m, attr))
    uses: dict[int, Use] = {}
    for name in names:
        if name not in named:
            raise Ineligible(f"inner parameter {name} is not a parameter of the model")
        kinds = set()
        holders = [(path, m, attr, module_kind(m)) for path, m, attr in owners[id(named[name])]]
        # a holder of another kind beside a known one (a BERT head holding the bias that its
        # decoder reads) is left to the probe, which refuses the parameter if it reads it
        known = [(path, m, attr, kind) for path, m, attr, kind in holders if adapts(m, attr, kind)]
        if not known:
            path, m, attr, _ = holders[0]
            raise Ineligible(
                f"parameter {name} belongs to module {path} of kind {type(m).__name__} "
                f"(as {attr!r}), which the fast-weights engine does not know"
            )
        for path, m, attr, kind in known:
            use = uses.setdefault(
                id(m),
                Use(
                    m,
                    path,
                    kind,
                    style=norm_style(m),
                    lookup=kind == "embedding" and derives_ids(m),
                    call=kind == "linear" and not is_linear(m),
                ),
            )
            if kind in ("experts", "sinks"):
                use.parts[attr] = name
            else:
                setattr(use, attr, name)
            kinds.add(kind)
        if "conv1d" in kinds and len(kinds) > 1:
            raise Ineligible(f"parameter {name} is shared between a Conv1D and another layout")
    return list(uses.values())


def adapts(module: nn.Module, attr: str, kind: str | None) -> bool:
    """Whether the engine adapts ``module``'s parameter ``attr`` (module of ``kind``)."""
    if kind == "experts":
        return attr in parameter_names(module)
    if kind == "sinks":
        return attr == "sinks"
    return kind is not None and attr in (("weight",) if kind == "embedding" else ("weight", "bias"))


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


METADATA_CALLS = frozenset(
    {"__get__", "dim", "size", "numel", "stride", "data_ptr", "is_floating_point",
     "is_contiguous", "element_size", "is_complex", "__format__", "__repr__", "__hash__"}
)  # fmt: skip
"""Tensor calls that read a parameter's metadata, not its values (``.dtype`` is ``__get__``)."""

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
        with torch.enable_grad(), reads:
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
            f"inner parameter {name} is read outside the module that holds it (by a call to {where} in "
            "the model's forward), where the engine's update would not reach it"
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


def differentiable_inputs(forward, args: tuple, kwargs: dict) -> list[str]:
    """The names of the arguments (of ``forward``, a decoder block's) through which a call
    passes a tensor requiring grad other than the hidden states (the first argument, or
    ``hidden_states``), e.g. ["per_layer_input"]."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    try:
        sig = inspect.signature(forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
        named = []
        for name, value in bound.items():
            many = sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
            named.extend(value.items() if many else [(name, value)])
    except (TypeError, ValueError):  # no signature, or one the call does not fit
        named = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())
    found = []
    for where, value in named:
        leaves = torch.utils._pytree.tree_leaves(value)
        if any(isinstance(t, torch.Tensor) and t.requires_grad and t is not hidden for t in leaves):
            found.append(where)
    return found


def flattened(use: Use, shape: tuple, rows: int, length: int) -> bool:
    """Whether module ``use``'s input of ``shape`` has the tokens of a forward of ``rows`` ×
    ``length`` flattened into one dimension, ``[rows · length, features]`` (OPT's MLP and its
    norm): groupable by task only in row-major order, which ``probe`` verifies."""
    return use.kind != "embedding" and len(shape) == 2 and shape[0] == rows * length


def layout_problem(use: Use, shape: tuple, rows: int, length: int) -> str | None:
    """Why module ``use``'s input of ``shape``, in a forward of ``rows`` × ``length`` tokens,
    cannot be grouped by task (None: it can). Token ids ``[rows, length]`` for an embedding,
    ``[rows, length, features]`` for a linear layer; a norm, which acts on the last dimension
    alone, may also see per-head inputs ``[rows, length, H, d]`` (Qwen3's q/k norms) or
    ``[rows, H, length, d]`` (Phi's, StableLM's). Tokens flattened to ``[rows · length, ...]``
    are grouped where ``probe`` saw that module's tokens flattened row by row (``ROW_MAJOR``);
    other orders are not: nothing in the shape says which row is which task's."""
    if use.kind == "embedding":
        fits = shape == (rows, length)
    elif use.kind == "norm":
        fits = shape[:2] == (rows, length) and len(shape) >= 3
        fits |= len(shape) == 4 and shape[0] == rows and shape[2] == length
    else:
        fits = len(shape) == 3 and shape[:2] == (rows, length)
    flat = flattened(use, shape, rows, length)
    if fits or (flat and use.module in ROW_MAJOR):
        return None
    where = f"module {use.path} ({type(use.module).__name__}) gets inputs of shape {shape}"
    if flat:
        return (
            f"{where}, the tokens of a forward of {rows} x {length} flattened, in an order "
            "the eligibility probe (fastweights.ineligibility) has not found to be row by row: "
            "the engine cannot group them by task"
        )
    return (
        f"{where} in a forward of {rows} x {length} tokens, not [{rows}, {length}, ...]: "
        "the engine cannot group them by task"
    )


ROW_MAJOR: weakref.WeakSet = weakref.WeakSet()
"""Modules whose inputs ``probe`` saw flattened to ``[rows · length, features]`` row by row
(one row's tokens changed: only that row's block of the input changed)."""


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


# ---------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------


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


Mode = TypeVar("Mode", bound=torch.overrides.TorchFunctionMode)


def started(mode: Mode) -> Mode:
    """``mode`` made active until ``stopped`` (a forward pre-hook's work, ended by the forward
    hook: ``Lookup``, ``LinearCall``, ``SinkCall`` while their module runs)."""
    mode.__enter__()
    return mode


def stopped(mode: Mode) -> Mode:
    mode.__exit__(None, None, None)
    return mode


class Lookup(torch.overrides.TorchFunctionMode):
    """While active (during the forward of a ``Use.lookup`` embedding), keeps the ids of each
    ``F.embedding`` call on ``weight``: the ids ``[rows, length]`` the module derived."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.weight = module.weight
        self.ids: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            table = args[1] if len(args) > 1 else kwargs.get("weight")
            if table is self.weight:
                self.ids.append(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)

    def found(self, use: Use) -> tuple[torch.Tensor | None, str | None]:
        """(the ids, None), or (None, why the module's lookup cannot be adapted)."""
        if len(self.ids) == 1:
            return self.ids[0], None
        how = (
            "does not look its weight up with F.embedding"
            if not self.ids
            else (f"looks its weight up {len(self.ids)} times in one call")
        )
        return None, (
            f"module {use.path} ({type(use.module).__name__}) {how}: the engine cannot tell "
            "which rows of its table a call reads"
        )


CASTS = frozenset({"to", "type", "float", "double", "half", "bfloat16"})
"""Tensor methods whose result a ``LinearCall`` follows as its weight in another dtype."""

METADATA_GETS = frozenset(
    {"dtype", "shape", "device", "requires_grad", "is_leaf", "ndim", "layout", "is_cuda",
     "is_meta", "grad_fn", "names", "itemsize", "nbytes"}
)  # fmt: skip
"""Tensor attributes that are metadata, not values (``.T`` and ``.data`` are not)."""


def value_read(func) -> str | None:
    """What torch call ``func`` on a tensor reads of its values (None: metadata only)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        what = getattr(getattr(func, "__self__", None), "__name__", "")
        return None if what in METADATA_GETS else f".{what}"
    return None if name in METADATA_CALLS else getattr(func, "__qualname__", None) or repr(func)


class LinearCall(torch.overrides.TorchFunctionMode):
    """While active (during the forward of a ``Use.call`` module, e.g. a mixture-of-experts
    router: ``F.linear(x.float(), self.weight.float())``), finds the ``F.linear`` calls on the
    module's weight, or on a dtype cast of it, and passes their output through ``adjust(x,
    out)`` (the hooks' update); any other read of its weight or bias goes into ``strays``."""

    def __init__(self, module: nn.Module, adjust=None):
        super().__init__()
        self.bias = getattr(module, "bias", None)
        self.mine: dict[int, tuple[str, torch.Tensor]] = {
            id(module.weight): ("weight", module.weight)
        }
        if self.bias is not None:
            self.mine[id(self.bias)] = ("bias", self.bias)
        self.adjust = adjust
        self.inputs: list[torch.Tensor] = []
        self.strays: list[str] = []

    def which(self, t) -> str | None:
        hit = self.mine.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[0] if hit is not None and hit[1] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if self.which(w) == "weight":
                if self.bias is not None and self.which(b) != "bias":
                    self.strays.append("F.linear without the module's bias")
                out = func(*args, **kwargs)
                self.inputs.append(x)
                return self.adjust(x, out) if self.adjust and len(self.inputs) == 1 else out
        reads = [
            self.which(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if self.which(t)
        ]
        out = func(*args, **kwargs)
        if not reads:
            return out
        if name in CASTS and isinstance(out, torch.Tensor) and len(reads) == 1:
            self.mine[id(out)] = (reads[0], out)  # the same parameter, in another dtype
        elif what := value_read(func):
            self.strays.append(what)
        return out

    def found(self, use: Use) -> tuple[torch.Tensor | None, str | None]:
        """(the input of the module's one F.linear call, None), or (None, why it cannot be
        adapted)."""
        if len(self.inputs) == 1 and not self.strays:
            return self.inputs[0], None
        how = (
            f"reads its weight or bias by {self.strays[0]}"
            if self.strays
            else "never calls F.linear on its weight"
            if not self.inputs
            else f"calls F.linear on its weight {len(self.inputs)} times in one call"
        )
        return None, (
            f"module {use.path} ({type(use.module).__name__}) {how}: the engine adapts such a "
            "module only where its forward reads its weight through one F.linear call"
        )


class SinkCall(torch.overrides.TorchFunctionMode):
    """While active (during the forward of an attention module holding attention ``sinks``
    ``[H]``, GPT-OSS's), finds the view of its sinks as ``[1, H, ...]`` that its attention
    broadcasts over the rows (``module.sinks.reshape(1, -1, 1, 1)``) and returns ``per_row(out)``
    (``[rows, H, ...]``: each row its task's sinks) instead; any other read of the sinks goes
    into ``strays``."""

    def __init__(self, module: nn.Module, per_row=None):
        super().__init__()
        self.sinks = module.sinks
        self.per_row = per_row
        self.views = 0
        self.strays: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not any(t is self.sinks for t in leaves):
            return out
        name = getattr(func, "__name__", "")
        heads = self.sinks.shape[0]
        if name in ("reshape", "view") and args[0] is self.sinks and out.shape[:2] == (1, heads):
            self.views += 1
            return self.per_row(out) if self.per_row and self.views == 1 else out
        if what := value_read(func):
            self.strays.append(what)
        return out

    def found(self, use: Use) -> tuple[None, str | None]:
        """(None, why the module's sinks cannot be adapted, or None where they can)."""
        if self.views == 1 and not self.strays:
            return None, None
        how = (
            f"reads its sinks by {self.strays[0]}"
            if self.strays
            else "never views its sinks as [1, H, ...]"
            if not self.views
            else f"views its sinks {self.views} times in one call"
        )
        return None, (
            f"module {use.path} ({type(use.module).__name__}) {how}: the engine adapts attention "
            "sinks only where the forward broadcasts one [1, H, ...] view of them over the rows"
        )


class Hooks:
    """Forward hooks adding ``terms``' corrections during one forward of ``rows`` × ``length`` tokens.

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
        if style is None or not style.upcast or not (FUSED_OPS or style.centred):
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
            eps = m.eps if type(m) is nn.LayerNorm else getattr(m, style.eps)
            return F.layer_norm(x, x.shape[-1:], None, None, eps)
        acc = self.acc(use, x.dtype)
        if acc is not None:
            eps = getattr(m, style.eps)
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
    """The adapted module's output minus its plain output, grouped ``[B, R, out]`` (None: no change).

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
    """(name, term) pairs of one hooked call's ``-η G`` given d = -η dL/d(out) ``[rows, length, out]``."""
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


# ---------------------------------------------------------------------------
# the inner loss's gradient w.r.t. the logits
# ---------------------------------------------------------------------------

SEED_CHUNK = 2**26
"""Elements of one chunk of float32 work over the vocabulary (256 MiB)."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class NextTokenSeed(torch.autograd.Function):
    """``seed = w ⊙ (softmax(z) - onehot(y))`` per row of z ``[M, V]`` and the rows' NLL ``[M]``.

    This is ``w ⊙ dNLL/dz``; its derivative is ``w ⊙ (p ⊙ g - p (p·g))``. Both are taken in
    float32 (or z's dtype if wider) over row chunks, so no ``[M, V]`` float32 tensor is
    kept, and the second-order graph is this one node holding z (instead of the
    upcast, the log-softmax and their backward's intermediates)."""

    @staticmethod
    def forward(ctx, z, y, w):
        acc = _acc_dtype(z.dtype)
        rows = max(1, SEED_CHUNK // z.shape[-1])
        seed = torch.empty_like(z)
        nll = torch.empty(z.shape[0], dtype=acc, device=z.device)
        for lo in range(0, z.shape[0], rows):
            hi = min(lo + rows, z.shape[0])
            log_p = torch.log_softmax(z[lo:hi], -1, dtype=acc)
            yc = y[lo:hi, None]
            nll[lo:hi] = log_p.gather(-1, yc)[:, 0].neg_()
            p = log_p.exp_()
            p.scatter_add_(-1, yc, torch.full_like(yc, -1, dtype=acc))
            torch.mul(p, w[lo:hi, None], out=seed[lo:hi])
        ctx.save_for_backward(z, w)
        ctx.mark_non_differentiable(nll)
        return seed, nll

    @staticmethod
    @torch.autograd.function.once_differentiable  # the outer backward is the last one
    def backward(ctx, g, _unused):
        z, w = ctx.saved_tensors
        acc = _acc_dtype(z.dtype)
        rows = max(1, SEED_CHUNK // z.shape[-1])
        out = torch.empty_like(z)
        for lo in range(0, z.shape[0], rows):
            hi = min(lo + rows, z.shape[0])
            p = torch.softmax(z[lo:hi], -1, dtype=acc)
            pg = p * g[lo:hi]  # in acc (g promoted as read)
            pg.addcmul_(p, pg.sum(-1, keepdim=True), value=-1)  # p ⊙ (g − p·g)
            torch.mul(pg, w[lo:hi, None], out=out[lo:hi])
        return out, None, None


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


# ---------------------------------------------------------------------------
# activation checkpointing of the inner pass
# ---------------------------------------------------------------------------


def decoder_blocks(model) -> list[nn.Module]:
    """The repeated blocks: the ModuleList of one class holding the most parameters."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
    ]
    if not lists:
        return []
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def run_checkpointed(fn, context_fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs
    )


@contextlib.contextmanager
def checkpointed_blocks(model, enabled: bool, replay):
    """While active, each decoder block's forward runs under non-reentrant checkpointing;
    ``replay()`` gives the context of its recomputation (hooks as in this forward)."""
    if not enabled:
        yield
        return

    def context_fn():
        return contextlib.nullcontext(), replay()

    patched = []
    for blk in decoder_blocks(model):
        had = "forward" in blk.__dict__
        orig = blk.forward
        blk.forward = functools.partial(run_checkpointed, orig, context_fn)
        patched.append((blk, had, orig))
    try:
        yield
    finally:
        for blk, had, orig in patched:
            if had:
                blk.forward = orig
            else:
                del blk.__dict__["forward"]


class Replay:
    """The recomputation of a checkpointed inner block: same hooks, no records, math SDPA.

    Reusable: checkpointing may recompute a block more than once (inner and outer backward)."""

    def __init__(self, model, uses, terms, tasks, rows, length):
        self.model = model
        self.args = (uses, terms, tasks, rows, length)
        self.stack: list[contextlib.ExitStack] = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        stack.enter_context(Hooks(*self.args, inner=True))
        stack.enter_context(double_backward_attention())
        stack.enter_context(engine_ops(self.model))
        self.stack.append(stack)
        return self

    def __exit__(self, *exc):
        self.stack.pop().close()


# ---------------------------------------------------------------------------
# checkpointing the inner backward per decoder block ("vjp" mode)
# ---------------------------------------------------------------------------

CHECKPOINT_MODES = {
    False: None,
    None: None,
    "none": None,
    True: "vjp",
    "vjp": "vjp",
    "forward": "forward",
}
"""``InnerSpec.checkpoint_inner`` values: True / "vjp" checkpoints the inner *backward* per
decoder block (see ``BlockVJP``); "forward" only recomputes the inner forward's blocks (the
create_graph inner backward then keeps the recomputed activations)."""


def checkpoint_mode(value) -> str | None:
    try:
        return CHECKPOINT_MODES[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"checkpoint_inner={value!r}: expected False, True, 'none', 'vjp' or 'forward'"
        ) from None


def _fields(term) -> list[torch.Tensor]:
    return [getattr(term, f.name) for f in dataclasses.fields(term)]


def _key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def draws_random(module: nn.Module) -> bool:
    """Whether ``module``'s forward draws random numbers in its current mode: active dropout
    (a dropout module, or a Hugging Face attention's ``attention_dropout``, in training)."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        p = getattr(m, "attention_dropout", 0.0)
        if isinstance(p, float) and p > 0:
            return True
    return False


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


# ---------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------


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
    """``spec.steps`` SGD steps per task on its contexts ``[B, n, Tc]`` (kept as update terms)."""
    try:
        uses = find_uses(model, spec.names)
    except Ineligible as e:
        raise ValueError(f"fast-weights engine: {e}") from None
    b, n, tc = contexts.input_ids.shape
    flat = contexts.flat()
    state = FastState(uses, {}, b)
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
