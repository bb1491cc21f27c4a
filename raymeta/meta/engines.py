"""Engine registry: each engine is a pair of functions (adapt, logits).

``adapt(model, contexts [B,n,Tc], spec) -> state`` (state has ``inner_loss [B]``) and
``logits(model, state, queries [B,m,T]) -> [B,m,T,V]``. ``select_engine`` resolves
``auto`` to the fast-weights engine where it is exact (with ``checkpoint_inner=forward``
where only ``vjp`` is refused), else to the reference one, and logs why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

from raymeta.errors import InputError
from raymeta.meta import reference

log = logging.getLogger("raymeta.meta")


class Engine(NamedTuple):
    name: str
    adapt: object
    logits: object
    checkpoint_inner: str | None = None
    """The inner checkpointing ``adapt`` runs with when it is not the spec's (``auto`` on a
    model whose blocks ``vjp`` cannot recompute: "forward"); None: the spec's."""


def fastweights_ineligibility(model, spec) -> str | None:
    """Why the fast-weights engine cannot run this model exactly (None = it can)."""
    try:
        from raymeta.meta import fastweights
    except ImportError:
        return "the fast-weights engine is not installed in this build"
    return fastweights.ineligibility(model, spec)


def select_engine(name: str, model, spec) -> Engine:
    """The engine called ``name`` (reference, fastweights, auto) for ``model`` and ``spec``."""
    if name == "reference":
        return Engine("reference", reference.adapt, reference.logits)
    reason = fastweights_ineligibility(model, spec)
    if reason is None:
        from raymeta.meta import fastweights

        warn_unfused_attention(model)
        return Engine("fastweights", fastweights.adapt, fastweights.logits)
    if name == "fastweights":
        raise InputError(
            f"meta.engine=fastweights cannot run exactly here: {reason} "
            "(meta.engine=auto falls back to the reference engine)"
        )
    if spec.checkpoint_inner in (True, "vjp"):
        forward = dataclasses.replace(spec, checkpoint_inner="forward")
        if fastweights_ineligibility(model, forward) is None:  # only "vjp" is refused
            from raymeta.meta import fastweights

            warn_once(
                f"[engine] meta.engine=auto: meta.checkpoint_inner={spec.checkpoint_inner} "
                f"cannot run here because {reason}; using the fast-weights engine with "
                "checkpoint_inner=forward"
            )

            def adapt(model, contexts, spec):
                spec = dataclasses.replace(spec, checkpoint_inner="forward")
                return fastweights.adapt(model, contexts, spec)

            warn_unfused_attention(model)
            return Engine("fastweights", adapt, fastweights.logits, "forward")
    warn_once(f"[engine] meta.engine=auto: using the reference engine because {reason}")
    if spec.checkpoint_inner:
        warn_once(
            f"[engine] meta.checkpoint_inner={spec.checkpoint_inner} is ignored: the reference "
            "engine has no inner checkpointing"
        )
    if spec.compile_ops:
        warn_once(
            "[engine] meta.compile_ops=true is ignored: the reference engine runs torch's own ops"
        )
    return Engine("reference", reference.adapt, reference.logits)


def warn_unfused_attention(model) -> None:
    """Say (once) when the fast-weights engine's passes run the model's own attention, slower,
    because the fused attention does not know its attention classes (exact either way)."""
    from raymeta.meta.fastweights import ops

    unknown = ops.unfused_attention(model)
    if unknown:
        warn_once(
            f"[engine] fast-weights engine: its passes run the model's own attention "
            f"({ops.attention_run(model)}), not the fused one, which knows Llama-style "
            f"attention classes only (not {unknown}); exact, but slower"
        )


WARNED: set[str] = set()
"""The fallback warnings given in this process (a job selects its engine at each stage)."""


def warn_once(message: str) -> None:
    if message not in WARNED:
        WARNED.add(message)
        log.warning(message)
