"""Token batches for the formats, greedy decoding, the offline tiny model and tokenizer."""

import pytest
import torch

from raymeta.config import TinyModelConfig
from raymeta.data import generate
from raymeta.data.batches import context_batch, extend, prompt_batch, prompt_text, scoring_batch
from raymeta.data.triples import Triple
from raymeta.evaluate import matches, normalise, partners
from raymeta.meta.decode import greedy_decode, model_forward
from raymeta.models import build_tiny_model, load_model, save_model, train_tokenizer
from raymeta.pretrain import tokenizer_texts


def tiny_tokenizer():
    train, test = generate.generate("character_descriptions", 50, 10, seed=0)
    return train, test, train_tokenizer(tokenizer_texts("character_descriptions", train, test))


def test_word_tokenizer_makes_names_two_tokens_and_round_trips(tmp_path):
    train, test, tok = tiny_tokenizer()
    for t in train + test:
        assert len(tok(" " + t.response, add_special_tokens=False)["input_ids"]) == 2
        assert tok.unk_token_id not in tok(t.context)["input_ids"]
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), len(tok))
    save_model(model, tok, tmp_path / "m")
    back, tok2 = load_model(str(tmp_path / "m"))
    ids = torch.tensor([tok2(train[0].context)["input_ids"]])
    assert tok2.decode(ids[0]).replace(" ", "") == train[0].context.replace(" ", "")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


def test_formats_score_only_the_response():
    train, _, tok = tiny_tokenizer()
    t = train[0]
    nc = scoring_batch(tok, [t.query], [t.response])
    pr = scoring_batch(tok, [prompt_text(t.context, t.query)], [t.response], add_eos=True)
    scored = nc.input_ids[nc.labels != -100].tolist()
    assert tok.decode(scored) == t.response
    assert pr.labels[pr.labels != -100].tolist()[-1] == tok.eos_token_id
    assert nc.input_ids[0, 0] == tok.bos_token_id
    # padding: a batch of two lengths is right-padded and masked
    both = scoring_batch(tok, [t.query, prompt_text(t.context, t.query)], [t.response] * 2)
    assert both.attention_mask[0].sum() < both.attention_mask[1].sum()
    assert (both.input_ids[0][both.attention_mask[0] == 0] == tok.pad_token_id).all()
    assert (both.labels[0][both.attention_mask[0] == 0] == -100).all()


def test_context_groups_and_extend():
    train, _, tok = tiny_tokenizer()
    ctx = context_batch(
        tok, [[train[0].context, train[1].context], [train[2].context, train[3].context]]
    )
    assert ctx.input_ids.shape[:2] == (2, 2)
    scored = ctx.attention_mask.bool()
    scored[..., 0] = False  # a row's first token: nothing of the row predicts it
    assert ((ctx.labels != -100) == scored).all()
    p = prompt_batch(tok, [train[0].query, train[1].context])
    ext = extend(p, [[5, 6], [7]], tok.pad_token_id)
    assert ext.labels[0][ext.labels[0] != -100].tolist() == [5, 6]
    assert ext.labels[1][ext.labels[1] != -100].tolist() == [7]


def test_greedy_decode_matches_step_by_step_argmax():
    train, _, tok = tiny_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, intermediate_size=64), len(tok), seed=1
    ).eval()
    prompts = prompt_batch(tok, [train[0].query, train[1].context])
    out = greedy_decode(model_forward(model), prompts, 3, None, tok.pad_token_id)
    for i in range(2):
        ids = prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
        for k in range(3):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            assert out[i][k] == nxt
            ids.append(nxt)


def test_matching_and_partners():
    assert normalise(" Evan  Armstrong .") == "evan armstrong"
    assert matches("Evan Armstrong.", "evan armstrong")
    assert matches("Evan Armstrong was", "Evan Armstrong")
    assert not matches("Evan Armstrongs", "Evan Armstrong")
    assert not matches("", "Evan")
    p = partners([Triple(f"c{i}", f"q{i}", f"r{i}") for i in range(50)], seed=1)
    assert sorted(p) == list(range(50)) and all(p[i] != i for i in range(50))


