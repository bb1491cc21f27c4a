"""The LM regulariser's texts (``meta.lm_source``, ``meta.lm_mix``)."""

from __future__ import annotations

import pytest

from raymeta.config import ConfigError, load_config
from raymeta.data.triples import Triple
from raymeta.models import train_tokenizer
from raymeta.outer import lm_sampler


def rows(tok, batch) -> list[str]:
    """The batch's texts, as the tokenizer decodes them, without specials and spaces (decoders
    differ in spaces)."""
    texts = [
        tok.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(batch.input_ids, batch.attention_mask)
    ]
    return [squash(t) for t in texts]


def squash(text: str) -> str:
    return "".join(text.split())


def test_lm_mix_picks_the_regularisers_text_kinds():
    """``meta.lm_mix={context: 1}`` draws training contexts only; the default holds no training
    fact's answer after its query (LC's loss stays label-free); ``{}`` (the whole pretraining
    mix) draws prompt / nc texts that end in one."""
    train = [
        Triple(f"Lake {i} is called alpha{i}.", f"Lake {i} is called", f"alpha{i}")
        for i in range(30)
    ]
    test = [Triple("Lake x is called beta.", "Lake x is called", "beta")]
    tok = train_tokenizer([t.context for t in (*train, *test)])
    contexts = {squash(t.context) for t in train}
    answered = {squash(f"{t.query} {t.response}") for t in train}

    def texts(*overrides: str) -> list[str]:
        cfg = load_config(None, ["meta.lm_batch_size=16", *overrides])
        sample = lm_sampler(cfg, tok, train, test)
        return [x for step in range(4) for x in rows(tok, sample(step))]

    def with_answers(drawn: list[str]) -> list[str]:
        return [x for x in drawn if x not in contexts and any(x.endswith(a) for a in answered)]

    only = texts("meta.lm_mix={context: 1}")
    assert len(only) == 64 and set(only) <= contexts
    default = texts()
    assert len(default) == 64 and not with_answers(default)
    assert contexts & set(default) and set(default) - contexts  # contexts, fresh facts, copies
    assert with_answers(texts("meta.lm_mix={}"))


@pytest.mark.parametrize(
    "override, words",
    [
        ("meta.lm_mix.bogus=1", ["meta.lm_mix.bogus", "a key of"]),
        ("meta.lm_mix={context: -1}", ["meta.lm_mix.context", "-1.0", ">= 0"]),
        ("meta.lm_mix={context: 0}", ["meta.lm_mix", "at least one weight > 0"]),
    ],
)
def test_bad_lm_mix_names_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_lm_mix_of_fresh_facts_only_needs_a_generated_set():
    with pytest.raises(ConfigError, match="meta.lm_mix.*fresh facts exist only"):
        load_config(None, ["data.dataset=jsonl", "data.source=t.jsonl", "meta.lm_mix={fresh: 1}"])
