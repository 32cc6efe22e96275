"""Dictionaries trained side by side: a small scheduler of worker processes.

Once the activations exist, the dictionaries that do not wait on each other are independent
units of work: S; then D and M; then F_via_D, F_via_M and the noise controls; and, from the
start, the crosscoder and the diff-SAE. A small dictionary uses the cores of one process badly
(the tiny preset's S on two CPU cores: one 2-thread process runs 1.3x as fast as one thread,
two 1-thread processes training a dictionary each get through 1.6x the work; docs/MEASUREMENTS.md),
so `run_jobs` trains them in `workers` processes of cores / workers threads each, every unit as
soon as the units it needs are done, the one heading the most remaining work first.

Plain subprocesses, as the organism's fine-tunes (nothing depends on how the caller's main module
is guarded): each worker gets its unit in a job file (the run's resolved config as JSON) and leaves a
result file. The main process keeps the run's records: it marks a unit started before handing it out and
done once its worker succeeded, so an interrupted run resumes exactly as a sequential one does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagediff.errors import StagediffError
from stagediff.files import read_json, write_json

MAX_AUTO_WORKERS = 4  # more 1-thread processes than this gain little: the graph rarely has more units ready at once


@dataclass
class Job:
    """One unit of work of a run, as the scheduler sees it."""

    unit: str  # the run's unit: "train/<stage>", "crosscoder", "diffsae"
    needs: tuple[str, ...]  # units that must be finished first (only those among the jobs are waited for)
    cost: float  # its share of the work (activation rows x width), to start the longest chains first
    begin: Callable[[], str | None]  # main process, once its needs are met: its fingerprint, recorded as started; None = done already
    work: Callable[[], None]  # the training itself, in this process (one worker) or rebuilt in a worker by `unit`
    end: Callable[[str], None] = field(repr=False, default=lambda fp: None)  # main process: record it done


def auto_workers(device: Any, cores: int | None = None) -> int:
    """Worker processes for `workers: 0`: one per core on a CPU (up to MAX_AUTO_WORKERS), one on an accelerator
    (processes sharing one device only queue on it)."""
    if str(device) != "cpu":
        return 1
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(cores, MAX_AUTO_WORKERS))


def run_jobs(jobs: list[Job], workers: int, spec: Callable[[str], dict], folder: Path | None) -> None:
    """Run every job once its needs are done, at most `workers` at a time: in this process when `workers`
    is 1, else in worker processes, which rebuild a job's work from `spec(unit)` (a JSON-able dict, read
    by `pipeline.job_work`). `folder` holds the job and result files while they run. A failure stops the
    other workers and raises its error here.
    """
    if workers <= 1:
        for job in _order(jobs):
            fp = job.begin()
            if fp is not None:
                job.work()
                job.end(fp)
        return
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // workers)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    by_unit = {j.unit: j for j in jobs}
    pending = dict(by_unit)
    idle: list[Worker] = []
    busy: dict[str, tuple[Worker, str]] = {}  # unit -> (its worker, its fingerprint)
    started: list[Worker] = []
    took: dict[str, float] = {}
    t0 = time.time()
    try:
        while pending or busy:
            skipped = False
            for job in _ready(pending, busy, workers):
                del pending[job.unit]
                fp = job.begin()
                if fp is None:  # done already: the units that need it may be ready now
                    skipped = True
                    continue
                if not idle:  # a process is started once and takes unit after unit (python + torch load once)
                    started.append(Worker(folder, len(started), threads))
                    idle.append(started[-1])
                worker = idle.pop()
                worker.give(job.unit, spec(job.unit))
                busy[job.unit] = (worker, fp)
            if not busy:
                if not pending:
                    break
                if skipped:
                    continue
                # nothing runs and nothing can start: a need outside the graph
                raise StagediffError(f"cannot order {sorted(pending)}: they need units that are not part of this run")
            time.sleep(0.05)
            for unit, (worker, fp) in list(busy.items()):
                if worker.finished():
                    del busy[unit]
                    by_unit[unit].end(fp)
                    idle.append(worker)
                    took[unit] = worker.seconds
    finally:
        for worker in started:
            worker.close()
        shutil.rmtree(folder, ignore_errors=True)
    if took:  # the progress bars of several processes interleave: one line says what ran
        longest = ", ".join(f"{u} {t:.0f} s" for u, t in sorted(took.items(), key=lambda kv: -kv[1])[:4])
        print(f"trained {len(took)} units in {len(started)} processes of {threads} thread{'s' * (threads > 1)}: "
              f"{time.time() - t0:.0f} s wall, {sum(took.values()):.0f} s of work (longest: {longest})", flush=True)


class Worker:
    """A worker process, fed units one at a time on its stdin; each leaves a result file when it ends."""

    def __init__(self, folder: Path, slot: int, threads: int):
        root = str(Path(__file__).resolve().parents[1])  # this stagediff, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "STAGEDIFF_BAR_POSITION": str(slot)}  # one progress line per worker on a terminal
        self.folder, self.threads, self.unit, self.result, self.seconds = folder, threads, "", Path(), 0.0
        self.proc = subprocess.Popen([sys.executable, "-m", "stagediff.workers", str(threads)], env=env, stdin=subprocess.PIPE, text=True)

    def give(self, unit: str, spec: dict) -> None:
        job = self.folder / f"{unit.replace('/', '__')}.job.json"
        write_json(job, spec)
        self.unit, self.result = unit, Path(f"{job}.done")
        self.proc.stdin.write(f"{job}\n")
        self.proc.stdin.flush()

    def finished(self) -> bool:
        """True once its unit succeeded; raises the unit's error when it failed or the process died."""
        if self.result.exists():
            info = read_json(self.result)
            if "error" not in info:
                self.seconds = float(info["seconds"])
                return True
            if info.get("user_error"):
                raise StagediffError(info["error"])
            raise RuntimeError(f"{self.unit} failed in its worker process:\n{info.get('traceback') or info['error']}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.unit} failed: its worker process exited with status {self.proc.returncode} "
                               "(killed? out of memory?)")
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # no more units: it exits
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _order(jobs: list[Job]) -> list[Job]:
    """The jobs one after another, each after its needs, the longest remaining chain first (one worker)."""
    pending, out = {j.unit: j for j in jobs}, []
    while pending:
        ready = _ready(pending, {}, 1)
        if not ready:
            raise StagediffError(f"cannot order {sorted(pending)}: they need units that are not part of this run")
        job = ready[0]
        del pending[job.unit]
        out.append(job)
    return out


