"""Every config composes; option file == registry key == name; YAML defaults == dataclass defaults; bad input is a
clear error; the protocol and retrieval groups give experiments the objects their untyped forms gave."""

import dataclasses
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import lce.conf
from lce.cli import legacy_overrides
from lce.errors import ConfigError
from lce.eval.config import EvalConfig
from lce.eval.protocols import PROTOCOLS, build_protocol
from lce.eval.retrieval import RETRIEVALS, build_retrieval
from lce.experiment import GROUPS, parse_run_config
from lce.train import TrainConfig

CONF = Path(lce.conf.__file__).parent
SINGLE = {"train": TrainConfig, "eval": EvalConfig}
#: Groups nested in ``eval`` (``conf/eval/<group>/``), by the field of ``EvalConfig`` they fill.
NESTED = {"eval/protocol": PROTOCOLS, "eval/retrieval": RETRIEVALS}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides=()):
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group", [*sorted(GROUPS), *NESTED])
def test_option_files_match_registry(group):
    registry = {**GROUPS, **NESTED}[group]
    assert options(group) == registry.names()
    for name in registry.names():
        assert OmegaConf.load(CONF / group / f"{name}.yaml").name == name


REQUIRED = {("model", "hf"): ["model.path=some/model"], ("data", "local"): ["data.pattern=*.txt"],
            ("data", "hf"): ["data.path=pg19"]}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in [*sorted(GROUPS), *NESTED, "train", "eval", "experiment"] for o in options(g)]
)
def test_every_option_composes_and_parses(group, option):
    cfg = composed([f"{group}={option}", *REQUIRED.get((group, option), [])])
    run_cfg = parse_run_config(cfg)
    if group in GROUPS:
        assert getattr(run_cfg, group).name == option
    if group == "eval/protocol":
        assert run_cfg.eval.protocol.name == option
    if group == "eval/retrieval":
        assert list(run_cfg.eval.retrieval) == [option] and run_cfg.eval.retrieval[option].name == option


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


@pytest.mark.parametrize("group,option", [(g, o) for g in [*sorted(GROUPS), *NESTED, *SINGLE] for o in options(g)])
def test_yaml_defaults_equal_dataclass_defaults(group, option):
    cls = SINGLE[group] if group in SINGLE else {**GROUPS, **NESTED}[group].get(option)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    raw.pop("defaults", None)  # eval/default.yaml selects its nested groups' options
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


def test_nested_groups_name_bad_keys_and_values():
    with pytest.raises(ConfigError, match=r"^eval\.protocol\.truncat: unknown key \(did you mean 'truncate'\?\); "
                                          r"allowed keys: add_start_token, name, stride, truncate$"):
        parse_run_config(composed(["eval/protocol=yarn", "+eval.protocol.truncat=true"]))
    with pytest.raises(ConfigError, match=r"^eval\.protocol\.stride: must be >= 1, got 0$"):
        parse_run_config(composed(["eval/protocol=yarn", "eval.protocol.stride=0"]))
    with pytest.raises(ConfigError, match=r"^eval\.retrieval\.passkey\.trials: must be >= 1, got 0$"):
        parse_run_config(composed(["eval/retrieval=[passkey]", "eval.retrieval.passkey.trials=0"]))
    with pytest.raises(ConfigError, match=r"^eval\.retrieval\.needle\.mach: unknown key \(did you mean 'match'\?\)"):
        parse_run_config(composed(["eval/retrieval=[needle]", "+eval.retrieval.needle.mach=integer"]))
    with pytest.raises(ConfigError, match=r"^eval\.retrieval\.passkee: unknown key \(did you mean 'passkey'\?\); "
                                          r"allowed keys: needle, passkey, ruler_cwe, .*, ruler_vt$"):
        parse_run_config(composed(["+eval.retrieval.passkee={trials: 1}"]))
    # An experiment's fields for a task whose option is not selected do not quietly add the task.
    with pytest.raises(ConfigError, match=r"^eval\.retrieval\.passkey: fields are set but the task is not selected"):
        parse_run_config(composed(["experiment=retrieval", "eval/retrieval=[needle]"]))


