"""Tiny float64 models of many families and the harness that runs one meta step with either
engine and compares them (shared by the fast-weights tests)."""

from __future__ import annotations

import pytest
import torch

from raymeta.meta import fastweights, reference
from raymeta.meta.inner import double_backward_attention
from raymeta.meta.losses import scored_positions
from raymeta.meta.objectives import lc_loss, lg_loss
from raymeta.models import resolve_inner_params
from tests.helpers import random_contexts, random_queries, tiny_llama

VOCAB = 48
"""The tiny models' vocabulary."""
TOL = 1e-8
"""The largest relative difference allowed between the engines in float64."""


def perturb(model, pattern: str, scale: float = 0.1):
    """Random offsets on parameters whose name contains ``pattern`` (norms, biases, lora_B)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if pattern in n:
                p.add_(scale * torch.randn_like(p))
    return model


def llama_tied():
    model = tiny_llama(vocab=VOCAB, tie=True, heads=4, kv_heads=2)  # grouped-query attention
    model.model.embed_tokens.padding_idx = 3  # real context tokens hit it (ids start at 3)
    return model


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPT2LMHeadModel(cfg).to(torch.float64)
    assert model.lm_head.weight is not model.transformer.wte.weight
    return perturb(perturb(model, "ln"), "bias")


def lora(
    seed=0, bias="none", attention_bias=False, rank=2, targets=("q_proj", "v_proj", "down_proj")
):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(vocab=VOCAB, tie=True, seed=seed, attention_bias=attention_bias)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias=bias,
        task_type="CAUSAL_LM",
    )
    return perturb(get_peft_model(base, cfg), "lora_B", 0.3)


def all_names(model):
    return tuple(n for n, _ in model.named_parameters())


def mistral(sliding_window):
    return tiny_llama(
        kind="mistral", vocab=VOCAB, heads=4, kv_heads=2, sliding_window=sliding_window
    )


def mistral_window():
    """Mistral with a 4-token sliding window (the contexts are longer, so it bites)."""
    return mistral(sliding_window=4)


def qwen3():
    """Qwen3: RMSNorms over each head's queries and keys ([rows, T, H, d] inputs)."""
    return tiny_llama(kind="qwen3", vocab=VOCAB, heads=4, kv_heads=2, tie=True)


def phi_head_norms():
    """Phi with q/k LayerNorms: per-head norms called on [rows, H, T, d] inputs; partial
    rotary, biases, a parallel attention/MLP block."""
    model = tiny_llama(
        kind="phi", vocab=VOCAB, heads=4, partial_rotary_factor=0.5, qk_layernorm=True
    )
    return perturb(model, "bias")


def phi3():
    """Phi-3: its RMSNorm is Llama's code under another class name; fused qkv and gate/up
    projections."""
    return tiny_llama(kind="phi3", vocab=VOCAB, heads=4, kv_heads=2, pad_token_id=0)


def gemma(kind="gemma", **overrides):
    """Gemma: a scaled embedding (rows * sqrt(hidden)) tied to the head, RMSNorms scaling by
    ``1 + weight``, a GELU-gated MLP (``kind``, ``overrides``: a later Gemma)."""
    return tiny_llama(
        kind=kind, vocab=VOCAB, heads=4, kv_heads=2, tie=True, pad_token_id=0, **overrides
    )


def gemma2():
    """Gemma 2 (eager attention only): Gemma's embedding and norms, attention scores and final
    logits soft-capped (caps small enough to bend them), a 6-token window on alternate layers
    (the longest padding run here is 5 tokens: HF's eager attention gives NaN on a row that
    sees only padding)."""
    soft_caps = {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}
    return gemma("gemma2", attn="eager", sliding_window=6, query_pre_attn_scalar=4, **soft_caps)


def gemma3():
    """Gemma 3: Gemma's embedding and norms, also as per-head q/k norms ([rows, T, H, d]), a
    4-token sliding window and its own query scaling."""
    return gemma("gemma3_text", sliding_window=4, query_pre_attn_scalar=4)


def olmo2(kind="olmo2", **overrides):
    """OLMo-2: RMSNorms that scale in float32 and round once (OLMo-2's code, not Llama's), also
    over the whole q/k projections ([rows, T, H·d]); untied (``kind``: a later OLMo)."""
    return tiny_llama(kind=kind, vocab=VOCAB, heads=4, kv_heads=2, pad_token_id=0, **overrides)


def olmo3():
    """OLMo-3: OLMo-2's norms and a 4-token sliding window."""
    return olmo2("olmo3", sliding_window=4)


