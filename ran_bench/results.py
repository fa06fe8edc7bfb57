"""`results.json`: the record a finished (or partial) run leaves in its run directory.

The trainer writes it, `ran-bench eval` updates its evaluations, `ran-bench report` reads it.
One dataclass is the schema for all three, so a field cannot drift between writer and reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ran_bench import __version__
from ran_bench.config import Config
from ran_bench.errors import UserError
from ran_bench.fileio import git_commit, write_json_atomic

SCHEMA_VERSION = 1


class ResultsError(ValueError, UserError):
    """A results.json that is missing, not JSON, or does not match the schema."""


@dataclass
class Evaluation:
    """Single centre-crop error at one test size, over `num_samples` distinct validation images.

    Written by the trainer's final evaluation or by `ran-bench eval`, on the machine named here,
    which need not be the training machine of the record."""

    size: int
    top1_err: float  # percent
    top5_err: float  # percent
    num_samples: int
    step: int  # training step of the weights evaluated
    skipped_images: int = 0  # unreadable validation images replaced by a flat image (counted as samples)
    device_type: str = ""  # where this evaluation ran: "cpu" or "cuda" ("" in records older than the field)
    device_name: str = ""
    precision: str = ""  # autocast of this evaluation: "fp32", "bf16" or "fp16"


@dataclass
class Results:
    """A run's record. The training fields (steps to skipped_images) describe the training run as
    its checkpoints recorded it, over all its segments (one segment per launch or requeue), even
    when `ran-bench eval` writes the file on another machine."""

    model: str
    dataset: str  # data set name, e.g. "imagenet", "demo", "cifar10"
    data_root: str
    num_classes: int
    params: int
    macs: int  # multiply-adds of one forward pass at `macs_input_size`
    macs_input_size: int
    train_size: int
    evaluations: list[Evaluation]
    steps: int  # optimizer steps done
    total_steps: int  # optimizer steps of the configured schedule
    images_seen: int
    epochs: float
    global_batch_size: int
    world_size: int  # processes (one device each) of the last training segment
    device_type: str  # "cpu" or "cuda", of the last training segment
    device_name: str
    precision: str  # "fp32", "bf16" or "fp16", of the last training segment
    wall_time_s: float  # sum over segments of launch-to-last-checkpoint (to results.json for the last one)
    gpu_hours: float  # on CUDA, sum over segments of its processes x its wall time, / 3600; 0 on CPU
    git_commit: str
    label_noise: float = 0.0
    augmentation: str = "imagenet"  # data.augmentation: "imagenet", or "cifar" (the paper's CIFAR recipe)
    # Training images / seconds spent in training steps, over all segments (evaluations, checkpoints,
    # start-up and steps redone after a kill without a checkpoint excluded); all processes together.
    train_images_per_s: float | None = None
    # Validation images / seconds of the trainer's final evaluation at the first test size, the
    # evaluation pass only, on the training processes; None when ran-bench eval wrote the record.
    infer_images_per_s: float | None = None
    skipped_images: int = 0  # distinct unreadable training files replaced, over all segments and ranks
    ran_bench_version: str = ""
    created: str = ""  # ISO 8601
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        """True when the run stopped before the end of its schedule."""
        return self.steps < self.total_steps

    def evaluation(self, size: int) -> Evaluation | None:
        return next((e for e in self.evaluations if e.size == size), None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
        write_json_atomic(Path(path), self.to_dict())


def run_results(cfg: Config, *, num_classes: int, params: int, macs: int, macs_input_size: int, step: int,
                images_seen: int, epochs: float, world_size: int, device_type: str, device_name: str,
                precision: str, wall_time_s: float, device_seconds: float, evaluations: list[Evaluation],
                train_images_per_s: float | None = None, infer_images_per_s: float | None = None,
                skipped_images: int = 0) -> Results:
    """The record of a run trained with `cfg` (the trainer's at the end, or `ran-bench eval`'s
    from a checkpoint): the training fields describe the training run, whichever machine calls
    this; each evaluation names where it ran."""
    return Results(
        model=cfg.model.name, dataset=cfg.data.name, data_root=str(cfg.data.root), num_classes=num_classes,
        params=params, macs=macs, macs_input_size=macs_input_size, train_size=cfg.data.train_size,
        augmentation=cfg.data.augmentation, evaluations=list(evaluations), steps=step, total_steps=cfg.total_steps,
        images_seen=images_seen, epochs=epochs, global_batch_size=cfg.optim.global_batch_size,
        world_size=world_size, device_type=device_type, device_name=device_name, precision=precision,
        wall_time_s=wall_time_s, gpu_hours=device_seconds / 3600 if device_type == "cuda" else 0.0,
        git_commit=git_commit(), label_noise=cfg.data.label_noise, train_images_per_s=train_images_per_s,
        infer_images_per_s=infer_images_per_s, skipped_images=skipped_images, ran_bench_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def load_results(path: str | os.PathLike) -> Results:
    """Read and validate a results.json (or a run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ResultsError(f"{path}: no results.json (has the run finished or been evaluated?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return _from_dict(Results, data, str(path))


def _from_dict(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ResultsError(f"{where}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    missing = sorted(
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ResultsError(f"{where}: missing keys {missing}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check(fields[name].type, value, f"{where}: {name}")
    if cls is Results:
        kwargs["evaluations"] = [
            _from_dict(Evaluation, e, f"{where}: evaluations[{i}]") if isinstance(e, dict)
            else _fail(f"{where}: evaluations[{i}] must be an object")
            for i, e in enumerate(kwargs["evaluations"])
        ]
    return cls(**kwargs)


_TYPES = {"int": int, "float": (int, float), "str": str, "dict": dict, "bool": bool}


def _check(type_name: str, value, where: str):
    optional = type_name.endswith("| None")
    base = type_name.replace("| None", "").strip()
    if value is None and optional:
        return value
    if base.startswith("list"):
        if not isinstance(value, list):
            _fail(f"{where} must be a list, got {value!r}")
        return value
    expected = _TYPES[base]
    if isinstance(value, bool) and base != "bool" or not isinstance(value, expected):
        _fail(f"{where} must be {base}, got {value!r}")
    return value


def _fail(message: str):
    raise ResultsError(message)
