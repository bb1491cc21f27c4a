"""Loading causal LMs (any Hugging Face model, or the offline tiny one) and LoRA wrapping.

Everything loads through ``from_pretrained``: a hub name, a local path, or the
tiny model this module builds (a small Llama saved with ``save_pretrained`` and
a word-level tokenizer trained with the ``tokenizers`` library on the task
texts). The attention implementation is one with double backward (eager, or
SDPA which the meta step runs under its math backend).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from raymeta.errors import InputError
from raymeta.paths import looks_local

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
"""Files of which a saved Hugging Face tokenizer has at least one."""
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(texts: Iterable[str], max_vocab: int = 16000):
    """A word-level tokenizer (words and punctuation) trained on ``texts``.

    Every word of the generated sets is one token, so a name is exactly two."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, special_tokens=SPECIALS)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_tiny_model(shape, vocab_size: int, seed: int = 0):
    """A randomly initialised small Llama. ``shape``: a TinyModelConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=shape.tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg)


ADAPTER_DIR = "adapter"
"""Subdirectory of a saved model holding its peft LoRA adapter (``save_pretrained`` of peft)."""


def is_peft(model) -> bool:
    """Whether ``model`` is a peft-wrapped model (it has a ``peft_config``)."""
    return isinstance(getattr(model, "peft_config", None), dict)


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of a peft model's base model without its adapter (original key names)."""
    base = model.get_base_model()
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def point_adapter_at_base(path: str | Path) -> None:
    """Set the ``base_model_name_or_path`` of the adapter in ``path/adapter`` (if any) to
    ``path`` itself, absolute: where the model saved there has moved to (e.g. a checkpoint that
    Ray copied out of the temporary folder it was written in)."""
    adapter_config = Path(path) / ADAPTER_DIR / "adapter_config.json"
    if not adapter_config.is_file():
        return
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = str(Path(path).resolve())
    adapter_config.write_text(json.dumps(settings, indent=2))


