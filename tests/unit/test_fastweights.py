"""The fast-weights engine against the reference engine, in float64 on tiny random models.

Outer loss and every parameter gradient must agree within 1e-8 relative, for
k = 1, 2 inner steps, n = 1, 3 contexts per update, padded contexts and queries,
second and first order, on: a Llama with tied embeddings (and a padding_idx hit
by real context tokens), a GPT-2 (transformers Conv1D, biases, LayerNorm, learned
positions, untied head), Mistral with a sliding window, Qwen3 and Phi (per-head q/k norms in
either layout), Phi-3 (Llama's RMSNorm code under another name, fused projections), Gemma,
Gemma 2 (eager attention with logit soft-capping, soft-capped final logits) and Gemma 3 (scaled
embeddings, ``1 + weight`` norms), and peft LoRA (adapter-only inner; LoRA outer (ranks 1 and
2) with a full-rank inner step on the frozen base weights). The fused SwiGLU and RMS normaliser
the engine's passes use (``fused``) are checked against torch's unfused ops on their own too.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymeta.errors import InputError
from raymeta.meta import attention, engines, fastweights, fused, reference, rotary
from raymeta.meta.engines import select_engine
from raymeta.meta.inner import InnerSpec, double_backward_attention
from raymeta.meta.losses import scored_positions
from raymeta.meta.objectives import lc_loss, lg_loss
from raymeta.models import NORMS, resolve_inner_params
from tests.helpers import random_contexts, random_queries, tiny_llama

VOCAB = 48
TOL = 1e-8


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the engine's fallback warnings as a new job would (once per reason)."""
    engines.WARNED.clear()


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


@pytest.mark.parametrize("kind", list(MODELS))
def test_matches_reference(kind):
    build, names_of = MODELS[kind]
    model = build()
    names = names_of(model)
    assert fastweights.ineligibility(model, InnerSpec(0.5, names)) is None
    worst = 0.0
    for steps in (1, 2):
        for n in (1, 3):
            ctx, q = batch(n, seed=steps * 10 + n)
            for second in (True, False):
                spec = InnerSpec(lr=0.5, names=names, steps=steps, second_order=second)
                worst = max(worst, compare(model, spec, ctx, q))
    print(f"{kind}: max relative gradient error {worst:.2e}")


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2", "opt", "lora_adapter"])
def test_left_padding_equals_right_padding(kind):
    """The same rows padded on the left: the same inner losses, outer loss and gradients in
    both engines (positions count real tokens; a row's first token is never scored)."""
    build, names_of = MODELS[kind]
    model = build()
    spec = InnerSpec(lr=0.5, names=names_of(model), steps=2)

    def padded(side):
        gen = torch.Generator().manual_seed(4)
        ctx = random_contexts(2, 3, VOCAB, gen, side=side)
        return ctx, random_queries(2, 2, VOCAB, gen, side=side)

    right, left = padded("right"), padded("left")
    assert not torch.equal(right[0].attention_mask, left[0].attention_mask)
    assert fastweights.ineligibility(model, spec) is None  # (OPT: its flattened tokens' order)
    for engine in (reference, fastweights):
        loss_r, inner_r, grads_r = run(engine, model, spec, *right)
        loss_l, inner_l, grads_l = run(engine, model, spec, *left)
        assert loss_l == pytest.approx(loss_r, rel=1e-10)
        torch.testing.assert_close(inner_l, inner_r, rtol=1e-10, atol=0)
        assert max_rel_error(grads_r, grads_l) < 1e-8
    compare(model, spec, *left)


def llama_biased():
    """A Llama with q/k/v/o biases (``attention_bias``), perturbed so they matter."""
    return perturb(tiny_llama(vocab=VOCAB, tie=True, attention_bias=True), "bias")


SUBSETS = {
    # (model, meta.inner_params patterns): a norm's bias without its scale, a layer's bias
    # without its weight, one matrix, the tied table alone, the untied head alone
    "gpt2 biases": (gpt2, ["bias"]),
    "gpt2 LayerNorm biases": (gpt2, ["ln_1.bias", "ln_f.bias"]),
    "gpt2 LayerNorm scales": (gpt2, ["ln_2.weight"]),
    "gpt2 one Conv1D bias": (gpt2, ["h.0.mlp.c_fc.bias"]),
    "gpt2 head": (gpt2, ["lm_head"]),
    "gpt2 position table": (gpt2, ["wpe"]),
    "llama q bias": (llama_biased, ["layers.0.self_attn.q_proj.bias"]),
    "llama tied table": (llama_tied, ["embed_tokens"]),
    "llama norms": (llama_tied, ["norm"]),
    # peft's bias="all": the adapter and every bias train, the base weights stay frozen
    "lora with biases": (lambda: lora(bias="all", attention_bias=True), ["lora_", "bias"]),
}


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_inner_parameter_subsets_match_reference(subset):
    """``meta.inner_params`` picks any subset: the engine adapts exactly those parameters."""
    build, patterns = SUBSETS[subset]
    model = build()
    names = tuple(resolve_inner_params(model, patterns))
    for steps, n in ((1, 1), (2, 3)):
        ctx, q = batch(n, seed=steps * 10 + n)
        spec = InnerSpec(lr=0.5, names=names, steps=steps)
        assert fastweights.ineligibility(model, spec) is None
        compare(model, spec, ctx, q)


_softmax = F.softmax


def softmax_in_the_inputs_dtype(x, dim=None, _stacklevel=3, dtype=None):
    """``F.softmax`` that never rounds below ``x``'s dtype (``dtype=torch.float32`` on float64)."""
    wide = None if dtype is None else torch.promote_types(dtype, x.dtype)
    return _softmax(x, dim=dim, dtype=wide)


def rotary_in_the_inputs_dtype(module):
    """Cohere's ``apply_rotary_pos_emb`` (of ``module``, Cohere's or Cohere 2's modeling)
    without its rounding of q and k to float32."""

    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        turn = module.rotate_half
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    return apply


