"""The training loop of `ran-bench train`: what set-up built (`Job`), where the run stands
(`Progress`), the optimizer steps with their logging, evaluations and checkpoints, and the record
at the end.

The ranks sum their stop votes after every optimizer step (`StopVote`), so all of them stop after
the same step, at most one step after a signal; then they write one checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import gather_object

from ran_bench import metrics
from ran_bench.checkpoint import Checkpoint, rng_state, save_checkpoint
from ran_bench.config import Config, to_yaml
from ran_bench.data import build_loader
from ran_bench.evaluate import evaluate, evaluation_record, sync_buffers
from ran_bench.recipe import train_step
from ran_bench.results import run_results
from ran_bench.runlog import RunLog
from ran_bench.runtime import device_name, synchronize

log = logging.getLogger("ran_bench.train")


@dataclass
class Job:
    """What set-up builds once per launch, for the loop, the checkpoints and the evaluations."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    precision: str  # "fp32", "bf16" or "fp16"
    model: nn.Module  # as trained: DDP-wrapped, maybe compiled
    raw_model: nn.Module  # the module whose state_dict is checkpointed and evaluated
    optimizer: Any
    scheduler: Any
    criterion: nn.Module
    train_loader: Any
    loader_args: dict
    num_classes: int
    params: int
    macs: int  # multiply-adds at macs_size, the model's paper input size
    macs_size: int
    epoch_images: int  # images of one epoch over all ranks
    label_noise: dict | None = None  # the record of label_noise.json
    val_loaders: dict[int, Any] = field(default_factory=dict)

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def val_loader(self, size: int):
        """The validation loader of one test size, built on first use."""
        if size not in self.val_loaders:
            self.val_loaders[size] = build_loader(self.cfg.data.root, "val", size=size,
                                                  batch_size=self.cfg.eval.batch_size,
                                                  augmentation=self.cfg.data.augmentation, **self.loader_args)
        return self.val_loaders[size]


@dataclass
class Progress:
    """Where the run stands (restored from a checkpoint on resume), and this launch's clock."""

    loss_sum: torch.Tensor  # summed loss of the micro-batches since the last metrics line
    t_begin: float  # when this launch began
    micro_batches: int = 0
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    eval_due: bool = False
    # Totals of the earlier segments of the run (one segment per launch), from the checkpoint.
    elapsed_before: float = 0.0
    device_seconds_before: float = 0.0
    train_images_before: int = 0
    train_seconds_before: float = 0.0
    skipped_before: set[str] = field(default_factory=set)
    # This segment: its first step; seconds in training steps (evaluations and checkpoints
    # excluded), which grow by the time from t_mark to each pause; the images/s window.
    start_step: int = 0
    trained: float = 0.0
    t_mark: float = 0.0
    t_window: float = 0.0
    images_window: int = 0
    data_wait: float = 0.0

    def start_clock(self) -> None:
        self.start_step, self.trained = self.step, 0.0
        self.t_mark = self.t_window = time.perf_counter()
        self.images_window, self.data_wait = 0, 0.0

    def totals(self, job: Job) -> dict[str, float]:
        """The training run's totals so far, over all segments."""
        segment = time.perf_counter() - self.t_begin
        return {"elapsed_s": self.elapsed_before + segment,
                "device_seconds": self.device_seconds_before + job.world_size * segment,
                "train_images": self.train_images_before
                + (self.step - self.start_step) * job.cfg.optim.global_batch_size,
                "train_seconds": self.train_seconds_before + self.trained}


class StopVote:
    """Each rank's vote to stop, summed over ranks after every optimizer step.

    The vote is preallocated on the device: filling it queues a kernel, while
    torch.tensor(value, device=...) would copy from the host and synchronise every step. The sum
    over ranks is copied to pinned host memory without blocking and read one step later, after
    waiting on an event recorded behind that copy: the CPU never waits for the step it has just
    queued (votes.item() would, as it waits for everything queued on the stream)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.on_cuda = accelerator.device.type == "cuda"
        self.vote = torch.zeros((), device=accelerator.device)
        self.host = torch.zeros((), pin_memory=self.on_cuda)
        self.ready = torch.cuda.Event() if self.on_cuda else None

    def cast(self, signalled: bool) -> bool:
        """Queue this step's vote; True when any rank had voted to stop by the previous step."""
        if self.ready is not None:
            self.ready.synchronize()  # the previous step's copy, not the step just queued
        stop = self.host.item() > 0
        self.vote.fill_(float(signalled))
        votes = self.accelerator.reduce(self.vote, "sum") if self.accelerator.num_processes > 1 else self.vote
        self.host.copy_(votes, non_blocking=self.on_cuda)
        if self.ready is not None:
            self.ready.record()
        return stop


