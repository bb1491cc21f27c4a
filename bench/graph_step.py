"""The outer step captured once as a CUDA graph and replayed (``meta_step.py --cuda-graph``).

At meta-batch 16 the eager fast-weights step on an H100 is bound by the host issuing its
~8,200 kernel launches (bench/RESULTS.md); replaying a captured graph issues them from the
GPU. Capture needs a step that never waits for the GPU on the host: no ``.item()``, no
``nonzero``, no copy from host memory. ``host_syncs`` finds such calls on any device, and
``measure_graphed`` refuses, naming the call and where it came from, before trying to capture
a step that has one. The tests run it on the CPU, where the reads show, and on the meta device,
which stands in for the GPU: every tensor off the host, so a copy from host memory shows too
(on the CPU it is no copy at all).

The graphed step is ``sync_free_step``: the same LG meta-loss, backward, grad-norm clip and
AdamW step as ``meta_step.outer_step``, without the meta-loss's logging reads. AdamW must be
``capturable=True`` (its step counter on the GPU). Before timing, one replay is compared
with one eager step from the same parameters and optimizer state (``graph_vs_eager``: the
largest parameter difference relative to the largest parameter change), so a graph that
does not compute the step shows up in the row, not only in a faster time.
"""

from __future__ import annotations

import collections
import time
import traceback

import torch
from meta_step import slice_batch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from raymeta.meta.inner import double_backward_attention
from raymeta.meta.objectives import lg_loss

SYNCS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "nonzero",
        "nonzero_static",
        "equal",
        "allclose",
        "masked_select",
        "_unique2",
        "unique_consecutive",
        "_assert_async",
    }
)
"""aten calls whose result the host must read from the device (each stops a capture)."""


HOST_DATA = (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor)
"""Constructors from Python data: on a device, a copy from host memory that the dispatcher
does not see (``HostData`` watches them)."""


class HostRead(RuntimeError):
    """A host read that the device cannot do (the meta device's ``.item()``), once named."""


def devices(*trees) -> str:
    """The devices of the tensors in ``trees``, sorted: ``"cpu, cuda:0"``."""
    leaves = torch.utils._pytree.tree_leaves(trees)
    return ", ".join(sorted({str(t.device) for t in leaves if isinstance(t, torch.Tensor)}))


def record(found: dict, key: str) -> None:
    """Keeps the first Python stack (outside torch) that made the call ``key``."""
    if key not in found:
        stack = traceback.format_stack()[:-2]
        found[key] = "".join(s for s in stack if "torch/" not in s)[-1500:]


class HostSyncs(TorchDispatchMode):
    """Records the calls of ``SYNCS`` and copies between devices, each with its Python stack."""

    def __init__(self):
        super().__init__()
        self.found: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:  # named before it runs: where the device cannot read (meta), it raises
            key = f"{name} ({devices(args, kwargs)})"
            record(self.found, key)
            try:
                return func(*args, **(kwargs or {}))
            except RuntimeError as e:
                if "meta" not in key:
                    raise
                raise HostRead(key) from e
        out = func(*args, **(kwargs or {}))
        if name in ("_to_copy", "copy_") and "," in (where := devices(args, kwargs, out)):
            record(self.found, f"{name} ({where})")
        return out


class HostData(TorchFunctionMode):
    """Records tensors made from Python data (``HOST_DATA``) on a device other than the CPU."""

    def __init__(self, found: dict):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_DATA:
            device = kwargs.get("device")
            if device is None and func is torch.Tensor.new_tensor:
                device = args[0].device
            if device is not None and torch.device(device).type != "cpu":
                record(self.found, f"{func.__name__} (cpu, {torch.device(device)})")
        return func(*args, **kwargs)


def host_syncs(fn, *args, **kwargs) -> dict[str, str]:
    """Runs ``fn(*args, **kwargs)`` and returns its host syncs: call → where (empty if none).

    On a device that cannot read a value on the host (meta), ``fn`` stops at its first read,
    which is returned."""
    syncs = HostSyncs()
    try:
        with HostData(syncs.found), syncs:
            fn(*args, **kwargs)
    except HostRead:
        pass
    return dict(syncs.found)