def save_model(model, tokenizer, path: str | Path, info: dict | None = None) -> Path:
    """``save_pretrained`` model and tokenizer into ``path`` (plus ``raymeta.json`` info).

    A peft model is written as its base model (``path``) plus its adapter
    (``path/adapter``), which :func:`load_model` puts back together, and so does peft's
    ``AutoPeftModelForCausalLM.from_pretrained(path/adapter)``: the adapter's
    ``base_model_name_or_path`` is ``path`` itself (absolute)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.get_base_model().save_pretrained(path, state_dict=base_state_dict(model))
        model.save_pretrained(path / ADAPTER_DIR)
        point_adapter_at_base(path)
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if info is not None:
        (path / "raymeta.json").write_text(json.dumps(info, indent=1))
    return path


def check_model_path(name_or_path: str) -> None:
    """Raise InputError when ``model.name_or_path`` names a local path that holds no saved model
    (no directory, no ``config.json`` in it, or no tokenizer files); hub names and ``tiny`` pass
    unchecked."""
    if name_or_path == "tiny" or not looks_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        problem = "does not exist"
    elif not path.is_dir():
        problem = "is a file, not a model directory"
    elif not (path / "config.json").is_file():
        problem = "is a directory without config.json (no model saved there)"
    elif not any((path / name).is_file() for name in TOKENIZER_FILES):
        problem = (
            "holds a model but no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}; save one there with tokenizer.save_pretrained)"
        )
    else:
        return
    raise InputError(
        f"model.name_or_path: {name_or_path} {problem}; give a directory written by "
        "save_pretrained, a hub name, or tiny"
    )


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str = "eager",
    device: str | torch.device = "cpu",
):
    """(model, tokenizer) from a hub name or local directory through ``from_pretrained``.

    A directory written by :func:`save_model` from a peft model comes back as that peft
    model (base weights plus the adapter in ``adapter/``, adapter trainable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {list(DTYPES)}")
    check_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
        )
    except OSError as e:
        raise InputError(
            f"model.name_or_path: cannot load {name_or_path!r} ({e}). Offline machines need a "
            "local directory written by save_pretrained, or model.name_or_path=tiny."
        ) from None
    except ValueError as e:  # e.g. GPT-OSS has no SDPA attention (Gemma 2 from transformers 5.21)
        if "attention implementation" not in str(e) or attn_implementation == "eager":
            raise
        why = str(e).split(". ")[0]
        raise InputError(
            f"model.attn_implementation={attn_implementation}: {name_or_path!r} cannot load with "
            f"it ({why}); set model.attn_implementation=eager"
        ) from None
    if not tokenizer("The river is called Alba.")["input_ids"]:
        raise InputError(
            f"model.name_or_path: the tokenizer of {name_or_path!r} encodes text to no tokens "
            "(an empty vocabulary: was the right tokenizer saved there?)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = Path(name_or_path) / ADAPTER_DIR
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        # trainable like apply_lora's model: the adapter trains, the base is frozen
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return model.to(device), tokenizer


def apply_lora(model, lora_cfg):
    """Wrap ``model`` with a peft LoRA adapter (``lora_cfg``: a LoraConfig); base frozen.

    Raises InputError when peft refuses the adapter (e.g. a target module the model lacks)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        target_modules=list(lora_cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # peft's errors about the targets (NoMatchingPeftModuleError, ...)
        raise InputError(
            f"model.lora.target_modules={list(lora_cfg.target_modules)}: peft cannot apply "
            f"LoRA to this model: {e}"
        ) from None


def resolve_inner_params(model, patterns: list[str], lora_mode: str | None = None) -> list[str]:
    """Names of the parameters the inner step updates.

    ``["all"]``: every trainable parameter (with LoRA in adapter mode: the adapter;
    in ``outer_lora_inner_full`` mode: every base weight, not the adapter). Otherwise
    every parameter whose name contains one of the patterns. Raises if none match."""
    named = list(model.named_parameters())
    if lora_mode == "outer_lora_inner_full":
        pool = [n for n, _ in named if "lora_" not in n]
    else:
        pool = [n for n, p in named if p.requires_grad]
    if patterns == ["all"]:
        names = pool
    else:
        names = [n for n in pool if any(p in n for p in patterns)]
    if not names:
        tied = tied_names(model, patterns)
        outside = [n for n, _ in named if n not in pool and any(p in n for p in patterns)]
        where = {
            None: "the model",
            "outer_lora_inner_full": "the base weights (model.lora.mode=outer_lora_inner_full: "
            "the inner step updates those, the outer step the adapter)",
        }.get(
            lora_mode, f"the adapter (model.lora.mode={lora_mode}: the inner step updates it alone)"
        )
        raise InputError(
            f"meta.inner_params: {patterns!r} matches no parameter of {where}"
            + (f" ({tied}: name it so)" if tied else "")
            + (f"; it matches {outside[0]}, outside them" if outside else "")
        )
    return names


def tied_names(model, patterns: list[str]) -> str:
    """'a is tied to b, ...' for the shared parameters whose other name matches a pattern
    (named_parameters lists a tied parameter once, under its first name)."""
    seen = {id(p): n for n, p in model.named_parameters()}
    pairs = [
        f"{n} is tied to {seen[id(p)]}"
        for n, p in model.named_parameters(remove_duplicate=False)
        if seen.get(id(p), n) != n and any(q in n for q in patterns)
    ]
    return ", ".join(pairs)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass(frozen=True)
class NormStyle:
    """The arithmetic of a transformers norm class, known by its code: its output is
    ``(offset + weight) · n(x) (+ bias)`` with ``n(x) = x · rsqrt(mean(x²) + eps)`` over the
    last dim (an RMSNorm), or ``(x - mean(x)) · rsqrt(var(x) + eps)`` (``centred``: a
    LayerNorm), ``n`` computed in float32 (the class's forward casts x up) unless ``upcast``
    is off."""

    where: str
    """The module under ``transformers.models`` defining the class, e.g. "llama.modeling_llama"."""
    name: str
    """The class whose code defines the style; classes with the same code share it."""
    methods: tuple[str, ...]
    """The methods whose code must be that class's (``forward``, and ``_norm`` where it has one)."""
    offset: float = 0.0
    """Added to the weight (Gemma, Nemotron: 1)."""
    wide: bool = False
    """Scaled in float32 and rounded to x's dtype once, at the end (else ``n`` is rounded to
    x's dtype first, then scaled in the weight's dtype, as Llama does)."""
    centred: bool = False
    """x's mean is taken out first: a LayerNorm (Cohere's, Nemotron's)."""
    upcast: bool = True
    """The forward computes in float32 for any input, which ``keep_float64`` widens (False:
    in the input's dtype, as Nemotron's ``F.layer_norm``: float64 already)."""


NORMS = (
    NormStyle("llama.modeling_llama", "LlamaRMSNorm", ("forward",)),
    NormStyle("gemma.modeling_gemma", "GemmaRMSNorm", ("forward", "_norm"), offset=1.0, wide=True),
    NormStyle("olmo2.modeling_olmo2", "Olmo2RMSNorm", ("forward",), wide=True),
    NormStyle("helium.modeling_helium", "HeliumRMSNorm", ("forward",), wide=True),
    NormStyle("gemma4.modeling_gemma4", "Gemma4RMSNorm", ("forward", "_norm"), wide=True),
    NormStyle("moshi.modeling_moshi", "MoshiRMSNorm", ("forward", "_norm"), wide=True),
    NormStyle("nanochat.modeling_nanochat", "NanoChatRMSNorm", ("forward", "_norm")),
    NormStyle(
        "cohere.modeling_cohere",
        "CohereLayerNorm",
        ("forward",),
        wide=True,
        centred=True,
    ),
    NormStyle(
        "nemotron.modeling_nemotron",
        "NemotronLayerNorm1P",
        ("forward",),
        offset=1.0,
        centred=True,
        upcast=False,
    ),
)
"""The norm styles the fast-weights engine computes (besides ``nn.LayerNorm``). transformers
copies each class under other names (by a scan of transformers 5.25: Llama's into Mistral,
Qwen, Phi-3, Granite, ..., 144 classes; Gemma's into Gemma 2-3, VaultGemma, Qwen3-Next,
Qwen3.5, 13; OLMo-2's (``weight * n(x)`` in float32) into OLMo-3, FlexOlmo, GPT-OSS, 12;
Helium's (the same, the weight cast first) into Nemotron-H, 4; Gemma 4's (``n`` by
``pow(·, -0.5)``, a ``with_scale`` switch) into Gemma 3n, 8; Moshi's into Kyutai's
speech-to-text, 2; Cohere's LayerNorm (no bias, in float32) into Cohere 2; Nemotron's
``F.layer_norm`` with ``1 + weight`` and a bias). NanoChat's has no weight (nothing to
adapt): it is here for ``keep_float64`` (HRM copies it)."""


def norm_style(module, weighted: bool = True) -> NormStyle | None:
    """The ``NORMS`` style of ``module``'s class (its methods have that class's code: a class
    that only shares the name is not one), when it has a float eps and (``weighted``) a
    ``weight`` tensor (``[d]``, or Cohere's per-head q/k scales ``[H, d]``); None otherwise. A
    forward patched on the instance is the eligibility probe's to check."""
    if weighted and not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    for style in NORMS:
        if copies_code(type(module), style.where, style.name, style.methods):
            return style if isinstance(norm_eps(module, style), float) else None
    return None


EPS_NAMES = ("variance_epsilon", "eps")


@functools.cache
def eps_attribute(style: NormStyle) -> str | None:
    """The attribute holding eps in the installed transformers' code of ``style``'s class: the
    one of ``EPS_NAMES`` its methods read (transformers 5.25 renamed Gemma 4's and NanoChat's
    ``eps`` to ``variance_epsilon``), or None (no such class, or not exactly one name read)."""
    ref = reference_class(style.where, style.name)
    codes = [getattr(getattr(ref, m, None), "__code__", None) for m in style.methods]
    read = {n for c in codes if c is not None for n in c.co_names}
    found = [n for n in EPS_NAMES if n in read]
    return found[0] if len(found) == 1 else None


def norm_eps(module, style: NormStyle):
    """The eps of norm ``module`` of ``style`` (None where it has none)."""
    name = eps_attribute(style)
    return None if name is None else getattr(module, name, None)


def normalise(x: torch.Tensor, eps: float, centred: bool) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps)`` over the last dim ``[..., d]``, x's mean taken out first
    if ``centred`` (in x's dtype, with the operations of Cohere's LayerNorm)."""
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_full_precision(self, x: torch.Tensor) -> torch.Tensor:
    """A ``NORMS`` module's forward, in float64 for float64 inputs (as its class's otherwise:
    float32 normalisation, then its own scaling and rounding; no scaling for a norm without
    weight, such as Gemma 4's ``with_scale=False``)."""
    style = norm_style(self, weighted=False)
    dtype = torch.promote_types(x.dtype, torch.float32)
    h = normalise(x.to(dtype), norm_eps(self, style), style.centred)
    if getattr(self, "weight", None) is None:
        return h.to(x.dtype)
    if style.wide:
        return (h * (style.offset + self.weight.to(dtype))).to(x.dtype)
    return (style.offset + self.weight) * h.to(x.dtype)


def _code(f, depth: int = 0) -> tuple | None:
    """``f``'s code with that of the functions it closes over, so that a decorator's wrapper is
    known by the function it wraps too; None where f is not a function. A module called as a
    function is known by its class's ``forward``, unless the instance has a forward of its own:
    with the ``kernels`` package installed (transformers 5.25 requires it), transformers' hub
    decorators make ``apply_rotary_pos_emb`` such a module, and an attention class's
    ``forward`` a wrapper around its own code, the same wrapper for every class."""
    if isinstance(f, torch.nn.Module):
        if "forward" in f.__dict__:  # (a kernel put on the instance)
            return None
        f = type(f).forward
    c = getattr(f, "__code__", None)
    if c is None or depth > 8:
        return None
    inner = []
    for cell in getattr(f, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        if inspect.isfunction(v) or isinstance(v, torch.nn.Module):
            inner.append(_code(v, depth + 1))
    return (c.co_code, c.co_names, c.co_consts, c.co_varnames, tuple(inner))


def same_code(f, g) -> bool:
    """Whether functions ``f`` and ``g`` have the same code, and so have the functions they close
    over (``_code``; False if either is not a function)."""
    code = _code(f)
    return code is not None and code == _code(g)


@functools.cache
def copies_code(t: type, where: str, name: str, methods: tuple[str, ...]) -> bool:
    """Whether class ``t``'s ``methods`` have the code of transformers' ``where.name``'s (False
    when that class does not exist in the installed transformers)."""
    ref = reference_class(where, name)
    if ref is None:
        return False
    return all(same_code(getattr(ref, m, None), getattr(t, m, None)) for m in methods)


def reference_class(where: str, name: str) -> type | None:
    """transformers' class ``where.name`` (``where`` under ``transformers.models``), or None when
    the installed transformers has none."""
    try:
        return getattr(importlib.import_module(f"transformers.models.{where}"), name)
    except (ImportError, AttributeError):
        return None


LINEARS = (("falcon.modeling_falcon", "FalconLinear"),)  # x @ weight.T (+ bias)
"""transformers ``nn.Linear`` subclasses whose ``forward`` computes ``nn.Linear``'s formula."""


def is_linear(module) -> bool:
    """Whether ``module`` computes ``x W^T + b`` as ``nn.Linear`` does: one, or a subclass whose
    ``forward`` has the code of one of the ``LINEARS`` (any other subclass's is unknown)."""
    t = type(module)
    if t is torch.nn.Linear:
        return True
    return isinstance(module, torch.nn.Linear) and any(
        copies_code(t, where, name, ("forward",)) for where, name in LINEARS
    )


SCALED_EMBEDDINGS = (
    ("gemma.modeling_gemma", "GemmaTextScaledWordEmbedding"),  # rows * embed_scale.to(dtype)
    ("biogpt.modeling_biogpt", "BioGptScaledWordEmbedding"),  # rows * embed_scale (a float)
)
"""transformers classes whose ``forward`` multiplies ``nn.Embedding``'s rows by ``embed_scale``
(Gemma 1-4, MiniCPM3 and VaultGemma copy the first; Bart, BioGPT, M2M100, XGLM, ... the second)."""


def embedding_scale(module) -> torch.Tensor | float | None:
    """The factor a scaled embedding multiplies its looked-up rows by, as its forward applies
    it (a one-element ``embed_scale`` buffer cast to the table's dtype, or a float), or None
    for a module that is not one: an ``nn.Embedding`` whose ``forward`` has the code of one of
    the ``SCALED_EMBEDDINGS``."""
    if not isinstance(module, torch.nn.Embedding):
        return None
    t = type(module)
    if not any(copies_code(t, where, name, ("forward",)) for where, name in SCALED_EMBEDDINGS):
        return None
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale.to(module.weight.dtype)
    return float(scale) if isinstance(scale, (int, float)) else None


def keep_float64(model):
    """Make the norm layers the fast-weights engine knows (``norm_style``) compute in float64
    when the model is float64.

    HF's RMSNorms (and Cohere's LayerNorm) round through float32, which caps float64 checks
    (finite differences, engine equivalence) at float32 accuracy; their float32 and
    half-precision arithmetic is unchanged. Other norms keep their own arithmetic. Returns
    ``model``."""
    import types

    for module in model.modules():
        style = norm_style(module, weighted=False)
        if style is not None and style.upcast:
            module.forward = types.MethodType(norm_full_precision, module)
    return model


def position_limit(model_config) -> int | None:
    """The longest sequence a Hugging Face model config declares it accepts (None: no limit)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
