"""The fast-weights engine against the reference engine, in float64 on tiny random models.

Outer loss and every parameter gradient must agree within 1e-8 relative, for
k = 1, 2 inner steps, n = 1, 3 contexts per update, padded contexts and queries,
second and first order, on: a Llama with tied embeddings (and a padding_idx hit
by real context tokens), a GPT-2 (transformers Conv1D, biases, LayerNorm, learned
positions, untied head), Mistral with a sliding window, Qwen3 and Phi (per-head q/k norms in
either layout), Phi-3 (Llama's RMSNorm code under another name, fused projections), Gemma,
Gemma 2 (eager attention with logit soft-capping, soft-capped final logits) and Gemma 3 (scaled
embeddings, ``1 + weight`` norms), and peft LoRA (adapter-only inner; LoRA outer (ranks 1 and
2) with a full-rank inner step on the frozen base weights). The models are in
``fastweights_models``; the refusals in ``test_fastweights_refusals``; the fused ops on their own
in ``test_fused_ops``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymeta.meta import fastweights, reference
from raymeta.meta.inner import InnerSpec, double_backward_attention
from raymeta.models import resolve_inner_params
from tests.helpers import random_contexts, random_queries, tiny_llama
from tests.unit.fastweights_models import (
    MODELS,
    VJP_REFUSED,
    VOCAB,
    all_names,
    batch,
    compare,
    gpt2,
    llama_tied,
    lora,
    max_rel_error,
    perturb,
    run,
)


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
