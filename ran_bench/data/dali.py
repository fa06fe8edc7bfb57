"""The DALI backend: NVIDIA DALI decodes and augments (GPU `mixed` decoding when CUDA is there).

Train: `decoders.image_random_crop` (area 0.08-1, aspect ratio 3/4-4/3, the paper's scale and
aspect augmentation), resize to `size`, random horizontal flip. Val: decode, resize the shorter
side to `size / 0.875`, centre crop. Both normalise with the ImageNet mean/std in
`crop_mirror_normalize`, in float32 or float16 (bfloat16 is converted from float32 on the device,
DALI has no bfloat16 output), NCHW or NHWC (channels_last).

Sharding: the reader gets the epoch's file list (`ran_bench.data.sampling`: the same order the
torchvision backend reads) with `shard_id` = global rank and `num_shards` = world size. The
training list is cut so all shards are equal and whole batches; validation pads the last batch
in the reader and `LastBatchPolicy.PARTIAL` drops the padding, so every image counts once.

Resuming: pipelines are built with `enable_checkpointing=True`; `state_dict()` holds the
iterator's checkpoint (reader position and every random generator), and a loader that loads it
rebuilds the pipeline from it, so the next batch has the same images and the same crops as the
uninterrupted run.

Unreadable files. Measured with DALI 2.4 on the CPU pipeline: a truncated or non-image file
makes `run()` raise `RuntimeError` ("Error in CPU operator nvidia.dali.fn.decoders.image ...
nvImageCodec failure") without naming the file, and the pipeline declares itself invalid.
Grayscale and CMYK JPEGs decode to RGB and a PNG named .JPEG decodes (the decoder sniffs the
format), so only genuinely broken files fail. Checking every file up front would cost a full
decode of the data set per run, so instead: a failing batch is caught, the candidate files
(the batches the pipeline may have had in flight) are bisected with small DALI pipelines of the
same decoder to find the broken ones, those are replaced in the file list by a flat mean-colour
JPEG (zero after normalisation, same label), and the pipeline is rebuilt from the checkpoint
taken after the last good batch. The file is logged and listed in `loader.bad_files`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from ran_bench.data.folder import MEAN_255, STD_255
from ran_bench.data.sampling import LoaderBase, train_order, train_per_rank, val_range
from ran_bench.data.torchvision_loader import RATIO, SCALE, val_resize_size

log = logging.getLogger("ran_bench.data")

READER = "Reader"
PREFETCH = 2  # DALI's default prefetch_queue_depth


def _placeholder_jpeg(owner: object, size: int) -> str:
    """A flat mean-colour JPEG that stands in for an unreadable file, deleted with `owner`."""
    d = tempfile.mkdtemp(prefix="ran_bench_dali_")
    path = Path(d) / "placeholder.JPEG"
    Image.new("RGB", (size, size), tuple(round(m) for m in MEAN_255)).save(path, "JPEG", quality=95)
    weakref.finalize(owner, shutil.rmtree, d, True)
    return str(path)


def _build_pipeline(files: list[str], labels: list[int], *, train: bool, size: int, batch_size: int,
                    shard_id: int, num_shards: int, num_threads: int, seed: int, device_id: int | None,
                    channels_last: bool, fp16: bool, checkpoint: str | None = None):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, label = fn.readers.file(
            files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
            random_shuffle=False, stick_to_shard=True, pad_last_batch=not train, name=READER)
        decoder = "mixed" if gpu else "cpu"
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, random_area=list(SCALE),
                random_aspect_ratio=list(RATIO), num_attempts=100)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=val_resize_size(size),
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT16 if fp16 else types.FLOAT,
            output_layout="HWC" if channels_last else "CHW", crop=(size, size),
            crop_pos_x=0.5, crop_pos_y=0.5, mean=list(MEAN_255), std=list(STD_255), mirror=mirror)
        if gpu:
            label = label.gpu()
        return images, label

    pipe = pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=PREFETCH, checkpoint=checkpoint)
    pipe.build()
    return pipe


def find_undecodable(paths: list[str], *, device_id: int | None = None, num_threads: int = 1) -> list[str]:
    """The files among `paths` that DALI's decoder cannot decode (bisection with small pipelines)."""
    from nvidia.dali import fn, pipeline_def, types

    def decodes(part: list[str]) -> bool:
        bs = min(len(part), 32)

        @pipeline_def(batch_size=bs, num_threads=num_threads, device_id=device_id, seed=0)
        def probe():
            data, _ = fn.readers.file(files=part, pad_last_batch=True)
            return fn.decoders.image(data, device="mixed" if device_id is not None else "cpu",
                                     output_type=types.RGB)

        try:
            pipe = probe()
            pipe.build()
            for _ in range(-(-len(part) // bs)):
                pipe.run()
        except RuntimeError:
            return False
        finally:
            del pipe
        return True

    if not paths or decodes(paths):
        return []
    if len(paths) == 1:
        return list(paths)
    mid = len(paths) // 2
    return find_undecodable(paths[:mid], device_id=device_id, num_threads=num_threads) + \
        find_undecodable(paths[mid:], device_id=device_id, num_threads=num_threads)


class DaliLoader(LoaderBase):
    """`build_loader(..., backend="dali")`; see `ran_bench.data.build_loader`."""

    backend = "dali"

    def __init__(self, files: list[str], labels: list[int], *, split: str, size: int, batch_size: int,
                 rank: int, world_size: int, num_threads: int, seed: int, channels_last: bool,
                 dtype: torch.dtype, device: torch.device):
        n = len(files)
        if split == "train":
            num_samples = train_per_rank(n, world_size=world_size, batch_size=batch_size)
            if num_samples == 0:
                raise ValueError(f"{n} training images are fewer than world_size x batch_size = "
                                 f"{world_size} x {batch_size}; lower the batch size")
        else:
            num_samples = len(val_range(n, rank=rank, world_size=world_size))
        super().__init__(split=split, num_samples=num_samples, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.files = list(files)  # unreadable entries get replaced by the placeholder
        self.labels = list(labels)
        self.size = size
        self.num_threads = num_threads
        self.channels_last = channels_last
        self.dtype = dtype
        self.device = torch.device(device)
        self.device_id = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._checkpoint: str | None = None  # DALI checkpoint of a pending resume
        self._last_checkpoint: str | None = None  # after the last batch handed out
        self._placeholder: str | None = None

    # -- the epoch's file list and pipeline ------------------------------------------------------
    def _epoch_lists(self) -> tuple[list[str], list[int]]:
        if self.train:
            order = train_order(len(self.files), world_size=self.world_size, seed=self.seed,
                                epoch=self.epoch, batch_size=self.batch_size)
            return [self.files[i] for i in order], [self.labels[i] for i in order]
        return self.files, self.labels

    def _pipeline_seed(self) -> int:
        # Different crops per epoch and per rank, reproducible from the loader's seed.
        return (self.seed * 1_000_003 + self.epoch * 1009 + self.rank) % (1 << 31)

    def _iterator(self, checkpoint: str | None):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        files, labels = self._epoch_lists()
        pipe = _build_pipeline(
            files, labels, train=self.train, size=self.size, batch_size=self.batch_size,
            shard_id=self.rank, num_shards=self.world_size, num_threads=self.num_threads,
            seed=self._pipeline_seed(), device_id=self.device_id, channels_last=self.channels_last,
            fp16=self.dtype == torch.float16, checkpoint=checkpoint)
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                   last_batch_policy=policy, auto_reset=False)

    def _skip_start(self, start: int) -> str | None:
        """A DALI checkpoint positioned at batch `start` of this epoch (None for the start)."""
        if start == 0:
            return None
        if self._checkpoint is not None:
            return self._checkpoint
        # A state saved by another backend: run the pipeline up to the position (same samples,
        # DALI's own augmentation randomness).
        it = self._iterator(None)
        for _ in range(start):
            next(it)
        return it.checkpoints()[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._begin()
        checkpoint = self._skip_start(start)
        self._checkpoint = None
        it = None
        last_good = checkpoint
        while self._consumed < len(self):
            try:
                if it is None:  # the iterator decodes its first batch when it is created
                    it = self._iterator(last_good)
                batch = next(it)[0]
            except StopIteration:
                return
            except RuntimeError as e:
                it = None
                if not self._replace_bad_files(e):
                    raise
                continue
            last_good = self._last_checkpoint = it.checkpoints()[0]
            self._consumed += 1
            yield self._to_torch(batch)

    def _to_torch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW = channels_last
        images = images.to(self.dtype)
        labels = batch["labels"].reshape(-1).to(device=self.device, dtype=torch.int64)
        return images, labels

    def _replace_bad_files(self, error: RuntimeError) -> bool:
        """Find the unreadable files among those the failing pipeline may have been reading,
        swap them for the placeholder and return True; False when none is found."""
        files, _ = self._epoch_lists()
        lo = self._shard_start() + self._consumed * self.batch_size
        hi = lo + (PREFETCH + 2) * self.batch_size
        shard_end = self._shard_start() + self.num_samples
        candidates = sorted(set(files[lo:min(hi, shard_end)]))
        lines = [ln.strip() for ln in str(error).splitlines() if "failure" in ln or "Error in" in ln]
        log.warning("DALI pipeline failed (%s); looking for unreadable files among %d candidates",
                    " ".join(lines)[:300] or type(error).__name__, len(candidates))
        bad = find_undecodable(candidates, device_id=self.device_id, num_threads=self.num_threads)
        if not bad:
            return False
        if self._placeholder is None:
            self._placeholder = _placeholder_jpeg(self, self.size)
        bad_set = set(bad)
        self.files = [self._placeholder if f in bad_set else f for f in self.files]
        for path in bad:
            self._note_bad(path, "DALI could not decode it")
        return True

    def _shard_start(self) -> int:
        if self.train:
            return self.rank * self.num_samples
        return val_range(len(self.files), rank=self.rank, world_size=self.world_size).start

    # -- resumable state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        ckpt = self._last_checkpoint
        state["dali_checkpoint"] = ckpt if self._consumed > 0 and ckpt is not None else ""
        state["bad_files"] = list(self.bad_files)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        ckpt = state.get("dali_checkpoint") if state.get("backend") == self.backend else None
        self._checkpoint = self._last_checkpoint = ckpt or None
        for path in state.get("bad_files", []):
            if path in self.files and path not in self.bad_files:
                if self._placeholder is None:
                    self._placeholder = _placeholder_jpeg(self, self.size)
                self.files = [self._placeholder if f == path else f for f in self.files]
                self.bad_files.append(path)
