"""The config tree: YAML + dotted overrides, validation errors that name field and value."""

import shlex
from pathlib import Path

import pytest

from raymeta.config import ConfigError, RunConfig, dump_config, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_embedded_defaults_and_overrides():
    cfg = load_config(None, ["meta.inner_lr=1e-3", "meta.objectives=[LG]", "data.n_train=10"])
    assert cfg.meta.inner_lr == 1e-3 and isinstance(cfg.meta.inner_lr, float)
    assert cfg.meta.objectives == ["LG"]
    assert cfg.data.n_train == 10
    assert load_config(None).meta.inner_lr == RunConfig().meta.inner_lr


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("meta:\n  outer_lr: 1e-4\n")
    assert load_config(p).meta.outer_lr == 1e-4


@pytest.mark.parametrize(
    "override, words",
    [
        ("meta.inner_lr=-1", ["meta.inner_lr", "-1"]),
        ("meta.inner_lr=fast", ["meta.inner_lr", "fast"]),
        ("meta.engine=turbo", ["meta.engine", "turbo"]),
        ("meta.nope=1", ["meta.nope", "unknown field"]),
        ("data.n_train=1.5", ["data.n_train", "1.5"]),
        ("data.n_train=1.5e1", ["data.n_train", "1.5e1"]),
        ("data.n_train=2.5e-1", ["data.n_train", "2.5e-1"]),
        ("train.zero_stage=7", ["train.zero_stage", "7"]),
        ("meta.second_order=maybe", ["meta.second_order", "maybe"]),
        ("meta.checkpoint_inner=always", ["meta.checkpoint_inner", "always"]),
        ("meta.checkpoint_inner=off", ["meta.checkpoint_inner", "False", "'none'", "YAML reads"]),
        (
            "meta.checkpoint_inner=vjp meta.engine=reference",
            ["meta.checkpoint_inner", "'vjp'", "fastweights engine"],
        ),
        (
            "meta.compile_ops=true meta.engine=reference",
            ["meta.compile_ops", "fastweights engine"],
        ),
        ("meta.compile_ops=sometimes", ["meta.compile_ops", "sometimes"]),
        ("noequals", ["noequals"]),
        ("eval.batch_size=0", ["eval.batch_size", "0", ">= 1"]),
        ("pretrain.batch_size=0", ["pretrain.batch_size", ">= 1"]),
        ("prepare.batch_size=0", ["prepare.batch_size", ">= 1"]),
        ("pretrain.lr=-1", ["pretrain.lr", "-1.0", "> 0"]),
        ("prepare.lr=-5", ["prepare.lr", "> 0"]),
        ("meta.outer_lr=.inf", ["meta.outer_lr", "inf", "finite"]),
        ("meta.lm_batch_size=0", ["meta.lm_batch_size", ">= 1"]),
        ("meta.log_every=0", ["meta.log_every", ">= 1"]),
        ("model.tiny.num_heads=0", ["model.tiny.num_heads", ">= 1"]),
        ("model.tiny.hidden_size=0", ["model.tiny.hidden_size", ">= 1"]),
        ("model.tiny.hidden_size=30", ["model.tiny.hidden_size", "multiple", "num_heads=4"]),
        ("prepare.n_examples=-1", ["prepare.n_examples", ">= 1"]),
        ("pretrain.mix.context=-1", ["pretrain.mix.context", "-1.0", ">= 0"]),
        ("pretrain.mix.bogus=1", ["pretrain.mix.bogus", "'context'"]),
        ("pretrain.target_prompt_accuracy=97", ["pretrain.target_prompt_accuracy", "[0, 1]"]),
        ("eval.settings=[]", ["eval.settings", "at least one"]),
        ("eval.n_examples=-1", ["eval.n_examples", "-1", ">= 0"]),
        ("train.eval_every=-1", ["train.eval_every", ">= 0"]),
        ("train.checkpoint_every=-3", ["train.checkpoint_every", ">= 0"]),
        ("meta.objectives=[LG,LG]", ["meta.objectives", "repeated: LG"]),
        ("data.n_train=0", ["data.n_train", "generated set"]),
        ("data.n_test=0", ["data.n_test", "generated set"]),
        ("data.n_train=6000", ["data.n_train + data.n_test", "6000 + 500", "distinct names"]),
        ("train.num_workers=2 meta.lm_batch_size=3", ["meta.lm_batch_size", "3", "num_workers=2"]),
        ("train.num_workers=2 meta.meta_batch_size=3", ["meta.meta_batch_size", "num_workers=2"]),
        ("meta.steps=abc", ["override 'meta.steps=abc'", "meta.steps", "'abc'"]),
        ("meta=3 meta.steps=1", ["override 'meta.steps=1'", "meta is 3", "not a section"]),
        ("model.dtype=float16", ["model.dtype", "'float16'", "loss scaling", "bfloat16"]),
        ("device=gpu", ["device", "'gpu'", "cpu, cuda or cuda:N"]),
        ("device=cuda:x", ["device", "'cuda:x'"]),
        ("tracking.experiment=", ["tracking.experiment", "non-empty"]),
        ("data.dataset=squad", ["data.source", "required for dataset 'squad'", "rajpurkar/squad"]),
        ("data.dataset=wikitext", ["data.source", "'wikitext'", "Salesforce/wikitext"]),
        ("data.dataset=jsonl", ["data.source", "TRAIN.jsonl[,TEST.jsonl]"]),
        (
            "data.dataset=jsonl data.source=t.jsonl 'pretrain.mix={fresh: 1}'",
            ["pretrain.mix", "other than 'fresh'", "'jsonl'"],
        ),
    ],
)
def test_bad_values_name_field_and_value(override, words):
    """Each bad value stops at load time, naming the field, the value and what was expected."""
    with pytest.raises(ConfigError) as e:
        load_config(None, shlex.split(override))
    for w in words:
        assert w in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("meta:\n  clip_norm: loud\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: meta\.clip_norm"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["meta.inner_lr=0.3", "eval.settings=[NC,FT]"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_embedded_defaults_are_the_quick_start_config():
    root = Path(__file__).resolve().parents[2]
    shipped = load_config(root / "configs" / "tiny_char.yaml")
    defaults = load_config(None)
    for section in ("data", "model", "pretrain", "prepare", "meta", "eval"):
        assert getattr(shipped, section) == getattr(defaults, section), section


@pytest.mark.parametrize(
    "mode, spec_value", [("none", False), ("vjp", "vjp"), ("forward", "forward")]
)
def test_checkpoint_inner_reaches_the_inner_spec(mode, spec_value):
    from raymeta.meta.fastweights.checkpoint import checkpoint_mode
    from raymeta.outer import inner_spec
    from tests.helpers import tiny_llama

    cfg = load_config(None, [f"meta.checkpoint_inner={mode}"])
    spec = inner_spec(tiny_llama(vocab=16), cfg.meta)
    assert spec.checkpoint_inner == spec_value
    assert checkpoint_mode(spec.checkpoint_inner) == (None if mode == "none" else mode)


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("meta:\n  steps: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["meta.steps=abc"])
    assert str(e.value).startswith("override 'meta.steps=abc': meta.steps:")
    assert str(p) not in str(e.value)
    p.write_text("meta:\n  steps: abc\n")
    with pytest.raises(ConfigError) as e:  # the file's own error still names the file
        load_config(p, ["meta.inner_lr=0.1"])
    assert str(e.value).startswith(f"{p}: meta.steps:")


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("name=2024", "name", "2024"),
        ("name='2024'", "name", "2024"),
        ("tracking.experiment=0.10", "tracking.experiment", "0.10"),
        ("experiment=1e3", "experiment", "1e3"),
        ("meta.inner_lr=1e-3", "meta.inner_lr", 1e-3),
        ("meta.steps=12", "meta.steps", 12),
        ("meta.steps=2e4", "meta.steps", 20000),
        ("pretrain.mix={context: 1e-1, copy: 2}", "pretrain.mix", {"context": 0.1, "copy": 2.0}),
    ],
)
def test_overrides_take_the_type_of_their_field(override, field, value):
    from raymeta.config import get_field

    got = get_field(load_config(None, [override]), field)
    assert got == value and type(got) is type(value)


def test_yaml_strings_that_look_like_numbers_stay_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text('name: "1e5"\nexperiment: 2024\nmeta:\n  inner_lr: 1e-2\n  steps: "7"\n')
    cfg = load_config(p)
    assert cfg.name == "1e5" and cfg.experiment == "2024"
    assert cfg.meta.inner_lr == 0.01 and cfg.meta.steps == 7


def test_a_section_set_whole_then_one_field():
    cfg = load_config(None, ["pretrain.mix={context: 1}", "pretrain.mix.copy=3"])
    assert cfg.pretrain.mix == {"context": 1.0, "copy": 3.0}


def test_a_section_given_as_a_mapping_keeps_the_fields_it_leaves_out(tmp_path):
    """``pretrain={lr: 1e-3}`` sets pretrain.lr and keeps the file's pretrain.steps (it used to
    reset every field it left out to its default); nested sections merge the same way, and an
    error in one of the mapping's fields names that field and the override."""
    p = tmp_path / "c.yaml"
    p.write_text("pretrain:\n  steps: 123\n  lr: 0.5\nmodel:\n  tiny:\n    num_layers: 3\n")
    cfg = load_config(p, ["pretrain={lr: 1e-3}", "model={tiny: {hidden_size: 32}}"])
    assert (cfg.pretrain.steps, cfg.pretrain.lr) == (123, 1e-3)
    assert (cfg.model.tiny.num_layers, cfg.model.tiny.hidden_size) == (3, 32)
    default = load_config(None).model.tiny
    assert cfg.model.tiny.num_heads == default.num_heads
    later = load_config(p, ["pretrain={lr: 1e-3}", "pretrain.steps=7", "pretrain={batch_size: 2}"])
    assert (later.pretrain.steps, later.pretrain.lr, later.pretrain.batch_size) == (7, 1e-3, 2)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["pretrain={steps: abc}"])
    assert str(e.value).startswith("override 'pretrain={steps: abc}': pretrain.steps:")
    with pytest.raises(ConfigError, match="pretrain.bogus: unknown field"):
        load_config(p, ["pretrain={bogus: 1}"])