def test_lora_model_saves_as_base_plus_adapter_and_loads_back(tmp_path):
    from raymeta.config import LoraConfig
    from raymeta.models import ADAPTER_DIR, apply_lora, is_peft

    _, _, tok = tiny_tokenizer()
    plain = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok))
    base_weights = {k: v.clone() for k, v in plain.state_dict().items()}
    model = apply_lora(
        plain, LoraConfig(enabled=True, rank=2, target_modules=["q_proj", "up_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: it changes the outputs
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / ADAPTER_DIR / "adapter_config.json").is_file()

    back, _ = load_model(str(tmp_path / "m"))
    assert is_peft(back)
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in back.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-6)
    # peft's own loader finds the base from any working directory (an absolute path)
    from peft import AutoPeftModelForCausalLM

    peft_back = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "m" / ADAPTER_DIR))
    assert torch.allclose(peft_back(ids).logits, model(ids).logits, atol=1e-5)

    # the base model alone is the model before the adapter, under the usual names
    (tmp_path / "base").mkdir()
    for f in (tmp_path / "m").iterdir():
        if f.is_file():
            (tmp_path / "base" / f.name).write_bytes(f.read_bytes())
    base, _ = load_model(str(tmp_path / "base"))
    assert not is_peft(base)
    assert base.state_dict().keys() == base_weights.keys()
    for k, v in base_weights.items():
        assert torch.equal(base.state_dict()[k], v), k


def test_a_model_reloaded_with_its_adapter_is_not_wrapped_twice(tmp_path):
    """``model.name_or_path`` = a LoRA-trained model: with model.lora.enabled its adapter goes on
    training (not a second adapter on top); without, the mismatch is an input error."""
    from raymeta.config import load_config
    from raymeta.errors import InputError
    from raymeta.models import apply_lora, is_peft
    from raymeta.pipeline import with_model_choices

    _, _, tok = tiny_tokenizer()
    plain = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok))
    cfg = load_config(None, ["model.lora.enabled=true", "model.lora.rank=2"])
    save_model(apply_lora(plain, cfg.model.lora), tok, tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"))
    names = {n for n, p in loaded.named_parameters() if p.requires_grad}
    again = with_model_choices(cfg, loaded)
    assert is_peft(again) and {n for n, p in again.named_parameters() if p.requires_grad} == names
    assert not any("base_model.model.base_model" in n for n, _ in again.named_parameters())
    off = load_config(None, [f"model.name_or_path={tmp_path / 'm'}"])
    with pytest.raises(InputError, match="holds a LoRA adapter"):
        with_model_choices(off, load_model(str(tmp_path / "m"))[0])


def test_a_saved_models_settings_are_named_where_a_job_differs(tmp_path, capsys):
    """A job that loads a model another job saved names each setting its evaluation and training
    depend on that differs from the saved raymeta.json, and records the adapter as it is."""
    import json

    from raymeta.config import load_config
    from raymeta.models import apply_lora
    from raymeta.pipeline import note_saved_settings, save_trained

    _, _, tok = tiny_tokenizer()
    plain = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok))
    lora = ["model.lora.enabled=true", "model.lora.mode=outer_lora_inner_full"]
    model = apply_lora(plain, load_config(None, [*lora, "model.lora.rank=2"]).model.lora)
    # a job asked for rank 4 but trained on a loaded rank-2 adapter as it was
    save_trained(
        model, tok, tmp_path, "LG", "base", load_config(None, [*lora, "model.lora.rank=4"])
    )
    path = str(tmp_path / "models" / "LG")
    capsys.readouterr()  # the "saved to" line
    info = json.loads((tmp_path / "models" / "LG" / "raymeta.json").read_text())
    assert info["config"]["model"]["lora"]["rank"] == 2
    assert note_saved_settings(load_config(None, [*lora, "model.lora.rank=2"]), path) == []
    lines = note_saved_settings(load_config(None, ["meta.inner_lr=0.1"]), path)
    assert lines == capsys.readouterr().out.splitlines()
    assert [x.split(" was meta-trained with ")[1] for x in lines] == [
        "meta.inner_lr=0.3; this job has 0.1",
        "model.lora.enabled=True; this job has False",
        "model.lora.mode=outer_lora_inner_full; this job has adapter",
        "model.lora.rank=2; this job has 8 (the saved adapter is used as it is)",
    ]


