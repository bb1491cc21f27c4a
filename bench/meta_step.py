"""Benchmark one whole outer step (meta_loss LG + backward + clip + AdamW) per engine.

Random weights; imports only torch, transformers and raymeta.meta / raymeta.data,
so it runs on a bare GPU machine. Prints one table (engine × shape × context /
query length × meta-batch → ms per task, tasks/s, peak memory, estimated
TFLOP/s, % of bf16 peak, speedup of fastweights over reference).

    python bench/meta_step.py --device cpu --shape tiny --meta-batch 8 --ctx 64 --query 16
    python bench/meta_step.py --device cpu --family gemma --shape tiny --ctx 16,64
    python bench/meta_step.py --device cuda --shape llama-1b --dtype bfloat16 \\
        --meta-batch 16,64 --ctx 192 --query 32 --json out.json

FLOPs per task (docs/fastweights.md): 12·N·Tc + 6·N·Tq with N the parameter count.
The reference engine keeps every task's θ' alive at once, so it runs the
meta-batch in micro-batches (``--ref-micro`` tasks each, gradients accumulated):
the same outer step, the memory it can afford.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymeta.data.batches import Tokens  # noqa: E402
from raymeta.meta.engines import Engine, select_engine  # noqa: E402
from raymeta.meta.fastweights import ops  # noqa: E402
from raymeta.meta.inner import InnerSpec  # noqa: E402
from raymeta.meta.step import MetaBatch, meta_loss  # noqa: E402

PEAK_TFLOPS = {"bfloat16": 990.0, "float16": 990.0}  # H100 / H200 SXM dense (one datasheet value)
SHAPES = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "demo": dict(  # the README demo's tiny model (TinyModelConfig) and its 291-word vocabulary
        vocab_size=291,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        tie_word_embeddings=False,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
    ),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


FAMILIES = ("llama", "gemma", "opt", "mixtral")
"""Model families a shape is built as: Llama (fused attention, SwiGLU and RMS normalisation in
the fast engine's passes), Gemma (a scaled embedding, ``1 + weight`` norms, a GELU-gated MLP;
its attention and MLP are Llama's code, fused as Llama's) or OPT (learned
positions, LayerNorms, a ReLU MLP on flattened tokens, biases, its own SDPA attention; no
grouped-query attention, no dropout) or Mixtral (Llama's layers with a mixture of 8 experts of
the shape's MLP width, 2 per token, for the MLP: a router and the experts' stacked weights)."""


def model_config(shape: str, family: str = "llama"):
    """The config of ``shape`` as a ``family`` model (tied embeddings unless the shape says
    not)."""
    from transformers import AutoConfig

    fields = {"tie_word_embeddings": True, **SHAPES[shape]}
    if family == "opt":  # OPT's names for the MLP's and the embedding's widths
        fields.update(
            ffn_dim=fields["intermediate_size"],
            word_embed_proj_dim=fields["hidden_size"],
            dropout=0.0,
        )
    if family == "mixtral":
        fields.update(num_local_experts=8, num_experts_per_tok=2)
    return AutoConfig.for_model(
        family,
        **fields,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )


def build_model(shape: str, dtype, device, family: str = "llama"):
    """A random causal LM of ``shape`` and ``family`` in ``dtype`` on ``device``, in train
    mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, family)).to(dtype)
    return model.train()


def rows(b: int, n: int, t: int, vocab: int, device, labels_from: int) -> Tokens:
    """Random full-length rows ``[b, n, t]``, labels from position ``labels_from`` on."""
    ids = torch.randint(3, vocab, (b, n, t), device=device)
    labels = ids.clone()
    labels[..., :labels_from] = -100
    return Tokens(ids, torch.ones_like(ids), labels)


