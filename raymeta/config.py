"""One typed config tree for every raymeta job.

A run is described by :class:`RunConfig`, loaded from YAML with dotted
command-line overrides (``meta.inner_lr=1e-3``) and validated on load. Every
error names the field, the bad value and, where it came from a file, the file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message names field and value.

    ``field``: the dotted path of the field it is about (None: the file or an override as a
    whole), so that an error can be blamed on the override that set the field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


SOURCE_FORMS = {
    "jsonl": "TRAIN.jsonl[,TEST.jsonl]",
    "squad": "a hub name such as rajpurkar/squad, or a local file or directory",
    "wikitext": "a hub name such as Salesforce/wikitext[:CONFIG], or a local file or directory",
}
"""What ``data.source`` holds for the data sets that need one."""

GENERATED = ("character_descriptions", "reversal_curse")
"""The data sets raymeta generates (the others are read from files or the hub)."""

MIX_KINDS = ("context", "prompt", "nc", "prompt2", "fresh", "copy")
"""The text kinds of the tiny model's pretraining mix (``pretrain.mix`` keys; see pretrain.py)."""


# --------------------------------------------------------------------------- tree


@dataclass
class DataConfig:
    dataset: Literal["character_descriptions", "reversal_curse", "squad", "wikitext", "jsonl"] = (
        "character_descriptions"
    )
    """Which task set: the two generated sets, SQuAD, WikiText, or your own triples (jsonl)."""
    source: str = ""
    """SQuAD/WikiText: a hub name or a local file/directory for ``datasets.load_dataset``.
    jsonl: ``TRAIN.jsonl[,TEST.jsonl]``. Unused for the generated sets."""
    n_train: int = 5000
    """Training triples (generated sets: how many to generate; others: a cap, 0 = all)."""
    n_test: int = 500
    """Test triples. Generated sets: how many to generate (>= 1). SQuAD/WikiText and a jsonl
    TEST file: a cap, 0 = all. A single jsonl file (no TEST file): its last 10% (at least 1)
    are held out as the test set, at most n_test (0 = no cap)."""
    seed: int = 0
    """Seed of the generator and of every sampled subset."""
    cache_dir: str = ".cache/raymeta/data"
    """Where generated/preprocessed triples and their manifests are cached."""
    max_context_chars: int = 2000
    """SQuAD/WikiText filter: drop triples whose context is longer than this."""


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    """Width of the tiny Llama."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Attention heads (key/value heads equal)."""
    intermediate_size: int = 512
    """FFN width."""
    max_positions: int = 256
    """Longest sequence the tiny model accepts."""
    tie_embeddings: bool = False
    """Tie the input embedding and the LM head."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Wrap the model with a peft LoRA adapter."""
    rank: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """LoRA alpha."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt."""
    mode: Literal["adapter", "outer_lora_inner_full"] = "adapter"
    """adapter: outer loop and inner step both update only the adapter;
    outer_lora_inner_full: the outer loop trains the adapter, the inner step is full-rank."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """A Hugging Face causal LM name or local path, or ``tiny`` for the offline tiny model
    (built, pretrained on the task texts and cached under ``tiny_cache_dir``)."""
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    """Parameter dtype. float16 is refused: meta-training has no loss scaling, so its
    gradients under- and overflow (use bfloat16)."""
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    """eager has double backward; sdpa is run under its math backend for the meta step."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny model."""
    tiny_cache_dir: str = ".cache/raymeta/models"
    """Where the tiny model and tokenizer are cached (keyed by data and shape)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA (peft) settings."""


@dataclass
class PretrainConfig:
    """From-scratch pretraining of the tiny model on the task texts (tiny model only)."""

    steps: int = 4000
    """Maximum optimizer steps (the cosine schedule's length)."""
    lr: float = 4e-3
    """AdamW peak learning rate (cosine decay)."""
    batch_size: int = 32
    """Sequences per step."""
    mix: dict[str, float] = field(
        default_factory=lambda: {
            "context": 1.0,
            "prompt": 2.0,
            "nc": 1.0,
            "prompt2": 2.0,
            "fresh": 6.0,
            "copy": 3.0,
        }
    )
    """Sampling weights of the text kinds (context, prompt, nc, prompt2, fresh, copy)."""
    eval_every: int = 250
    """Measure Prompt accuracy every N steps."""
    target_prompt_accuracy: float = 0.97
    """Stop once Prompt accuracy on held-out facts reaches this (0 = never stop early): fresh
    facts for generated sets, else the last tenth of the training triples (at most 200), which
    are then left out of pretraining."""
    seed: int = 0
    """Seed of initialisation and sampling."""


