"""Interop with the real `sae_lens`: our saved SAEs load there unchanged, and theirs load here.

sae-lens pulls in transformer-lens, datasets, wandb, ...; it lives in a side venv built once
under $STAGEDIFF_CACHE/saelens-venv (--system-site-packages, so it reuses this torch; the
pins in tests/saelens-constraints.txt keep pip from fetching another torch). The check runs
there as a subprocess and trades tensors with this process through safetensors files.
Skipped only when the package registry cannot be reached to build that venv.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from sae_factory import perturbed_sae
from safetensors.torch import load_file, save_file

from stagediff.sae import SAE

CONSTRAINTS = Path(__file__).with_name("saelens-constraints.txt")
ARCHS = ["batchtopk", "topk", "relu", "jumprelu"]
D_IN, D_SAE, K = 24, 96, 6


def _registry_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        urllib.request.urlopen(f"{index}/sae-lens/", timeout=15).close()
        return True
    except OSError:
        return False


def saelens_python() -> Path:
    """The side venv's python with sae-lens installed; built (once per constraints file) if missing."""
    cache = Path(os.environ.get("STAGEDIFF_CACHE", Path.home() / ".cache" / "stagediff"))
    venv = cache / "saelens-venv"
    python = venv / "bin" / "python"
    stamp = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()
    marker = venv / ".stagediff-built"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "saelens-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest may be building it right now
        if marker.exists() and marker.read_text() == stamp and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # half-built, or built for other pins
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "sae-lens"],
                             capture_output=True, text=True)
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            if not _registry_reachable():
                pytest.skip("the package registry is unreachable: cannot install sae-lens into the side venv")
            pytest.fail(f"pip install sae-lens failed:\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}")
        marker.write_text(stamp)
    return python


# Runs inside the sae-lens venv. Loads each of our folders with sae_lens, encodes/decodes the
# shared inputs; saves one SAE of each sae_lens inference architecture for the reverse check.
WORKER = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from sae_lens import SAE

job = json.loads(Path(sys.argv[1]).read_text())
x = load_file(job["x"])["x"]
out, info = {}, {}
for arch, folder in job["ours"].items():
    sae = SAE.load_from_disk(folder)
    f = sae.encode(x)
    out[f"{arch}.encode"], out[f"{arch}.decode"], out[f"{arch}.forward"] = f, sae.decode(f), sae(x)
    info[arch] = {"class": type(sae).__name__, "metadata": sae.cfg.metadata.to_dict(),
                  "k": getattr(sae.cfg, "k", None)}
g = torch.Generator().manual_seed(5)
for name, folder in job["theirs"].items():
    cfg = {"architecture": name, "d_in": x.shape[1], "d_sae": job["d_sae"], "dtype": "float32", "device": "cpu",
           "metadata": {"hook_name": "blocks.2.hook_resid_post"}}
    if name == "topk":
        cfg["k"] = job["k"]
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.5))
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.5)
    sae.save_model(folder)
    f = sae.encode(x)
    out[f"theirs.{name}.encode"], out[f"theirs.{name}.decode"] = f, sae.decode(f)
save_file({k: v.detach().contiguous() for k, v in out.items()}, job["out"])
Path(job["info"]).write_text(json.dumps(info))
"""


def _our_sae(arch: str) -> SAE:
    return perturbed_sae(arch, D_IN, D_SAE, K, scale=1.7, noise=0.2)


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    """Save ours, run the sae_lens worker once, return (ours, x, their outputs, info, folders)."""
    python = saelens_python()
    root = tmp_path_factory.mktemp("saelens")
    ours = {arch: _our_sae(arch) for arch in ARCHS}
    meta = {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_post", "context_size": 64,
            "prepend_bos": True, "dataset_path": "kjv", "stage": "S", "parent_stage": None,
            "parent_sha256": None, "tokens_seen": 4096}
    for arch, sae in ours.items():
        sae.save(root / "ours" / arch, meta)
    x = 3 * torch.randn(50, D_IN, generator=torch.Generator().manual_seed(4))
    save_file({"x": x}, str(root / "x.safetensors"))
    theirs = {name: str(root / "theirs" / name) for name in ("standard", "topk", "jumprelu")}
    job = {"x": str(root / "x.safetensors"), "out": str(root / "out.safetensors"), "info": str(root / "info.json"),
           "ours": {arch: str(root / "ours" / arch) for arch in ARCHS}, "theirs": theirs, "d_sae": D_SAE, "k": K}
    (root / "job.json").write_text(json.dumps(job))
    (root / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", TQDM_DISABLE="1")
    res = subprocess.run([str(python), str(root / "worker.py"), str(root / "job.json")], capture_output=True,
                         text=True, env=env, cwd=root)
    assert res.returncode == 0, f"sae_lens worker failed:\n{res.stderr[-4000:]}"
    return ours, x, load_file(job["out"]), json.loads((root / "info.json").read_text()), theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_our_files_load_in_saelens_with_the_same_outputs(exchange, arch):
    ours, x, out, info, _ = exchange
    sae = ours[arch]
    expected_class = {"batchtopk": "JumpReLUSAE", "topk": "TopKSAE", "relu": "StandardSAE", "jumprelu": "JumpReLUSAE"}
    assert info[arch]["class"] == expected_class[arch]
    with torch.no_grad():
        f = sae.encode(x)
        assert (f > 0).any() and (f == 0).any()  # a real sparse code, not a degenerate one
        assert torch.allclose(out[f"{arch}.encode"], f, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[f"{arch}.encode"] > 0, f > 0)  # the same features fire
        assert torch.allclose(out[f"{arch}.decode"], sae.decode(f), atol=1e-5, rtol=1e-5)
        assert torch.allclose(out[f"{arch}.forward"], sae(x), atol=1e-4, rtol=1e-5)
    if arch == "topk":
        assert info[arch]["k"] == K
    meta = info[arch]["metadata"]  # our metadata survives sae_lens's loader
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["stage"] == "S" and meta["context_size"] == 64


@pytest.mark.parametrize("name", ["standard", "topk", "jumprelu"])
def test_saelens_files_load_here_with_the_same_outputs(exchange, name):
    _, x, out, _, theirs = exchange
    sae = SAE.load(theirs[name], expected_d_in=D_IN)
    assert sae.architecture == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[name]
    with torch.no_grad():
        f = sae.encode(x)
        assert (f > 0).any() and (f == 0).any()
        assert torch.allclose(f, out[f"theirs.{name}.encode"], atol=1e-5, rtol=1e-5)
        assert torch.allclose(sae.decode(f), out[f"theirs.{name}.decode"], atol=1e-4, rtol=1e-5)