def meta_backward(model, engine, spec, batch, micro: int) -> None:
    """LG meta-loss of MetaBatch ``batch`` and its backward, ``micro`` tasks per pass
    (gradients accumulated, scaled to the mean over the batch), without host reads."""
    b = batch.size
    for lo in range(0, b, micro):
        part = slice_batch(batch, lo, min(b, lo + micro))
        with double_backward_attention():
            state = engine.adapt(model, part.contexts, spec)
            loss = lg_loss(engine.logits(model, state, part.queries), part.queries).mean()
        (loss * (part.size / b)).backward()
        del state, loss


def sync_free_step(model, opt, engine, spec, batch, micro: int) -> None:
    """``meta_step.outer_step`` without host reads and without zeroing the gradients (a
    graph's first backward writes them; ``opt.zero_grad(set_to_none=True)`` before capture)."""
    meta_backward(model, engine, spec, batch, micro)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()


def state_tensors(model, opt) -> list[torch.Tensor]:
    """Parameters and optimizer state, the tensors one step changes (in a fixed order)."""
    state = [v for p in model.parameters() for v in opt.state[p].values()]
    return list(model.parameters()) + [v for v in state if isinstance(v, torch.Tensor)]


def copy_batch(dst, src) -> None:
    """Copies the tensors of MetaBatch ``src`` into the same-shaped ``dst`` (in place)."""
    for a, b in zip(vars(dst).values(), vars(src).values()):
        for x, y in zip(vars(a).values(), vars(b).values()):
            if x is not None:
                x.copy_(y)


@torch.no_grad()
def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor], start) -> float:
    """max |a - b| / max |b - start| over the tensor lists (0 when a equals b)."""
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    change = max((y.float() - s.float()).abs().max().item() for y, s in zip(b, start))
    return diff / max(change, 1e-30)


def on_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies in host memory (so that the checks add nothing to the GPU's peak)."""
    return [t.detach().to("cpu", copy=True) for t in tensors]


@torch.no_grad()
def restore(tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for t, s in zip(tensors, saved):
        t.copy_(s)


def check_replay(model, opt, step, replay):
    """Runs ``step()`` twice from the same parameters and optimizer state (restored in between
    and after, each step from no gradients), then ``replay()``. Returns ``(replay vs first
    step, second step vs first step, what replay returned)``: parameter differences relative
    to the step's largest parameter change, the second the control (the device's own
    run-to-run difference). The copies live in host memory: nothing added to the GPU's peak."""
    tensors = state_tensors(model, opt)
    params = list(model.parameters())
    start = on_host(tensors)
    eager = []
    opt.zero_grad(set_to_none=True)  # each step writes the gradients afresh
    for _ in range(2):
        step()
        eager.append(on_host(params))
        restore(tensors, start)
        opt.zero_grad(set_to_none=True)
    out = replay()
    first = start[: len(params)]
    check = relative_difference(on_host(params), eager[0], first)
    return check, relative_difference(eager[1], eager[0], first), out


def measure_graphed(model, opt, engine, spec, batch_fn, micro: int, reps: int) -> dict:
    """Capture ``sync_free_step`` on one batch, check one replay against the eager step
    (``check_replay``), time ``reps`` replays (each on a fresh batch copied into the
    captured one).

    ``batch_fn()`` makes a MetaBatch on the GPU. Returns ``dt`` (s per step), ``peak_GiB``
    (reserved: a replay allocates nothing, so the graph's memory shows as its reserved pool),
    ``graph_vs_eager`` and its control ``eager_vs_eager`` (atomic accumulations make two eager
    GPU steps differ a little; a replay that computes the step stays near that)."""
    static = batch_fn()

    def step():
        sync_free_step(model, opt, engine, spec, static, micro)

    step()  # AdamW creates its state first (copies from the host, once)
    opt.zero_grad(set_to_none=True)
    found = host_syncs(step)
    if found:
        call, where = next(iter(found.items()))
        raise RuntimeError(
            f"the step syncs with the host ({call}), so it cannot be captured:\n{where}"
        )
    opt.zero_grad(set_to_none=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)

    def capture():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        return graph

    check, noise, graph = check_replay(model, opt, step, capture)
    fresh = [batch_fn() for _ in range(reps)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in fresh:
        copy_batch(static, batch)
        graph.replay()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    peak = torch.cuda.max_memory_reserved() / 2**30
    del graph
    opt.zero_grad(set_to_none=True)
    return dict(dt=dt, peak_GiB=peak, graph_vs_eager=check, eager_vs_eager=noise)