def mixtral_router_in_the_inputs_dtype(self, hidden_states):
    """Mixtral's router without its rounding of the logits to float32 before the softmax."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    top, index = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
    return logits, top / top.sum(-1, keepdim=True), index


VJP_REFUSED = {
    "falcon": ("decoder blocks return a tuple", "returned tuple, not a tensor"),
    "gemma4": ("input besides their hidden states (per_layer_input)", "(per_layer_input)"),
    "hrm": ("not chained (the input of", "is not the previous block's output"),
}
"""Models whose decoder blocks checkpoint_inner="vjp" cannot recompute from their hidden
states alone: kind → (the refusal's words, the engine's error when called anyway)."""


@pytest.mark.parametrize("kind", sorted(set(MODELS) - set(VJP_REFUSED)))
def test_checkpointed_inner_backward_matches_reference(kind, monkeypatch):
    """checkpoint_inner=True ("vjp": the inner backward checkpointed per decoder block) is
    exact: k = 1, 2; n = 1, 3; second and first order; every block's VJP is recomputed.

    Hugging Face's eager attention (Gemma 2's) and the MoE routers take their softmax in
    float32, and Cohere's rotary embedding rounds q and k to float32; the recomputed VJP rounds
    them differently (1.2e-7, 8.8e-8 (Mixtral), 1.5e-8 here), so they are widened to the
    inputs' dtype: what is compared is the engine's arithmetic, at float64 rounding."""
    from transformers.models.cohere import modeling_cohere
    from transformers.models.cohere2 import modeling_cohere2
    from transformers.models.mixtral import modeling_mixtral

    monkeypatch.setattr(F, "softmax", softmax_in_the_inputs_dtype)
    for module in (modeling_cohere, modeling_cohere2):
        monkeypatch.setattr(module, "apply_rotary_pos_emb", rotary_in_the_inputs_dtype(module))
    router = modeling_mixtral.MixtralTopKRouter
    monkeypatch.setattr(router, "forward", mixtral_router_in_the_inputs_dtype)
    calls = {"vjp": 0, "forward": 0}
    for cls, key in (
        (fastweights.blocks.BlockVJP, "vjp"),
        (fastweights.blocks.BlockForward, "forward"),
    ):
        orig = cls.backward

        def counted(ctx, *grads, _orig=orig, _key=key):
            calls[_key] += 1
            return _orig(ctx, *grads)

        monkeypatch.setattr(cls, "backward", staticmethod(counted))
    build, names_of = MODELS[kind]
    model = build()
    names = names_of(model)
    assert fastweights.ineligibility(model, InnerSpec(0.5, names, checkpoint_inner=True)) is None
    blocks = len(fastweights.checkpoint.decoder_blocks(model))
    worst = 0.0
    for steps in (1, 2):
        for n in (1, 3):
            ctx, q = batch(n, seed=steps * 10 + n)
            for second in (True, False):
                spec = InnerSpec(
                    lr=0.5,
                    names=names,
                    steps=steps,
                    second_order=second,
                    checkpoint_inner=True,
                )
                before = dict(calls)
                worst = max(worst, compare(model, spec, ctx, q))
                if second:  # the outer backward recomputed every block's forward and VJP
                    assert calls["vjp"] - before["vjp"] == steps * blocks
                    assert calls["forward"] - before["forward"] == steps * blocks
    assert all(
        "forward" not in blk.__dict__ for blk in fastweights.checkpoint.decoder_blocks(model)
    )
    print(f"{kind} (checkpointed inner backward): max relative gradient error {worst:.2e}")


def gpt2_with_dropout(p=0.1):
    """``gpt2()`` in training mode with active dropout in its blocks (attention, residuals)."""
    model = gpt2()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return model.train()


@pytest.mark.parametrize("mode", ["vjp", "forward"])
def test_checkpointed_blocks_replay_their_dropout(mode):
    """With dropout active, a recomputed block draws the masks it drew when it ran: the
    checkpointed step equals the uncheckpointed one from the same seed (loss and every
    gradient), for k = 2 and second order."""
    model = gpt2_with_dropout()
    assert all(
        fastweights.checkpoint.draws_random(b) for b in fastweights.checkpoint.decoder_blocks(model)
    )
    ctx, q = batch(2)
    out = {}
    for key in ("none", mode, "eval"):
        model.train(key != "eval")
        torch.manual_seed(7)
        mode_of = "none" if key == "eval" else key
        spec = InnerSpec(lr=0.5, names=all_names(model), steps=2, checkpoint_inner=mode_of)
        out[key] = run(fastweights, model, spec, ctx, q)
    (l0, _, g0), (l1, _, g1), (_, _, ge) = out["none"], out[mode], out["eval"]
    assert l1 == pytest.approx(l0, rel=1e-12)
    assert max_rel_error(g0, g1) < 1e-10
    assert max_rel_error(g0, ge) > 1e-3  # the control: the dropout draws change the step


def test_checkpoint_inner_values():
    assert fastweights.checkpoint.checkpoint_mode(False) is None
    assert fastweights.checkpoint.checkpoint_mode(True) == "vjp"
    assert fastweights.checkpoint.checkpoint_mode("forward") == "forward"
    with pytest.raises(ValueError, match="checkpoint_inner"):
        fastweights.checkpoint.checkpoint_mode("everything")


@pytest.mark.parametrize("mode", [True, "forward"])
def test_lc_objective_and_checkpointed_inner(mode, monkeypatch):
    """LC outer loss once; inner-pass checkpointing recomputes and stays exact (k=2, 2nd order)."""
    recomputed = []
    cls, method = (
        (fastweights.checkpoint.Replay, "__enter__")
        if mode == "forward"
        else (fastweights.blocks.Block, "run")
    )
    orig = getattr(cls, method)

    def counting(self, *args, **kwargs):
        recomputed.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counting)
    model = llama_tied()
    ctx, q = batch(2)
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2, checkpoint_inner=mode)
    compare(model, spec, ctx, q, objective="LC")
    assert recomputed, "the checkpointed inner blocks were never recomputed"
    gpt = gpt2()
    compare(gpt, InnerSpec(lr=0.5, names=all_names(gpt), steps=2, checkpoint_inner=mode), ctx, q)


class OddLinear(nn.Linear):
    """A Linear subclass whose forward reads its weight other than through ``F.linear``: the
    engine cannot tell what that computes, so it must refuse it."""

    def forward(self, x):
        return x @ self.weight.T


class SquashedLinear(nn.Linear):
    """A Linear subclass whose forward transforms the output of its one ``F.linear`` call."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def with_down_proj(cls, layer=0):
    """A tiny Llama whose layer's ``down_proj`` is a ``cls`` on the same weight."""
    model = tiny_llama(vocab=VOCAB)
    mlp = model.model.layers[layer].mlp
    odd = cls(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    odd.weight = mlp.down_proj.weight
    mlp.down_proj = odd
    return model


def test_unknown_module_kind_falls_back(caplog):
    model = with_down_proj(OddLinear)
    spec = InnerSpec(lr=0.5, names=all_names(model))
    reason = fastweights.ineligibility(model, spec)
    assert (
        reason is not None
        and "model.layers.0.mlp.down_proj (OddLinear) reads its weight or bias by .T" in reason
    ), reason
    with caplog.at_level(logging.WARNING, logger="raymeta.meta"):
        assert select_engine("auto", model, spec).name == "reference"
        assert select_engine("auto", model, spec).name == "reference"  # said once
    (record,) = caplog.records
    assert record.getMessage().startswith("[engine] meta.engine=auto: using the reference engine")
    assert "OddLinear" in caplog.text
    with pytest.raises(InputError, match="OddLinear"):
        select_engine("fastweights", model, spec)
    # restricted to parameters of known modules it is eligible again
    ok = InnerSpec(lr=0.5, names=("model.layers.1.mlp.down_proj.weight", "model.norm.weight"))
    assert select_engine("auto", model, ok).name == "fastweights"


def refused_and_unsafe(model, culprit: str, words: str, caplog):
    """The probe refuses ``model`` (every parameter inner, k = 2) with a reason naming
    ``culprit`` and saying ``words``, ``auto`` runs the reference, and run anyway the engine
    stops (e.g. at an input whose row order the refused probe did not check) or is wrong."""
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2)
    reason = fastweights.ineligibility(model, spec)
    assert reason is not None and culprit in reason and words in reason, reason
    with caplog.at_level(logging.WARNING, logger="raymeta.meta"):
        assert select_engine("auto", model, spec).name == "reference"
    ctx, q = batch(3)
    lr, _, gr = run(reference, model, spec, ctx, q)
    try:
        lf, _, gf = run(fastweights, model, spec, ctx, q)
    except RuntimeError as e:
        assert str(e).startswith("fast-weights:"), e
    else:
        assert abs(lf - lr) > 1e-6 * abs(lr) or max_rel_error(gr, gf) > 1e-6


