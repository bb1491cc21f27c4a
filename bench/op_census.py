"""Census of one meta-step, without computing it: operator calls, matmul FLOPs, memory traffic.

Runs the same outer step as ``meta_step.py`` (LG meta-loss, backward, grad-norm clip, AdamW)
on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes only), so any shape
(the Llama-3.2-1B one included) runs on any machine (about a minute on 2 CPU cores for the
1B shape), and counts every aten call below autograd (forward, create_graph inner backward,
outer backward, optimizer):

* ``calls/step``: aten calls other than views (each is one kernel launch on a GPU);
* ``GFLOP/task``: of mm / bmm / addmm / baddbmm;
* ``GB/task``: bytes read and written by every other call (``moved_bytes``), what bounds
  elementwise work on a GPU, which is memory-bound (HBM: ~3.35 TB/s on an H100).

On fake tensors a few calls differ from a real run: Hugging Face builds the SDPA mask in
another way, and checkpoint_inner="vjp" (which finds shared tensors by data pointer) clones a
few more; the fused attention's mask path and the other engines' own calls are the same.
It is a model, not a timing: fusion inside a kernel and cache reuse are invisible to it, and
a Function's Python overhead is not counted. Use it to compare engines and op sets where no
GPU is at hand (RESULTS.md relates it to the H100 profile).

The ``compiled`` and ``compiled-vjp`` variants count the calls of ``fused.BODIES`` (the bodies
that ``fused.COMPILE`` runs through ``torch.compile``: the fused ops', the rotary's, the logit
gradient's) as inductor compiles them: each distinct call compiled once, on the CPU, for
real tensors of its shapes, strides and dtypes; its kernels' reads and writes by inductor's
own count (``compiled_cost``; about a minute for the 1B shape). Inductor's C++ backend stands
in for its Triton one, whose fusion decisions are alike in the main but not in every detail:
a model of what compiling saves on a GPU, to be checked by ``meta_step.py --compile-ops``.

    python bench/op_census.py --shape llama-1b --meta-batch 16 --ctx 192 --query 32
    python bench/op_census.py ... --variants fused,unfused,vjp --top 15
    python bench/op_census.py ... --family gemma --variants fused,unfused
    python bench/op_census.py ... --variants fused --sites 20   # which code moves the bytes
    python bench/op_census.py ... --variants fused,compiled    # the bodies compiled, or not
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_step import meta_backward  # noqa: E402
from meta_step import (  # noqa: E402
    DTYPES,
    SHAPES,
    distinct,
    inner_names,
    json_path,
    model_config,
    outer_optimizer,
    positive,
    random_batch,
)

from raymeta.meta import fused  # noqa: E402
from raymeta.meta.engines import select_engine  # noqa: E402
from raymeta.meta.fastweights import ops as fastweights_ops  # noqa: E402
from raymeta.meta.inner import InnerSpec  # noqa: E402

CENSUS_FAMILIES = ("llama", "gemma")
"""The bench's model families (``meta_step.FAMILIES``) the census can run on fake tensors."""

MATMULS = frozenset({"mm", "bmm", "addmm", "baddbmm"})
FREE = frozenset(
    {"view", "_unsafe_view", "_reshape_alias", "reshape", "t", "transpose", "permute", "expand"}
    | {"unsqueeze", "squeeze", "select", "slice", "as_strided", "alias", "detach", "unbind"}
    | {"split", "split_with_sizes", "chunk", "empty", "empty_like", "empty_strided"}
    | {"new_empty", "new_empty_strided", "lift_fresh", "device", "promote_types", "sym_size"}
    | {"_record_function_enter_new", "_record_function_exit"}  # profiler marks (optimizers')
)
"""Calls that move no data (views, allocations, metadata queries, profiler marks)."""

