"""Hub benchmark corpora: registered names, hub names, fields, YAML defaults, and the load call (no download)."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lce.conf

# Registers the hub sources (until lce.data imports lce.data.hub itself).
import lce.data.hub
from lce.data import DATASETS, HFData, build_data

CONF = Path(lce.conf.__file__).parent / "data"
HUB = ("govreport", "pg19", "proof_pile")


@pytest.mark.parametrize("name", HUB)
def test_registered_and_yaml_equals_defaults(name):
    cls = DATASETS.get(name)
    assert issubclass(cls, HFData)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(raw) == set(fields) and raw["name"] == name
    for key, value in raw.items():
        field = fields[key]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert value == default, key


@pytest.mark.parametrize("name,path,text_field,revision", [
    ("pg19", "emozilla/pg19", "text", None),
    ("proof_pile", "hoskinson-center/proof-pile", "text", None),
    ("govreport", "tau/scrolls", "input", "refs/convert/parquet"),
])
def test_hub_fields(name, path, text_field, revision):
    source = build_data(name)
    assert (source.path, source.text_field, source.revision) == (path, text_field, revision)
    assert (source.train_split, source.validation_split, source.test_split) == ("train", "validation", "test")
    assert source.min_chars == 8192 and not source.trust_remote_code
    assert build_data({"name": name, "min_chars": 1}).min_chars == 1


def test_govreport_reads_the_parquet_export():
    files = build_data("govreport").data_files
    assert files == {split: f"gov_report/{split}/*.parquet" for split in ("train", "validation", "test")}


class FakeSplit(list):
    column_names = ("text", "input")


@pytest.mark.parametrize("name", HUB)
def test_load_call_and_length_filter(name, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, config_name=None, **kwargs):
        calls.append((path, config_name, kwargs))
        return FakeSplit([{"text": "short", "input": "short"}, {"text": "x" * 9000, "input": "y" * 9000}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = build_data(name)
    docs = list(source.documents("test"))
    assert [doc_id for doc_id, _ in docs] == ["test/1"]  # the short document is filtered out
    path, config_name, kwargs = calls[0]
    assert (path, config_name, kwargs["split"], kwargs["revision"]) == (source.path, None, "test", source.revision)
    assert kwargs.get("data_files") == source.data_files
