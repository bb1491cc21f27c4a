"""Torch-function modes that watch one module's forward from the inside, between a forward
pre-hook (``started``) and a forward hook (``stopped``): the ids an embedding derives
(``Lookup``), the one ``F.linear`` call of a router or an ``nn.Linear`` subclass
(``LinearCall``), the view of an attention's sinks that it broadcasts over the rows
(``SinkCall``)."""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch import nn

from raymeta.meta.fastweights.uses import Use

METADATA_CALLS = frozenset(
    {"__get__", "dim", "size", "numel", "stride", "data_ptr", "is_floating_point",
     "is_contiguous", "element_size", "is_complex", "__format__", "__repr__", "__hash__"}
)  # fmt: skip
"""Tensor calls that read a parameter's metadata, not its values (``.dtype`` is ``__get__``)."""


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
