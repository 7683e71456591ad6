"""lce.preflight: the configuration checks the ``lce`` command runs before Hydra creates a directory and before torch
is imported; they agree with the full parse (lce.experiment.parse_run_config)."""

import dataclasses
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from lce.errors import ConfigError
from lce.experiment import RunConfig, parse_run_config
from lce.preflight import check_config, check_writable_root, top_level_keys


def composed(*overrides):
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_top_level_keys_are_the_run_config_fields():
    assert top_level_keys() == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("override,message", [
    ("+posenc.facter=2", "posenc.facter: unknown key (did you mean 'factor'?)"),
    ("+train.stesp=2", "train.stesp: unknown key (did you mean 'steps'?)"),
    ("+sead=1", "sead: unknown key (did you mean 'seed'?)"),
])
def test_an_unknown_key_is_named_as_the_full_parse_names_it(override, message):
    cfg = composed("posenc=yarn", override)
    with pytest.raises(ConfigError) as quick:
        check_config(cfg)
    with pytest.raises(ConfigError) as full:
        parse_run_config(cfg)
    assert str(quick.value).startswith(message) and str(quick.value) == str(full.value)


@pytest.mark.parametrize("key,value", [("run_name", "a/b"), ("run_name", ".."), ("run_name", ""),
                                       ("experiment_name", "x/../y")])
def test_names_that_would_move_the_results_elsewhere_are_refused(key, value):
    cfg = composed(f"{key}='{value}'")
    with pytest.raises(ConfigError, match=f"^{key}: .* must be a single directory name") as quick:
        check_config(cfg)
    with pytest.raises(ConfigError) as full:
        parse_run_config(cfg)
    assert str(full.value) == str(quick.value)


def test_an_out_root_that_cannot_hold_the_results_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"^out_root: {blocker} is a file, not a directory"):
        check_config(composed(f"out_root={blocker}"))
    with pytest.raises(ConfigError, match=f"^out_root: {blocker} is a file"):
        check_writable_root(str(blocker / "deeper"), "x")
    check_config(composed(f"out_root={tmp_path / 'new' / 'dirs'}"))  # missing directories are fine: created later
    assert not (tmp_path / "new").exists()


def test_the_checks_import_neither_torch_nor_transformers():
    script = ("import sys\nfrom hydra import compose, initialize_config_module\n"
              "from lce.preflight import check_config\n"
              "with initialize_config_module(config_module='lce.conf', version_base='1.3'):\n"
              "    check_config(compose('config', overrides=['experiment=quickstart']))\n"
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
