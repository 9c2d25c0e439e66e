"""CPU threads of torch: the default that keeps its speed when other programs share the cores.

A multi-threaded CPU step waits, in every parallel region, for all its threads. Alone on the machine two threads
are faster than one; when other processes compete for the cores, a thread the OS has descheduled stalls the others
and the step falls far below its share of the machine (measured with ``bench/cpu_load.py``: the demo's training
took 3.1x its idle time beside one busy process with two threads on two cores, 0.94x with one thread).

So on the CPU the default (``--threads auto``) is a :class:`ThreadGovernor`: it uses the cores the other processes
leave free, counted every few seconds from the kernel's run queue (Linux ``/proc``; elsewhere one thread), and
moves between one thread and all of them as load comes and goes. ``--threads N`` or ``OMP_NUM_THREADS`` fix the
count; an accelerator's run keeps torch's default.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Union

logger = logging.getLogger(__name__)

AUTO = "auto"


def num_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_threads(value: Union[str, int, None]) -> Union[int, str]:
    """``--threads`` value: ``None``/``"auto"`` -> ``"auto"``, a positive integer (or its digits) -> that integer."""
    if value is None or value == AUTO:
        return AUTO
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--threads must be 'auto' or an integer >= 1, got {value!r}")
    return int(text)


def other_runnable_threads(proc: str = "/proc") -> Optional[int]:
    """Runnable threads of other processes right now: the kernel's ``procs_running`` minus this process's own
    running threads; ``None`` where ``/proc`` is not there to tell."""
    try:
        with open(os.path.join(proc, "stat")) as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running "))
        own = 0
        task_dir = os.path.join(proc, "self", "task")
        for tid in os.listdir(task_dir):
            try:
                with open(os.path.join(task_dir, tid, "stat")) as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue  # a thread that ended while we looked
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0, running - own)


class ThreadGovernor:
    """Sets torch's intra-op threads to the cores that other processes leave free, re-decided every
    ``interval_s`` seconds from the run-queue samples taken at each :meth:`step` call.

    Args:
        max_threads: the most threads to use (default: the cores of this process).
        interval_s: seconds between decisions.
        probe: returns the other processes' runnable threads (``None``: cannot tell; the governor then keeps one
            thread); default :func:`other_runnable_threads`.
        clock: time source (``time.monotonic``; tests pass a fake).
        set_threads: applies a thread count (``torch.set_num_threads``; tests pass a recorder).
        cores: the cores to share (default: those of this process).
    """

    def __init__(self, max_threads: Optional[int] = None, interval_s: float = 3.0,
                 probe: Callable[[], Optional[int]] = other_runnable_threads,
                 clock: Callable[[], float] = time.monotonic,
                 set_threads: Optional[Callable[[int], None]] = None, cores: Optional[int] = None) -> None:
        self.cores = int(cores or num_cores())
        self.max_threads = max(1, int(max_threads or self.cores))
        self.interval_s = float(interval_s)
        self.probe, self.clock = probe, clock
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self._set = set_threads
        self._samples: list[int] = []
        self._last = clock()
        self._last_sample = self._last
        self.threads = 0
        self.changes = 0
        first = probe()
        self._apply(self._target([first]) if first is not None else 1)

    def _target(self, samples: list[int]) -> int:
        others = sorted(samples)[len(samples) // 2]  # the median: one stray sample does not move the count
        return max(1, min(self.max_threads, self.cores - others))

    def _apply(self, threads: int) -> None:
        if threads != self.threads:
            if self.threads:
                self.changes += 1
                logger.debug("CPU threads %d -> %d (other processes use the rest of the %d cores)", self.threads,
                             threads, self.cores)
            self._set(threads)
            self.threads = threads

    def step(self) -> int:
        """Take a run-queue sample (at most six per interval, so a fast training loop reads ``/proc`` a few times a
        second, not every step); every ``interval_s`` decide and apply the thread count. Returns it."""
        now = self.clock()
        if now - self._last_sample >= self.interval_s / 6:
            self._last_sample = now
            sample = self.probe()
            if sample is not None:
                self._samples.append(sample)
        if now - self._last >= self.interval_s:
            self._apply(self._target(self._samples) if self._samples else 1)
            self._samples, self._last = [], now
        return self.threads


def configure_threads(threads: Union[str, int, None] = AUTO, on_cpu: bool = True) -> Optional[ThreadGovernor]:
    """Apply a ``--threads`` setting; returns the :class:`ThreadGovernor` the caller should :meth:`~ThreadGovernor.
    step` during long work (``None`` when the count is fixed).

    A number: exactly that many threads. ``auto`` (the default): ``OMP_NUM_THREADS`` when it is set (torch read it at
    start-up; kept), else on the CPU a governor that uses the free cores, and on an accelerator torch's default.
    ``ValueError`` for anything else.
    """
    import torch

    value = parse_threads(threads)
    if value != AUTO:
        torch.set_num_threads(int(value))
        return None
    if os.environ.get("OMP_NUM_THREADS") or not on_cpu:
        return None
    return ThreadGovernor()


def describe(governor: Optional[ThreadGovernor]) -> str:
    """One line for the logs: the thread count and where it comes from."""
    import torch

    if governor is not None:
        return (f"torch CPU threads: {governor.threads} of {governor.cores} cores, adapted to the other processes' "
                "load (--threads N fixes the count)")
    source = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "fixed"
    return f"torch CPU threads: {torch.get_num_threads()} ({source}; --threads auto adapts them to the load)"
