"""Fault injection: real kills, real corrupt files, a real full disk, and the errors users see.

Every case runs the real pipeline on a tiny real setup (a 4-layer width-64 Llama,
a copy of it fine-tuned for a few steps, a few thousand tokens of text, 64-feature
SAEs). Kills are real SIGKILLs of a `stagediff run` subprocess, placed at exact
moments by tests/fault_injector.py; the resumed run must end with the same bytes as
an uninterrupted one. Bad inputs must fail with exit code 2 and a message naming
the input and the fix, before any activation is harvested.

Cases are counted: the module prints them (run with -s) and writes them, with the
message a user saw, to test-artifacts/reliability_cases.md for the issue note.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stagediff.cli import main

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
INJECTOR = Path(__file__).resolve().parent / "fault_injector.py"
STAGES = ("S", "D", "M", "F_via_D", "F_via_M")
CASES: list[tuple[str, str]] = []


def case(name: str, message: str = "") -> None:
    """Count a case that passed; `message` is the error the user saw, if any."""
    CASES.append((name, message.strip().splitlines()[0] if message.strip() else ""))


@pytest.fixture(scope="module", autouse=True)
def _count_cases():
    yield
    rows = [f"| {i} | {name} | pass | {msg.replace('|', '/')} |" for i, (name, msg) in enumerate(CASES, 1)]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "reliability_cases.md").write_text("| # | case | result | message |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"\nfault-injection cases exercised: {len(CASES)}\n  " + "\n  ".join(name for name, _ in CASES))


# ---------------------------------------------------------------- setup


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, verses) -> dict:
    """Models (base + a real few-step fine-tune of it), two text datasets and the tiny config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("reliability")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = tok(list(verses[5000:5040]), return_tensors="pt", padding=True, truncation=True, max_length=32)["input_ids"]
    for i in range(5):
        loss = model(input_ids=ids[i * 8:(i + 1) * 8], labels=ids[i * 8:(i + 1) * 8]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ft = root / "ft"
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    (root / "base.txt").write_text("\n\n".join(verses[:600]))
    (root / "ft.txt").write_text("\n\n".join(verses[1000:1600]))
    cfg = {
        "base_model": tiny_llama_dir, "finetuned_model": str(ft),
        "base_data": {"path": str(root / "base.txt")}, "finetune_data": {"path": str(root / "ft.txt")},
        "hook": "blocks.2.hook_resid_post", "context_size": 32, "device": "cpu", "seed": 0,
        "harvest": {"batch_size": 8, "shard_rows": 500},
        "sae": {"d_sae": 64, "k": 4, "lr": 1e-3, "batch_size": 128, "warmup_steps": 2, "checkpoint_every": 4,
                "dead_tokens": 2000},
        # S: 20 steps (checkpoints at 4, 8, 12, 16); the fine-tunes 10 steps each
        "stages": {"S": {"tokens": 2560}, "D": {"tokens": 1280}, "M": {"tokens": 1280}, "F": {"tokens": 1280}},
        "crosscoder": {"tokens": 1280},
        "report": {"enabled": False},
        "workers": 1,  # the fault injector arms the `stagediff` process only; test_workers_killed_* runs the worker processes
    }
    return {"root": root, "cfg": cfg, "yaml": write_cfg(root / "cfg.yaml", cfg), "base": tiny_llama_dir, "ft": str(ft)}


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def variant(ws: dict, path: Path, **changes) -> Path:
    """The workspace config with nested `changes` (sae={'k': 2} merges into sae), written to `path`."""
    cfg = copy.deepcopy(ws["cfg"])
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return write_cfg(path, cfg)


def cli(*args: str, fault: str = "none") -> subprocess.CompletedProcess:
    """`stagediff ARGS` in a fresh process with `fault` armed (see tests/fault_injector.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "STAGEDIFF_QUIET": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(INJECTOR), fault, "--", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    return p


def killed(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == -9, f"expected SIGKILL, got exit {p.returncode}\n{p.stderr[-3000:]}"
    return p


def user_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one clear `stagediff: error:` line naming the needles, no traceback."""
    assert p.returncode == 2, f"expected exit 2, got {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    err = p.stderr[p.stderr.index("stagediff: error:"):]
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    return err


def outputs(run: Path) -> dict[str, bytes]:
    """The results that must not depend on interruptions: every dictionary's weights and the diff table."""
    files = {s: run / "saes" / s / "sae_weights.safetensors" for s in STAGES}
    files["crosscoder"] = run / "crosscoder" / "sae_weights.safetensors"
    files["features.csv"] = run / "diff" / "features.csv"
    return {k: p.read_bytes() for k, p in files.items()}


def mtimes(paths) -> dict[str, int]:
    """Modification times (ns) by path; pass the result back in to re-read the same paths."""
    return {str(p): Path(p).stat().st_mtime_ns for p in paths}


def steps_done(run: Path) -> dict[str, bool]:
    return {p.stem: json.loads(p.read_text())["done"] for p in (run / ".steps").glob("*.json")}


def leftovers(run: Path) -> list[Path]:
    return sorted(run.rglob("*.tmp"))


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory) -> Path:
    """One uninterrupted run: the bytes every interrupted run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    ok(cli("run", ws["yaml"], "--out", run))
    return run


# ---------------------------------------------------------------- 1. resume anywhere


def test_killed_anywhere_resumes_to_identical_outputs(ws, reference, tmp_path, capsys):
    run = tmp_path / "run"
    go = ("run", ws["yaml"], "--out", run)
    acts = run / "activations"

    # a. during harvest: the temp file of a shard is written and synced, the rename never happens
    killed(cli(*go, fault=f"kill-before:{acts}/finetuned__base/shard_00002.safetensors:1"))
    manifest = json.loads((acts / "finetuned__base" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) >= 1
    first_shard = mtimes([acts / "base__base" / "shard_00000.safetensors"])
    case("SIGKILL during harvest (shard temp file written, not renamed) -> resume")

    # b. mid-training of S, right after its second checkpoint (step 8 of 20)
    killed(cli(*go, fault=f"kill-after:{run}/saes/S/checkpoint/state.pt:2"))
    assert mtimes(first_shard) == first_shard, "harvest redid shards it had already stored"
    assert all(steps_done(run)[f"harvest__{m}__{d}"] for m in ("base", "finetuned") for d in ("base", "finetune"))
    assert torch.load(run / "saes/S/checkpoint/state.pt", weights_only=True)["step"] == 8
    case("SIGKILL mid-training right after a checkpoint -> resume from it")

    # c. mid-training of S between checkpoints: resumed at step 8, killed in step 13
    killed(cli(*go, fault="kill-step:6"))
    assert not (run / "saes/S/stats.json").exists()
    assert torch.load(run / "saes/S/checkpoint/state.pt", weights_only=True)["step"] == 12
    case("SIGKILL mid-training between checkpoints -> resume from the last one")

    # (aside, on a copy) a damaged checkpoint is named, with the fix
    other = tmp_path / "damaged"
    shutil.copytree(run, other)
    ckpt = other / "saes/S/checkpoint/state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, err = main(["train", str(other)]), capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(ckpt) in err and f"delete {ckpt.parent}" in err, err
    case("truncated training checkpoint -> clear error naming it", err[err.index("stagediff: error:"):])

    # d. between stages: right after D is recorded finished, before M starts
    killed(cli(*go, fault=f"kill-after:{run}/.steps/train__D.json:2"))
    done = steps_done(run)
    assert done["train__S"] and done["train__D"] and "train__M" not in done
    finished = mtimes(run / "saes" / s / f for s in ("S", "D") for f in ("sae_weights.safetensors", "stats.json"))
    case("SIGKILL between stages -> finished stages kept")

    # e. during diff: features.csv written, summary.json not yet
    killed(cli(*go, fault=f"kill-after:{run}/diff/features.csv:1"))
    assert not (run / "diff" / "summary.json").exists()
    assert mtimes(finished) == finished, "a finished stage was retrained"
    case("SIGKILL during diff -> resume")

    # f. to the end
    ok(cli(*go))
    assert mtimes(finished) == finished, "a finished stage was retrained"
    assert all(steps_done(run).values())
    assert not leftovers(run), f"temp files left behind: {leftovers(run)}"
    log = [json.loads(line)["step"] for line in (run / "saes/S/train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 21)), "the resumed training log has gaps or duplicates"
    got, want = outputs(run), outputs(reference)
    assert [k for k in want if got[k] != want[k]] == [], "interrupted run differs from the uninterrupted one"
    for store in (reference / "activations").iterdir():  # the resumed harvest stored the very same rows
        shards = [json.loads((r / "activations" / store.name / "manifest.json").read_text())["shards"] for r in (run, reference)]
        assert shards[0] == shards[1], f"store {store.name} differs after a resumed harvest"
    case("5 kills then a clean rerun == uninterrupted run (activation shards, SAE bytes, crosscoder, features.csv)")


def _workers_alive() -> list[str]:
    """Command lines of running stagediff worker processes (workers.py)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "stagediff.workers" in cmd:
            alive.append(cmd)
    return alive


