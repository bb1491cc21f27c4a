"""Where the fast-weights engine cannot be exact it refuses (``fastweights.ineligibility``), with
the reason, and ``meta.engine=auto`` runs the reference engine: module kinds it does not know,
parameters read outside their modules, tokens it cannot group by task, decoder blocks
checkpointing cannot recompute; and the controls, the same models made exact, which it runs."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymeta.errors import InputError
from raymeta.meta import fastweights, reference
from raymeta.meta.engines import select_engine
from raymeta.meta.inner import InnerSpec
from tests.helpers import random_contexts, random_queries, tiny_llama
from tests.unit.fastweights_models import (
    MODELS,
    TOL,
    VJP_REFUSED,
    VOCAB,
    all_names,
    batch,
    compare,
    gemma,
    gpt_oss,
    max_rel_error,
    mixtral,
    opt,
    perturb,
    roberta,
    run,
)


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


def test_experts_without_the_post_norm_flag_are_known():
    """transformers 5.17 sets no ``has_post_expert_norm`` (it has no norm after the experts):
    such experts have the layout of the flag's False; True is refused (above)."""
    from raymeta.meta import experts as moe

    module = mixtral().model.layers[0].mlp.experts
    assert moe.projections(module) == ("gate_up_proj", "down_proj")
    vars(module).pop("has_post_expert_norm", None)  # (5.23's forward reads it: layout only)
    assert not hasattr(module, "has_post_expert_norm")
    assert moe.projections(module) == ("gate_up_proj", "down_proj")
    module.has_post_expert_norm = True
    assert moe.projections(module) is None


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
