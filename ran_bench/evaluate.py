"""`ran-bench eval RUN_DIR_OR_CHECKPOINT [--size 320] [key=value ...]`: single centre-crop error.

Top-1 and top-5 error with torchmetrics, exact across ranks: the validation loader gives every
rank a contiguous, unpadded share of the images (ranks may differ by one image), each rank
accumulates the metric's sums over its share, and torchmetrics all-gathers and adds those sums
at `compute()`. Every validation image is counted once; `num_samples` proves it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator, PartialState
from torchmetrics.classification import MulticlassAccuracy

from ran_bench import metrics
from ran_bench.checkpoint import Checkpoint, checkpoint_path
from ran_bench.config import Config, config_from_yaml
from ran_bench.data import build_loader
from ran_bench.errors import StorageError
from ran_bench.fileio import write_json_atomic
from ran_bench.models import create_model
from ran_bench.results import Evaluation, ResultsError, load_results, run_results
from ran_bench.runtime import accelerate_precision, device_name, resolve_backend, resolve_precision
from ran_bench.weights import ExportedModel, find_weights


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, num_classes: int) -> dict:
    """Top-1/top-5 error (percent), the number of images and the number of unreadable images
    replaced by a flat one (`skipped_images`) over all ranks' shards of `loader`.

    `model` is the plain module (not DDP-wrapped): ranks run different numbers of batches, and
    DDP's forward may start collectives. Every rank must call this (compute() synchronises)."""
    device = accelerator.device
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        top1.update(logits, labels)
        top5.update(logits, labels)
        count += labels.numel()
    model.train(was_training)
    # Ranks read disjoint shards, so their counts of unreadable files add up.
    counts = torch.stack([count, torch.tensor(len(loader.bad_files), device=device)])
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    num_samples, skipped = (int(x) for x in counts.tolist())
    return {"top1_err": 100.0 * (1.0 - float(top1.compute())), "top5_err": 100.0 * (1.0 - float(top5.compute())),
            "num_samples": num_samples, "skipped_images": skipped}


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts rank 0's buffers at each training forward, but the last forward then updates
    them on each rank from its own batch; evaluating and checkpointing rank 0's copy everywhere
    makes the result independent of the number of processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def evaluation_record(result: dict, device: torch.device, precision: str) -> Evaluation:
    """An `evaluate` result (with its size and step added) as the `Evaluation` of results.json,
    naming the device it ran on."""
    return Evaluation(size=result["size"], top1_err=result["top1_err"], top5_err=result["top5_err"],
                      num_samples=result["num_samples"], step=result["step"],
                      skipped_images=result["skipped_images"], device_type=device.type,
                      device_name=device_name(device), precision=precision)