def test_worker_counts_bind_only_the_ray_launcher():
    """train.num_workers is unused by the local launcher, so it does not constrain the batch
    sizes there."""
    local = ["train.launcher=local", "train.num_workers=2"]
    cfg = load_config(None, [*local, "meta.meta_batch_size=3", "meta.lm_batch_size=3"])
    assert (cfg.meta.meta_batch_size, cfg.meta.lm_batch_size) == (3, 3)


def test_the_job_takes_options_after_overrides():
    """``jobs/metatrain.py meta.steps=1 --output-dir X meta.steps=2`` keeps every override."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "jobs" / "metatrain.py"
    spec = importlib.util.spec_from_file_location("metatrain_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.parse_args(["meta.steps=1", "--output-dir", "X", "meta.steps=2"])
    assert args.output_dir == "X" and args.overrides == ["meta.steps=1", "meta.steps=2"]
    assert load_config(args.config, args.overrides).meta.steps == 2


def test_an_override_of_one_mix_weight_keeps_the_others(tmp_path):
    """``pretrain.mix.copy=5`` changes one weight of the default mix (with or without a config
    file) instead of replacing the mix; a YAML mapping still replaces it whole."""
    default = load_config(None, []).pretrain.mix
    for path in (None, "configs/tiny_char.yaml"):
        mix = load_config(path, ["pretrain.mix.copy=5"]).pretrain.mix
        assert mix == {**default, "copy": 5.0}
    f = tmp_path / "mix.yaml"
    f.write_text("pretrain:\n  mix: {copy: 1}\n")
    assert load_config(str(f)).pretrain.mix == {"copy": 1.0}


def test_yaml_shapes_users_write_by_mistake(tmp_path):
    """An empty section is the defaults; a dotted key in YAML is named with how to nest it; an
    empty model name is refused on load."""
    f = tmp_path / "c.yaml"
    f.write_text("meta:\n")
    assert load_config(str(f)).meta == load_config(None).meta
    f.write_text("meta.inner_lr: 0.1\n")
    with pytest.raises(ConfigError, match="meta.inner_lr: unknown field .*write meta: then"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="model.name_or_path: invalid value ''"):
        load_config(None, ["model.name_or_path="])


def test_invalid_yaml_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("meta:\n  inner_lr: [0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(f))
    assert str(err.value).startswith(f"{f}: not valid YAML: ") and "\n" not in str(err.value)