FUSED = {"FUSED_OPS": True, "ATTENTION": "fused"}
UNFUSED = {"FUSED_OPS": False, "ATTENTION": None}
VARIANTS = {
    "reference": ("reference", {}, False, False),
    "fused": ("fastweights", FUSED, False, False),
    "unfused": ("fastweights", UNFUSED, False, False),
    "vjp": ("fastweights", FUSED, "vjp", False),
    "unfused-vjp": ("fastweights", UNFUSED, "vjp", False),
    "compiled": ("fastweights", FUSED, False, True),
    "compiled-vjp": ("fastweights", FUSED, "vjp", True),
}
"""name → (engine, fastweights switches, checkpoint_inner, bodies compiled: the calls of
``fused.BODIES`` counted as inductor's kernels for them, ``compiled_cost``)."""


class Census(TorchDispatchMode):
    """Counts aten calls, matmul FLOPs and the bytes other calls read and write (and, with
    ``sites``, the bytes and calls per (op, ``call_site``))."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.calls = 0
        self.flops = 0
        self.bytes: collections.Counter = collections.Counter()
        self.site_bytes: collections.Counter | None = collections.Counter() if sites else None
        self.site_calls: collections.Counter = collections.Counter()
        self.inside = 0  # > 0 while a body to be counted compiled runs (``counting_bodies``)
        self.bodies: collections.Counter = collections.Counter()  # (body, arguments) → calls

    def totals(self) -> tuple[int, int, int]:
        """(calls, matmul FLOPs, bytes) so far."""
        return self.calls, self.flops, sum(self.bytes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE or (self.inside and name not in MATMULS):
            return out  # (a compiled body's other calls are its kernels, ``add_compiled``)
        if name in MATMULS:
            self.calls += 1
            a, b = args[-2], args[-1]
            self.flops += 2 * a.numel() * b.shape[-1]
        else:
            site = call_site() if self.site_bytes is not None else ""  # (looked up if counted)
            self.add(name, moved_bytes(func, args, kwargs or {}, out), 1, site)
        return out

    def add(self, op: str, moved: int, calls: int, site: str) -> None:
        """``calls`` calls of ``op`` moving ``moved`` bytes, made at ``site`` (kept when sites
        are counted)."""
        self.calls += calls
        self.bytes[op] += moved
        if self.site_bytes is not None:
            key = (op, site)
            self.site_bytes[key] += moved
            self.site_calls[key] += calls


@contextlib.contextmanager
def counting_bodies(counted: Census):
    """While active, each body of ``fused.BODIES`` runs eagerly without its calls counted (but
    its matmuls, which stay calls of their own when compiled) and each call is kept in
    ``counted.bodies`` by its arguments (``argument_key``); ``add_compiled`` then counts them
    as compiled. (The bodies are called by their module's global name: swapped here.)"""
    swapped = []
    for run in fused.BODIES:

        def counting(*args, _body=run.__wrapped__):
            counted.bodies[(_body, tuple(map(argument_key, args)))] += 1
            counted.inside += 1
            try:
                return _body(*args)
            finally:
                counted.inside -= 1

        module = sys.modules[run.__module__]
        swapped.append((module, run.__name__, getattr(module, run.__name__)))
        setattr(module, run.__name__, counting)
    try:
        yield
    finally:
        for module, name, run in swapped:
            setattr(module, name, run)
    if len(fused.BODIES) != len(swapped):  # a module imported while the step ran: not swapped
        late = [f"{b.__module__}.{b.__name__}" for b in fused.BODIES[len(swapped) :]]
        raise RuntimeError(f"bodies imported during the step, counted eagerly: {late}")


def argument_key(a) -> tuple:
    """A body's argument as ``compiled_cost`` rebuilds it: a tensor's shape, strides and dtype,
    any other value itself."""
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype)
    return ("value", a)