def random_batch(b: int, ctx: int, query: int, vocab: int, device, n: int = 1) -> MetaBatch:
    """B tasks, each ``n`` contexts of ``ctx`` tokens (one inner update on all of them, as in
    the paper's Table 2) and ``n`` queries of ``query`` tokens (half scored)."""
    contexts = rows(b, n, ctx, vocab, device, 0)
    queries = rows(b, n, query, vocab, device, query // 2)
    flat = queries.flat()
    return MetaBatch(contexts, queries, flat, flat)


def slice_batch(batch: MetaBatch, lo: int, hi: int) -> MetaBatch:
    def part(t: Tokens) -> Tokens:
        return Tokens(t.input_ids[lo:hi], t.attention_mask[lo:hi], t.labels[lo:hi])

    return MetaBatch(
        part(batch.contexts), part(batch.queries), batch.student_prompts, batch.teacher_prompts
    )


def outer_optimizer(model, capturable: bool = False) -> torch.optim.AdamW:
    """The outer optimizer: AdamW through its fused kernel (one pass over the parameters, their
    gradients and state; the meta-training job's outer Adam runs it too). ``capturable``: its
    step counter kept on the device, as a CUDA graph needs."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=capturable)


def outer_step(model, opt, engine: Engine, spec: InnerSpec, batch: MetaBatch, micro: int):
    """One optimiser step over the meta-batch, ``micro`` tasks per forward/backward."""
    b = batch.size
    for lo in range(0, b, micro):
        part = slice_batch(batch, lo, min(b, lo + micro))
        loss, _ = meta_loss(model, engine, spec, part, "LG")
        (loss * (part.size / b)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, opt, engine, spec, args, b, ctx, query, micro, n_params, graphed=False):
    """One table row (dict); out-of-memory becomes a row with an error. ``graphed``: the step
    captured as a CUDA graph and replayed (``measure_graphed_row``)."""
    dev = args.device
    vocab = model.config.vocab_size
    fast = engine.name == "fastweights"  # (the switches below are the fast engine's alone)
    row = dict(
        engine=engine.name,
        shape=args.shape,
        family=args.family,
        dtype=args.dtype,
        ctx=ctx,
        contexts=args.contexts,
        query=query,
        meta_batch=b,
        micro=micro,
        checkpoint_inner=spec.checkpoint_inner if fast else False,
        fw_attention=ops.attention_run(model) if fast else None,
        fused_ops=fast and not args.unfused_ops,
        compile_ops=fast and args.compile_ops,
        cuda_graph=graphed,
        inner=args.inner,
        steps=spec.steps,
        params_M=round(n_params / 1e6, 1),
    )
    if graphed:
        return measure_graphed_row(model, opt, engine, spec, args, row, n_params)
    try:
        batch = random_batch(b, ctx, query, vocab, dev, args.contexts)
        outer_step(model, opt, engine, spec, batch, micro)  # warm-up (allocates AdamW state)
        sync(dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reps = args.reps if engine.name == "fastweights" else args.ref_reps
        t0 = time.perf_counter()
        for _ in range(reps):
            batch = random_batch(b, ctx, query, vocab, dev, args.contexts)
            outer_step(model, opt, engine, spec, batch, micro)
        sync(dev)
        dt = (time.perf_counter() - t0) / reps
    except torch.OutOfMemoryError as e:
        opt.zero_grad(set_to_none=True)
        row["error"] = "out of memory: " + str(e).split("\n")[0][:120]
        return row
    if dev == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return add_rates(row, args, dt, n_params)


def add_rates(row: dict, args, dt: float, n_params: int) -> dict:
    """``row`` with ms/task, tasks/s, TFLOP/s and % of peak of a step of ``dt`` seconds."""
    b, ctx, query = row["meta_batch"], row["ctx"], row["query"]
    flops = (12 * n_params * ctx + 6 * n_params * query) * args.contexts * b
    row.update(ms_per_task=1000 * dt / b, tasks_per_s=b / dt, tflops=flops / dt / 1e12)
    if args.device == "cuda":
        peak = PEAK_TFLOPS.get(args.dtype)
        row["pct_peak"] = 100 * row["tflops"] / peak if peak else None
    return row


def measure_graphed_row(model, opt, engine, spec, args, row: dict, n_params: int) -> dict:
    """The row of a step captured as a CUDA graph (``graph_step.measure_graphed``); a failed
    capture or out-of-memory becomes a row with an error."""
    from graph_step import measure_graphed

    def batch_fn():
        vocab = model.config.vocab_size
        return random_batch(
            row["meta_batch"], row["ctx"], row["query"], vocab, "cuda", args.contexts
        )

    try:
        got = measure_graphed(model, opt, engine, spec, batch_fn, row["micro"], args.reps)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        opt.zero_grad(set_to_none=True)
        print(f"cuda graph, meta-batch {row['meta_batch']}: {e}", file=sys.stderr, flush=True)
        row["error"] = "cuda graph: " + str(e).split("\n")[0][:200]
        return row
    dt = got.pop("dt")
    row.update(got)
    return add_rates(row, args, dt, n_params)


def phases(model, engine, spec, batch: MetaBatch) -> dict:
    """GiB allocated after the inner step, after the outer loss, and the peak of the backward."""
    from raymeta.meta.inner import double_backward_attention
    from raymeta.meta.objectives import lg_loss

    gib = 2**30
    opt_free = torch.cuda.memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    with double_backward_attention():
        state = engine.adapt(model, batch.contexts, spec)
        sync("cuda")
        after_adapt = torch.cuda.memory_allocated() / gib
        peak_adapt = torch.cuda.max_memory_allocated() / gib
        loss = lg_loss(engine.logits(model, state, batch.queries), batch.queries).mean()
        after_loss = torch.cuda.memory_allocated() / gib
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
    sync("cuda")
    out = dict(
        phase_base_GiB=opt_free,
        after_adapt=after_adapt,
        peak_adapt=peak_adapt,
        after_loss=after_loss,
        peak_backward=torch.cuda.max_memory_allocated() / gib,
        tasks=batch.size,
    )
    del state, loss
    model.zero_grad(set_to_none=True)
    return {k: round(v, 2) for k, v in out.items()}


class KeptBytes:
    """Saved-tensor hooks counting the bytes autograd keeps for backward that are still alive
    (each storage once; the model's parameters left out): any device, no allocator needed."""

    class Held:
        def __init__(self, t, owner, key):
            self.t, self.owner, self.key = t, owner, key
            owner.count[key] = owner.count.get(key, 0) + 1
            owner.size[key] = t.untyped_storage().nbytes()

        def __del__(self):
            self.owner.count[self.key] -= 1

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.count: dict[int, int] = {}
        self.size: dict[int, int] = {}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        # detached: holding t itself would hold its grad_fn, and a node that saves its own
        # output would then never be freed (a reference cycle through autograd)
        return t if key in self.params else KeptBytes.Held(t.detach(), self, key)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, KeptBytes.Held) else held

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def live(self, extra=()) -> int:
        """Bytes of the live saved storages plus those of the tensors ``extra`` not among them."""
        keys = {k for k, c in self.count.items() if c > 0}
        total = sum(self.size[k] for k in keys)
        for t in extra:
            k = t.untyped_storage().data_ptr()
            if k not in keys and k not in self.params:
                keys.add(k)
                total += t.untyped_storage().nbytes()
        return total


def tensors_in(obj) -> list[torch.Tensor]:
    """The tensors in ``obj`` (tensors, dicts, lists, tuples, objects' attributes)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif hasattr(obj, "__dict__"):
        obj = [v for k, v in vars(obj).items() if k not in ("uses",)]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors_in(x)]
    return []


def graph_memory(model, engine, spec, batch: MetaBatch) -> dict:
    """GiB per task that the inner step leaves for the outer backward (saved tensors of its
    graph, plus what the state holds: the update terms, or the reference's θ'), counted by
    ``KeptBytes`` on any device."""
    from raymeta.meta.inner import double_backward_attention

    counter = KeptBytes(model)
    with counter.hooks(), double_backward_attention():
        state = engine.adapt(model, batch.contexts, spec)
    kept = counter.live(tensors_in(state)) / 2**30 / batch.size
    del state
    return {"kept_GiB_per_task": round(kept, 4)}


def profile(model, opt, engine, spec, args, b, ctx, micro):
    """Print the top operators of one outer step (by device time on cuda, else CPU time)."""
    batch = random_batch(b, ctx, args.query, model.config.vocab_size, args.device, args.contexts)
    if args.device == "cuda":
        print(json.dumps(phases(model, engine, spec, batch)), flush=True)
    with torch.profiler.profile() as prof:
        outer_step(model, opt, engine, spec, batch, micro)
        sync(args.device)
    key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60))


def fmt(v, nd=1):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def add_speedups(rows_: list[dict]) -> None:
    """Set each measured fastweights row's ``speedup``: its tasks/s over the reference's at the
    same context length, contexts, query length and meta-batch (when that was measured)."""

    def setting(r):
        return r["ctx"], r["contexts"], r["query"], r["meta_batch"]

    ref = {setting(r): r for r in rows_ if r["engine"] == "reference" and "error" not in r}
    for r in rows_:
        base = ref.get(setting(r))
        if r["engine"] != "reference" and "error" not in r and base:
            r["speedup"] = r["tasks_per_s"] / base["tasks_per_s"]


def table(rows_: list[dict]) -> str:
    """Markdown table with the speedup of fastweights over reference at equal settings."""
    add_speedups(rows_)
    head = [
        "engine",
        "shape",
        "dtype",
        "ctx",
        "n",
        "query",
        "meta-batch",
        "micro",
        "ckpt",
        "ms/task",
        "tasks/s",
        "peak GiB",
        "TFLOP/s",
        "% bf16 peak",
        "speedup",
    ]
    kept = any("kept_GiB_per_task" in r for r in rows_)
    if kept:
        head.append("kept GiB/task")
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    keys = ("engine", "shape", "dtype", "ctx", "contexts", "query", "meta_batch", "micro")
    for r in rows_:
        cells = [r[k] for k in (*keys, "checkpoint_inner")]
        if r.get("family", "llama") != "llama":
            cells[1] = f"{r['family']} {cells[1]}"
        if r.get("compile_ops"):
            cells[0] += " (compiled ops)"
        if r.get("cuda_graph"):
            cells[0] += " (CUDA graph)"
        if "error" in r:
            cells += [r["error"]] + [""] * (5 + kept)
        else:
            speed = r.get("speedup")
            cells += [
                fmt(r["ms_per_task"]),
                fmt(r["tasks_per_s"], 2),
                fmt(r.get("peak_GiB"), 2),
                fmt(r["tflops"], 1 if r["tflops"] >= 1 else 4),
                fmt(r.get("pct_peak")),
                fmt(speed) + ("x" if speed else ""),
            ]
            if kept:
                cells.append(fmt(r.get("kept_GiB_per_task"), 4))
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def inner_names(model, which: str) -> tuple[str, ...]:
    names = [n for n, _ in model.named_parameters()]
    if which == "blocks":
        names = [n for n in names if ".layers." in n and n.endswith("proj.weight")]
    return tuple(names)


def graph_modes(cuda_graph: str | None, engine: str) -> list[bool]:
    """Rows to measure for ``engine``: eager (False), captured as a CUDA graph (True), or both
    (``--cuda-graph also``); only fast-weights steps are captured (the reference engine's runs
    Hugging Face's SDPA mask, which reads the padding on the host)."""
    if engine != "fastweights" or not cuda_graph:
        return [False]
    return [True] if cuda_graph == "only" else [False, True]


def at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse_int(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is not >= {low}")
        return n

    parse_int.__name__ = f"integer >= {low}"
    return parse_int


positive = at_least(1)
nonnegative = at_least(0)


def json_path(s: str) -> str:
    """An argparse type: a file the rows can be written to (checked before any measurement);
    empty = none."""
    if not s:
        return s
    path = Path(s).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{s} is a directory, not a file")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{s}: not writable")
    return str(path)


def distinct(p: argparse.ArgumentParser, flag: str, items: list[str], known) -> None:
    """argparse error for unknown or repeated entries of a comma-separated ``flag``."""
    unknown = set(items) - set(known)
    if unknown:
        p.error(f"{flag}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    repeated = sorted({x for x in items if items.count(x) > 1})
    if repeated:
        p.error(f"{flag}: {', '.join(repeated)} given twice")


def ints(s: str) -> list[int]:
    """An argparse type: a comma-separated list of integers >= 1."""
    return [positive(x) for x in s.split(",")]


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default="llama",
        help="build the shape as a Llama (the default) or a Gemma",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--meta-batch", type=ints, default=[8], help="comma-separated list")
    p.add_argument("--ctx", type=ints, default=[64], help="context tokens (comma-separated)")
    p.add_argument("--query", type=positive, default=16)
    p.add_argument(
        "--contexts",
        type=positive,
        default=1,
        help="contexts per task, all in one inner update (and as many queries)",
    )
    p.add_argument("--engines", default="reference,fastweights")
    p.add_argument(
        "--inner",
        choices=["all", "blocks"],
        default="all",
        help="inner parameters: all, or the decoder blocks' projection weights",
    )
    p.add_argument("--steps", type=positive, default=1, help="inner SGD steps")
    p.add_argument("--first-order", action="store_true")
    p.add_argument(
        "--checkpoint-inner",
        nargs="?",
        const="vjp",
        default=False,
        choices=["vjp", "forward"],
        help="InnerSpec.checkpoint_inner: vjp (the default when given: the inner backward "
        "checkpointed per decoder block) or forward (only the inner forward's blocks)",
    )
    p.add_argument(
        "--phases",
        action="store_true",
        help="after timing, add GiB allocated by phase of one fastweights step (cuda)",
    )
    p.add_argument(
        "--fw-attention",
        choices=["fused", "eager", "model"],
        default="fused",
        help="fastweights' attention: fused (raymeta.meta.attention, the default), eager (HF "
        "eager for a half-precision SDPA model) or model (the model's own, SDPA math)",
    )
    p.add_argument(
        "--graph-memory",
        action="store_true",
        help="after timing, add the GiB per task the inner step keeps for the outer backward "
        "(saved tensors + update terms, counted by saved-tensor hooks; any device)",
    )
    p.add_argument(
        "--unfused-ops",
        action="store_true",
        help="fastweights: torch's own gated MLPs and RMS normalisation instead of the fused ones",
    )
    p.add_argument(
        "--compile-ops",
        action="store_true",
        help="fastweights: the fused ops' bodies through torch.compile (meta.compile_ops)",
    )
    p.add_argument(
        "--cuda-graph",
        nargs="?",
        const="only",
        default=None,
        choices=["only", "also"],
        help="fastweights: the whole step captured once as a CUDA graph and replayed "
        "(bench/graph_step.py; cuda only; AdamW capturable for every row); 'also': an eager "
        "row and a graphed one",
    )
    p.add_argument(
        "--micro", type=nonnegative, default=0, help="fastweights tasks per forward (0: all)"
    )
    p.add_argument("--ref-micro", type=positive, default=1, help="reference tasks per forward")
    p.add_argument(
        "--ref-max-batch",
        type=positive,
        default=10**9,
        help="skip the reference above this meta-batch",
    )
    p.add_argument("--reps", type=positive, default=3)
    p.add_argument("--ref-reps", type=positive, default=1)
    p.add_argument("--threads", type=nonnegative, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--profile",
        type=nonnegative,
        default=0,
        help="after timing, profile one fastweights step and print this many top ops",
    )
    p.add_argument("--json", type=json_path, default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
        p.error(f"--device cuda: no CUDA device here (torch {torch.__version__}, {why})")
    engines = args.engines.split(",")
    distinct(p, "--engines", engines, ("reference", "fastweights"))
    if engines == ["reference"] and min(args.meta_batch) > args.ref_max_batch:
        p.error(
            f"--ref-max-batch {args.ref_max_batch} skips every --meta-batch "
            f"{','.join(map(str, args.meta_batch))} of the only engine: nothing to measure"
        )
    if args.phases and args.device != "cuda":
        p.error("--phases needs --device cuda (it reads the CUDA allocator)")
    if args.cuda_graph and args.device != "cuda":
        p.error(f"--cuda-graph needs --device cuda (got --device {args.device})")
    return args


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = build_model(args.shape, dtype, args.device, args.family)
    n_params = sum(p.numel() for p in model.parameters())
    opt = outer_optimizer(model, capturable=bool(args.cuda_graph))
    names = inner_names(model, args.inner)
    if args.unfused_ops:
        ops.FUSED_OPS = False
    if args.fw_attention != "fused":
        ops.ATTENTION = None if args.fw_attention == "model" else args.fw_attention
    spec = InnerSpec(
        lr=1e-3,
        names=names,
        steps=args.steps,
        second_order=not args.first_order,
        checkpoint_inner=args.checkpoint_inner,
        compile_ops=args.compile_ops,
    )
    print(
        f"# torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
        + f", {n_params / 1e6:.1f}M parameters, {len(names)} inner tensors"
        + f", fastweights attention: {ops.attention_run(model)}",
        flush=True,
    )
    results = []
    for ctx in args.ctx:
        for b in args.meta_batch:
            for name in args.engines.split(","):
                if name == "reference" and b > args.ref_max_batch:
                    continue
                engine = select_engine(name, model, spec)
                micro = args.ref_micro if name == "reference" else (args.micro or b)
                eager = None  # the extras below look at the eager row only
                for graphed in graph_modes(args.cuda_graph, name):
                    row = measure(
                        model, opt, engine, spec, args, b, ctx, args.query, micro, n_params, graphed
                    )
                    print(json.dumps(row), flush=True)
                    results.append(row)
                    eager = eager if graphed else row
                if eager is None:
                    continue
                row = eager
                if args.phases and args.device == "cuda" and name == "fastweights":
                    if "error" not in row:
                        batch = random_batch(
                            b, ctx, args.query, model.config.vocab_size, "cuda", args.contexts
                        )
                        try:
                            row.update(phases(model, engine, spec, batch))
                        except torch.OutOfMemoryError:
                            row["phases"] = "out of memory"
                            model.zero_grad(set_to_none=True)
                        del batch
                        print(json.dumps(row), flush=True)
                if args.graph_memory and "error" not in row:
                    batch = random_batch(
                        b, ctx, args.query, model.config.vocab_size, args.device, args.contexts
                    )
                    row.update(graph_memory(model, engine, spec, batch))
                    print(json.dumps(row), flush=True)
                if args.profile and name == "fastweights" and "error" not in row:
                    profile(model, opt, engine, spec, args, b, ctx, micro)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    print(table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