def test_a_holder_the_engine_does_not_know_may_not_read_what_it_holds(caplog):
    """RoBERTa's head holds the output bias that its decoder reads (``MODELS["roberta"]``:
    exact). A head that also adds the bias itself reads it where no update reaches: refused,
    and run anyway the engine would be wrong."""
    model = roberta()
    head = model.lm_head

    def forward(features, **kwargs):
        return head.decoder(head.layer_norm(F.gelu(head.dense(features)))) + head.bias

    head.forward = forward
    refused_and_unsafe(model, "lm_head.bias", "is read outside the module", caplog)


def test_linear_subclasses_are_adapted_at_their_f_linear_call():
    """An ``nn.Linear`` subclass with its own forward (PhiMoE's router is one) is adapted at
    its one ``F.linear`` call on its weight, whatever its forward does with the output: exact."""
    model = with_down_proj(SquashedLinear)
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2)
    assert fastweights.ineligibility(model, spec) is None
    compare(model, spec, *batch(3))


def time_major_mlp(mlp):
    """Make a Llama MLP run on its tokens flattened time-major, ``[T · rows, d]``: each
    flattened block of T inputs then mixes rows (tasks)."""

    def forward(x):
        rows, length, d = x.shape
        h = x.transpose(0, 1).reshape(length * rows, d)
        y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return y.view(length, rows, -1).transpose(0, 1)

    mlp.forward = forward
    return mlp


def test_tokens_flattened_out_of_row_order_are_refused(caplog):
    """Tokens flattened row by row (OPT's MLP, ``MODELS["opt"]``) are grouped by task; in
    another order the probe refuses (a second forward with the last row's tokens changed
    changes other rows' part of the input), and ``auto`` runs the reference engine."""
    model = tiny_llama(vocab=VOCAB)
    time_major_mlp(model.model.layers[0].mlp)
    spec = InnerSpec(lr=0.5, names=all_names(model))
    reason = fastweights.ineligibility(model, spec)
    assert reason is not None and "model.layers.0.mlp.gate_proj" in reason, reason
    assert "flattened to (6, 16)" in reason and "changed other rows' part" in reason, reason
    with caplog.at_level(logging.WARNING, logger="raymeta.meta"):
        assert select_engine("auto", model, spec).name == "reference"
    assert "cannot group it by task" in caplog.text
    ctx, q = batch(2)
    run(reference, model, spec, ctx, q)  # which runs


def test_flattened_tokens_need_the_probe():
    """The engine groups flattened inputs only of modules the probe saw flattened row by row:
    called without it (``fastweights.adapt`` directly), it stops with the reason."""
    model = opt()
    ctx, q = batch(2)
    spec = InnerSpec(lr=0.5, names=all_names(model))
    with pytest.raises(RuntimeError, match="final_layer_norm .* has not found to be row by row"):
        run(fastweights, model, spec, ctx, q)
    assert fastweights.ineligibility(model, spec) is None
    for layer in model.model.decoder.layers:
        assert {layer.final_layer_norm, layer.fc1, layer.fc2} <= set(fastweights.uses.ROW_MAJOR)
    compare(model, spec, ctx, q)


def test_row_order_needs_a_change_in_the_changed_row_alone():
    """``row_order_problem`` on the probe's two inputs of one call ``[rows · T, d]``."""
    use = fastweights.uses.Use(nn.Linear(4, 4), "fc", "linear", weight="fc.weight")
    rows, length = fastweights.probe.PROBE_ROWS, fastweights.probe.PROBE_LENGTH
    first = torch.randn(rows, length, 4)
    second = first.clone()
    assert "left that input unchanged" in fastweights.probe.row_order_problem(
        use, first.view(-1, 4), second.view(-1, 4)
    )
    second[-1, 0] += 1.0  # the last row's first token changed: row-major
    assert fastweights.probe.row_order_problem(use, first.view(-1, 4), second.view(-1, 4)) is None
    flipped = [t.transpose(0, 1).reshape(-1, 4) for t in (first, second)]  # time-major
    assert "changed other rows' part" in fastweights.probe.row_order_problem(use, *flipped)


class TransformedTable(nn.Embedding):
    """Looks up a function of its table, not the table: the rows read are not W's."""

    def forward(self, ids):
        return F.embedding(ids, 2.0 * self.weight)


class TwoLookups(nn.Embedding):
    """Looks its table up twice in one call."""

    def forward(self, ids):
        return super().forward(ids) + super().forward(ids.flip(-1))


class ShiftedLookup(nn.Embedding):
    """Derives its ids (as OPT's positions do) but adds a constant after the lookup."""

    def forward(self, ids):
        return super().forward(ids) + 1.0


@pytest.mark.parametrize(
    "cls, words",
    [
        (TransformedTable, "does not look its weight up with F.embedding"),
        (TwoLookups, "looks its weight up 2 times in one call"),
        (ShiftedLookup, "does not compute W[ids]"),
    ],
)
def test_embeddings_deriving_ids_are_checked_by_their_lookup(cls, words):
    """An ``nn.Embedding`` subclass with its own forward (OPT's, BioGPT's learned positions)
    runs fast when it computes ``W[ids]`` with one ``F.embedding`` on its table, the ids
    taken from that call; otherwise the probe says why not."""
    model = tiny_llama(vocab=VOCAB)
    table = model.model.embed_tokens
    odd = cls(table.num_embeddings, table.embedding_dim).to(torch.float64)
    odd.weight = table.weight
    model.model.embed_tokens = odd
    reason = fastweights.ineligibility(model, InnerSpec(0.5, all_names(model)))
    assert reason is not None and words in reason and "model.embed_tokens" in reason, reason


