"""Every config composes; option file == registry key == name; YAML defaults == dataclass defaults; bad input is a
clear error."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import lce.conf
from lce.errors import ConfigError
from lce.eval.config import EvalConfig
from lce.experiment import GROUPS, parse_run_config
from lce.train import TrainConfig

CONF = Path(lce.conf.__file__).parent
SINGLE = {"train": TrainConfig, "eval": EvalConfig}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides=()):
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_option_files_match_registry(group):
    registry = GROUPS[group]
    assert options(group) == registry.names()
    for name in registry.names():
        assert OmegaConf.load(CONF / group / f"{name}.yaml").name == name


REQUIRED = {("model", "hf"): ["model.path=some/model"], ("data", "local"): ["data.pattern=*.txt"],
            ("data", "hf"): ["data.path=pg19"]}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in [*sorted(GROUPS), "train", "eval", "experiment"] for o in options(g)]
)
def test_every_option_composes_and_parses(group, option):
    cfg = composed([f"{group}={option}", *REQUIRED.get((group, option), [])])
    run_cfg = parse_run_config(cfg)
    if group in GROUPS:
        assert getattr(run_cfg, group).name == option


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


@pytest.mark.parametrize("group,option", [(g, o) for g in [*sorted(GROUPS), *SINGLE] for o in options(g)])
def test_yaml_defaults_equal_dataclass_defaults(group, option):
    cls = SINGLE[group] if group in SINGLE else GROUPS[group].get(option)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(raw) == set(fields), "the YAML must list every field, with its default"
    for key, value in raw.items():
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation (e.g. model.max_position_embeddings: ${train.seq_len})
        assert value == _default(fields[key]), f"{group}/{option}.yaml: {key}"


def test_unknown_key_added_with_plus_is_rejected():
    cfg = composed(["+posenc.facter=2"])
    with pytest.raises(ConfigError, match=r"posenc\.facter: unknown key.*allowed keys: logn, logn_length, name"):
        parse_run_config(cfg)


def test_unknown_top_level_key_is_rejected():
    with pytest.raises(ConfigError, match=r"sed: unknown key \(did you mean 'seed'\?\)"):
        parse_run_config(composed(["+sed=1"]))


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'abc'"):
        parse_run_config(composed(["train.lr=abc"]))
    with pytest.raises(ConfigError, match=r"eval\.documents: 'longest' is not allowed.*'long', 'concat'"):
        parse_run_config(composed(["eval.documents=longest"]))
    with pytest.raises(ConfigError, match=r"train\.grad_accum"):
        parse_run_config(composed(["train.grad_accum=0"]))
    with pytest.raises(ConfigError, match=r"model\.num_key_value_heads"):
        parse_run_config(composed(["model.num_key_value_heads=3"]))


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match=r"model\.path: set a hub id"):
        parse_run_config(composed(["model=hf"]))


def test_bad_group_option_lists_available():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)posenc/yarnn.*Available options in 'posenc'.*nope"):
        composed(["posenc=yarnn"])


def test_eval_posencs_are_validated():
    with pytest.raises(ConfigError, match=r"eval\.posencs\[1\]: unknown posenc 'yarnn'"):
        parse_run_config(composed(["eval.posencs=[{name: rope},{name: yarnn}]"]))
    with pytest.raises(ConfigError, match=r"eval\.posencs\[0\]\.facter: unknown key"):
        parse_run_config(composed(["eval.posencs=[{name: logn, facter: 2}]"]))
    with pytest.raises(ConfigError, match=r"eval\.posencs: labels must be distinct"):
        parse_run_config(composed(["eval.posencs=[{name: rope},{name: logn, label: rope}]"]))