def train_loop(job: Job, progress: Progress, stop, run_log: RunLog) -> bool:
    """Optimizer steps until the stop step, logging, evaluating and checkpointing on the way;
    True when a signal stopped it (after writing the checkpoint)."""
    cfg, stop_step = job.cfg, job.cfg.stop_step
    log.info("training %s from step %d to %d of %d (lr %.4g = %.4g per 256 images x %d / 256, %s schedule)",
             cfg.model.name, progress.step, stop_step, cfg.total_steps, cfg.lr, cfg.optim.lr_per_256,
             cfg.optim.global_batch_size, cfg.schedule.kind.name)
    job.model.train()
    bar = run_log.progress_bar(total=stop_step, initial=progress.step, disable=not job.main_process, unit="step",
                               dynamic_ncols=True, smoothing=0.1)
    progress.start_clock()
    vote = StopVote(job.accelerator)
    signalled = False
    while progress.step < stop_step and not signalled:
        job.train_loader.set_epoch(progress.epoch)
        for images, targets in _waited_for(job.train_loader, progress):
            lr = _micro_batch(job, progress, images, targets)
            if lr is None:  # within an accumulation window
                continue
            bar.update(1)
            if progress.step % cfg.log.every_steps == 0 or progress.step == stop_step:
                _log_window(job, progress, lr, bar)
            signalled = vote.cast(stop.signum is not None)  # a signal before the previous step ended
            finished = progress.step >= stop_step
            eval_due = bool(cfg.eval.every_steps) and progress.step % cfg.eval.every_steps == 0 and not finished
            if eval_due and not signalled:  # when signalled, the resumed run evaluates first
                _paused(job, progress, run_evaluation, job, progress)
            if progress.step % cfg.checkpoint.every_steps == 0 or finished or signalled:
                _paused(job, progress, write_checkpoint, job, progress, eval_due=eval_due and signalled)
            if finished or signalled:  # both wrote a checkpoint just now: `trained` is complete
                break
        else:
            progress.epoch += 1
    bar.close()
    return signalled


def _waited_for(loader, progress: Progress):
    """The loader's batches, adding the time spent waiting for each to `progress.data_wait`."""
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        progress.data_wait += time.perf_counter() - t0
        if batch is None:
            return
        yield batch