def test_blocks_returning_tuples_refuse_only_the_vjp_checkpointing():
    """Bloom's blocks return tuples: checkpoint_inner="vjp" (True) needs a tensor and is refused
    with the alternative named; "forward" and no checkpointing run, exactly."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2)
    model = perturb(perturb(BloomForCausalLM(cfg).to(torch.float64), "layernorm"), "bias")
    names = all_names(model)
    reason = fastweights.ineligibility(model, InnerSpec(0.5, names, checkpoint_inner=True))
    assert reason is not None and "decoder blocks return a tuple" in reason, reason
    assert "checkpoint_inner='forward'" in reason
    ctx, q = batch(3)
    for mode in (False, "forward"):
        spec = InnerSpec(lr=0.5, names=names, steps=2, checkpoint_inner=mode)
        assert fastweights.ineligibility(model, spec) is None
        compare(model, spec, ctx, q)


@pytest.mark.parametrize("kind", list(VJP_REFUSED))
def test_blocks_vjp_cannot_recompute_refuse_only_the_vjp_checkpointing(kind, caplog):
    """Gemma 4's blocks also take per-layer inputs computed from the tokens (and, in its last
    layers, key/value states shared from earlier ones); HRM's run in cycles, each block's
    input not the previous one's output. checkpoint_inner="vjp", which recomputes each block
    from its hidden states alone, is refused up front, saying why; ``auto`` runs the fast
    engine with "forward" instead and says so (``meta.engine=fastweights`` stops); "forward"
    and no checkpointing run, exactly (HRM's cycles under no_grad included)."""
    words, error = VJP_REFUSED[kind]
    build, names_of = MODELS[kind]
    model = build()
    names = names_of(model)
    vjp = InnerSpec(0.5, names, checkpoint_inner=True)
    reason = fastweights.ineligibility(model, vjp)
    assert reason is not None and words in reason, reason
    assert "checkpoint_inner='forward'" in reason
    with caplog.at_level(logging.WARNING):
        engine = select_engine("auto", model, vjp)
    assert (engine.name, engine.checkpoint_inner) == ("fastweights", "forward")
    assert words in caplog.text
    assert "using the fast-weights engine with checkpoint_inner=forward" in caplog.text
    with pytest.raises(InputError, match=re.escape(words)):
        select_engine("fastweights", model, vjp)
    ctx, q = batch(3)
    replays = []
    enter = fastweights.checkpoint.Replay.__enter__
    with pytest.MonkeyPatch.context() as mp:  # the blocks are checkpointed ("forward")
        mp.setattr(
            fastweights.checkpoint.Replay, "__enter__", lambda r: replays.append(r) or enter(r)
        )
        spec = InnerSpec(lr=0.5, names=names, steps=2, checkpoint_inner=True)
        ref, fw = run(reference, model, spec, ctx, q), run(engine, model, spec, ctx, q)
    assert replays and max_rel_error(ref[2], fw[2]) < TOL
    for mode in (False, "forward"):
        spec = InnerSpec(lr=0.5, names=names, steps=2, checkpoint_inner=mode)
        assert fastweights.ineligibility(model, spec) is None
        compare(model, spec, ctx, q)
    with pytest.raises(RuntimeError, match=re.escape(error)):
        run(fastweights, model, InnerSpec(lr=0.5, names=names, checkpoint_inner=True), ctx, q)


def test_vjp_checkpointing_runs_gemma4_without_per_layer_inputs():
    """The control of the refusal above: a Gemma 4 without per-layer inputs passes the probe
    and runs checkpoint_inner="vjp" exactly."""
    model = gemma("gemma4_text", sliding_window=4, global_head_dim=8, hidden_size_per_layer_input=0)
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2, checkpoint_inner=True)
    assert fastweights.ineligibility(model, spec) is None
    compare(model, spec, *batch(3))


@pytest.mark.parametrize("engine", [reference, fastweights])
def test_queries_for_another_number_of_tasks_are_refused(engine):
    model = tiny_llama(vocab=VOCAB)
    spec = InnerSpec(lr=0.5, names=all_names(model))
    gen = torch.Generator().manual_seed(0)
    state = engine.adapt(model, random_contexts(2, 1, VOCAB, gen), spec)
    for tasks in (1, 3):
        with pytest.raises(ValueError, match=f"queries hold {tasks} tasks, the adapted state 2"):
            engine.logits(model, state, random_queries(tasks, 2, VOCAB, gen))


def test_a_probe_that_fails_is_a_refusal(caplog):
    """A model the probe (3 tokens) cannot run (here: one that needs four tokens) is refused
    with the probe's error, and ``auto`` runs the reference engine on it."""
    model = tiny_llama(vocab=VOCAB)

    def at_least_four(module, args, kwargs):
        if kwargs["input_ids"].shape[-1] < 4:
            raise ValueError("this model needs at least 4 tokens")

    model.register_forward_pre_hook(at_least_four, with_kwargs=True)
    spec = InnerSpec(lr=0.5, names=all_names(model))
    reason = fastweights.ineligibility(model, spec)
    assert reason is not None and "probe" in reason and "at least 4 tokens" in reason, reason
    with caplog.at_level(logging.WARNING, logger="raymeta.meta"):
        assert select_engine("auto", model, spec).name == "reference"
    assert "at least 4 tokens" in caplog.text
    ctx, q = batch(2)
    run(reference, model, spec, ctx, q)  # which runs


class TiedHead(nn.Module):
    """An LM head reading the embedding table itself: ``h @ table^T``, no module call."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.table = table

    def forward(self, h):
        return F.linear(h, self.table.weight)


def one_plus_weight(self, x):
    """A forward scaling by ``1 + weight`` (Gemma's arithmetic)."""
    return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def read_down_proj_weight(model):
    """Layer 0's MLP applies ``down_proj.weight`` through F.linear, never calling down_proj."""
    mlp = model.model.layers[0].mlp

    def forward(x):
        return F.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)

    mlp.forward = forward
    return model, "model.layers.0.mlp.down_proj.weight"


def head_on_the_table(model):
    model.lm_head = TiedHead(model.model.embed_tokens)
    return model, "model.embed_tokens.weight"


def odd_norm(model):
    """Llama's own RMSNorm class, its forward replaced on the instance by ``one_plus_weight``."""
    import types

    model.model.norm.forward = types.MethodType(one_plus_weight, model.model.norm)
    return model, "model.norm"


def doubled_projection(model):
    """An nn.Linear whose forward, patched on the instance, doubles its output."""
    proj = model.model.layers[1].self_attn.o_proj
    proj.forward = lambda x: 2 * F.linear(x, proj.weight)
    return model, "model.layers.1.self_attn.o_proj"


def scaled_lookup(model):
    """An nn.Embedding whose forward, patched on the instance, scales its rows (as Gemma's
    class does, but unknown to ``models.embedding_scale``)."""
    table = model.model.embed_tokens
    table.forward = lambda ids: 3 * F.embedding(ids, table.weight, table.padding_idx)
    return model, "model.embed_tokens"


TWISTS = [read_down_proj_weight, head_on_the_table, odd_norm, doubled_projection, scaled_lookup]


@pytest.mark.parametrize("twist", TWISTS)
def test_weights_the_hooks_cannot_see_make_it_refuse(twist, caplog):
    """A known module whose weight is read elsewhere, or a module that only looks known (a
    forward patched on the instance): the engine would be silently wrong there, so it refuses
    and ``auto`` runs the reference."""
    model, culprit = twist(tiny_llama(vocab=VOCAB, tie=True))
    spec = InnerSpec(lr=0.5, names=all_names(model))
    reason = fastweights.ineligibility(model, spec)
    assert reason is not None and culprit in reason, reason
    with caplog.at_level(logging.WARNING, logger="raymeta.meta"):
        assert select_engine("auto", model, spec).name == "reference"
    assert culprit in caplog.text
    with pytest.raises(InputError, match="cannot run exactly"):
        select_engine("fastweights", model, spec)
    # the control: run anyway, the engine would be wrong (or fail: the head's read leaves the
    # inner step's graph spent before the outer backward)
    ctx, q = batch(2)
    lr, _, gr = run(reference, model, spec, ctx, q)
    try:
        lf, _, gf = run(fastweights, model, spec, ctx, q)
    except RuntimeError as e:
        assert "backward through the graph a second time" in str(e)
    else:
        assert abs(lf - lr) > 1e-6 * abs(lr) or max_rel_error(gr, gf) > 1e-6


