"""Stopping at a checkpoint when a scheduler asks: the signals, the request flag and the exit code.

SLURM (scancel, scontrol requeue, preemption) and torchrun send SIGTERM to every process of a job,
and SLURM's pre-timeout warning is SIGUSR1 here. The trainer turns both into a request that the
loop reads between optimizer steps; it then checkpoints and exits with REQUEUE_EXIT_CODE. Loader
worker processes ignore both signals, so that only the trainer decides when to stop.

This module imports nothing heavy: `ran-bench train` installs the handlers before it imports
torch, so a signal during the seconds of start-up is not lost.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

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
def stop_signals_deferred() -> Iterator[None]:
    """Hold the stop signals back from this thread while it starts worker processes: a child
    inherits the blocked mask, so a signal between its fork and `ignore_stop_signals` cannot
    kill it; one sent to this process meanwhile is delivered when the block ends."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
