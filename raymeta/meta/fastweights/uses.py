"""The modules that hold the inner parameters (``Use``, found by ``find_uses``, or
``Ineligible``: a module kind the engine does not know) and how their inputs are grouped by
task (``layout_problem``, ``ROW_MAJOR``)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from raymeta.meta.experts import parameter_names, projections
from raymeta.models import NormStyle, embedding_scale, is_linear, norm_style


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