def router_forward(reads):
    """A twist: Mixtral's layer-0 router, its forward patched on the instance to compute the
    logits with ``reads(x, weight)``."""

    def twist(model):
        gate = model.model.layers[0].mlp.gate

        def forward(hidden_states):
            logits = reads(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
            top, index = torch.topk(torch.softmax(logits, -1), gate.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), index

        gate.forward = forward
        return model, "model.layers.0.mlp.gate"

    return twist


def doubled_experts(model):
    """Mixtral's layer-1 experts, their forward patched on the instance to double the output."""
    experts = model.model.layers[1].mlp.experts
    own = experts.forward
    experts.forward = lambda *args: 2 * own(*args)
    return model, "model.layers.1.mlp.experts"


MOE_TWISTS = {
    "router on a function of its weight": (
        router_forward(lambda x, w: F.linear(x, 2 * w)),
        "reads its weight or bias by",
    ),
    "router calling F.linear twice": (
        router_forward(lambda x, w: F.linear(x, w) + F.linear(x.flip(0), w)),
        "calls F.linear on its weight 2 times",
    ),
    "router on the transpose": (
        router_forward(lambda x, w: x @ w.T),
        "reads its weight or bias by .T",
    ),
    "experts that are not their class's": (doubled_experts, "does not compute its experts"),
}


@pytest.mark.parametrize("twist", list(MOE_TWISTS))
def test_moe_layers_the_engine_cannot_follow_make_it_refuse(twist, caplog):
    """A router is adapted at its one ``F.linear`` call on its weight (``LinearCall``) and
    experts through the engine's own run of their class's layout; a router that reads its
    weight otherwise, or experts whose forward is not their class's, are refused, ``auto`` runs
    the reference, and run anyway the engine would be wrong or stops."""
    make, words = MOE_TWISTS[twist]
    refused_and_unsafe(*make(mixtral()), words, caplog)


def test_router_reading_a_copy_of_its_weight_in_another_dtype_is_adapted():
    """``F.linear(x, w.to(dtype, copy=True))`` (routers casting their weight to float32) is
    the weight in another dtype: adapted, exact; a ``clone()`` is not a cast: refused."""
    model, _ = router_forward(lambda x, w: F.linear(x, w.to(torch.float64, copy=True)))(mixtral())
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2)
    assert fastweights.ineligibility(model, spec) is None
    compare(model, spec, *batch(3))
    model, culprit = router_forward(lambda x, w: F.linear(x, w.clone()))(mixtral())
    reason = fastweights.ineligibility(model, spec)
    assert reason is not None and culprit in reason and "clone" in reason, reason


def test_router_adding_its_bias_outside_f_linear_is_refused(caplog):
    """GPT-OSS's router passes its bias to ``F.linear``; one that adds it afterwards reads it
    where the call's update does not reach: refused."""
    model = gpt_oss()
    router = model.model.layers[0].mlp.router

    def forward(hidden_states):
        logits = F.linear(hidden_states, router.weight) + router.bias
        top, index = torch.topk(logits, router.top_k, dim=-1)
        return logits, torch.softmax(top, dim=1), index

    router.forward = forward
    refused_and_unsafe(
        model, "model.layers.0.mlp.router", "F.linear without the module's bias", caplog
    )


def test_experts_with_a_norm_after_each_expert_are_refused():
    """``has_post_expert_norm`` experts (a norm inside each expert): not a layout the engine
    runs, so they are an unknown module kind."""
    model = mixtral()
    model.model.layers[0].mlp.experts.has_post_expert_norm = True
    reason = fastweights.ineligibility(model, InnerSpec(lr=0.5, names=all_names(model)))
    assert reason is not None and "model.layers.0.mlp.experts" in reason, reason
    assert "does not know" in reason


def sink_attention(sinks_of):
    """GPT-OSS's eager attention with its sink logits ``[rows, H, T, 1]`` taken by
    ``sinks_of(module, query)`` (GPT-OSS's own: ``module.sinks.reshape(1, -1, 1, 1)`` expanded)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import repeat_kv

    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask
        logits = torch.cat([logits, sinks_of(module, query)], dim=-1)
        probs = F.softmax(logits - logits.max(-1, keepdim=True).values, dim=-1)[..., :-1]
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    return forward


SINK_TWISTS = {
    "sinks averaged over the rows": (
        lambda m, q: (
            m.sinks.reshape(1, -1, 1, 1)
            .mean(0, keepdim=True)
            .expand(q.shape[0], -1, q.shape[-2], -1)
        ),
        "does not give each row the output of its own sinks",
    ),
    "sinks read twice": (
        lambda m, q: (
            m.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1) + 0 * m.sinks.sum()
        ),
        "reads its sinks by",
    ),
}


@pytest.mark.parametrize("twist", list(SINK_TWISTS))
def test_attention_sinks_the_engine_cannot_follow_make_it_refuse(twist, monkeypatch, caplog):
    """Attention sinks are adapted where the forward broadcasts one ``[1, H, ...]`` view of
    them over the rows (``SinkCall``), which the probe checks by giving the last row other
    sinks: that row's output alone must change. Sinks mixed across rows, or read twice, are
    refused, ``auto`` runs the reference, and run anyway the engine would be wrong."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    sinks_of, words = SINK_TWISTS[twist]
    monkeypatch.setattr(modeling_gpt_oss, "eager_attention_forward", sink_attention(sinks_of))
    refused_and_unsafe(gpt_oss(), "model.layers.0.self_attn", words, caplog)