def test_several_retrieval_tasks_run_in_the_order_selected():
    assert list(parse_run_config(composed(["eval/retrieval=[needle,passkey]"])).eval.retrieval) == ["needle", "passkey"]
    assert parse_run_config(composed()).eval.retrieval == {}


#: What each experiment set before eval.protocol and eval.retrieval were config groups (their YAML then).
UNTYPED = {
    "dca_table1": ({"name": "longlora_stream", "stride": 256}, []),
    "yarn_table2": ({"name": "yarn", "truncate": True}, []),
    "retrieval": (None, [
        {"name": "passkey", "lengths": [256, 512, 1024], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 4,
         "key_digits": 5},
        {"name": "needle", "lengths": [256, 512, 1024], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 4,
         "key_digits": 5}]),
    "real_retrieval": (None, [
        {"name": "passkey", "lengths": [4096, 8192, 16384], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 1},
        {"name": "needle", "lengths": [4096, 8192, 16384], "depths": [0.0, 0.5, 1.0], "trials": 1}]),
}


def hydra_value(value) -> str:
    """``value`` in Hydra's override syntax: Python's repr without quotes (the values here are names and numbers)."""
    return repr(value).replace("'", "")


@pytest.mark.parametrize("experiment", sorted(UNTYPED))
def test_experiments_in_group_form_give_the_objects_of_their_untyped_form(experiment):
    protocol, retrieval = UNTYPED[experiment]
    ev = parse_run_config(composed([f"experiment={experiment}"])).eval
    assert ev.protocol == build_protocol(protocol or "canonical")
    assert list(ev.retrieval.values()) == [build_retrieval(spec) for spec in retrieval]
    # The untyped form still works, on the command line as it always did (and as a deprecated list).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = parse_run_config(composed(legacy_overrides(
            [f"experiment={experiment}", f"eval.protocol={hydra_value(protocol or {'name': 'canonical'})}",
             f"eval.retrieval={hydra_value(retrieval)}"]))).eval
    assert (old.protocol, old.retrieval) == (ev.protocol, ev.retrieval)


def test_untyped_protocol_merged_over_the_selected_option_still_works():
    """An experiment file of the untyped form (``eval: {protocol: {name: yarn, truncate: true}}``) is merged by Hydra
    into the ``canonical`` option's fields; those are recognised and dropped."""
    merged = OmegaConf.merge(OmegaConf.load(CONF / "eval" / "protocol" / "canonical.yaml"),
                             {"name": "yarn", "truncate": True})
    with pytest.warns(DeprecationWarning, match=r"eval/protocol=yarn"):
        assert EvalConfig(protocol=merged).protocol == build_protocol({"name": "yarn", "truncate": True})
    # A changed field of the other option is not a leftover: the user set it, for a protocol that has no such field.
    with pytest.raises(ConfigError, match=r"^eval\.protocol\.bucket_size: unknown key; allowed keys: add_start_token, "
                                          r"name, stride, truncate$"):
        EvalConfig(protocol={**OmegaConf.to_container(merged), "n_bootstrap": 5})


def test_python_api_takes_names_mappings_lists_and_configs():
    passkey = build_retrieval({"name": "passkey", "trials": 2})
    assert EvalConfig().protocol == build_protocol("canonical")
    assert EvalConfig(protocol="yarn").protocol == build_protocol("yarn")
    assert EvalConfig(retrieval={"passkey": passkey}).retrieval == {"passkey": passkey}
    assert EvalConfig(retrieval={"passkey": {"name": "passkey", "trials": 2}}).retrieval == {"passkey": passkey}
    with pytest.warns(DeprecationWarning, match=r"eval\.retrieval: a list of tasks is deprecated"):
        assert EvalConfig(retrieval=[passkey]).retrieval == {"passkey": passkey}
    with pytest.raises(ConfigError, match=r"^eval\.retrieval\[1\]: a second passkey task"):
        EvalConfig(retrieval=[passkey, "passkey"])
    with pytest.raises(ConfigError, match=r"^eval\.retrieval\.needle\.name: must be 'needle'"):
        EvalConfig(retrieval={"needle": passkey})
