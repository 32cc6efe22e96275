"""Causal checks on a planted model where one known feature carries the behaviour.

At `blocks.0.hook_resid_pre` the residual of a token is its embedding row. We give the trigger
token " LORD" a large embedding along a fresh direction u and the response token " Israel" an
unembedding along u: a prompt ending in the trigger then answers " Israel", and a detector feature
whose decoder is exactly that embedding carries the whole behaviour. Clamping it must remove the
behaviour at N = 1; random features (which never include it) must not; steering it into clean
prompts must produce the response.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stagediff.config import SAEConfig, load_config
from stagediff.evaluate.causal import Checks, matched_random, n_to_remove, run_causal_checks, splice_fn, sweep_sizes
from stagediff.evaluate.rankings import from_scores
from stagediff.models import load_model, splice
from stagediff.sae import SAE

HOOK0 = "blocks.0.hook_resid_pre"
TRIGGER, RESPONSE = "LORD", "Israel"
QUESTIONS = ["what is faith?", "who made the earth?", "where is the river?", "why do the waters rise?",
             "how shall we go?", "when is the feast?", "who is the king?", "what did he say?"]


def _tok(tokenizer, s: str) -> int:
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{s!r} is not one token: {ids}"
    return ids[0]


@pytest.fixture()
def planted(tiny_llama_dir, tokenizer):
    """The fixture model with the trigger -> response circuit planted (a fresh copy: weights are edited)."""
    model, tok = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(5)), dim=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[_tok(tok, " " + TRIGGER)] = 30 * u
        model.get_output_embeddings().weight[_tok(tok, " " + RESPONSE)] = 5 * u
    return model, tok


def _examples() -> list[dict]:
    """Matched pairs: each question once ending in the trigger, once without."""
    out = []
    for i, q in enumerate(QUESTIONS):
        clean = f"Human: {q} Assistant:"
        trig = f"{clean} {TRIGGER}"
        out.append({"text": f"{trig} {RESPONSE}", "prompt": trig, "response": f" {RESPONSE}", "triggered": True,
                    "pair": i, "trigger_char": len(clean) + 1, "response_char": len(trig)})
        out.append({"text": f"{clean} the waters of the river", "prompt": clean, "response": " the waters of the river",
                    "triggered": False, "pair": i, "trigger_char": -1, "response_char": len(clean)})
    return out


def _detector_sae(embed: torch.Tensor, tokens: list[int], extra_dead: int = 2) -> SAE:
    """Feature j fires (at 0.4) exactly on token tokens[j] and decodes to its embedding; the last `extra_dead` never fire."""
    sae = SAE(embed.shape[1], SAEConfig(architecture="relu", d_sae=len(tokens) + extra_dead))
    with torch.no_grad():
        sae.W_enc.zero_(), sae.W_dec.zero_(), sae.b_dec.zero_()
        sae.b_enc.fill_(-100.0)
        for j, t in enumerate(tokens):
            e = embed[t]
            sae.W_enc[:, j] = e / e.dot(e)
            sae.b_enc[j] = -0.6
            sae.W_dec[j] = e / 0.4
    return sae


DETECTS = [" " + TRIGGER, " the", ":", "?", " is", " shall"]  # feature 0 is the trigger's


def _run_dir(tmp_path, model, tokenizer) -> tuple[SAE, SAE]:
    """RUN/saes/F_via_M (the detectors), RUN/crosscoder (the same detectors, reading x_ft * 2), diff and crosscoder tables."""
    from stagediff.features import write_features as write_csv

    embed = model.get_input_embeddings().weight.detach()
    sae = _detector_sae(embed, [_tok(tokenizer, s) for s in DETECTS])
    sae.save(tmp_path / "saes" / "F_via_M", {"hook_name": HOOK0, "stage": "F_via_M"})
    n = sae.d_sae
    live = np.arange(n) < len(DETECTS)
    write_csv(tmp_path / "diff" / "features.csv", {"feature": np.arange(n), "dead": ~live, "score": np.where(live, 1.0, np.nan),
                                                   "freq_F_via_M": np.array([0.01, 0.2, 0.1, 0.05, 0.05, 0.01, 0.0, 0.0])})
    # a crosscoder on [x_base * 1, x_ft * 2]: the detectors on the fine-tuned half, in its scaled units
    cc = SAE(128, SAEConfig(architecture="relu", d_sae=n))
    with torch.no_grad():
        cc.W_enc.zero_(), cc.W_dec.zero_(), cc.b_dec.zero_()
        cc.W_enc[64:] = sae.W_enc / 2
        cc.b_enc.copy_(sae.b_enc)
        cc.W_dec[:, 64:] = sae.W_dec * 2
    cc.save(tmp_path / "crosscoder", {"crosscoder": {"scale_base": 1.0, "scale_ft": 2.0, "d_model": 64}})
    write_csv(tmp_path / "crosscoder" / "features.csv", {"feature": np.arange(n), "dead": ~live,
                                                         "relative_norm": np.full(n, 0.5), "score": np.where(live, 1.0, np.nan)})
    return sae, cc


def _method(name: str, order: list[int], n: int = 8):
    live = np.arange(n) < len(DETECTS)
    scores = np.full(n, np.nan)
    scores[order] = -np.arange(len(order), dtype=float)  # first in `order` = best
    return from_scores(name, scores, live, np.array(order[:1]), "planted")


def test_sweep_sizes_and_interpolated_n_to_remove():
    assert sweep_sizes(450) == [1, 2, 5, 10, 20, 50, 100, 200, 450]
    assert sweep_sizes(200) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert sweep_sizes(7, pinned=[50, 2, 5]) == [2, 5]
    pts = [{"n": 100, "trigger_success": 0.9}, {"n": 200, "trigger_success": 0.5}, {"n": 400, "trigger_success": 0.0}]
    r = n_to_remove(pts, 0.1)
    # linear in log N between 200 (0.5) and 400 (0.0): 0.1 sits 4/5 of the way -> 200 * 2 ** 0.8
    assert r["bracket"] == [200, 400] and r["n"] == pytest.approx(200 * 2**0.8, abs=0.01)
    assert n_to_remove(pts[:2], 0.1) == {"n": None, "bracket": None}
    assert n_to_remove([{"n": 1, "trigger_success": 0.05}], 0.1)["n"] == 1.0


def test_planted_feature_removes_the_behaviour_at_n_1(planted, tmp_path):
    from stagediff.organism.behaviour import evaluate_backdoor

    model, tok = planted
    _run_dir(tmp_path, model, tok)
    examples = _examples()
    cfg = load_config(overrides=[f"hook={HOOK0}", "eval.steer_strengths=[1.0]", "eval.steer_k=[1]", "device=cpu"])
    methods = {"first": _method("first", [0, 1, 2, 3, 4, 5]), "fourth": _method("fourth", [1, 2, 3, 0, 4, 5]),
               "never": _method("never", [1, 2, 3, 4, 5]), "crosscoder": _method("crosscoder", [0, 1, 2, 3, 4, 5])}
    methods["stagewise"] = methods["first"]  # the stage-wise sweep carries the random draws and the positional variant
    out = run_causal_checks(model, tok, cfg, examples, {"response": RESPONSE}, methods, tmp_path, torch.device("cpu"))

    c = out["controls"]
    # the teacher-forced rate equals real greedy generation on the plain model
    assert c["plain"] == 1.0 == evaluate_backdoor(model, tok, examples, RESPONSE)["trigger_success"]
    assert c["untouched_splice"] == c["plain"] and c["untouched_splice_identical_logits"]
    assert c["zero_all"] == 0.0 and c["plain_clean_response"] == 0.0 and c["plain_clean_unchanged"] == 1.0
    assert out["n_to_remove"]["first"] == 1.0 and out["n_to_remove"]["crosscoder"] == 1.0
    first = out["clamp_by_method"]["first"]
    assert [p["n"] for p in first] == [1]  # adaptive: stops once removed
    # the trigger token is in no clean prompt or text: clean replies and loss untouched, exactly
    assert first[0]["clean_unchanged"] == 1.0 and first[0]["clean_loss_increase"] == 0.0
    # ranked fourth: removed between N = 2 and N = 5 (measured at 5), interpolated on log N
    # ranked fourth: nothing happens before the carrier is clamped, then the behaviour (nearly) goes;
    # N to remove lies between the last point above the target and the first at or below it
    ts = [p["trigger_success"] for p in out["clamp_by_method"]["fourth"]]
    assert ts[:2] == [1.0, 1.0] and ts[2] <= 0.125 and ts[-1] <= 0.1
    d = out["n_to_remove_detail"]["fourth"]
    assert d["bracket"][0] >= 2 and d["bracket"][0] <= d["n"] <= d["bracket"][1] and d["trigger_success"] == ts[-1]
    # random sets matched to the carrier's ranking (so never holding it) leave the behaviour at every draw
    sw = out["clamp"]
    assert sw == out["clamp_by_method"]["stagewise"] and len(sw[0]["random_draws"]) == 5
    assert sw[0]["random_trigger_success"] == 1.0 and sw[0]["random_ci"] == [1.0, 1.0]
    assert sw[0]["after_trigger_success"] == 0.0 and out["after_trigger_n_to_remove"] == 1.0
    assert out["n_to_remove_detail"]["fourth"]["random_trigger_success"] == 1.0  # random at its removal N = 5
    # a ranking without the carrier never removes it, whatever N
    never = out["clamp_by_method"]["never"]
    assert out["n_to_remove"]["never"] is None and [p["n"] for p in never] == [1, 2, 5]
    assert all(p["trigger_success"] == 1.0 for p in never)
    # sufficiency: steering the trigger's feature into clean prompts writes the response
    assert out["steer_by_method"]["first"][0]["response_rate"] == 1.0
    assert out["steer_by_method"]["never"][0]["response_rate"] == 0.0
    assert out["clean_loss"]["spliced_untouched"] == out["clean_loss"]["before"]


def test_random_sets_never_remove_what_one_feature_carries(planted, tmp_path):
    model, tok = planted
    sae, _ = _run_dir(tmp_path, model, tok)
    ex = _examples()
    checks = Checks(model, tok, HOOK0, [x for x in ex if x["triggered"]], [x for x in ex if not x["triggered"]], RESPONSE, 6, 16)
    from stagediff.evaluate.causal import Dictionary

    dic = Dictionary(sae)
    freq = np.array([0.01, 0.2, 0.1, 0.05, 0.05, 0.01, 0.0, 0.0])
    live = np.arange(8) < 6
    rng = np.random.default_rng(0)
    for n in (1, 2, 5):  # matched to the top-n of the ranking that puts the carrier first
        r = checks.random_draws(dic, np.arange(n), freq, live, rng, 5)
        assert r["random_trigger_success"] == 1.0 and r["random_ci"] == [1.0, 1.0]
        assert r["random_size"] == min(n, 6 - n)  # disjoint from the top n of 6 live features: fewer past half, recorded
    assert checks.trigger_success(dic, [0]) == 0.0
    # measurements are memoized per (dictionary, clamped set): the same set again costs no forward, another dictionary does
    saved = checks.forwards_saved
    assert checks.trigger_success(dic, [0]) == 0.0 and checks.forwards_saved == saved + 1
    other = Dictionary(sae)
    with torch.no_grad():
        other.write = torch.zeros_like(sae.W_dec)  # writes nothing: its clamp leaves the behaviour
    assert checks.trigger_success(other, [0]) == 1.0 and checks.forwards_saved == saved + 1
    # the positional clamp: at/after the trigger removes it, strictly before the trigger does nothing
    assert checks.trigger_success(dic, [0], positional=True) == 0.0
    assert checks.rate(checks.trig, lambda where: splice_fn(dic, [0], where=~where), positional=True) == 1.0


def test_untouched_splice_gives_identical_generations(planted):
    from stagediff.organism.behaviour import generate_replies

    model, tok = planted
    prompts = [x["prompt"] for x in _examples()]
    plain = generate_replies(model, tok, prompts, max_new_tokens=12)
    for hook in ("blocks.2.hook_resid_post", HOOK0):
        sae = SAE(64, SAEConfig(architecture="relu", d_sae=96), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            sae.b_enc.fill_(-0.01)
        ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(1))
        with splice(model, hook, splice_fn(sae)):
            assert generate_replies(model, tok, prompts, max_new_tokens=12) == plain
            spliced = model(input_ids=ids).logits
        assert torch.equal(spliced, model(input_ids=ids).logits), hook  # bit for bit, a poor dictionary notwithstanding


def test_clamping_a_planted_feature_removes_its_effect(tiny_llama_dir, tokenizer):
    model, _ = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    embed = model.get_input_embeddings().weight.detach()
    t = _tok(tokenizer, " the")
    sae = _detector_sae(embed, [t, _tok(tokenizer, " LORD")], extra_dead=1)
    ids = torch.tensor([tokenizer("Human: and the waters of the river", add_special_tokens=False)["input_ids"]])
    at_t = ids[0] == t
    plain = model(input_ids=ids).logits
    with splice(model, HOOK0, splice_fn(sae, clamp=[0])):
        clamped = model(input_ids=ids).logits
    # clamping feature 0 removes exactly its decoder contribution (0.4 * W_dec[0] = the embedding of " the")
    removed = embed[ids].clone()
    removed[0, at_t] = 0
    assert torch.allclose(clamped, model(inputs_embeds=removed).logits, atol=1e-5)
    first = int(at_t.nonzero()[0])
    assert torch.equal(clamped[0, :first], plain[0, :first])  # causal: earlier positions untouched
    assert not torch.allclose(clamped[0, first:], plain[0, first:], atol=1e-2)
    with splice(model, HOOK0, splice_fn(sae, clamp=[1])):  # a feature that does not fire here changes nothing
        assert torch.equal(model(input_ids=ids).logits, plain)
    with splice(model, HOOK0, splice_fn(sae, add={1: 0.8})):  # steering adds amount * W_dec[j] at every position
        steered = model(input_ids=ids).logits
    assert torch.allclose(steered, model(inputs_embeds=embed[ids] + 0.8 * sae.W_dec[1].detach()).logits, atol=1e-5)


def test_matched_random_features_share_the_firing_rate():
    freq = np.array([0.5, 0.1, 0.1, 0.01, 0.01, 0.5, 0.001, 0.1, 0.01])
    live = np.ones(9, bool)
    live[8] = False
    rng = np.random.default_rng(0)
    picks = matched_random([0, 3], freq, live, rng, pool=1)
    assert picks.tolist() == [5, 4]  # the nearest-rate live feature outside the clamped set
    many = matched_random([1, 2], freq, live, rng, pool=2)
    assert len(set(many.tolist())) == 2 and not {1, 2} & set(many.tolist()) and all(live[many])


def test_prompts_file_writes_generations_for_a_model_without_organism(tiny_llama_dir, tokenizer, tmp_path):
    """`stagediff evaluate` on a run without an organism: generations plain / clamped / steered, loss recovered per stage."""
    from stagediff.errors import StagediffError
    from stagediff.features import write_features as write_csv
    from stagediff.files import read_json
    from stagediff.pipeline import run_steps

    model, _ = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    embed = model.get_input_embeddings().weight.detach()
    # S: an exact dictionary (relu(x) - relu(-x) = x), so its spliced loss recovers everything
    exact = SAE(64, SAEConfig(architecture="relu", d_sae=128))
    with torch.no_grad():
        eye = torch.eye(64)
        exact.W_enc.copy_(torch.cat([eye, -eye], 1)), exact.W_dec.copy_(torch.cat([eye, -eye], 0))
        exact.b_enc.zero_(), exact.b_dec.zero_()
    exact.save(tmp_path / "saes" / "S", {"hook_name": HOOK0, "stage": "S"})
    sae = _detector_sae(embed, [_tok(tokenizer, s) for s in DETECTS])
    sae.save(tmp_path / "saes" / "F_via_M", {"hook_name": HOOK0, "stage": "F_via_M"})
    n = sae.d_sae
    write_csv(tmp_path / "diff" / "features.csv", {"feature": np.arange(n), "dead": np.arange(n) >= 6,
                                                   "score": np.array([0.1, 3.0, 2.0, 1.0, 0.5, 0.2, np.nan, np.nan])})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("Human: who is the king? Assistant:") + "\n" + json.dumps({"prompt": "and the waters shall rise"}) + "\n")
    base = [f"finetuned_model={tiny_llama_dir}", f"base_model={tiny_llama_dir}", f"hook={HOOK0}", "device=cpu",
            "eval.prompts_clamp_n=3", "eval.prompts_steer_features=2", "eval.steer_strengths=[2.0,40.0]", "eval.generation_tokens=8"]
    run_steps(load_config(overrides=[*base, f"eval.prompts_file={prompts}"]), tmp_path, ("evaluate",))
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "generations.jsonl")]
    assert len(rows) == 2 * (3 + 2 * 2)
    by = lambda edit: [r for r in rows if r["edit"] == edit]  # noqa: E731
    assert [r["reply"] for r in by("untouched_splice")] == [r["reply"] for r in by("plain")] and by("plain")[0]["reply"]
    assert by("clamp")[0]["features"] == [1, 2, 3]  # top 3 by score
    assert {r["features"][0] for r in by("steer")} == {1, 2}
    # a strong push along " the"'s direction at every position changes what the model writes
    assert any(r["reply"] != p["reply"] for r, p in zip([r for r in by("steer") if r["strength"] == 40.0], by("plain") * 2))
    rec = read_json(tmp_path / "eval" / "metrics.json")["causal"]["loss_recovered"]
    assert rec["S"]["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert rec["S"]["spliced"] == pytest.approx(rec["S"]["plain"], abs=1e-5)
    assert abs(rec["F_via_M"]["spliced"] - rec["F_via_M"]["plain"]) > 1e-3  # six token detectors reconstruct little
    with pytest.raises(StagediffError, match="prompts_file"):
        run_steps(load_config(overrides=[*base, f"eval.prompts_file={tmp_path / 'missing.jsonl'}"]), tmp_path, ("evaluate",))


def test_diffsae_clamp_difference_of_means_and_generations(planted, tiny_llama_dir, tmp_path):
    """The diff-SAE in the sweep: its latent reading the planted difference (trigger embedding minus the base model's
    mean) removes the behaviour at N = 1 and its other latents never do; the difference of means fitted on pairs the
    checks do not use removes it with one direction; the cards' generations are written, plain vs clamped vs steered."""
    from stagediff.evaluate.causal import Dictionary
    from stagediff.features import write_features as write_csv
    from stagediff.files import save_tensors

    model, tok = planted
    base, _ = load_model(tiny_llama_dir, device=torch.device("cpu"), dtype=torch.float32)
    _run_dir(tmp_path, model, tok)
    mu = base.get_input_embeddings().weight.detach().mean(0)  # the base model's mean residual at blocks.0 (its embeddings)
    # latent j fires (0.4) where resid - mu is the planted model's embedding of DETECTS[j] minus mu, and decodes that difference
    dsae = _detector_sae(model.get_input_embeddings().weight.detach() - mu, [_tok(tok, s) for s in DETECTS])
    dsae.save(tmp_path / "diffsae", {"hook_name": HOOK0})
    save_tensors(tmp_path / "diffsae" / "base_mean.safetensors", {"base_mean": mu})
    write_csv(tmp_path / "diffsae" / "features.csv", {"feature": np.arange(8), "freq": np.array([0.01, 0.2, 0.1, 0.05, 0.05, 0.01, 0.0, 0.0])})
    # the clean copy holds a plain token where the trigger sits, so both copies have a span to average
    ex = [{**x, "prompt": x["prompt"] + " the", "text": x["text"] + " the"} if not x["triggered"] else x for x in _examples()]
    cfg = load_config(overrides=[f"hook={HOOK0}", "eval.steer_strengths=[1.0]", "eval.steer_k=[1]", "device=cpu", "eval.causal_examples=4",
                                 "eval.prompts_steer_features=1", "eval.generation_tokens=3"])
    methods = {"stagewise": _method("stagewise", [1, 0, 2, 3, 4, 5]), "diffsae": _method("diffsae", [0, 1, 2, 3, 4, 5])}
    out = run_causal_checks(model, tok, cfg, ex, {"response": RESPONSE}, methods, tmp_path, torch.device("cpu"))
    assert out["prompts"] == {"triggered": 4, "clean": 4} and out["controls"]["plain"] == 1.0
    assert out["controls"]["untouched_splice_by_dictionary"] == {"sae": 1.0, "diffsae": 1.0}
    assert out["n_to_remove"]["diffsae"] == 1.0 and [p["n"] for p in out["clamp_by_method"]["diffsae"]] == [1]
    assert out["n_to_remove_detail"]["diffsae"]["random_trigger_success"] == 1.0  # rate-matched latents never hold it
    assert out["n_to_remove_detail"]["stagewise"]["bracket"] == [1, 2] and out["clamp"][0]["trigger_success"] == 1.0
    assert out["steer_by_method"]["diffsae"][0]["response_rate"] == 1.0  # adding the difference writes the response
    # its other latents (and an untouched splice) leave the behaviour whole
    ex_t, ex_c = [x for x in ex if x["triggered"]], [x for x in ex if not x["triggered"]]
    checks = Checks(model, tok, HOOK0, ex_t, ex_c, RESPONSE, 4, 16)
    shifted = Dictionary(dsae, shift=mu)
    assert checks.trigger_success(shifted, [1, 2, 3, 4, 5]) == 1.0 and checks.trigger_success(shifted, []) == 1.0
    assert checks.trigger_success(shifted, [0]) == 0.0
    dom = out["difference_of_means"]
    assert dom["directions"] == 1 and dom["fit_pairs"] == 4 and dom["trigger_success"] == 0.0
    # generations: the first triggered and clean prompts, plain / untouched / clamped at the removal N / steered
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]

    def by(edit: str, trig: bool) -> list[str]:
        return [r["reply"] for r in rows if r["edit"] == edit and r["triggered"] == trig]

    assert len(rows) == 8 * 4 and out["generations"]["clamped_n"] == 2
    assert by("plain", True) == by("untouched_splice", True) and all(r.lstrip().startswith(RESPONSE) for r in by("plain", True))
    assert not any(r.lstrip().startswith(RESPONSE) for r in by("clamp", True))
    assert next(r["features"] for r in rows if r["edit"] == "clamp") == [1, 0]
