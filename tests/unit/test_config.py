"""The config tree: YAML + dotted overrides, validation errors that name field and value."""

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
        ("train.zero_stage=7", ["train.zero_stage", "7"]),
        ("meta.second_order=maybe", ["meta.second_order", "maybe"]),
        ("meta.checkpoint_inner=always", ["meta.checkpoint_inner", "always"]),
        ("meta.checkpoint_inner=off", ["meta.checkpoint_inner", "False", "'none'", "YAML reads"]),
        (
            "meta.checkpoint_inner=vjp meta.engine=reference",
            ["meta.checkpoint_inner", "'vjp'", "fastweights engine"],
        ),
        ("noequals", ["noequals"]),
    ],
)
def test_bad_values_name_field_and_value(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
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
    from raymeta.meta.fastweights import checkpoint_mode
    from raymeta.outer import inner_spec
    from tests.helpers import tiny_llama

    cfg = load_config(None, [f"meta.checkpoint_inner={mode}"])
    spec = inner_spec(tiny_llama(vocab=16), cfg.meta)
    assert spec.checkpoint_inner == spec_value
    assert checkpoint_mode(spec.checkpoint_inner) == (None if mode == "none" else mode)