def add_compiled(counted: Census) -> tuple[int, int]:
    """Counts the body calls ``counting_bodies`` kept as the kernels inductor generates for
    them (``compiled_cost``, once per distinct arguments); returns the (calls, bytes) added."""
    before = counted.totals()
    for (body, key), n in counted.bodies.items():
        moved, kernels = compiled_cost(body, key)
        code = body.__code__
        _, shown = source_of(code.co_filename) or (0, code.co_filename)
        site = f"{shown}:{code.co_firstlineno} ({body.__name__}, compiled)"
        counted.add("compiled", moved * n, kernels * n, site)
    after = counted.totals()
    return after[0] - before[0], after[2] - before[2]


@functools.cache
def compiled_cost(body, key: tuple) -> tuple[int, int]:
    """(bytes, kernels) of ``body`` compiled by inductor for arguments ``key`` (on the CPU,
    ``dynamic=False``, random values), by inductor's own count: each generated kernel's
    reads and writes, each buffer once (``GraphLowering.count_bytes``); its matmuls are left
    out (the census counts them as calls and FLOPs). The CPU backend's fusion decisions stand
    in for Triton's: a model of what ``fused.COMPILE`` saves on a GPU, not a measurement."""
    import logging

    import torch._inductor.config
    from torch._inductor import compile_fx, metrics

    def value(k):
        if k[0] == "value":
            return k[1]
        t = torch.empty_strided(k[1], k[2], dtype=k[3])
        return t.normal_() if t.is_floating_point() else t.zero_()  # (ids: valid indices)

    log = compile_fx.inductor_metrics_log  # counts only when it is on (prints nothing: INFO)
    level = log.level
    log.setLevel(logging.INFO)
    torch._dynamo.reset()
    metrics.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):  # (a cached graph: no count)
            torch.compile(body, dynamic=False)(*map(value, key))
        moved = [num * 4 for n, num in metrics.nodes_num_elem if not matmul(n)]  # (bytes // 4)
    finally:
        log.setLevel(level)
        torch._dynamo.reset()
        metrics.reset()
    return sum(moved), sum(1 for b in moved if b)  # (no bytes: a view, not a kernel)


def matmul(node) -> bool:
    """Whether an inductor scheduler node is an extern matmul kernel (``MATMULS``)."""
    op = getattr(getattr(node, "node", None), "op_overload", None)
    return op is not None and op.overloadpacket.__name__ in MATMULS


@functools.cache
def site_dirs() -> list[tuple[int, Path, Path]]:
    """(rank, directory, the base its paths are shown from) of the code ``call_site`` names:
    0 raymeta's package, 1 transformers, ``torch.nn`` and ``torch.optim``, 2 these benchmarks
    (by where they are installed, not by their paths' names: a checkout may be named
    raymeta)."""
    import transformers

    import raymeta

    def top(module) -> Path:
        return Path(os.path.realpath(module.__file__)).parent

    torch_base = top(torch).parent
    bench = Path(os.path.realpath(__file__)).parent
    return [
        (0, top(raymeta), top(raymeta).parent),
        (1, top(transformers), top(transformers).parent),
        (1, top(torch.nn), torch_base),
        (1, top(torch.optim), torch_base),
        (2, bench, bench.parent),
    ]


@functools.cache
def source_of(filename: str) -> tuple[int, str] | None:
    """(rank, path shown) of a frame's file in ``site_dirs``, (-1, "") for autograd's engine
    (``torch.autograd.graph``), or None (other code)."""
    path = Path(os.path.realpath(filename))
    if path == Path(os.path.realpath(torch.autograd.graph.__file__)):
        return -1, ""
    for rank, folder, base in site_dirs():
        if path.is_relative_to(folder):
            return rank, path.relative_to(base).as_posix()
    return None