@dataclass
class PrepareConfig:
    """The paper's preparation stage (4.3): brief fine-tuning in NC and Prompt formats."""

    steps: int = 50
    """Optimizer steps (0 = skip)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    batch_size: int = 16
    """Examples per step."""
    n_examples: int = 500
    """Size of the training subset used."""


@dataclass
class MetaConfig:
    objectives: list[Literal["LG", "LC"]] = field(default_factory=lambda: ["LG", "LC"])
    """Which meta-models to train: LG (gold labels) and/or LC (learn from conditioning);
    ``[]``: none, the job only evaluates the configured model (e.g. one a job saved:
    ``model.name_or_path=DIR/models/LG meta.objectives=[] prepare.steps=0``)."""
    engine: Literal["auto", "reference", "fastweights"] = "auto"
    """Meta-step engine: reference (materialised θ'), fastweights (exact low-rank), or auto
    (fastweights where exact, else reference)."""
    inner_lr: float = 0.3
    """η, the inner SGD learning rate (also the FT evaluation's). The paper uses 1e-3 with
    Llama 3.2 1B; the tiny from-scratch model needs a larger step."""
    inner_steps: int = 1
    """k inner SGD steps."""
    second_order: bool = True
    """Differentiate through the inner gradient (False = first-order)."""
    checkpoint_inner: Literal["none", "vjp", "forward"] = "none"
    """Activation checkpointing of the inner pass (fastweights engine): ``vjp`` keeps only each
    decoder block's input and recomputes the block's forward and inner backward in the outer
    backward (least memory: meta-batch 64 of a 1B model fits one 80 GB GPU); ``forward``
    recomputes only the inner forward's blocks; ``none`` keeps everything (fastest). Where
    ``vjp`` cannot recompute a model's blocks (they return tuples, take other differentiable
    inputs or run in cycles), ``meta.engine=auto`` runs ``forward`` and says so."""
    compile_ops: bool = False
    """Run the fastweights engine's fused ops (attention, gated MLP, RMS normalisation, rotary
    embedding, the inner loss's logit gradient) through ``torch.compile``: fewer kernels and
    passes over memory (by ``bench/op_census.py``'s count, about half the step's memory
    traffic at the 1B shape), exact like the eager ops (tests), GPU speed not yet measured
    (``bench/meta_step.py --compile-ops``). The first steps compile each op (seconds each;
    inductor needs a C++ compiler on a CPU, Triton on a GPU)."""
    inner_params: list[str] = field(default_factory=lambda: ["all"])
    """Parameters the inner step updates: ``all`` or substrings of parameter names."""
    contexts_per_update: int = 2
    """Contexts (facts) in one inner update; the outer loss asks about each of them."""
    outer_lr: float = 1e-3
    """Adam learning rate of the outer loop (torch's fused Adam, on either launcher; with
    bfloat16 parameters it computes each update in float32 and rounds once)."""
    clip_norm: float = 1.0
    """Clip the meta-gradient to this global norm (0 = off)."""
    meta_batch_size: int = 16
    """Tasks per outer step (summed over workers)."""
    steps: int = 400
    """Outer steps, capped at ``epochs`` passes over the tasks (0 = all ``epochs`` passes)."""
    epochs: int = 3
    """Passes over the training tasks (the paper: one)."""
    lm_weight: float = 0.5
    """λ, the weight of the plain LM regulariser on θ."""
    lm_source: Literal["contexts", "pretrain_mix", "file"] = "pretrain_mix"
    """Text of the regulariser: training contexts, the tiny model's pretraining mix, or a file
    (contexts and file lines cut to 256 tokens; every text cut to the model's positions). The
    paper's is "ordinary text"; ``lm_mix`` picks the mix's kinds."""
    lm_file: str = ""
    """Text file (one document per line) when ``lm_source`` is file."""
    lm_mix: dict[str, float] = field(
        default_factory=lambda: {"context": 1.0, "fresh": 6.0, "copy": 3.0}
    )
    """Sampling weights of the regulariser's text kinds when ``lm_source`` is pretrain_mix (keys
    as in ``pretrain.mix``; {} = ``pretrain.mix``). The default leaves out the kinds that hold
    training facts' answers (prompt, nc, prompt2), so LC's loss holds no gold label (the paper:
    LC needs none); fresh facts exist only for the generated sets, elsewhere it is context and
    copy."""
    lm_batch_size: int = 16
    """Sequences per regulariser batch."""
    lc_teacher_context: Literal["own", "all"] = "own"
    """LC teacher prompt: the query's own context, or all contexts of the inner update."""
    max_answer_tokens: int = 8
    """Longest answer the LC teacher decodes."""
    log_every: int = 25
    """Print progress every N steps."""


@dataclass
class EvalConfig:
    settings: list[Literal["NC", "Prompt", "FT", "FT_irrelevant", "FT2"]] = field(
        default_factory=lambda: ["NC", "Prompt", "FT", "FT_irrelevant", "FT2"]
    )
    """Evaluation settings."""
    n_examples: int = 500
    """Test triples evaluated (0 = all)."""
    inner_lr: float = 0.0
    """η of the FT settings (0 = meta.inner_lr)."""
    max_new_tokens: int = 8
    """Greedy-decoding budget."""
    batch_size: int = 32
    """Examples per evaluation batch."""


@dataclass
class TrainConfig:
    """Distributed execution (Ray Train + DeepSpeed)."""

    num_workers: int = 1
    """Ray Train workers; each owns a shard of the training tasks."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage for the outer optimizer (0, 1 or 2; the Ray launcher refuses 3,
    which shards the parameters the inner step needs whole)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Outer-step precision (bf16: DeepSpeed's bf16 mode over float32 master weights; the
    checkpoints' model is then bfloat16, ``DIR/models/<objective>`` keeps ``model.dtype``)."""
    report_every: int = 10
    """ray.train.report every N steps."""
    eval_every: int = 0
    """Held-out evaluation every N steps (0 = only at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    checkpoints_to_keep: int = 2
    """Newest checkpoints kept per run (Ray deletes older ones; the final one is always kept)."""
    max_failures: int = 0
    """Restarts from the last checkpoint after a worker dies."""
    ray_address: str = ""
    """Ray cluster address (HOST:PORT of its GCS, ray://HOST:PORT, auto or local); empty =
    $RAY_ADDRESS, else the cluster a ``ray start`` left running on this machine, else a
    private instance (``auto`` is Ray's: any running instance, even another job's). A HOST:PORT
    that does not answer stops the job before it starts."""
    object_store_mb: int = 0
    """Object store size for a local Ray instance (0 = Ray's default)."""
    launcher: Literal["ray", "local"] = "ray"
    """ray: Ray Train workers with DeepSpeed (a local Ray instance when no cluster is running);
    local: the in-process loop (quick debugging and tests)."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (rank 0)."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else a local store in the output dir."""
    experiment: str = "raymeta"
    """MLflow experiment the job's runs go to (the top-level ``experiment`` is only a tag)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name (MLflow run name, output sub-directories)."""
    experiment: str = "main"
    """A tag, ``experiment``, on the job's MLflow runs: which study (which of the paper's
    experiments) the run belongs to, to filter runs by inside the MLflow experiment, which
    is ``tracking.experiment``."""
    seed: int = 0
    """Global seed."""
    device: str = "cpu"
    """Torch device of single-process jobs (cpu, cuda, cuda:N)."""
    threads: int = 0
    """torch threads (0 = torch's default)."""
    save_models: bool = True
    """Write each meta-trained model with ``save_pretrained`` (weights, tokenizer, and a LoRA
    adapter in ``adapter/``) to ``DIR/models/<objective>``, loadable as ``model.name_or_path``
    or with ``AutoModelForCausalLM.from_pretrained``."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass(frozen=True)
class Override:
    """A command-line value: its text and what YAML reads it as. A string field takes the text
    (``name=2024`` is the name "2024"), every other field what YAML read."""

    text: str
    value: Any

    def __repr__(self) -> str:  # as errors show it: what was written
        return self.text.strip()

    def as_text(self) -> str:
        t = self.text.strip()
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
            return t[1:-1]
        return t


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
"""A decimal number as written in a config (YAML 1.1 reads ``1e-3``, without a dot, as a string)."""


def _number(value: Any, tp: type) -> Any:
    """A string written as a number of type ``tp`` (int: digits, or a whole number in exponent
    notation without a dot, such as ``2e4``), else ``value``."""
    if not isinstance(value, str) or not NUMBER.fullmatch(value.strip()):
        return value
    text = value.strip()
    if tp is int:
        if text.lstrip("+-").isdigit():
            return int(text)
        whole = "." not in text and float(text).is_integer() and abs(float(text)) < 2**53
        return int(float(text)) if whole else value
    return float(text)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if isinstance(value, Override):
        wants_text = tp is str or (
            origin is Literal and all(isinstance(c, str) for c in get_args(tp))
        )
        value = value.as_text() if wants_text and not isinstance(value.value, bool) else value.value
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section in YAML (``meta:`` with nothing under it)
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = ""
            if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
                hint = " (YAML reads an unquoted yes/no/on/off as true/false: write one of these)"
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        value = _number(value, float)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        value = _number(value, int)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML's `name: 2024`
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} (quote it)")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        path = f"{where}.{unknown[0]}" if where else unknown[0]
        hint = ""
        if "." in unknown[0]:
            head, _, rest = unknown[0].partition(".")
            hint = f"; in YAML a dotted key nests: write {head}: then {rest}: under it"
        raise ConfigError(f"{path}: unknown field (known: {', '.join(sorted(names))}){hint}", path)
    kwargs = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        try:
            kwargs[name] = _coerce(value, hints[name], path)
        except ConfigError as e:
            e.field = e.field or path
            raise
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. meta.inner_lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), Override(raw, value)


def _section_of(keys: list[str]) -> Any:
    """The config class the field ``keys`` is named in (None: no such section)."""
    cls: Any = RunConfig
    for k in keys[:-1]:
        cls = typing.get_type_hints(cls).get(k) if dataclasses.is_dataclass(cls) else None
    return cls if dataclasses.is_dataclass(cls) else None


def _is_section(keys: list[str]) -> bool:
    """Whether ``keys`` names a section (``meta``, ``model.tiny``), not a field."""
    cls = _section_of(keys)
    return cls is not None and dataclasses.is_dataclass(typing.get_type_hints(cls).get(keys[-1]))


def _default_mapping(keys: list[str]) -> dict:
    """A copy of the default of the mapping-typed field at ``keys`` (e.g. ``pretrain.mix``), so
    that an override of one of its entries keeps the others; {} for a section or no field."""
    cls = _section_of(keys)
    if cls is None:
        return {}
    field_of = {f.name: f for f in dataclasses.fields(cls)}.get(keys[-1])
    if field_of is None or field_of.default_factory is MISSING:
        return {}
    default = field_of.default_factory()
    return dict(default) if isinstance(default, dict) else {}


def _set_path(tree: dict, keys: list[str], value: Any, text: str) -> None:
    """Set ``keys`` in ``tree`` to ``value``. A mapping given for a section sets the fields it
    names one by one (``pretrain={lr: 1e-3}`` keeps the file's ``pretrain.steps``); a mapping
    for a mapping-typed field (``pretrain.mix``) is its whole value."""
    given = value.value if isinstance(value, Override) else value
    if isinstance(given, dict) and _is_section(keys):
        for k, v in given.items():
            _set_path(tree, [*keys, str(k)], v, text)
        return
    node = tree
    for i, k in enumerate(keys[:-1]):
        if k not in node:
            node[k] = _default_mapping(keys[: i + 1])
        child = node[k]
        if isinstance(child, Override) and isinstance(child.value, dict):
            child = node[k] = dict(child.value)  # a mapping field set whole earlier
        if not isinstance(child, dict):
            shown = child.value if isinstance(child, Override) else child
            where = ".".join(keys[: i + 1])
            raise ConfigError(
                f"override {text!r}: {where} is {shown!r} (set earlier by the config file or an "
                "override), not a section"
            )
        node = child
    node[keys[-1]] = value


MINIMUM = {
    "threads": 0,
    "data.n_train": 0,
    "data.n_test": 0,
    "data.max_context_chars": 1,
    "model.tiny.hidden_size": 1,
    "model.tiny.num_layers": 1,
    "model.tiny.num_heads": 1,
    "model.tiny.intermediate_size": 1,
    "model.tiny.max_positions": 1,
    "model.lora.rank": 1,
    "pretrain.steps": 0,
    "pretrain.batch_size": 1,
    "pretrain.eval_every": 1,
    "prepare.steps": 0,
    "prepare.batch_size": 1,
    "prepare.n_examples": 1,
    "meta.inner_steps": 1,
    "meta.contexts_per_update": 1,
    "meta.meta_batch_size": 1,
    "meta.steps": 0,
    "meta.epochs": 1,
    "meta.lm_batch_size": 1,
    "meta.max_answer_tokens": 1,
    "meta.log_every": 1,
    "eval.n_examples": 0,
    "eval.max_new_tokens": 1,
    "eval.batch_size": 1,
    "train.num_workers": 1,
    "train.report_every": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
    "train.checkpoints_to_keep": 1,
    "train.max_failures": 0,
    "train.object_store_mb": 0,
}
"""Integer fields and the least value each may take."""

POSITIVE_NUMBERS = (
    "model.lora.alpha",
    "pretrain.lr",
    "prepare.lr",
    "meta.inner_lr",
    "meta.outer_lr",
    "train.cpus_per_worker",
)
"""Float fields that must be finite and > 0."""

NONNEGATIVE_NUMBERS = ("meta.clip_norm", "meta.lm_weight", "eval.inner_lr")
"""Float fields that must be finite and >= 0."""


def _fail(path: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{path}: invalid value {value!r} (expected {expected})", path)


def _check_ranges(cfg: RunConfig) -> None:
    """Every field of MINIMUM, POSITIVE_NUMBERS and NONNEGATIVE_NUMBERS in its range."""
    for path, low in MINIMUM.items():
        value = get_field(cfg, path)
        if value < low:
            _fail(path, value, f">= {low}")
    for path in (*POSITIVE_NUMBERS, *NONNEGATIVE_NUMBERS):
        value = get_field(cfg, path)
        strict = path in POSITIVE_NUMBERS
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            _fail(path, value, "a finite number " + ("> 0" if strict else ">= 0"))
    target = cfg.pretrain.target_prompt_accuracy
    if not 0 <= target <= 1:
        _fail("pretrain.target_prompt_accuracy", target, "a fraction in [0, 1]")


def _check_lists(cfg: RunConfig) -> None:
    """Lists without repeats, non-empty but for ``meta.objectives``; known pretraining text kinds
    with usable weights."""
    for path in (
        "meta.objectives",
        "eval.settings",
        "meta.inner_params",
        "model.lora.target_modules",
    ):
        items = get_field(cfg, path)
        if not items and path != "meta.objectives":
            _fail(path, items, "at least one entry")
        repeated = sorted({x for x in items if items.count(x) > 1})
        if repeated:
            _fail(path, items, f"no repeated entries; repeated: {', '.join(repeated)}")
    _check_mix("pretrain.mix", cfg.pretrain.mix, cfg.data.dataset)
    if cfg.meta.lm_mix:  # ({} = pretrain.mix)
        _check_mix("meta.lm_mix", cfg.meta.lm_mix, cfg.data.dataset)


def _check_mix(path: str, mix: dict[str, float], dataset: str) -> None:
    """A mix of text kinds: known kinds, finite weights >= 0, at least one > 0, and one other
    than fresh facts (which exist only for the generated sets) for any other ``dataset``."""
    unknown = sorted(set(mix) - set(MIX_KINDS))
    if unknown:
        _fail(f"{path}.{unknown[0]}", mix[unknown[0]], f"a key of {list(MIX_KINDS)}")
    for kind, weight in mix.items():
        if not (weight >= 0 and math.isfinite(weight)):
            _fail(f"{path}.{kind}", weight, "a finite weight >= 0")
    if not any(w > 0 for w in mix.values()):
        _fail(path, mix, "at least one weight > 0")
    if dataset not in GENERATED and not any(w > 0 for k, w in mix.items() if k != "fresh"):
        _fail(
            path,
            mix,
            f"a weight > 0 for a kind other than 'fresh': fresh facts exist only for the "
            f"generated sets, not {dataset!r}",
        )


def validate(cfg: RunConfig) -> RunConfig:
    """Range checks across fields; raises ConfigError naming the field and value."""
    _check_ranges(cfg)
    _check_lists(cfg)
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        _fail(
            "train.zero_stage", cfg.train.zero_stage, "0, 1 or 2; 3 is refused by the Ray launcher"
        )
    tiny = cfg.model.tiny
    if tiny.hidden_size % tiny.num_heads:
        _fail(
            "model.tiny.hidden_size",
            tiny.hidden_size,
            f"a multiple of model.tiny.num_heads={tiny.num_heads}",
        )
    if cfg.meta.checkpoint_inner != "none" and cfg.meta.engine == "reference":
        raise ConfigError(
            f"meta.checkpoint_inner: {cfg.meta.checkpoint_inner!r} needs the fastweights engine "
            "(meta.engine=auto or fastweights); the reference engine has no inner checkpointing",
            "meta.checkpoint_inner",
        )
    if cfg.meta.compile_ops and cfg.meta.engine == "reference":
        raise ConfigError(
            "meta.compile_ops: true needs the fastweights engine (meta.engine=auto or "
            "fastweights); the reference engine runs torch's own ops",
            "meta.compile_ops",
        )
    if cfg.meta.lm_source == "file" and cfg.meta.lm_weight > 0 and not cfg.meta.lm_file:
        raise ConfigError("meta.lm_file: required when meta.lm_source is 'file'", "meta.lm_file")
    if not cfg.data.source and cfg.data.dataset in SOURCE_FORMS:
        raise ConfigError(
            f"data.source: required for dataset {cfg.data.dataset!r} "
            f"({SOURCE_FORMS[cfg.data.dataset]})",
            "data.source",
        )
    if cfg.model.dtype == "float16":
        _fail(
            "model.dtype",
            cfg.model.dtype,
            "float32, float64 or bfloat16 (float16 needs loss scaling, which meta-training "
            "does not do: its gradients under- and overflow)",
        )
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        _fail("device", cfg.device, "cpu, cuda or cuda:N")
    if not cfg.model.name_or_path.strip():
        _fail("model.name_or_path", cfg.model.name_or_path, "tiny, a hub name or a model directory")
    if not cfg.tracking.experiment.strip():
        _fail("tracking.experiment", cfg.tracking.experiment, "a non-empty MLflow experiment name")
    generated = cfg.data.dataset in GENERATED
    if generated and cfg.data.n_train < 1:
        _fail("data.n_train", cfg.data.n_train, ">= 1 for a generated set (how many to generate)")
    if generated and cfg.data.n_test < 1:
        _fail("data.n_test", cfg.data.n_test, ">= 1 for a generated set (how many to generate)")
    if generated:
        from raymeta.data.generate import max_facts

        if cfg.data.n_train + cfg.data.n_test > max_facts():
            raise ConfigError(
                f"data.n_train + data.n_test: {cfg.data.n_train} + {cfg.data.n_test} facts "
                f"asked, but the generator has {max_facts()} distinct names and descriptions",
                "data.n_train",
            )
    workers = cfg.train.num_workers if cfg.train.launcher == "ray" else 1
    if cfg.meta.lm_weight > 0 and cfg.meta.lm_batch_size % workers:
        raise ConfigError(
            f"meta.lm_batch_size: {cfg.meta.lm_batch_size} is not divisible by "
            f"train.num_workers={workers} (each worker takes an equal share)",
            "meta.lm_batch_size",
        )
    if cfg.meta.meta_batch_size % workers:
        raise ConfigError(
            f"meta.meta_batch_size: {cfg.meta.meta_batch_size} is not divisible by "
            f"train.num_workers={workers}",
            "meta.meta_batch_size",
        )
    return cfg


def get_field(cfg: Any, path: str) -> Any:
    """``get_field(cfg, "meta.inner_lr")``."""
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Any) -> dict:
    """The config tree as plain nested dicts (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"meta": {"inner_lr": 1e-3}}`` → ``{"meta.inner_lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(key.split(".")):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _blame(field: str | None, overridden: dict[str, str]) -> str | None:
    """The last override that set ``field`` or a section above it (None: none did)."""
    if field is None:
        return None
    hits = [
        (i, text)
        for i, (key, text) in enumerate(overridden.items())
        if field == key or field.startswith(key + ".") or key.startswith(field + ".")
    ]
    return max(hits)[1] if hits else None


def from_dict(values: dict, overrides: list[str] | None = None, source: str = "") -> RunConfig:
    """Build and validate a RunConfig from nested dicts plus dotted overrides.

    An error is prefixed with the override that set its field, else with ``source``."""
    tree = copy.deepcopy(values or {})
    overridden: dict[str, str] = {}
    for text in overrides or []:
        keys, value = _parse_override(text)
        _set_path(tree, keys, value, text)
        overridden.pop(".".join(keys), None)
        overridden[".".join(keys)] = text
    try:
        return validate(_build(RunConfig, tree))
    except ConfigError as e:
        blamed = _blame(e.field, overridden)
        prefix = f"override {blamed!r}" if blamed else source
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e), e.field) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load ``path`` (YAML; None = the embedded defaults) and apply dotted overrides."""
    values: dict = {}
    source = ""
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(values).__name__}")
    return from_dict(values, overrides, source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to the same tree)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