def _micro_batch(job: Job, progress: Progress, images: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Train on one micro-batch; the learning rate of the optimizer step it completed, or None
    within an accumulation window."""
    with job.accelerator.accumulate(job.model):
        loss = train_step(job.accelerator, job.model, job.optimizer, job.criterion, images, targets)
    progress.loss_sum += loss.float()
    progress.micro_batches += 1
    if not job.accelerator.sync_gradients:
        return None
    lr = job.optimizer.param_groups[0]["lr"]  # the rate this step used
    job.scheduler.step()
    progress.step += 1
    progress.images_seen += job.cfg.optim.global_batch_size
    progress.images_window += job.cfg.optim.global_batch_size
    return lr


def _log_window(job: Job, progress: Progress, lr: float, bar) -> None:
    """A metrics.jsonl line for the steps since the previous one (mean loss over all ranks)."""
    total = job.accelerator.reduce(progress.loss_sum.clone(), "sum") if job.world_size > 1 else progress.loss_sum
    loss = total.item() / (progress.micro_batches * job.world_size)
    now = time.perf_counter()
    row = metrics.train_row(step=progress.step, epoch=progress.images_seen / job.epoch_images, loss=loss, lr=lr,
                            images_per_s=progress.images_window / (now - progress.t_window),
                            data_wait_s=progress.data_wait, time=progress.elapsed_before + now - progress.t_begin)
    if job.main_process:
        metrics.append(job.run_dir, [row])
    # The row's numbers at its step, to each of log.trackers (Accelerate logs on the main process only).
    job.accelerator.log({"train/loss": row["loss"], "train/lr": row["lr"], "train/images_per_s": row["images_per_s"]},
                        step=row["step"])
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{row['images_per_s']:.0f}", refresh=False)
    progress.loss_sum.zero_()
    progress.micro_batches = 0
    progress.t_window, progress.images_window, progress.data_wait = now, 0, 0.0


def _paused(job: Job, progress: Progress, action, *args, **kwargs) -> None:
    """Run `action` (an evaluation or a checkpoint) outside the training time and the images/s window."""
    synchronize(job.device)  # the steps queued so far count as training time
    t0 = time.perf_counter()
    progress.trained += t0 - progress.t_mark
    action(*args, **kwargs)
    job.model.train()
    progress.t_mark = time.perf_counter()
    progress.t_window += progress.t_mark - t0


def signalled_anywhere(accelerator: Accelerator, stop) -> bool:
    """Whether any rank has received a stop signal (a collective: every rank calls it)."""
    flag = torch.tensor(float(stop.signum is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    return flag.item() > 0


def write_checkpoint(job: Job, progress: Progress, eval_due: bool = False) -> None:
    """Every rank's state gathered on the main process, which writes the checkpoint of this step."""
    loader = job.train_loader
    rank_state = {"rng": rng_state(), "data": loader.state_dict(), "bad_files": list(loader.bad_files),
                  "window": {"loss_sum": progress.loss_sum.detach().cpu().clone(),
                             "micro_batches": progress.micro_batches}}
    ranks = gather_object([rank_state]) if job.world_size > 1 else [rank_state]
    if job.main_process:
        ranks = [_to_cpu(r) for r in ranks]
        scaler = job.accelerator.scaler
        ckpt = Checkpoint(
            step=progress.step, epoch=progress.epoch, epochs=progress.images_seen / job.epoch_images,
            images_seen=progress.images_seen, world_size=job.world_size, num_classes=job.num_classes,
            params=job.params, macs=job.macs, macs_input_size=job.macs_size, device_type=job.device.type,
            device_name=device_name(job.device), precision=job.precision, **progress.totals(job),
            skipped_files=sorted(progress.skipped_before.union(*(r["bad_files"] for r in ranks))),
            model=job.raw_model.state_dict(), optimizer=job.optimizer.state_dict(),
            scheduler=job.scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
            ranks=ranks, config=to_yaml(job.cfg), eval_due=eval_due)
        path = save_checkpoint(job.run_dir / "checkpoints", ckpt, keep_last=job.cfg.checkpoint.keep_last)
        log.info("checkpoint %s", path)
    job.accelerator.wait_for_everyone()


def run_evaluation(job: Job, progress: Progress) -> list[dict]:
    """Evaluate the current weights at every test size, logged and added to metrics.jsonl."""
    sync_buffers(job.raw_model)  # BatchNorm statistics of rank 0 everywhere, as in the checkpoint
    out = []
    for size in job.cfg.data.test_sizes:
        # Built once per size and outside the timer; a DALI pipeline is still built when a pass
        # begins, so the timed pass includes that (and torchvision's worker start-up).
        loader = job.val_loader(size)
        t0 = time.perf_counter()
        result = evaluate(job.accelerator, job.raw_model, loader, job.num_classes)
        result.update(size=size, step=progress.step, seconds=time.perf_counter() - t0)
        log.info("step %d, eval at %d px: top-1 err %.2f%%, top-5 err %.2f%% over %d images",
                 progress.step, size, result["top1_err"], result["top5_err"], result["num_samples"])
        row = metrics.eval_row(step=progress.step, size=size, top1_err=result["top1_err"],
                               top5_err=result["top5_err"], num_samples=result["num_samples"])
        if job.main_process:
            metrics.append(job.run_dir, [row])
        # The row's numbers at its step, to each of log.trackers (Accelerate logs on the main process only).
        job.accelerator.log({f"eval/top1_err_{size}": row["top1_err"], f"eval/top5_err_{size}": row["top5_err"]},
                            step=row["step"])
        out.append(result)
    return out


def write_results(job: Job, progress: Progress, evaluations: list[dict]) -> None:
    """results.json of the finished (or partial: schedule.max_steps) run."""
    bad = list(job.train_loader.bad_files)
    bad_files = gather_object(bad) if job.world_size > 1 else bad
    if not job.main_process:
        return
    totals, first = progress.totals(job), evaluations[0]
    results = run_results(
        job.cfg, num_classes=job.num_classes, params=job.params, macs=job.macs, macs_input_size=job.macs_size,
        step=progress.step, images_seen=progress.images_seen, epochs=progress.images_seen / job.epoch_images,
        world_size=job.world_size, device_type=job.device.type, device_name=device_name(job.device),
        precision=job.precision, wall_time_s=totals["elapsed_s"], device_seconds=totals["device_seconds"],
        evaluations=[evaluation_record(e, job.device, job.precision) for e in evaluations],
        train_images_per_s=totals["train_images"] / totals["train_seconds"] if totals["train_seconds"] > 0 else None,
        infer_images_per_s=first["num_samples"] / first["seconds"] if first["seconds"] > 0 else None,
        skipped_images=len(progress.skipped_before.union(bad_files)))
    results.save(job.run_dir / "results.json")
    log.info("results: %s (%s, %d steps, %.0f s)", job.run_dir / "results.json",
             "partial" if results.partial else "complete", progress.step, totals["elapsed_s"])


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_cpu(v) for v in value]
    return value