def test_model_source_is_absolute_and_follows_a_moved_model(tmp_path, monkeypatch):
    """The base model a job records: an absolute path; one of the output dir's own models,
    moved to previous/ as the job starts, at its new place; a hub name as given."""
    from raymeta.pipeline import model_source

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    (out / "models" / "LG").mkdir(parents=True)
    (tmp_path / "m").mkdir()
    assert model_source("m", out, None) == str(tmp_path / "m")
    moved = out / "previous" / "20261202-000000"
    assert model_source("out/models/LG", out, moved) == str(moved / "models" / "LG")
    assert model_source("out/models/LG", out, None) == str(out / "models" / "LG")
    assert model_source("meta-llama/Llama-3.2-1B", out, moved) == "meta-llama/Llama-3.2-1B"


def test_longest_sequences_is_the_longest_batch_the_job_builds():
    """The bound of the position check equals the rows the job's batches really have."""
    from raymeta.data.batches import longest_sequences

    train, _, tok = tiny_tokenizer()
    triples = train[:12]
    prompts = scoring_batch(
        tok,
        [prompt_text(t.context, t.query) for t in triples],
        [t.response for t in triples],
        add_eos=True,
    )
    assert longest_sequences(tok, triples, 0)[0] == prompts.input_ids.shape[1]
    row = int(prompts.attention_mask.sum(1).argmax())
    assert longest_sequences(tok, triples, 0)[1] == row
    # a decoding budget longer than any answer: the prefix plus that many tokens
    prefixes = prompt_batch(tok, [prompt_text(t.context, t.query) for t in triples])
    assert longest_sequences(tok, triples, 40)[0] == prefixes.input_ids.shape[1] + 40
    # no prompt: contexts alone, and queries with their answers
    contexts = context_batch(tok, [[t.context] for t in triples])
    queries = scoring_batch(tok, [t.query for t in triples], [t.response for t in triples], True)
    longest = max(contexts.input_ids.shape[-1], queries.input_ids.shape[1])
    assert longest_sequences(tok, triples, 0, prompt_contexts=0)[0] == longest
    # three contexts joined (LC's teacher, lc_teacher_context=all): at least the real prompt
    group = sorted(triples, key=lambda t: -len(t.context))[:3]
    joined = prompt_batch(tok, [prompt_text(" ".join(t.context for t in group), group[0].query)])
    assert longest_sequences(tok, triples, 0, prompt_contexts=3)[0] >= joined.input_ids.shape[1]