def helium():
    """Helium: RMSNorms casting their weight to float32 before scaling (Helium's code)."""
    return tiny_llama(kind="helium", vocab=VOCAB, heads=4, kv_heads=2, tie=True, pad_token_id=0)


def gemma4():
    """Gemma 4 (text): per-layer inputs (a second scaled embedding, projected and gated into
    every block), value norms without a scale, a wider head on its full-attention layers,
    key/value states shared by the last two of four layers, a 4-token window."""
    return gemma(
        "gemma4_text",
        layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=4,
        global_head_dim=8,
        hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=2,
    )


def hrm():
    """HRM (text): two stacks of blocks run in cycles, the early ones under ``no_grad`` (calls
    that add nothing to the inner gradient), weightless RMSNorms."""
    return tiny_llama(kind="hrm_text", vocab=VOCAB, heads=4, kv_heads=2, pad_token_id=0)


def opt(**overrides):
    """OPT: learned positions counted from the attention mask (an ``nn.Embedding`` subclass
    whose forward derives its ids, offset by 2), project in / out of a narrower embedding, the
    MLP and its norm on tokens flattened to ``[rows · T, d]``, biases everywhere (the keys'
    get no gradient: ``ZERO``)."""
    model = tiny_llama(
        kind="opt",
        vocab=VOCAB,
        ffn_dim=32,
        word_embed_proj_dim=8,
        dropout=0.0,
        pad_token_id=0,
        **overrides,
    )
    return perturb(model, "bias")


def cohere(kind="cohere", **overrides):
    """Cohere: LayerNorms without bias that centre x in float32 and round once (Cohere's
    code), attention and MLP in parallel off one norm, a logit scale, tied embeddings
    (``kind``: Cohere 2, with a sliding window on some layers; ``use_qk_norm``: per-head q/k
    norms with a scale per head, ``[H, d]``)."""
    return tiny_llama(
        kind=kind, vocab=VOCAB, heads=4, kv_heads=2, tie=True, pad_token_id=0, **overrides
    )


def nemotron():
    """Nemotron: LayerNorms with ``1 + weight`` and a bias (``F.layer_norm``), a squared-ReLU
    MLP without gate, partial rotary."""
    return perturb(tiny_llama(kind="nemotron", vocab=VOCAB, heads=4, kv_heads=2), "bias")


def falcon():
    """Falcon (the 40B / 180B layout): query, key and value as one ``FalconLinear`` (an
    ``nn.Linear`` subclass with its own forward of the same formula), grouped-query attention,
    attention and MLP in parallel off two LayerNorms; blocks that return tuples."""
    model = tiny_llama(
        kind="falcon",
        vocab=VOCAB,
        heads=4,
        head_dim=False,
        num_kv_heads=2,
        new_decoder_architecture=True,
    )
    return perturb(model, "ln_")


def moe(kind: str, **fields):
    """A tiny mixture-of-experts model of family ``kind``, each token routed to 2 experts. The
    reference runs transformers' eager experts loop (its default, ``grouped_mm``, takes no
    float64)."""
    return tiny_llama(
        kind=kind,
        vocab=VOCAB,
        heads=4,
        kv_heads=2,
        experts_implementation="eager",
        num_experts_per_tok=2,
        **fields,
    )


def mixtral():
    """Mixtral: 4 experts (a router module calling ``F.linear`` on its weight, softmax in
    float32, top-k renormalised; the experts as one ``[E, 2I, d]`` and one ``[E, d, I]``
    tensor)."""
    return moe("mixtral", num_local_experts=4)


def qwen2_moe():
    """Qwen2-MoE: Mixtral's layout with its own router (softmax with ``dtype=float32``) and a
    shared expert (an ``nn.Linear`` SwiGLU MLP) gated by the sigmoid of an ``nn.Linear``."""
    return moe(
        "qwen2_moe", num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16
    )


def gpt_oss():
    """GPT-OSS: experts stored transposed (``[E, in, out]``) with biases, gate and up
    interleaved and gated by its own clamped ``_apply_gate``, a router with a bias, eager
    attention with a learned sink logit per head (``sinks [H]``, broadcast over the rows as
    ``[1, H, 1, 1]``: ``SinkCall`` gives each row its task's)."""
    return perturb(moe("gpt_oss", attn="eager", num_local_experts=4), "bias")


