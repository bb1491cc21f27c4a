"""Small builders shared by tests: random tiny models and random token batches."""

from __future__ import annotations

import torch

from raymeta.data.batches import Tokens, pad
from raymeta.models import keep_float64


def older_than(module, major: int, minor: int) -> bool:
    """Whether ``module.__version__`` ("5.17.0", "2.60.0rc1") is before ``major.minor``."""
    release = tuple(int(v) for v in module.__version__.split(".")[:2])
    return release < (major, minor)


def tiny_llama(
    vocab=48,
    hidden=16,
    layers=2,
    heads=2,
    tie=False,
    dtype=torch.float64,
    seed=0,
    attn="sdpa",
    kv_heads=None,
    kind="llama",
    positions=64,
    head_dim=True,
    **overrides,
):
    """A random Llama in ``dtype``. SDPA (run under its math kernel by the meta step)
    keeps float64 throughout; HF eager attention takes its softmax in float32. ``kv_heads``
    below ``heads``: grouped-query attention. ``kind``: another Llama-style family
    ("mistral", "qwen3", ...), ``overrides``: more of its config fields. ``head_dim``: pass hidden //
    heads (False: the config derives it, as Falcon's does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        kind,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        **({"head_dim": hidden // heads} if head_dim else {}),
        max_position_embeddings=positions,
        tie_word_embeddings=tie,
        attn_implementation=attn,
        **overrides,
    )
    model = keep_float64(AutoModelForCausalLM.from_config(cfg).to(dtype))
    # random norms so that the norm-scale gradients are not degenerate
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny(path, texts, kind="llama", **overrides):
    """A random tiny float32 model of Hugging Face family ``kind`` (``tiny_llama``, with
    ``overrides``) and a word tokenizer trained on ``texts``, both saved with save_pretrained
    at ``path`` (returned)."""
    from raymeta.models import train_tokenizer

    tok = train_tokenizer(texts)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    model = tiny_llama(len(tok), kind=kind, dtype=torch.float32, **ids, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_rows(n, lo, hi, vocab, gen):
    return [
        torch.randint(
            3, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n)
    ]


def random_contexts(b, n, vocab, gen, lo=4, hi=9, side="right") -> Tokens:
    """Padded contexts ``[b, n, T]`` of varied lengths, labels on real tokens."""
    rows = random_rows(b * n, lo, hi, vocab, gen)
    return pad(rows, 0, side, label_from=[0] * len(rows)).view_lead(b, n)


def random_queries(b, m, vocab, gen, lo=3, hi=7, resp=2, side="right") -> Tokens:
    """Padded query+response rows ``[b, m, T]``; labels on the last ``resp`` tokens."""
    rows = random_rows(b * m, lo, hi, vocab, gen)
    return pad(rows, 0, side, label_from=[len(r) - resp for r in rows]).view_lead(b, m)