def test_a_model_with_too_few_positions_stops_the_job_before_any_work(tmp_path):
    """A GPT-2 of 24 positions crashed with an IndexError in the preparation stage."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from raymeta.config import load_config
    from raymeta.errors import InputError
    from raymeta.pipeline import run_pipeline

    _, _, tok = tiny_tokenizer()
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=24, n_embd=16, n_layer=1, n_head=2)
    )
    save_model(gpt2, tok, tmp_path / "gpt2")
    cfg = load_config(
        None, [f"model.name_or_path={tmp_path / 'gpt2'}", "data.n_train=40", "data.n_test=8"]
    )
    with pytest.raises(
        InputError,
        match=r"gpt2 accepts sequences of at most 24 positions, but "
        r"test triple \d+ needs up to \d+",
    ):
        run_pipeline(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "config.yaml").exists()
    small = load_config(
        None,
        [
            "model.tiny.max_positions=16",
            "data.n_train=40",
            "data.n_test=8",
            f"model.tiny_cache_dir={tmp_path / 'models'}",
        ],
    )
    with pytest.raises(InputError, match=r"model.tiny.max_positions=16: the tiny model accepts"):
        run_pipeline(small, tmp_path / "out")
    assert not (tmp_path / "models").exists()  # stopped before pretraining


def test_lm_regulariser_texts_are_cut_to_the_model_positions():
    """A GPT-2 of 32 positions crashed (IndexError) on the pretraining mix's joined facts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from raymeta.config import MetaConfig
    from raymeta.data.batches import lm_batch, truncate
    from raymeta.meta.engines import select_engine
    from raymeta.outer import inner_spec, step_loss

    train, _, tok = tiny_tokenizer()
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=32,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    meta = MetaConfig(inner_lr=0.1, lm_weight=0.5)
    spec = inner_spec(model, meta, None)
    engine = select_engine("reference", model, spec)
    long = lm_batch(tok, [" ".join(t.context for t in train[k : k + 3]) for k in range(4)])
    assert long.input_ids.shape[1] > 32
    cut = truncate(long, 32)
    assert cut.input_ids.shape[1] == 32 and torch.equal(cut.labels, long.labels[:, :32])
    assert truncate(long, None) is long and truncate(long, 10**4) is long
    groups = [[t] for t in train[:4]]
    torch.manual_seed(0)
    _, stats = step_loss(model, engine, spec, tok, groups, "LG", meta, None, long)
    torch.manual_seed(0)
    _, same = step_loss(model, engine, spec, tok, groups, "LG", meta, None, cut)
    assert stats["lm_loss"] == pytest.approx(same["lm_loss"], rel=1e-6)


def test_inner_params_naming_a_tied_weight_says_under_which_name():
    from raymeta.errors import InputError
    from raymeta.models import resolve_inner_params

    tied = build_tiny_model(TinyModelConfig(hidden_size=16, tie_embeddings=True), 40)
    with pytest.raises(InputError) as e:
        resolve_inner_params(tied, ["lm_head"])
    assert str(e.value) == (
        "meta.inner_params: ['lm_head'] matches no parameter of the model "
        "(lm_head.weight is tied to model.embed_tokens.weight: name it so)"
    )
    assert resolve_inner_params(tied, ["embed_tokens"]) == ["model.embed_tokens.weight"]
    untied = build_tiny_model(TinyModelConfig(hidden_size=16), 40)
    assert resolve_inner_params(untied, ["lm_head"]) == ["lm_head.weight"]
    with pytest.raises(InputError, match=r"matches no parameter of the model$"):
        resolve_inner_params(untied, ["nosuch"])


def test_inner_params_outside_the_lora_modes_pool_name_the_mode():
    """With LoRA the inner step's pool is the adapter (adapter mode) or the base weights
    (outer_lora_inner_full): a pattern that matches only outside it names the mode and the
    parameter it matched, not "no parameter of the model"."""
    from raymeta.config import LoraConfig
    from raymeta.errors import InputError
    from raymeta.models import apply_lora, resolve_inner_params

    plain = build_tiny_model(TinyModelConfig(hidden_size=16), 40)
    model = apply_lora(plain, LoraConfig(enabled=True, rank=2, target_modules=["q_proj"]))
    with pytest.raises(InputError) as e:
        resolve_inner_params(model, ["lora_"], "outer_lora_inner_full")
    assert "matches no parameter of the base weights (model.lora.mode=outer_lora_inner_full" in (
        str(e.value)
    )
    assert "; it matches base_model.model.model.layers.0.self_attn.q_proj.lora_A" in str(e.value)
    with pytest.raises(InputError) as e:
        resolve_inner_params(model, ["embed_tokens"], "adapter")
    assert "matches no parameter of the adapter (model.lora.mode=adapter: the inner step" in (
        str(e.value)
    )
    assert str(e.value).endswith(
        "; it matches base_model.model.model.embed_tokens.weight, outside them"
    )
    with pytest.raises(InputError, match=r"matches no parameter of the adapter .*\)$"):
        resolve_inner_params(model, ["nosuch"], "adapter")
    assert resolve_inner_params(model, ["lora_A"], "adapter")