def roberta():
    """RoBERTa as a decoder: learned positions, LayerNorms, GELU, biases, the head tied to the
    token table; the head's output bias is held both by the head module (a kind the engine does
    not know, which never reads it) and by its decoder ``nn.Linear`` (which does)."""
    model = tiny_llama(
        kind="roberta",
        vocab=VOCAB,
        tie=True,
        pad_token_id=0,
        is_decoder=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return perturb(model, "bias")


MODELS = {
    "llama_tied": (llama_tied, all_names),
    "gpt2": (gpt2, all_names),
    "mistral_window": (mistral_window, all_names),
    "qwen3": (qwen3, all_names),
    "phi_head_norms": (phi_head_norms, all_names),
    "phi3": (phi3, all_names),
    "gemma": (gemma, all_names),
    "gemma2": (gemma2, all_names),
    "gemma3": (gemma3, all_names),
    "olmo2": (olmo2, all_names),
    "olmo3": (olmo3, all_names),
    "helium": (helium, all_names),
    "gemma4": (gemma4, all_names),
    "hrm": (hrm, lambda m: tuple(resolve_inner_params(m, ["all"]))),
    "opt": (opt, all_names),
    "cohere": (cohere, all_names),
    "cohere_qk_norms": (lambda: cohere(use_qk_norm=True), all_names),
    "cohere2": (lambda: cohere("cohere2"), all_names),
    "nemotron": (nemotron, all_names),
    "falcon": (falcon, all_names),
    "mixtral": (mixtral, all_names),
    "qwen2_moe": (qwen2_moe, all_names),
    "gpt_oss": (gpt_oss, all_names),
    "roberta": (roberta, all_names),
    "lora_adapter": (lora, lambda m: tuple(resolve_inner_params(m, ["all"]))),
    "lora_outer_full_inner": (
        lora,
        lambda m: tuple(resolve_inner_params(m, ["all"], "outer_lora_inner_full")),
    ),
    "lora_rank1_outer_full_inner": (  # the paper's rank-1 LoRA outer, full-rank inner
        lambda: lora(rank=1),
        lambda m: tuple(resolve_inner_params(m, ["all"], "outer_lora_inner_full")),
    ),
    "lora_on_the_tied_table_outer_full_inner": (  # peft wraps the embedding itself
        lambda: lora(targets=("embed_tokens", "q_proj")),
        lambda m: tuple(resolve_inner_params(m, ["all"], "outer_lora_inner_full")),
    ),
}


def batch(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return random_contexts(2, n, VOCAB, gen), random_queries(2, 2, VOCAB, gen)


def run(engine, model, spec, ctx, q, objective="LG"):
    """Outer loss (float) and the parameter grads of one meta step with ``engine``."""
    model.zero_grad(set_to_none=True)
    with double_backward_attention():
        state = engine.adapt(model, ctx, spec)
        adapted = engine.logits(model, state, q)
        if objective == "LG":
            per_task = lg_loss(adapted, q)
        else:
            gen = torch.Generator().manual_seed(5)
            p = int(scored_positions(q.labels).sum())
            teacher = torch.log_softmax(
                torch.randn(p, adapted.shape[-1], generator=gen, dtype=adapted.dtype), -1
            )
            per_task = lc_loss(adapted, q, teacher)
    loss = per_task.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), state.inner_loss, grads


ZERO = 1e-12
"""A gradient below ZERO × the largest one is zero in exact arithmetic (a bias on every key
shifts all of a query's scores alike: OPT's ``k_proj.bias``): it is compared in absolute
terms, since its relative error is rounding noise over rounding noise."""


def max_rel_error(ref: dict, fw: dict) -> float:
    assert ref.keys() == fw.keys()
    assert ref, "no parameter received a gradient"
    scale = max(g.norm().item() for g in ref.values())
    errors = []
    for n in ref:
        if ref[n].norm() < ZERO * scale:
            assert fw[n].norm() < ZERO * scale, (n, fw[n].norm().item(), scale)
            continue
        errors.append(((ref[n] - fw[n]).norm() / ref[n].norm()).item())
    return max(errors)


def compare(model, spec, ctx, q, objective="LG"):
    lr, ir, gr = run(reference, model, spec, ctx, q, objective)
    lf, if_, gf = run(fastweights, model, spec, ctx, q, objective)
    assert lf == pytest.approx(lr, rel=TOL)
    assert torch.allclose(if_, ir, rtol=TOL, atol=0)
    err = max_rel_error(gr, gf)
    assert err < TOL, err
    return err


VJP_REFUSED = {
    "falcon": ("decoder blocks return a tuple", "returned tuple, not a tensor"),
    "gemma4": ("input besides their hidden states (per_layer_input)", "(per_layer_input)"),
    "hrm": ("not chained (the input of", "is not the previous block's output"),
}
"""Models whose decoder blocks checkpoint_inner="vjp" cannot recompute from their hidden
states alone: kind → (the refusal's words, the engine's error when called anyway)."""