def test_attention_sinks_viewed_another_way_are_adapted(monkeypatch):
    """Another model's form of the same broadcast (Flint's: ``view`` and an expand to the
    scores' shape) is adapted too, exactly."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    def flint(m, q):
        return m.sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], 1)

    monkeypatch.setattr(modeling_gpt_oss, "eager_attention_forward", sink_attention(flint))
    model = gpt_oss()
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2)
    assert fastweights.ineligibility(model, spec) is None
    compare(model, spec, *batch(3))


def plain_logits(model, q):
    f = q.flat()
    with torch.no_grad():
        return model(
            input_ids=f.input_ids, attention_mask=f.attention_mask, position_ids=f.position_ids
        ).logits


@pytest.mark.parametrize("mode", [True, "forward"])
def test_model_unchanged_and_logits_repeatable(mode):
    model = llama_tied()
    ctx, q = batch(2)
    before = plain_logits(model, q)
    spec = InnerSpec(lr=0.5, names=all_names(model), checkpoint_inner=mode)
    with double_backward_attention():
        ref_state = reference.adapt(model, ctx, spec)
        state = fastweights.adapt(model, ctx, spec)
        with torch.no_grad():
            for width in (
                q.input_ids.shape[-1],
                4,
                q.input_ids.shape[-1],
            ):  # growing/shrinking queries
                part = type(q)(q.input_ids[..., :width], q.attention_mask[..., :width])
                ref = reference.logits(model, ref_state, part)
                fw = fastweights.logits(model, state, part)
                assert torch.allclose(fw, ref, rtol=1e-10, atol=1e-12)
                assert not torch.allclose(fw, plain_logits(model, part).view_as(fw))
    assert all(not m._forward_hooks for m in model.modules())
    assert all("forward" not in blk.__dict__ for blk in model.model.layers)
    assert all(p.grad is None for p in model.parameters()), "the inner step wrote .grad"
    assert torch.equal(plain_logits(model, q), before)


def test_next_token_seed_is_the_scaled_inner_gradient(monkeypatch):
    """The analytic, chunked seed equals -η dL_inner/dlogits and its derivative is exact."""
    from raymeta.meta.inner import context_loss

    monkeypatch.setattr(fastweights.seed, "SEED_CHUNK", 3 * VOCAB)  # several chunks
    ctx, _ = batch(2)
    b, n, tc = ctx.input_ids.shape
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(b * n, tc, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    seed, loss = fastweights.seed.next_token_seed(z, ctx.labels, -0.5)
    want_loss = context_loss(z.view(b, n, tc, -1), ctx)
    (want,) = torch.autograd.grad(want_loss.sum(), z, create_graph=True)
    assert torch.allclose(loss, want_loss.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(seed, -0.5 * want, rtol=1e-12, atol=1e-15)
    probe = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((seed * probe).sum(), z)
    (g_want,) = torch.autograd.grad((-0.5 * want * probe).sum(), z)
    assert torch.allclose(g, g_want, rtol=1e-10, atol=1e-14)


def test_siblings_share_their_query_context_products(monkeypatch):
    """q / k / v (and gate / up) read one input and were updated from one context input, so
    the query pass takes ``x hᵀ`` once for them: 3 products fewer per decoder layer (2 for
    q / k / v, 1 for gate / up), and the same logits bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):  # bmm calls giving [B, query tokens, context tokens]
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.bmm.default and tuple(out.shape) == self.shape:
                self.count += 1
            return out

    model = llama_tied()
    spec = InnerSpec(0.5, all_names(model), steps=2)
    ctx, q = batch(3)
    b, n, tc = ctx.input_ids.shape
    shape = (b, q.input_ids.shape[1] * q.input_ids.shape[2], n * tc)
    with torch.no_grad():
        state = fastweights.adapt(model, ctx, spec)
    counted, out = {}, {}
    for shared in (True, False):
        with monkeypatch.context() as mp:
            if not shared:  # the control: every term takes its own product
                mp.setattr(fastweights.hooks.Hooks, "shared_products", lambda self, x: None)
            with torch.no_grad(), Products(shape) as products:
                out[shared] = fastweights.logits(model, state, q)
            counted[shared] = products.count
    layers = model.config.num_hidden_layers
    assert counted[False] - counted[True] == 3 * layers * spec.steps, counted
    assert torch.equal(out[True], out[False])


def test_attention_switch_restores(monkeypatch):
    model = tiny_llama(vocab=VOCAB)
    from transformers.models.llama import modeling_llama

    hf_rotary = modeling_llama.apply_rotary_pos_emb
    with fastweights.ops.attention_for(model):  # the default: the fused attention and rotary
        assert model.config._attn_implementation == attention.NAME
        assert modeling_llama.apply_rotary_pos_emb is not hf_rotary
        with fastweights.ops.attention_for(model):  # nested
            pass
        assert modeling_llama.apply_rotary_pos_emb is not hf_rotary
    assert model.config._attn_implementation == "sdpa"
    assert modeling_llama.apply_rotary_pos_emb is hf_rotary
    assert fastweights.ops.engine_attention(gpt2()) is None  # an attention it does not know
    monkeypatch.setattr(fastweights.ops, "ATTENTION", "eager")
    half = tiny_llama(vocab=VOCAB, dtype=torch.bfloat16)
    with fastweights.ops.attention_for(half):
        assert half.config._attn_implementation == "eager"
    assert half.config._attn_implementation == "sdpa"
    with fastweights.ops.attention_for(model):  # float64 keeps SDPA under "eager"
        assert model.config._attn_implementation == "sdpa"


def unfused_rms(x, eps=1e-2):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def fused_rms(x, eps=1e-2):
    return fused.rms_normalise(x, eps, torch.float64)


def causal_mask(t=6):
    """An additive causal mask ``[2, 1, t, t]`` with the last key of row 0 padded."""
    keep = torch.ones(t, t, dtype=torch.bool).tril().expand(2, 1, t, t).clone()
    keep[0, :, :, -1] = False
    keep[0, :, -1, -1] = True  # every row keeps a key
    mask = torch.zeros(2, 1, t, t, dtype=torch.float64)
    return mask.masked_fill_(~keep, torch.finfo(torch.float64).min)


def fused_attention(q, k, v):
    return attention.attention(q, k, v, causal_mask(), 0.7)


def unfused_attention(q, k, v):
    return torch.softmax(0.7 * q @ k.mT + causal_mask(), -1) @ v


def cos_sin(d=6):
    """Unrelated cosines and sines ``[3, d]`` (the transpose must not rely on duplicated halves)."""
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, d, generator=gen, dtype=torch.float64).unbind(0)


def fused_rotary(x):
    return rotary.Rotate.apply(x, *cos_sin(), False)


def unfused_rotary(x):
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = cos_sin()
    return x * cos + rotate_half(x) * sin


OPS = {
    "swiglu": (fused.gated, lambda g, u: nn.functional.silu(g) * u, 2),
    "geglu": (
        lambda g, u: fused.gated(g, u, "none"),
        lambda g, u: nn.functional.gelu(g) * u,
        2,
    ),
    "geglu_tanh": (
        lambda g, u: fused.gated(g, u, "tanh"),
        lambda g, u: nn.functional.gelu(g, approximate="tanh") * u,
        2,
    ),
    "rotary": (fused_rotary, unfused_rotary, 1),
    "rms": (fused_rms, unfused_rms, 1),
    "attention": (fused_attention, unfused_attention, 3),
}


def op_inputs(arity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 2, 6, 6) if arity == 3 else (2, 3, 6)  # attention: [B, H, T, D]
    return [
        torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(arity)
    ]


@pytest.mark.parametrize("op", list(OPS))
def test_fused_op_gradcheck(op):
    fn, _, arity = OPS[op]
    x = op_inputs(arity)
    assert torch.autograd.gradcheck(fn, x)
    assert torch.autograd.gradgradcheck(fn, x)


@pytest.mark.parametrize("op", list(OPS))
def test_fused_op_matches_torch(op):
    """Value, VJP and the VJP's derivative (w.r.t. the inputs and the output gradient)."""
    fn, plain, arity = OPS[op]
    x = op_inputs(arity)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(x[0].shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(x[0].shape, generator=gen, dtype=torch.float64) for _ in x]
    for used in {tuple(range(arity)), (0,), (arity - 1,)}:  # GatedUnitGrad: both or one output
        results = []
        for f in (fn, plain):
            out = f(*x)
            first = torch.autograd.grad((out * v).sum(), x, create_graph=True)
            probe = sum((first[i] * w[i]).sum() for i in used)
            second = torch.autograd.grad(probe, [*x, v], allow_unused=True)
            results.append([out, *first, *second])
        for got, want in zip(*results):
            assert (got is None and want is None) or torch.allclose(
                got, want, rtol=1e-12, atol=1e-13
            )