def main(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint and record the result in its run directory. A bad path, checkpoint,
    config or data root raises a UserError, which the command line prints as one line with exit
    status 2.

    Where the result goes (see `_record`): into results.json when the checkpoint is the one the
    record describes (evaluations of the same size are replaced) or when there is no record yet
    (then built from the checkpoint); the evaluation of an older checkpoint goes to
    RUN_DIR/evals/step_XXXXXXXX.json and never replaces the record of the run's later steps. An
    evaluation on other data than the run's (overrides of data.root, data.name or
    data.augmentation) goes to RUN_DIR/evals/<data folder>-<hash>/step_XXXXXXXX.json and nowhere
    else. A run directory that cannot be written gets the result printed, then a StorageError. An
    export folder (`ran-bench export`) is evaluated with the run's config it holds (and the
    overrides, e.g. data.root); its result is printed only."""
    ckpt_path, ckpt, run_dir = find_weights(args.path, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    cfg = config_from_yaml(ckpt.config, f"{ckpt_path} (embedded config)", args.overrides)
    cpu = not torch.cuda.is_available()  # see ran_bench.train: CPU processes as MULTI_CPU (gloo)
    precision = resolve_precision(cfg.precision.name, PartialState(cpu=cpu).device.type)
    if not cpu:
        torch.backends.cudnn.benchmark = True  # fixed input size per test size, as in training and the benchmarks
    accelerator = Accelerator(cpu=cpu, mixed_precision=accelerate_precision(precision))
    model = _model(cfg, ckpt, accelerator.device)
    evaluations = []
    for size in args.size or list(cfg.data.test_sizes):
        loader = build_loader(cfg.data.root, "val", size=size, batch_size=cfg.eval.batch_size,
                              backend=resolve_backend(cfg.data.backend.name, accelerator.device),
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              num_threads=cfg.data.num_threads, seed=cfg.seed, channels_last=cfg.model.channels_last,
                              device=accelerator.device, num_classes=ckpt.num_classes,
                              augmentation=cfg.data.augmentation)
        result = evaluate(accelerator, model, loader, ckpt.num_classes)
        result.update(size=size, step=ckpt.step)
        evaluations.append(evaluation_record(result, accelerator.device, precision))
        if accelerator.is_main_process:
            skipped = f", {result['skipped_images']} unreadable" if result["skipped_images"] else ""
            print(f"{cfg.model.name} step {ckpt.step} at {size} px: top-1 err {result['top1_err']:.2f}%, "
                  f"top-5 err {result['top5_err']:.2f}% over {result['num_samples']} images{skipped} ({ckpt_path})")
    if accelerator.is_main_process and run_dir is not None and (run_dir / "config.yaml").is_file():
        _store(run_dir, ckpt_path, ckpt, cfg, evaluations)
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _model(cfg: Config, ckpt: Checkpoint | ExportedModel, device: torch.device) -> nn.Module:
    """The checkpoint's (or export's) model on `device`, built as the run built it."""
    model = create_model(cfg.model.name, num_classes=ckpt.num_classes, **cfg.model.options)
    model.load_state_dict(ckpt.model)
    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _store(run_dir: Path, ckpt_path: Path, ckpt: Checkpoint, cfg: Config, evaluations: list[Evaluation]) -> None:
    """Record the evaluations in the run directory (see `main`) and say where."""
    other_data = _data_changes(config_from_yaml(ckpt.config, f"{ckpt_path} (embedded config)"), cfg)
    try:
        if other_data:
            print(f"updated {_save_other_data_evaluations(run_dir, ckpt.step, ckpt_path, cfg, evaluations)} "
                  f"(not the run's data: {'; '.join(other_data)}; the run's results.json is left as it is)")
        else:
            metrics.append(run_dir, [metrics.eval_row(step=ckpt.step, size=e.size, top1_err=e.top1_err,
                                                      top5_err=e.top5_err, num_samples=e.num_samples)
                                     for e in evaluations])
            print(f"updated {_record(run_dir, ckpt_path, ckpt, cfg, evaluations)}")
    except StorageError as e:
        raise StorageError(f"the result above was not recorded in {run_dir}: {e}; make the run directory "
                           "writable (or copy it somewhere writable) and evaluate again") from e


def _record(run_dir: Path, ckpt_path: Path, ckpt: Checkpoint, cfg: Config, evaluations: list[Evaluation]) -> Path:
    """Store `evaluations` of checkpoint `ckpt` in the run directory; returns the file written.

    results.json is the record of the run's newest weights: the checkpoint's evaluations replace
    those of the same size when the record is of the checkpoint's step, and a record is built from
    the checkpoint (its training fields from what the checkpoint saved of the training run) when
    there is none, or when the run has trained past the record since (the old record's
    evaluations then move to evals/). An older checkpoint's evaluations go to
    RUN_DIR/evals/step_XXXXXXXX.json, as the same Evaluation objects."""
    try:
        results = load_results(run_dir)
    except ResultsError:
        results = None  # none yet (an interrupted run), or unreadable: rebuilt from the checkpoint
    if results is not None and ckpt.step < results.steps:
        return _save_step_evaluations(run_dir, ckpt.step, ckpt_path, evaluations)
    if results is None or ckpt.step > results.steps:
        if results is not None and results.evaluations:
            _save_step_evaluations(run_dir, results.steps, checkpoint_path(run_dir / "checkpoints", results.steps),
                                   results.evaluations)
        results = run_results(
            cfg, num_classes=ckpt.num_classes, params=ckpt.params, macs=ckpt.macs,
            macs_input_size=ckpt.macs_input_size, step=ckpt.step, images_seen=ckpt.images_seen, epochs=ckpt.epochs,
            world_size=ckpt.world_size, device_type=ckpt.device_type, device_name=ckpt.device_name,
            precision=ckpt.precision, wall_time_s=ckpt.elapsed_s, device_seconds=ckpt.device_seconds, evaluations=[],
            train_images_per_s=ckpt.train_images / ckpt.train_seconds if ckpt.train_seconds > 0 else None,
            skipped_images=len(ckpt.skipped_files))
    results.evaluations = _merge(results.evaluations, evaluations)
    results.save(run_dir / "results.json")
    return run_dir / "results.json"


def _save_step_evaluations(run_dir: Path, step: int, ckpt_path: Path, evaluations: list,
                           folder: Path | None = None, **extra) -> Path:
    """Add `evaluations` (of the checkpoint of `step`) to step_XXXXXXXX.json in `folder`
    (default RUN_DIR/evals), with the `extra` fields."""
    path = (folder or run_dir / "evals") / f"step_{step:08d}.json"
    kept = [Evaluation(**e) for e in json.loads(path.read_text())["evaluations"]] if path.is_file() else []
    write_json_atomic(path, {"checkpoint": str(ckpt_path), "step": step, **extra,
                             "evaluations": [asdict(e) for e in _merge(kept, evaluations)]})
    return path


DATA_KEYS = ("root", "name", "augmentation")  # what makes an evaluation one on other data than the run's


def _data_changes(run_cfg, cfg) -> list[str]:
    """The data.* keys of `cfg` that make its evaluation one on other data than `run_cfg`'s (the
    run's own config), as "data.KEY X (the run's: Y)"; a data.root naming the same folder is the same."""
    changes = []
    for key in DATA_KEYS:
        old, new = getattr(run_cfg.data, key), getattr(cfg.data, key)
        same_folder = key == "root" and old and new and os.path.realpath(old) == os.path.realpath(new)
        if old != new and not same_folder:
            changes.append(f"data.{key} {new} (the run's: {old})")
    return changes


def _save_other_data_evaluations(run_dir: Path, step: int, ckpt_path: Path, cfg, evaluations: list) -> Path:
    """Record an evaluation on other data than the run's in RUN_DIR/evals/<data folder>-<hash>/,
    one folder per data set (its resolved root, name and augmentation), never in results.json or
    metrics.jsonl (`ran-bench report` reads those as the run's own)."""
    root = os.path.realpath(cfg.data.root) if cfg.data.root else None
    data = {"root": root, "name": cfg.data.name, "augmentation": cfg.data.augmentation}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(root).name if root else "no_root") + f"-{digest}"
    return _save_step_evaluations(run_dir, step, ckpt_path, evaluations, run_dir / "evals" / folder, data=data)


def _merge(old: list, new: list) -> list:
    """`old` evaluations with those of the sizes in `new` replaced, by size."""
    sizes = {e.size for e in new}
    return sorted([e for e in old if e.size not in sizes] + list(new), key=lambda e: e.size)
