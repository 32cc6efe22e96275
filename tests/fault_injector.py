"""Run the stagediff CLI with one injected fault: `python tests/fault_injector.py SPEC -- ARGS...`.

The fault is real, only its timing is chosen: the process SIGKILLs itself (no
cleanup, no `finally`, exactly like `kill -9` or a preempted GPU node) or a write
fails with ENOSPC, at a precise point, so the test does not race a fast tiny run.

SPEC is one of
  none                      no fault (a plain run, same interpreter setup)
  kill-after:GLOB:N         SIGKILL right after the N-th atomic rename onto a path matching GLOB
  kill-before:GLOB:N        SIGKILL right before it (the temp file is written and synced, not renamed)
  kill-step:N               SIGKILL during the N-th SAE training step (after backward, before the update)
  enospc:GLOB:N             the N-th fsync of a temp file for a path matching GLOB fails with ENOSPC
                            (a full disk; further writes there keep failing, as a full disk would)
  enospc-open:GLOB:N        opening a path matching GLOB for writing fails with ENOSPC from the N-th time
                            (plain appends, such as the training log, that do not go through files.py)

Every final file goes through files.atomic_path (temp file, fsync, os.replace), so
os.replace and os.fsync are the seams where those faults land.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Arm the fault described by `spec` in this process."""
    kind, _, rest = spec.partition(":")
    if kind == "none":
        return
    if kind == "kill-step":
        import stagediff.train as train

        target, seen = int(rest), [0]
        real = train.lr_factor

        def lr_factor(*args, **kwargs):  # called once per training step
            seen[0] += 1
            if seen[0] == target:
                _die()
            return real(*args, **kwargs)

        train.lr_factor = lr_factor
        return
    pattern, _, n = rest.rpartition(":")
    target, seen = int(n), [0]

    def hit(path) -> bool:
        if fnmatch.fnmatch(os.fspath(path), pattern):
            seen[0] += 1
            return seen[0] >= target if kind.startswith("enospc") else seen[0] == target
        return False

    if kind in ("kill-after", "kill-before"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            fire = hit(dst)
            if fire and kind == "kill-before":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if fire:
                _die()

        os.replace = replace
    elif kind == "enospc-open":
        import builtins

        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and hit(file):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
            return real_open(file, mode, *args, **kwargs)

        builtins.open = open_
    elif kind == "enospc":
        real_fsync = os.fsync

        def fsync(fd):
            try:
                name = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                name = ""
            # temp files are named .<final name>.<random>.tmp next to the final file
            base = os.path.basename(name)
            final = os.path.join(os.path.dirname(name), base[1:].rsplit(".", 2)[0]) if base.endswith(".tmp") else name
            if base.endswith(".tmp") and hit(final):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            return real_fsync(fd)

        os.fsync = fsync
    else:
        raise SystemExit(f"unknown fault {spec!r}")


if __name__ == "__main__":
    spec, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: fault_injector.py SPEC -- stagediff args"
    install(spec)
    from stagediff.cli import main

    sys.exit(main(args))