def call_site() -> str:
    """Where the running aten call comes from: the innermost frame of raymeta's code (a
    Function's forward or backward, a hook), else, while autograd's engine runs a node of
    its own, ``autograd: <node>`` (the node's formula, or summing its output into the input
    of a node that gets several: a gradient accumulation), else the innermost frame of
    transformers, ``torch.nn`` or ``torch.optim``, else of these benchmarks; as ``path:line
    (function)``."""
    found: dict[int, str] = {}
    for frame in reversed(traceback.extract_stack()[:-2]):  # (not this function, the dispatch)
        source = source_of(frame.filename)
        if source is None:
            continue
        rank, shown = source
        if rank == -1:
            node = torch._C._current_autograd_node()
            if node is not None:
                return f"autograd: {node.name()}"
        elif rank == 0:
            return f"{shown}:{frame.lineno} ({frame.name})"
        else:
            found.setdefault(rank, f"{shown}:{frame.lineno} ({frame.name})")
    return found[min(found)] if found else "elsewhere"


WRITE_ONLY = frozenset({"copy_", "fill_", "zero_"})
"""In-place calls that overwrite their first argument without reading it."""


def moved_bytes(func, args: tuple, kwargs: dict, out) -> int:
    """Bytes one call reads and writes: its tensor inputs (not ``out=``, which it only writes,
    nor the destination of a ``WRITE_ONLY`` call), its results, and the inputs its schema says
    it writes that it does not return (in-place foreach and fused optimizer ops return
    nothing), each tensor written counted once. The fused Adam kernels' schema declares the
    gradients written, which they are only when unscaling (``grad_scale``): not counted then.
    Each tensor is counted at its size as the call sees it (an expanded view at its expanded
    size)."""
    name = func.overloadpacket.__name__
    read_args = args[1:] if name in WRITE_ONLY else args
    read = torch.utils._pytree.tree_leaves(
        (read_args, {k: v for k, v in kwargs.items() if k != "out"})
    )
    written = {id(t): t for t in torch.utils._pytree.tree_leaves(out)}
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        if a.name == "grads" and kwargs.get("grad_scale") is None:
            continue  # _fused_adam(w)_: gradients only read without a grad scale
        value = args[i] if i < len(args) else kwargs.get(a.name)
        written.update((id(t), t) for t in torch.utils._pytree.tree_leaves(value))
    return sum(
        t.numel() * t.element_size()
        for t in [*read, *written.values()]
        if isinstance(t, torch.Tensor)
    )


def build_fake_model(shape: str, dtype, family: str = "llama"):
    """The bench's random model of ``shape`` and ``family`` on fake tensors (no memory, no init
    cost)."""
    from transformers import AutoModelForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # fake tensors cannot be cast with .to() afterwards
    try:
        return AutoModelForCausalLM.from_config(model_config(shape, family)).train()
    finally:
        torch.set_default_dtype(default)


