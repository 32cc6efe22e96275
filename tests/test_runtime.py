"""Progress bars written to a file or pipe: a few whole lines, not one redraw per update."""

import io
import time

from stagediff import runtime


def test_progress_to_a_file_prints_a_line_every_interval(monkeypatch):
    log = io.StringIO()  # not a terminal, like `stagediff demo > log 2>&1`
    monkeypatch.setattr(runtime.sys, "stderr", log)
    monkeypatch.delenv("STAGEDIFF_QUIET", raising=False)
    monkeypatch.setattr(runtime, "LOG_EVERY_SECONDS", 0.1)
    t0 = time.perf_counter()
    bar = runtime.progress(range(3000), desc="work")
    for i in bar:
        time.sleep(0.0002)  # ~0.6 s or more: a handful of intervals, thousands of updates
        bar.set_postfix(loss=f"{1 / (i + 1):.3g}")  # as training does: shown on the next line, not a line each
    seconds = time.perf_counter() - t0
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 2 <= len(lines) <= seconds / 0.1 + 2, lines
    assert lines[-1].startswith("work: 100%") and "3000/3000" in lines[-1] and "loss=0.000333" in lines[-1]
    for _ in runtime.progress(range(100), desc="short"):  # over before the first interval: silent
        pass
    assert len(log.getvalue().splitlines()) == len(lines)
