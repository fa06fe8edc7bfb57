"""The trainer's log: stderr on every process, and RUN_DIR/train.log on the main process."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ran_bench.errors import StorageError, UserError
from ran_bench.fileio import storage_errors

log = logging.getLogger("ran_bench.train")


class RunLog:
    """The trainer's log: stderr, and on the main process RUN_DIR/train.log. Until `open`, the
    main process keeps its lines in memory, so a run that fails set-up on bad input leaves no run
    directory behind."""

    FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")

    def __init__(self) -> None:
        self.root = logging.getLogger("ran_bench")
        self.main = os.environ.get("RANK", "0") == "0"  # until `start` knows (torchrun and Accelerate set RANK)
        self.pending: logging.handlers.MemoryHandler | None = None
        self.file: logging.FileHandler | None = None
        self.bar = None

    def start(self, rank: int, main_process: bool) -> None:
        """Log to stderr: everything on the main process (kept for train.log), warnings only,
        prefixed with the rank, elsewhere."""
        self.main = main_process
        self.root.handlers.clear()
        self.root.propagate = False
        console = logging.StreamHandler(sys.stderr)
        if main_process:
            console.setFormatter(self.FORMAT)
            self.root.setLevel(logging.INFO)
            self.pending = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
            self.root.addHandler(self.pending)
        else:
            console.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
            self.root.setLevel(logging.WARNING)
        self.root.addHandler(console)

    def open(self, run_dir: Path) -> None:
        """Create the run directory and train.log (appended to), and write the lines kept so far."""
        with storage_errors(f"create the run directory {run_dir} (--run-dir)"):
            run_dir.mkdir(parents=True, exist_ok=True)
        with storage_errors(f"write {run_dir / 'train.log'} (the run directory must be writable)"):
            self.file = logging.FileHandler(run_dir / "train.log")
        self.file.setFormatter(self.FORMAT)
        if self.pending is not None:
            self.pending.setTarget(self.file)
            self.pending.flush()
            self.root.removeHandler(self.pending)
            self.pending = None
        self.root.addHandler(self.file)

    def progress_bar(self, **kwargs) -> tqdm:
        """The loop's tqdm progress bar on stderr."""
        self.bar = tqdm(**kwargs)
        return self.bar

    def failed(self, error: UserError, run_dir: Path | None) -> None:
        """Write the error that ends the run to train.log only (the command line prints it), where
        that is a run directory already: a new run that failed set-up leaves nothing behind."""
        if self.bar is not None:
            self.bar.close()  # ends its line, so that the command line's error line starts one
        if self.file is None:
            if not (self.main and run_dir is not None and (run_dir / "config.yaml").is_file()):
                return
            try:
                self.open(run_dir)
            except StorageError:
                return  # a read-only run directory: the command line still prints the error
        self.file.handleError = lambda record: None  # a full disk: no "Logging error" traceback after the error
        self.file.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None))
