"""The fused ops of the engine's passes (``fused``: gated MLPs, RMS normalisation; ``attention``;
``rotary``) against torch's unfused ops in float64 (values, first and second derivatives), how
the engine recognises the modules it runs them for, and its switches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from raymeta.meta import attention, fastweights, fused, reference, rotary
from raymeta.meta.inner import InnerSpec
from raymeta.models import NORMS
from tests.helpers import older_than, tiny_llama
from tests.unit.fastweights_models import (
    VOCAB,
    all_names,
    batch,
    compare,
    gpt2,
    llama_tied,
    mistral,
    mistral_window,
    qwen3,
    run,
)


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
    import transformers
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

    from raymeta.models import keep_float64, norm_eps, norm_style

    # Nemotron-H's norm multiplies by its weight in float32 (Helium's code) from transformers
    # 5.18; 5.17's (the GPU machine's) is a copy of Llama's.
    nemotron_h_style = "LlamaRMSNorm" if older_than(transformers, 5, 18) else "HeliumRMSNorm"
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
        (NemotronHRMSNorm, nemotron_h_style),
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
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps(norm, found))
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


def test_code_is_compared_through_hub_kernel_wrappers():
    """With the ``kernels`` package (transformers 5.25 requires it), transformers' decorators
    turn a function into a module called as one, and wrap a class's ``forward`` in a wrapper
    whose code is the same for every class: functions are still told apart by their own code,
    and a module whose instance carries a kernel is not known. Without ``kernels`` (transformers
    5.20, the last for Python 3.10, does not require it) those decorators change nothing."""
    kernels = pytest.importorskip("kernels", reason="no kernels package: no hub-kernel wrappers")
    use_kernel_forward_from_hub = kernels.use_kernel_forward_from_hub
    use_kernelized_func = kernels.use_kernelized_func

    from raymeta.models import same_code

    def plus(x):
        return x + 1

    def plus_copy(x):
        return x + 1

    def times(x):
        return x * 2

    hub = use_kernel_forward_from_hub("raymeta_test")
    f, f_copy, g = hub(plus), hub(plus_copy), hub(times)
    assert isinstance(f, nn.Module)
    assert same_code(f, f_copy)
    assert not same_code(f, g)

    def forward_plus(self, x):
        return f(x)

    def forward_times(self, x):
        return g(x)

    def made(forward):
        return use_kernelized_func(f)(type("M", (nn.Module,), {"forward": forward}))

    a, a_copy, b = made(forward_plus), made(forward_plus), made(forward_times)
    assert same_code(a.forward, a_copy.forward)
    assert not same_code(a.forward, b.forward)  # one wrapper's code, different wrapped code
    x = torch.ones(2)
    assert torch.equal(a()(x), x + 1) and torch.equal(b()(x), 2 * x)

    kernelized = hub(plus)
    kernelized.forward = times  # what a kernel put on the instance looks like
    assert not same_code(kernelized, f)


def test_the_engine_says_when_its_passes_run_the_models_own_attention(caplog, monkeypatch):
    """Selecting the fast-weights engine for a model whose attention the fused one does not know
    (GPT-2's) says so once, naming the class and what runs instead; for Llama's it says nothing,
    nor when the model's own attention was asked for (``ATTENTION`` None)."""
    import logging

    from raymeta.meta.engines import select_engine

    llama, other = llama_tied(), gpt2()
    with caplog.at_level(logging.WARNING, logger="raymeta.meta"):
        spec = InnerSpec(lr=0.5, names=all_names(llama))
        assert select_engine("auto", llama, spec).name == "fastweights"
        assert not caplog.records
        spec = InnerSpec(lr=0.5, names=all_names(other))
        assert select_engine("auto", other, spec).name == "fastweights"
        assert select_engine("fastweights", other, spec).name == "fastweights"  # said once
    (record,) = caplog.records
    own = other.config._attn_implementation
    assert fastweights.ops.attention_run(other) == own
    assert f"run the model's own attention ({own})" in record.getMessage()
    assert "not GPT2Attention" in record.getMessage()
    assert fastweights.ops.attention_run(llama) == "fused"
    monkeypatch.setattr(fastweights.ops, "ATTENTION", None)
    assert fastweights.ops.unfused_attention(other) is None