def _ready(pending: dict[str, Job], running: dict, workers: int) -> list[Job]:
    """The pending jobs whose needs are done, as many as free workers, the most remaining work first."""
    waiting = set(pending) | set(running)
    ready = [j for j in pending.values() if not any(n in waiting for n in j.needs)]
    ready.sort(key=lambda j: -_remaining(j, pending))
    return ready[: max(0, workers - len(running))]


def _remaining(job: Job, pending: dict[str, Job]) -> float:
    """The job's cost plus that of every pending job that needs it, directly or not."""
    below = {job.unit}
    grew = True
    while grew:
        new = {u for u, j in pending.items() if u not in below and any(n in below for n in j.needs)}
        below |= new
        grew = bool(new)
    return job.cost + sum(pending[u].cost for u in below - {job.unit} if u in pending)


def worker_main(threads: int) -> None:
    """A worker process: for each job file named on stdin, rebuild the job's work from its spec, run it, and
    leave a result file beside the job file ({"seconds"} or {"error", ...})."""
    import torch

    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    from stagediff.pipeline import job_work

    for line in sys.stdin:
        job_path = line.strip()
        spec = read_json(job_path)
        t = time.time()
        try:
            job_work(spec)()
        except StagediffError as e:
            write_json(job_path + ".done", {"error": str(e), "user_error": True})
            continue
        except Exception as e:
            write_json(job_path + ".done", {"error": str(e), "traceback": traceback.format_exc()})
            continue
        write_json(job_path + ".done", {"seconds": round(time.time() - t, 2)})


def _exit_with(parent: int) -> None:
    """End this worker when the run that started it is gone (killed: no `finally` stopped us), so no orphan keeps
    writing into a run directory that a resumed run is already using."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
