"""Released SAEs as stage S, offline: hf://owner/repo/folder through a local Hugging Face cache,
{release, sae_id} through a registry entry laid out like sae_lens's, checks before any harvest."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from stagediff import hub
from stagediff.config import SAEConfig, load_config
from stagediff.errors import StagediffError
from stagediff.sae import SAE

HOOK = "blocks.1.hook_resid_post"
SAELENS_MODULES = ("sae_lens", "sae_lens.loading", "sae_lens.loading.pretrained_saes_directory")
REGISTRY = '''
from dataclasses import dataclass

@dataclass
class PretrainedSAELookup:
    release: str
    repo_id: str
    model: str
    conversion_func: str | None
    saes_map: dict

def get_pretrained_saes_directory():
    return {"tiny-res-sd": PretrainedSAELookup("tiny-res-sd", "sd-test/tiny-saes", "tiny-llama", None,
                                               {"blocks.1.hook_resid_post": "layer_1/width_64"})}
'''


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub repository sd-test/tiny-saes in a local HF cache (as a download leaves it), downloads forbidden."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    repo = cache / "models--sd-test--tiny-saes"
    snapshot = repo / "snapshots" / ("c0ffee" * 6 + "c0ff")
    torch.manual_seed(0)
    sae = SAE(16, SAEConfig(architecture="topk", d_sae=64, k=4))
    sae.save(snapshot / "layer_1" / "width_64", {"hook_name": HOOK, "model_name": "tiny-llama"})
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._resolve.cache_clear()
    yield sae
    hub._resolve.cache_clear()


def _stage(overrides):
    from stagediff.stages import resolve_stages

    cfg = load_config(None, overrides)
    return cfg, next(s for s in resolve_stages(cfg) if s.name == "S")


def test_hf_path_loads_from_the_cache_and_checks_the_hook(fake_hub):
    from stagediff.hub import load_pretrained

    cfg, stage = _stage([f"hook={HOOK}", "stages.S.from_pretrained=hf://sd-test/tiny-saes/layer_1/width_64"])
    sae, source = load_pretrained(stage, 16, cfg.hook)
    assert source == {"repo_id": "sd-test/tiny-saes", "path": "layer_1/width_64"}
    assert torch.equal(sae.W_dec, fake_hub.W_dec) and sae.architecture == "topk"
    with pytest.raises(StagediffError, match=r"trained at hook 'blocks.1.hook_resid_post', but the run reads 'blocks.2.hook_resid_post': set hook"):
        load_pretrained(stage, 16, "blocks.2.hook_resid_post")
    with pytest.raises(StagediffError, match="d_in=16 but the hooked activations have width 32"):
        load_pretrained(stage, 32, HOOK)
    _, missing = _stage(["stages.S.from_pretrained=hf://sd-test/other/x"])
    with pytest.raises(StagediffError, match="HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache"):
        load_pretrained(missing, 16, HOOK)
    _, empty = _stage(["stages.S.from_pretrained=hf://sd-test/tiny-saes/layer_1"])
    with pytest.raises(StagediffError, match="has no cfg.json: point at the folder"):
        load_pretrained(empty, 16, HOOK)


def test_release_and_sae_id_resolve_through_the_registry(fake_hub, tmp_path, monkeypatch):
    from stagediff.hub import load_pretrained
    from stagediff.pipeline import Run, import_pretrained

    (tmp_path / "pkg" / "sae_lens" / "loading").mkdir(parents=True)
    (tmp_path / "pkg" / "sae_lens" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sae_lens" / "loading" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sae_lens" / "loading" / "pretrained_saes_directory.py").write_text(REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    for name in SAELENS_MODULES:  # imported fresh from the fake package, and gone again after the test
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text(f"hook: {HOOK}\nstages:\n  S: {{from_pretrained: {{release: tiny-res-sd, sae_id: {HOOK}}}}}\n")
    cfg = load_config(yaml_cfg)
    assert cfg.stages["S"].from_pretrained == {"release": "tiny-res-sd", "sae_id": HOOK}
    stage = dataclasses.replace(_stage([])[1], from_pretrained=cfg.stages["S"].from_pretrained)
    run = Run(cfg, tmp_path / "run")
    import_pretrained(run, stage, tmp_path / "run" / "saes" / "S")
    meta = json.loads((tmp_path / "run" / "saes" / "S" / "cfg.json").read_text())["metadata"]
    assert meta["imported_from"] == {"release": "tiny-res-sd", "sae_id": HOOK, "repo_id": "sd-test/tiny-saes",
                                     "path": "layer_1/width_64", "model": "tiny-llama"}
    assert meta["hook_name"] == HOOK
    stage = dataclasses.replace(stage, from_pretrained={"release": "tiny-res-sd", "sae_id": "blocks.1.hook_resid_pre"})
    with pytest.raises(StagediffError, match="has no sae_id 'blocks.1.hook_resid_pre'; did you mean blocks.1.hook_resid_post"):
        load_pretrained(stage, 16, HOOK)
    stage = dataclasses.replace(stage, from_pretrained={"release": "tiny-res", "sae_id": HOOK})
    with pytest.raises(StagediffError, match="not in sae_lens's pretrained registry; did you mean tiny-res-sd"):
        load_pretrained(stage, 16, HOOK)
    stage = dataclasses.replace(stage, from_pretrained={"release": "tiny-res-sd"})
    with pytest.raises(StagediffError, match="exactly the keys release and sae_id"):
        load_pretrained(stage, 16, HOOK)


def test_bad_pretrained_specs_fail_before_any_harvest(tmp_path, monkeypatch):
    from stagediff.pipeline import Run, step_harvest

    for name in SAELENS_MODULES:  # not installed
        monkeypatch.setitem(sys.modules, name, None)
    hub._resolve.cache_clear()
    cases = {
        "stages.S.from_pretrained=gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82": "is not a folder: give a SAELens folder",
        "stages.S.from_pretrained={release: gemma-scope-2b-pt-res, sae_id: layer_12/width_16k/average_l0_82}":
            r"sae_lens is not installed: pip install 'stagediff\[saelens\]'",
    }
    for override, message in cases.items():
        cfg = load_config(None, [override])  # no models, no data: the check comes before they are needed
        with pytest.raises(StagediffError, match=message):
            step_harvest(Run(cfg, tmp_path / "run"))


def test_push_lays_out_saelens_folders_and_a_card_that_load_back(tmp_path, monkeypatch, capsys):
    """`stagediff push --dry-run`: the repository as it would be uploaded; placed in a local HF cache,
    each stage loads back through hf://owner/repo/stage with its weights and hook."""
    import huggingface_hub.constants

    from stagediff.cli import main
    from stagediff.hub import load_pretrained

    run = tmp_path / "run"
    saved = {}
    for i, stage in enumerate(["S", "D", "M", "F_via_D", "F_via_M", "D_ctl0"]):
        torch.manual_seed(i)
        saved[stage] = SAE(16, SAEConfig(architecture="topk", d_sae=32, k=4))
        saved[stage].save(run / "saes" / stage, {"hook_name": HOOK, "stage": stage, "parent_stage": None if stage == "S" else "S",
                                                  "model_name": str(tmp_path / "hf" / "models--me--base" / "snapshots" / "abc"),
                                                  "model_class_name": "AutoModelForCausalLM"})
    cache = tmp_path / "hf"
    repo = cache / "models--me--diffs"
    out = repo / "snapshots" / ("ab" * 20)
    assert main(["push", str(run), "me/diffs", "--dry-run", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["D", "F_via_D", "F_via_M", "M", "README.md", "S"]  # no noise control
    card = (out / "README.md").read_text()
    assert "library_name: saelens" in card and 'SAE.from_pretrained("me/diffs", "D")' in card and "| `F_via_M` |" in card
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(out.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._resolve.cache_clear()
    for stage in ("S", "F_via_M"):
        _, spec = _stage([f"stages.S.from_pretrained=hf://me/diffs/{stage}"])
        sae, source = load_pretrained(spec, 16, HOOK)
        assert torch.equal(sae.W_enc, saved[stage].W_enc) and source["path"] == stage
    with pytest.raises(StagediffError, match="HF_HUB_OFFLINE=1 is set: unset it to upload"):
        hub.push_run(run, "me/diffs")
    assert main(["push", str(run), "not-a-repo-id"]) == 2 and "owner/name" in capsys.readouterr().err


def test_hub_ids_in_metadata():
    assert hub.hub_id_of("/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/abc") == "HuggingFaceTB/SmolLM2-135M"
    assert hub.hub_id_of("/data/hub/datasets--HuggingFaceFW--fineweb/snapshots/x/sample") == "HuggingFaceFW/fineweb"
    assert hub.hub_id_of("google/gemma-2-2b") == "google/gemma-2-2b" and hub.hub_id_of("/my/model") == "/my/model"
    from stagediff.pipeline import sae_metadata

    cfg, stage = _stage(["base_model=/c/hub/models--google--gemma-2-2b/snapshots/1", "base_data.path=HuggingFaceFW/fineweb"])
    meta = sae_metadata(cfg, stage, "fp")
    assert meta["model_name"] == "google/gemma-2-2b" and meta["dataset_path"] == "HuggingFaceFW/fineweb"
    assert meta["model_class_name"] == "AutoModelForCausalLM"