def test_rms_normalise_follows_the_module_dtype():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 3, 16, dtype=torch.float64)
    hf = LlamaRMSNorm(16).to(torch.float64)  # Hugging Face's forward: through float32
    full = tiny_llama(vocab=VOCAB).model.norm  # models.keep_float64: float64 throughout
    for norm, acc in ((hf, torch.float32), (full, torch.float64)):
        assert fused.rms_dtype(norm, x.dtype) is acc
        with torch.no_grad():
            norm.weight.fill_(1.0)
            assert torch.equal(fused.rms_normalise(x, norm.variance_epsilon, acc), norm(x))
            forward = norm.__dict__.get("forward")
            with fused.skipped_norms([norm]):
                assert norm(x) is x and fused.rms_dtype(norm, x.dtype) is acc
                with fused.skipped_norms([norm]):  # nested: left alone
                    pass
                assert norm(x) is x
            assert norm.__dict__.get("forward") is forward
            assert torch.equal(fused.rms_normalise(x, norm.variance_epsilon, acc), norm(x))


@pytest.mark.parametrize("style", [s.name for s in NORMS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_norm_style_is_rebuilt_bit_for_bit(style, dtype):
    """In bf16 and float32, the output the engine's hook builds for an RMSNorm of each style
    (its normalisation through ``fused.rms_normalise``, then its scale, in the style's order
    of rounding) is the class's own forward's, bit for bit (a LayerNorm style's hook keeps
    the module's output and adds the update to it); so is ``keep_float64``'s forward, also for
    norms without a weight (NanoChat's; Gemma 4's ``with_scale=False``), which hold nothing to
    adapt, and for Cohere's LayerNorm. (OLMo-2's norm rounded as Llama's is differs in about a
    quarter of its bf16 outputs.)"""
    import importlib

    from raymeta.models import keep_float64, norm_style

    found = next(s for s in NORMS if s.name == style)
    cls = getattr(importlib.import_module(f"transformers.models.{found.where}"), style)
    torch.manual_seed(0)
    kinds = {"NanoChatRMSNorm": [()], "Gemma4RMSNorm": [(16,), (16, 1e-6, False)]}
    norms = [cls(*args).to(dtype) for args in kinds.get(style, [(16,)])]
    x = (3 * torch.randn(2, 3, 16)).to(dtype)
    with torch.no_grad():
        for norm in norms:
            weighted = getattr(norm, "weight", None) is not None
            if weighted:
                norm.weight.add_(0.5 * torch.randn(16, dtype=dtype))
            own = norm(x)
            if weighted:  # the hook rebuilds the output from the input
                use = fastweights.uses.Use(
                    norm, "n", "norm", weight="n.weight", style=norm_style(norm)
                )
                with fastweights.hooks.Hooks([use], {}, 2, 2, 3):
                    assert torch.equal(norm(x), own)
            keep_float64(nn.Sequential(norm))
            if found.upcast:
                assert "forward" in norm.__dict__ and torch.equal(norm(x), own)
            else:  # it computes in x's dtype (Nemotron's F.layer_norm): float64 already
                assert "forward" not in norm.__dict__


def test_norms_are_known_by_their_code_not_their_name():
    """A class whose methods have the code of one of ``models.NORMS`` under another name
    (Phi-3's and SmolLM3's are Llama's, Gemma 2's and Qwen3-Next's Gemma's, OLMo-3's OLMo-2's,
    Nemotron-H's Helium's, Cohere 2's Cohere's) has that style: the engine computes it and
    ``keep_float64`` makes it float64 with its own offset (Nemotron's, float64 already, it
    leaves alone). T5's norm, whose code is none of them (it rounds to the weight's dtype), is
    refused and left alone (keep_float64 once replaced any *RMSNorm's forward with Llama's)."""
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.cohere2.modeling_cohere2 import Cohere2LayerNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
    from transformers.models.helium.modeling_helium import HeliumRMSNorm
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RMSNorm
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm
    from transformers.models.smollm3.modeling_smollm3 import SmolLM3RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from raymeta.models import keep_float64, norm_style

    x = torch.randn(2, 3, 16, dtype=torch.float64)
    cases = (
        (Phi3RMSNorm, "LlamaRMSNorm"),
        (SmolLM3RMSNorm, "LlamaRMSNorm"),
        (GemmaRMSNorm, "GemmaRMSNorm"),
        (Gemma2RMSNorm, "GemmaRMSNorm"),
        (Qwen3NextRMSNorm, "GemmaRMSNorm"),
        (Olmo2RMSNorm, "Olmo2RMSNorm"),
        (Olmo3RMSNorm, "Olmo2RMSNorm"),
        (HeliumRMSNorm, "HeliumRMSNorm"),
        (NemotronHRMSNorm, "HeliumRMSNorm"),
        (Gemma4RMSNorm, "Gemma4RMSNorm"),
        (CohereLayerNorm, "CohereLayerNorm"),
        (Cohere2LayerNorm, "CohereLayerNorm"),
        (NemotronLayerNorm1P, "NemotronLayerNorm1P"),
        (T5LayerNorm, None),
    )
    for cls, style in cases:
        norm = cls(16).to(torch.float64)
        with torch.no_grad():
            for p in norm.parameters():
                p.add_(0.1 * torch.randn(16, dtype=torch.float64))
            before = norm(x)
            keep_float64(nn.Sequential(norm))
            after = norm(x)
        found = norm_style(norm)
        assert (found and found.name) == style, cls.__name__
        assert fastweights.uses.module_kind(norm) == ("norm" if style else None)
        assert ("forward" in norm.__dict__) is bool(found and found.upcast), cls.__name__
        if not style:
            assert torch.equal(before, after)
            continue
        with torch.no_grad():
            h = x - x.mean(-1, keepdim=True) if found.centred else x
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + getattr(norm, found.eps))
            exact = (found.offset + norm.weight) * h
            exact = exact if getattr(norm, "bias", None) is None else exact + norm.bias
        torch.testing.assert_close(after, exact, rtol=1e-14, atol=0)
        if found.upcast:  # float64 now: float32 rounding before, float64 rounding after
            assert not torch.allclose(before, exact, rtol=1e-10, atol=0)
    no_scale = Gemma4RMSNorm(16, with_scale=False)  # no weight: nothing to adapt, not a norm kind
    assert norm_style(no_scale) is None and fastweights.uses.module_kind(no_scale) is None


def test_gated_mlps_are_known_by_code_and_activation():
    """Every MLP class with the code of Llama's forward (here Gemma's, OLMo-2's) is fused with
    the activation it calls; the Python GELU formulas (other rounding), other activations and
    a subclass with its own forward are not."""
    from transformers import LlamaConfig
    from transformers import activations as acts
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.olmo2.modeling_olmo2 import Olmo2MLP

    kinds = [
        (acts.SiLUActivation(), "silu"),
        (nn.SiLU(), "silu"),
        (nn.GELU(), "none"),
        (nn.GELU(approximate="tanh"), "tanh"),
        (acts.GELUActivation(), "none"),
        (acts.GELUTanh(), "tanh"),
        (acts.GELUActivation(use_gelu_python=True), None),
        (acts.GELUTanh(use_gelu_tanh_python=True), None),
        (acts.NewGELUActivation(), None),
        (nn.ReLU(), None),
        (None, None),
    ]
    for act, kind in kinds:
        assert fused.activation_kind(act) == kind, act
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2)

    class OwnForward(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)))

    assert fused.gated_mlp_kind(LlamaMLP(cfg)) == "silu"
    assert fused.gated_mlp_kind(Olmo2MLP(cfg)) == "silu"
    cfg.hidden_act = "gelu_pytorch_tanh"  # Gemma's
    assert fused.gated_mlp_kind(GemmaMLP(cfg)) == "tanh"
    assert fused.gated_mlp_kind(OwnForward(cfg)) is None