@contextlib.contextmanager
def switches(values: dict):
    old = {k: getattr(fastweights_ops, k) for k in values}
    for k, v in values.items():
        setattr(fastweights_ops, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(fastweights_ops, k, v)


def census(args, variant: str, b: int, fake: bool = True) -> dict:
    """One outer step of ``variant`` at meta-batch ``b`` (AdamW's state already made),
    counted (on fake tensors, or on real ones on the CPU: the same counts, which the tests
    check)."""
    engine_name, values, ckpt, compiled = VARIANTS[variant]
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    with FakeTensorMode() if fake else contextlib.nullcontext(), switches(values):
        model = build_fake_model(args.shape, DTYPES[args.dtype], args.family)
        opt = outer_optimizer(model)
        spec = InnerSpec(lr=1e-3, names=inner_names(model, args.inner), checkpoint_inner=ckpt)
        engine = select_engine(engine_name, model, spec)
        micro = 1 if engine_name == "reference" else b
        batch = random_batch(b, args.ctx, args.query, model.config.vocab_size, "cpu", args.contexts)
        for p in model.parameters():  # AdamW's state exists, as in every step but the first
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counted = Census(sites=bool(args.sites))
        with counted, counting_bodies(counted) if compiled else contextlib.nullcontext():
            meta_backward(model, engine, spec, batch, micro)  # meta_loss without .item()
        meta = counted.totals()
        with counted:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
    added = add_compiled(counted)  # (on real tensors: outside the fake mode)
    meta = (meta[0] + added[0], meta[1], meta[2] + added[1])
    calls, flops, total = counted.totals()
    return {
        "variant": variant,
        "family": args.family,
        "shape": args.shape,
        "dtype": args.dtype,
        "ctx": args.ctx,
        "contexts": args.contexts,
        "query": args.query,
        "meta_batch": b,
        "calls_per_step": calls,
        "gflop_per_task": flops / b / 1e9,
        "gb_per_task": total / b / 1e9,
        "optimizer_calls": calls - meta[0],
        "optimizer_gb_per_task": (total - meta[2]) / b / 1e9,
        "top": {k: round(v / b / 1e9, 3) for k, v in counted.bytes.most_common(args.top)},
        "sites": [  # the call sites moving the most bytes
            {
                "op": key[0],
                "site": key[1],
                "gb_per_task": v / b / 1e9,
                "calls": counted.site_calls[key],
            }
            for key, v in (counted.site_bytes or collections.Counter()).most_common(args.sites)
        ],
    }


def figure(v: float) -> str:
    """A table cell: one decimal from 10 up, two from 1, else three significant digits (the
    tiny shapes' GFLOP and GB per task are hundredths)."""
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def table(rows: list[dict]) -> str:
    head = [
        "variant",
        "family",
        "shape",
        "ctx",
        "n",
        "query",
        "meta-batch",
        "calls/step",
        "GFLOP/task",
        "GB/task",
        "top GB/task",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        top = ", ".join(f"{k} {figure(v)}" for k, v in r["top"].items())
        cells = [
            r["variant"],
            r["family"],
            r["shape"],
            r["ctx"],
            r["contexts"],
            r["query"],
            r["meta_batch"],
            r["calls_per_step"],
            figure(r["gflop_per_task"]),
            figure(r["gb_per_task"]),
            top,
        ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument(
        "--family",
        choices=CENSUS_FAMILIES,
        default="llama",
        help="as meta_step.py's (FAMILIES there); not OPT or Mixtral, whose layers see tokens "
        "flattened, an order the engine's probe checks on real values (fake tensors have none)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--meta-batch", type=positive, default=16)
    p.add_argument("--ctx", type=positive, default=192)
    p.add_argument("--query", type=positive, default=32)
    p.add_argument(
        "--contexts", type=positive, default=1, help="contexts per task (one inner update)"
    )
    p.add_argument("--inner", choices=["all", "blocks"], default="all")
    p.add_argument(
        "--variants",
        default="reference,fused,unfused",
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    p.add_argument("--top", type=positive, default=4, help="ops with the most bytes to list")
    p.add_argument(
        "--sites",
        type=positive,
        default=0,
        help="also list the N call sites (code lines, or autograd nodes) moving the most bytes",
    )
    p.add_argument("--json", type=json_path, default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    distinct(p, "--variants", args.variants.split(","), list(VARIANTS))
    return args


def sites_table(row: dict) -> str:
    """The row's ``sites`` as a table: GB/task, calls per step, op, where."""
    out = [
        f"{row['variant']} ({row['family']}, meta-batch {row['meta_batch']}): the call sites "
        f"moving the most bytes, of {figure(row['gb_per_task'])} GB/task",
        "",
        "| GB/task | calls/step | op | where |",
        "| --- | --- | --- | --- |",
    ]
    for r in row["sites"]:
        out.append(f"| {figure(r['gb_per_task'])} | {r['calls']} | {r['op']} | {r['site']} |")
    return "\n".join(out)


def main(argv=None):
    args = parse(argv)
    rows = []
    for variant in args.variants.split(","):
        row = census(args, variant, args.meta_batch)
        print(json.dumps({k: v for k, v in row.items() if k != "sites"}), flush=True)
        rows.append(row)
    print(table(rows))
    for row in rows if args.sites else []:
        print(f"\n{sites_table(row)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
