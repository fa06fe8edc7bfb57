"""Stopping at a checkpoint when a scheduler asks: the signals, the request flag and the exit code.

SLURM (scancel, scontrol requeue, preemption) and torchrun send SIGTERM to every process of a job,
and SLURM's pre-timeout warning is SIGUSR1 here. The trainer turns both into a request that the
loop reads between optimizer steps; it then checkpoints and exits with REQUEUE_EXIT_CODE. Loader
worker processes ignore both signals, so that only the trainer decides when to stop.

This module imports nothing heavy: `ran-bench train` installs the handlers before it imports
torch, so a signal during the seconds of start-up is not lost.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from collections.abc import Iterator
from contextlib import contextmanager

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", the launcher requeues the job
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by a stop signal; `signum` is the first one received."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum


_request: StopRequest | None = None


def stop_request() -> StopRequest:
    """This process's stop request; the first call installs the handlers (main thread only)."""
    global _request
    if _request is None:
        _request = StopRequest()
        for sig in STOP_SIGNALS:
            signal.signal(sig, _request._handle)
    return _request


def ignore_stop_signals(*_args) -> None:
    """In a loader worker process (a DataLoader `worker_init_fn`): a worker killed by the job's
    SIGTERM would end the run with an error before the trainer could checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def starting_workers() -> Iterator[None]:
    """Around starting worker processes that call `ignore_stop_signals`: hold the stop signals
    back from this thread meanwhile (a child inherits the blocked mask, so a signal between its
    fork and its init cannot kill it; one sent to this process is delivered when the block
    ends), and make sure such workers still end when this process exits."""
    _kill_daemon_children_at_exit()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@functools.cache
def _kill_daemon_children_at_exit() -> None:
    # multiprocessing ends daemon children at exit with SIGTERM, which these workers ignore, then
    # waits for them forever (a loader whose workers outlive it, e.g. held by a traceback). Exit
    # handlers run last-registered first, so this SIGKILL comes before multiprocessing's SIGTERM.
    atexit.register(_kill_daemon_children)


def _kill_daemon_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