def test_fused_attention_classes_are_known_by_code_and_rotation():
    """Copies of Llama's, Mistral's, Qwen's attention run the fused attention; GLM's (its
    forward is Llama's, its rotation partial and interleaved), Gemma 2's and 3's (their own
    code: soft-capping; q/k norms after the transpose) and a subclass with its own forward do
    not."""
    from transformers.models.gemma.modeling_gemma import GemmaAttention
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
    from transformers.models.glm.modeling_glm import GlmAttention
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mixtral.modeling_mixtral import MixtralAttention
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

    class OwnForward(LlamaAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    for cls in (LlamaAttention, GemmaAttention, MixtralAttention, Qwen3MoeAttention):
        assert attention.fused_attention_class(cls), cls.__name__
    for cls in (GlmAttention, Gemma2Attention, Gemma3Attention, OwnForward):
        assert not attention.fused_attention_class(cls), cls.__name__


@pytest.mark.parametrize("mask_heads", [1, 4])
def test_grouped_query_attention_is_exact(mask_heads):
    """With 2 query heads per key / value head, ``attention_forward`` equals softmax attention
    over repeated keys and values (values and first derivatives, float64): the query heads side
    by side against unrepeated keys and values (a mask with one head row), or keys and values
    repeated (a mask with a row per head)."""
    model = tiny_llama(vocab=VOCAB, heads=4, kv_heads=2)
    module = model.model.layers[0].self_attn
    assert module.num_key_value_groups == 2
    gen = torch.Generator().manual_seed(0)
    b, t, s, d = 2, 5, 7, module.head_dim
    q = torch.randn(b, 4, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(b, 2, s, d, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    allowed = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # causal, s - t earlier keys
    allowed = allowed.expand(b, mask_heads, t, s).clone()
    allowed[0, ..., 0] = False  # a padded first key in the first row
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
        ~allowed, torch.finfo(torch.float64).min
    )

    def repeated(module, q, k, v, mask, scaling):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        p = torch.softmax(q @ k.mT * scaling + mask, -1)
        return (p @ v).transpose(1, 2), None

    probe = torch.randn(b, t, 4, d, generator=gen, dtype=torch.float64)
    outs, grads = [], []
    for forward in (attention.attention_forward, repeated):
        out, _ = forward(module, q, k, v, mask, scaling=d**-0.5)
        outs.append(out)
        grads.append(torch.autograd.grad((out * probe).sum(), (q, k, v)))
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-14)
    for a, e in zip(*grads):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-13)


def test_fused_mlps_patch_and_restore():
    model = tiny_llama(vocab=VOCAB)
    mlps = [blk.mlp for blk in model.model.layers]
    model.model.layers[1].mlp.act_fn = nn.Hardswish()  # an activation the unit lacks: unfused
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        seen = []
        mlps[0].up_proj.register_forward_hook(lambda *_: seen.append(1))
        with fused.fused_mlps(model):
            assert ["forward" in m.__dict__ for m in mlps] == [True, False]
            with fused.fused_mlps(model):  # nested: already patched, left alone
                pass
            assert "forward" in mlps[0].__dict__
            inside = model(input_ids=ids).logits
        assert seen == [1], "the projections' hooks did not fire"
        assert all("forward" not in m.__dict__ for m in mlps)
        assert torch.allclose(inside, before, rtol=1e-12, atol=1e-14)
        assert torch.equal(model(input_ids=ids).logits, before)


def count_second_order_nodes(monkeypatch) -> Counter:
    """Counts of the fused ops' second-order backwards (by class name) from now on."""
    calls = Counter()
    for cls in (
        fused.GatedUnitGrad,
        fused.RMSNormaliseGrad,
        attention.AttentionGrad,
        rotary.Rotate,
    ):
        orig = cls.backward

        def counted(ctx, *grads, _orig=orig, _name=cls.__name__):
            calls[_name] += 1
            return _orig(ctx, *grads)

        monkeypatch.setattr(cls, "backward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("mode", [False, True, "forward"])
def test_fused_ops_run_in_every_pass(mode, monkeypatch):
    """The fused second-order nodes are the ones the outer backward differentiates
    (k = 2: one per MLP and per RMSNorm call of each inner step), in every checkpoint mode."""
    calls = count_second_order_nodes(monkeypatch)
    model = llama_tied()
    ctx, q = batch(2)
    spec = InnerSpec(lr=0.5, names=all_names(model), steps=2, checkpoint_inner=mode)
    compare(model, spec, ctx, q)
    layers = len(model.model.layers)
    # Rotate is its own backward: per layer and for q and k, inner backwards 2 × 2, the outer
    # one through the query forward (2), the inner backwards (2 × 2) and forwards (2 × 2);
    # "vjp" adds the recomputed forward and VJP of each block (2 × 4)
    rotations = (22 if mode is True else 14) * layers
    assert calls == {
        "GatedUnitGrad": 2 * layers,
        "RMSNormaliseGrad": 2 * (2 * layers + 1),
        "AttentionGrad": 2 * layers,
        "Rotate": rotations,
    }
    skipped = []  # per RMSNorm call: whether its forward returned its input (skipped_norms)
    for m in model.modules():
        if "RMSNorm" in type(m).__name__:  # registered first: sees the module's own output
            m.register_forward_hook(lambda _m, args, out: skipped.append(out is args[0]))
    for engine, want in ((reference, False), (fastweights, True)):
        skipped.clear()
        run(engine, model, spec, ctx, q, "LG")
        # fastweights' passes skip the norms (the hooks rebuild their outputs from the inputs)
        assert skipped and set(skipped) == {want}
    assert all("forward" not in blk.mlp.__dict__ for blk in model.model.layers)


def test_unfused_switches_stay_exact(monkeypatch):
    """FUSED_OPS = False and ATTENTION = None (torch's own ops, for comparisons) stay exact."""
    calls = count_second_order_nodes(monkeypatch)
    monkeypatch.setattr(fastweights.ops, "FUSED_OPS", False)
    monkeypatch.setattr(fastweights.ops, "ATTENTION", None)
    model = llama_tied()
    ctx, q = batch(3)
    compare(model, InnerSpec(lr=0.5, names=all_names(model), steps=2), ctx, q)
    assert not calls


def test_sliding_window_and_head_norms_are_exercised():
    """The Mistral and Qwen3 cases above test what they claim: the window changes the
    logits of these context lengths, Qwen3's q/k norms are inner parameters seen per head,
    and both run the fused attention."""
    ctx, _ = batch(2)
    ids = ctx.flat().input_ids
    assert ids.shape[-1] > 4
    windowed, full = mistral_window(), mistral(sliding_window=None)
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        assert not torch.allclose(windowed(input_ids=ids).logits, full(input_ids=ids).logits)
    model = qwen3()
    assert any(".q_norm." in n for n in all_names(model))
    for m in (windowed, model):
        assert fastweights.ops.engine_attention(m) == attention.NAME
        assert fastweights.ineligibility(m, InnerSpec(0.5, all_names(m))) is None
