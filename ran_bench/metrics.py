"""`metrics.jsonl`: a run's log of numbers, one JSON object per line, appended as the run goes.

Two kinds of line: `train` (step, epoch, mean loss since the previous line, learning rate,
images/s, seconds waited for data, seconds since the run began) every `log.every_steps`, and
`eval` (step, test size, top-1/top-5 error, images) after every evaluation of the run's own
validation data. The trainer and `ran-bench eval` write it, `ran-bench report` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ran_bench.errors import UserError
from ran_bench.fileio import append_text, atomic_write

NAME = "metrics.jsonl"
_REQUIRED = {"train": ("step", "loss"), "eval": ("step", "size", "top1_err")}


class MetricsError(ValueError, UserError):
    """A metrics.jsonl line that is not what the trainer writes."""


def train_row(*, step: int, epoch: float, loss: float, lr: float, images_per_s: float, data_wait_s: float,
              time: float) -> dict:
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_s": images_per_s,
            "data_wait_s": data_wait_s, "time": time}


def eval_row(*, step: int, size: int, top1_err: float, top5_err: float, num_samples: int) -> dict:
    return {"kind": "eval", "step": step, "size": size, "top1_err": top1_err, "top5_err": top5_err,
            "num_samples": num_samples}


def append(run_dir: str | os.PathLike, rows: list[dict]) -> None:
    """Add `rows` at the end of RUN_DIR/metrics.jsonl (a StorageError when it cannot be written)."""
    append_text(Path(run_dir) / NAME, "".join(json.dumps(row) + "\n" for row in rows))


def truncate(run_dir: str | os.PathLike, step: int) -> None:
    """Drop the lines logged after `step`, the step being resumed from: the resumed run logs them
    again. A line cut short by a kill is dropped too."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in keep))


def read(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """The training and evaluation lines of RUN_DIR/metrics.jsonl, each sorted by step (empty
    without a log). A run killed while appending can leave a truncated last line; that line is
    ignored. Any other unreadable line is a MetricsError naming the file and line."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        return [], []
    lines = path.read_text().splitlines()
    train, evals = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                continue
            raise MetricsError(f"{path}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or record.get("kind") not in _REQUIRED:
            raise MetricsError(f"{path}:{number}: expected an object with kind 'train' or 'eval'")
        missing = [k for k in _REQUIRED[record["kind"]] if not isinstance(record.get(k), (int, float))]
        if missing:
            raise MetricsError(f"{path}:{number}: {record['kind']} line lacks numeric {missing}")
        (train if record["kind"] == "train" else evals).append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])