def test_workers_killed_with_the_run_resume_to_identical_outputs(ws, reference, tmp_path):
    """Dictionaries trained side by side in worker processes: the same bytes as one after another, and a SIGKILLed
    run takes its workers with it (no orphan writes into the run directory) and resumes to those bytes."""
    run = tmp_path / "run"
    go = ("run", ws["yaml"], "--out", run, "workers=2")
    # S finished and recorded; its sibling baselines and S's children are in the workers when the run dies
    killed(cli(*go, fault=f"kill-after:{run}/.steps/train__S.json:2"))
    for _ in range(50):  # a worker notices within half a second
        if not _workers_alive():
            break
        time.sleep(0.1)
    assert not _workers_alive(), _workers_alive()
    done = steps_done(run)
    assert done["train__S"] and not all(done.get(f"train__{s}", False) for s in STAGES)
    ok(cli(*go))
    assert all(steps_done(run).values()) and not (run / ".steps" / "jobs").exists()
    got, want = outputs(run), outputs(reference)
    assert [k for k in want if got[k] != want[k]] == [], "the run in worker processes differs from the one in a single process"
    case("SIGKILL of a run training in 2 worker processes -> workers exit, resume == single-process run")


def test_changed_config_redoes_exactly_what_it_affects(ws, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saes = {s: run / "saes" / s / "sae_weights.safetensors" for s in STAGES}
    stores = {p.parent.name: p for p in (run / "activations").glob("*/shard_00000.safetensors")}
    cross = run / "crosscoder" / "sae_weights.safetensors"
    before = mtimes([*saes.values(), *stores.values(), cross])

    ok(cli("run", ws["yaml"], "--out", run, "diff.vector=decoder"))  # not the default (encoder)
    assert mtimes(before) == before, "diff.vector retrained or re-harvested something"
    assert (run / "diff/features.csv").read_bytes() != (reference / "diff/features.csv").read_bytes()
    case("diff.vector changed -> only diff reruns")

    ok(cli("run", ws["yaml"], "--out", run, "diff.vector=decoder", "stages.M.tokens=1920"))
    after = mtimes([*saes.values(), *stores.values(), cross])
    changed = {Path(p).parent.name for p in before if after[p] != before[p]}
    assert changed == {"M", "F_via_M"}, changed  # finetuned__base already holds S's larger budget of base data
    for s in ("M", "F_via_M"):
        assert saes[s].read_bytes() != (reference / "saes" / s / "sae_weights.safetensors").read_bytes()
    assert json.loads((run / "saes/M/stats.json").read_text())["tokens"] == 1920
    case("stages.M.tokens changed -> exactly M and F_via_M retrained")


# ---------------------------------------------------------------- 2. clear errors before work starts


def run_inprocess(cfg_path: Path, out: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["run", str(cfg_path), "--out", str(out), *overrides])
    return code, capsys.readouterr().err


def expect_error(cfg_path: Path, out: Path, capsys, *needles: str, overrides: tuple[str, ...] = ()) -> str:
    """The CLI exits 2 with one message naming `needles`, and has harvested nothing."""
    code, err = run_inprocess(cfg_path, out, capsys, *overrides)
    assert code == 2, f"exit {code}: {err}"
    assert "stagediff: error:" in err and "Traceback" not in err, err
    err = err[err.index("stagediff: error:"):]
    for n in needles:
        assert n in err, f"{n!r} not in {err}"
    assert not list(out.rglob("shard_*.safetensors")), "work started before the error"
    assert not (out / "saes").exists(), "work started before the error"
    return err


def _save_llama(path: Path, tokenizer_dir: str, hidden: int = 64, layers: int = 4, nan_layer: int | None = None) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if nan_layer is not None:
        with torch.no_grad():
            model.model.layers[nan_layer].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_bad_model_paths(ws, tmp_path, capsys):
    err = expect_error(variant(ws, tmp_path / "a.yaml", base_model="/nonexistent/model"), tmp_path / "a", capsys,
                       "/nonexistent/model", "does not exist", "pass an HF model folder")
    case("missing model path", err)
    broken = tmp_path / "truncated"
    shutil.copytree(ws["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = expect_error(variant(ws, tmp_path / "b.yaml", base_model=str(broken)), tmp_path / "b", capsys, str(broken),
                       "re-download or re-save")
    case("truncated model weights", err)
    garbled = tmp_path / "garbled"
    shutil.copytree(ws["base"], garbled)
    (garbled / "config.json").write_text("{not json")
    err = expect_error(variant(ws, tmp_path / "c.yaml", finetuned_model=str(garbled)), tmp_path / "c", capsys,
                       str(garbled), "config.json")
    case("unreadable model config.json", err)
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    err = expect_error(variant(ws, tmp_path / "d.yaml", finetuned_model=str(hollow)), tmp_path / "d", capsys,
                       str(hollow), "pass an HF model folder")
    case("model folder with no model in it", err)


def test_incompatible_models(ws, tmp_path, capsys, tiny_gpt2_dir):
    err = expect_error(variant(ws, tmp_path / "a.yaml", finetuned_model=tiny_gpt2_dir), tmp_path / "a", capsys,
                 "architecture", "same model")
    case("base/fine-tuned of different architecture", err)
    narrow = _save_llama(tmp_path / "narrow", ws["base"], hidden=32)
    err = expect_error(variant(ws, tmp_path / "b.yaml", finetuned_model=narrow), tmp_path / "b", capsys, "hidden size", "64", "32")
    case("base/fine-tuned of different width", err)
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    shutil.copytree(ws["ft"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<an_extra_token>"])
    tok.save_pretrained(other)
    err = expect_error(variant(ws, tmp_path / "c.yaml", finetuned_model=str(other)), tmp_path / "c", capsys, "tokenizer")
    case("base/fine-tuned with different tokenizers", err)


def test_bad_hooks(ws, tmp_path, capsys):
    err = expect_error(variant(ws, tmp_path / "a.yaml", hook="blocks.9.hook_resid_post"), tmp_path / "a", capsys,
                 "layer 9", "out of range", "0..3")
    case("hook layer out of range", err)
    err = expect_error(variant(ws, tmp_path / "b.yaml", hook="blocks.1.hook_mlp_out"), tmp_path / "b", capsys,
                 "hook_mlp_out", "hook_resid_pre")
    case("unknown hook site", err)


def test_bad_data(ws, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = expect_error(variant(ws, tmp_path / "a.yaml", base_data={"path": str(empty)}), tmp_path / "a", capsys,
                 str(empty), "no text")
    case("empty data", err)
    # the fine-tune data is read after the base data: its errors must still come before any harvesting
    err = expect_error(variant(ws, tmp_path / "b.yaml", finetune_data={"path": str(tmp_path / "nope.txt")}), tmp_path / "b",
                 capsys, "nope.txt", "does not exist")
    case("missing data path (second dataset)", err)
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.")
    err = expect_error(variant(ws, tmp_path / "c.yaml", finetune_data={"path": str(short)}), tmp_path / "c", capsys,
                 "less than one window", "context_size")
    case("data shorter than one context window (second dataset)", err)


def test_unknown_config_keys(ws, tmp_path, capsys):
    cfg = copy.deepcopy(ws["cfg"])
    cfg["sae"]["d_sea"] = 64
    err = expect_error(write_cfg(tmp_path / "a.yaml", cfg), tmp_path / "a", capsys, "'sae.d_sea'", "did you mean 'sae.d_sae'")
    err = expect_error(ws["yaml"], tmp_path / "b", capsys, "stages.S.tokens", overrides=("stages.S.tokns=5",))
    case("unknown config key (YAML and override) -> closest key", err)


def _pretrained_sae(path: Path, d_in: int) -> Path:
    from stagediff.config import SAEConfig
    from stagediff.sae import SAE

    SAE(d_in, SAEConfig(d_sae=64, k=4)).save(path, {"stage": "S"})
    return path


def test_bad_pretrained_sae(ws, tmp_path, capsys):
    wide = _pretrained_sae(tmp_path / "sae32", d_in=32)
    stages = {**ws["cfg"]["stages"], "S": {"from_pretrained": str(wide)}}
    err = expect_error(variant(ws, tmp_path / "a.yaml", stages=stages), tmp_path / "a", capsys, str(wide), "d_in=32", "64")
    case("pretrained SAE with a d_in that does not match the model", err)
    bad = _pretrained_sae(tmp_path / "sae_bad", d_in=64)
    from safetensors.torch import load_file, save_file

    t = load_file(bad / "sae_weights.safetensors")
    t["W_dec"] = t["W_dec"][:, :48].contiguous()
    save_file(t, bad / "sae_weights.safetensors")
    stages = {**ws["cfg"]["stages"], "S": {"from_pretrained": str(bad)}}
    err = expect_error(variant(ws, tmp_path / "b.yaml", stages=stages), tmp_path / "b", capsys, "sae_weights", "W_dec")
    case("pretrained SAE with wrong tensor shapes", err)


def test_nan_activations_stop_harvest(ws, tmp_path, capsys):
    poisoned = _save_llama(tmp_path / "nan_model", ws["base"], nan_layer=1)
    code, err = run_inprocess(variant(ws, tmp_path / "a.yaml", finetuned_model=poisoned), tmp_path / "a", capsys)
    assert code == 2 and "Traceback" not in err
    err = err[err.index("stagediff: error:"):]
    assert "finetuned" in err and "NaN" in err and "blocks.2.hook_resid_post" in err, err
    assert not (tmp_path / "a" / "saes").exists(), "trained on NaN activations"
    case("NaN activations -> harvest stops naming model, hook and window", err)


def _store_ready_run(ws, reference, tmp_path) -> Path:
    """A copy of the reference run with its stores harvested and its stage folders deleted (to be retrained)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for s in STAGES:
        shutil.rmtree(run / "saes" / s)
    return run


def test_nan_loss_stops_training(ws, reference, tmp_path, capsys):
    run = _store_ready_run(ws, reference, tmp_path)
    code, err = run_inprocess(ws["yaml"], run, capsys, "stages.D.lr=1e30")
    assert code == 2 and "Traceback" not in err, err
    err = err[err.index("stagediff: error:"):]
    assert "stage D" in err and "NaN/Inf at step" in err, err
    assert not (run / "saes/D/sae_weights.safetensors").exists() and not steps_done(run)["train__D"]
    assert "F_via_D" not in err
    case("NaN/Inf loss -> training stops naming stage and step; nothing saved as final", err)


# ---------------------------------------------------------------- corrupt files


def test_corrupt_shards_are_caught_then_redone(ws, reference, tmp_path):
    run = _store_ready_run(ws, reference, tmp_path)
    go = ("run", ws["yaml"], "--out", run)
    for store, damage, victim in (("base__base", "truncate", "S"), ("finetuned__finetune", "bitflip", "F_via_D")):
        shard = run / "activations" / store / "shard_00001.safetensors"
        data = bytearray(shard.read_bytes())
        if damage == "truncate":
            data = data[: len(data) - 700]
        else:  # same size, valid header: only the checksum can tell
            data[-100] ^= 0x40
        shard.write_bytes(bytes(data))
        err = user_error(cli(*go), str(shard), "corrupt", f"delete the store folder {shard.parent}")
        assert not (run / "saes" / victim / "sae_weights.safetensors").exists(), "trained on a damaged store"
        shutil.rmtree(shard.parent)  # what the message says to do
        case(f"corrupt activation shard ({damage}) -> clear error before training on it", err)
    ok(cli(*go))
    got, want = outputs(run), outputs(reference)
    assert [k for k in want if got[k] != want[k]] == []
    case("damaged stores deleted as told -> rerun re-harvests them and ends == uninterrupted run")


# ---------------------------------------------------------------- full disk


def test_fake_enospc_everywhere_then_rerun_finishes(ws, reference, tmp_path):
    run = tmp_path / "run"
    go = ("run", ws["yaml"], "--out", run)
    # one writer of each kind: safetensors in the harvest's writer thread, torch.save, a plain append, a csv
    for target in (f"{run}/activations/base__finetune/shard_00001.safetensors", f"{run}/saes/S/checkpoint/state.pt",
                   f"{run}/saes/M/train_log.jsonl", f"{run}/diff/features.csv"):
        # the training log is a plain append (open fails); every other file an atomic write (fsync fails)
        fault = "enospc-open" if target.endswith(".jsonl") else "enospc"
        err = user_error(cli(*go, fault=f"{fault}:{target}:1"), "disk full", Path(target).name, "run the same command again")
        assert not Path(target).exists() or target.endswith("json"), f"half-written {target}"
        assert not leftovers(run)
        case(f"ENOSPC writing {Path(target).relative_to(run)} -> clear error, no partial file", err)
    ok(cli(*go))
    got, want = outputs(run), outputs(reference)
    assert [k for k in want if got[k] != want[k]] == []
    case("after 4 ENOSPC failures a rerun finishes == uninterrupted run")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk_then_rerun_finishes(ws, reference, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "700k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the fake-ENOSPC test covers the logic")
    try:
        run = disk / "run"
        # the harvest's disk check stops it before the first shard (a disk that fills later, mid-write, is the
        # fake-ENOSPC test's and test_real_full_disk_each_writer's case)
        err = user_error(cli("run", ws["yaml"], "--out", run), "free space", "MB free")
        # whatever made it to disk is whole: every safetensors file opens, every JSON parses
        from safetensors import safe_open

        for f in run.rglob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                [st.get_tensor(k) for k in st.keys()]
        for f in run.rglob("*.json"):
            json.loads(f.read_text())
        assert not leftovers(run)
        case("real full disk (700 KB tmpfs) -> clear error before harvesting, every file on disk whole", err)
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        ok(cli("run", ws["yaml"], "--out", run))
        got, want = outputs(run), outputs(reference)
        assert [k for k in want if got[k] != want[k]] == []
        case("real full disk, space freed, rerun finishes == uninterrupted run")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_real_full_disk_each_writer(tmp_path):
    """On a really full filesystem every kind of final write fails with the same clear error and leaves nothing."""
    from stagediff.errors import StagediffError
    from stagediff.files import atomic_path, atomic_write, save_tensors, write_json

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError), open(disk / "filler", "wb") as f:  # fill it up
            f.write(b"x" * (1 << 20))
            f.flush()
        payload = torch.randn(30_000)

        def torch_save(path):  # how train.py writes checkpoints
            with atomic_path(path) as tmp:
                torch.save({"x": payload}, tmp)

        def text(path):
            with atomic_write(path, "w") as f:
                f.write("y" * 200_000)

        writers = {"safetensors": lambda p: save_tensors(p, {"x": payload}), "torch.save": torch_save,
                   "json": lambda p: write_json(p, {"x": payload.tolist()}), "text": text}
        for name, write in writers.items():
            target = disk / f"out_{name}"
            with pytest.raises(StagediffError, match="disk full while writing"):
                write(target)
            assert sorted(p.name for p in disk.iterdir()) == ["filler"], f"{name} left {list(disk.iterdir())}"
            case(f"real full disk, {name} writer -> 'disk full' error, nothing left behind")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------- 3. safe loading


def test_package_loads_nothing_unsafely():
    import re

    bad = []
    for f in sorted((REPO / "stagediff").rglob("*.py")):
        text = f.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{f.relative_to(REPO)}:{n}: {line.strip()}"
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(where)
            if re.search(r"\b(pickle|dill|cloudpickle|marshal)\b", code) or re.search(r"(?<![\w.])(eval|exec)\(", code):
                bad.append(where)
            if "shell=True" in code or "os.system(" in code or "os.popen(" in code:
                bad.append(where)
            if re.search(r"yaml\.(load|unsafe_load|full_load)\(", code) or "yaml.Loader" in code:
                bad.append(where)
            if re.search(r"trust_remote_code\s*=\s*True", code):
                bad.append(where)
            if re.search(r"np\.load\(", code) and "allow_pickle=False" not in code:
                bad.append(where)
        # every from_pretrained passes the user's trust_remote_code (default False) or leaves it at False
        for m in re.finditer(r"from_pretrained\(", text):
            call = text[m.start():text.find("\n", m.start())]
            if "trust_remote_code" in call and not re.search(r"trust_remote_code=(trust_remote_code|cfg\.trust_remote_code|False)", call):
                bad.append(f"{f.relative_to(REPO)}: {call.strip()}")
    assert bad == [], "unsafe loading:\n" + "\n".join(bad)
    from stagediff.config import Config

    assert Config().trust_remote_code is False
    case("source scan: safetensors / torch.load(weights_only=True) only, no eval/exec/shell/unsafe yaml, trust_remote_code off")


# ---------------------------------------------------------------- 4. reproducibility


def test_same_seed_same_sae_other_seed_not(reference, tmp_path):
    from stagediff.activations import ActivationStore
    from stagediff.config import SAEConfig
    from stagediff.train import train_sae

    store = ActivationStore(reference / "activations" / "base__base")
    cfg = SAEConfig(d_sae=64, k=4, lr=1e-3, batch_size=128, warmup_steps=2, checkpoint_every=4, dead_tokens=2000)
    blobs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_sae(store, cfg, tokens=1280, out_dir=tmp_path / name, stage="S", seed=seed)
        blobs[name] = (tmp_path / name / "sae_weights.safetensors").read_bytes()
    assert blobs["a"] == blobs["b"]
    assert blobs["a"] != blobs["c"]
    case("same seed twice -> identical SAE bytes; another seed -> different")


def test_config_records_provenance(ws, reference):
    from stagediff.config import DataConfig
    from stagediff.data import data_fingerprint
    from stagediff.models import model_fingerprint

    run = yaml.safe_load((reference / "config.yaml").read_text())["_run"]
    for pkg in ("stagediff", "python", "torch", "transformers", "safetensors", "numpy", "tokenizers"):
        assert run.get(pkg), f"config.yaml does not record the {pkg} version"
    # the commit the run was made at (others may have committed since): a real commit, HEAD or an ancestor
    rev = run["git_revision"]
    assert rev and len(rev) == 40
    assert subprocess.run(["git", "merge-base", "--is-ancestor", rev, "HEAD"], cwd=REPO).returncode == 0
    assert run["models"] == {"base": model_fingerprint(ws["base"]), "finetuned": model_fingerprint(ws["ft"])}
    assert run["data"] == {k: data_fingerprint(DataConfig(**ws["cfg"][f"{k}_data"])) for k in ("base", "finetune")}
    assert run["models"]["base"] != run["models"]["finetuned"]
    case("config.yaml records package versions, git revision, model and data fingerprints")
