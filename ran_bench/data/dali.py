"""The DALI backend: NVIDIA DALI decodes and augments (GPU `mixed` decoding when CUDA is there).

augmentation "imagenet": train = `decoders.image_random_crop` (area 0.08-1, aspect ratio
3/4-4/3, the paper's scale and aspect augmentation), resize to `size`, random horizontal flip;
val = decode, resize the shorter side to `size / 0.875`, centre crop. augmentation "cifar":
decode, resize the shorter side to `size`, centre crop (the identity for 32x32 images); train
then takes a `size` x `size` window shifted by -4..4 pixels with black outside the image (= 4-pixel
zero padding + random crop) and flips at random. Both normalise with the ImageNet mean/std in
`crop_mirror_normalize`, in float32 or float16 (bfloat16 is converted from float32 on the device,
DALI has no bfloat16 output), NCHW or NHWC (channels_last).

Sharding: the reader gets the epoch's file list (`ran_bench.data.sampling`: the same order the
torchvision backend reads) with `shard_id` = global rank and `num_shards` = world size. The
training list is cut so all shards are equal and whole batches; validation pads the last batch
in the reader and `LastBatchPolicy.PARTIAL` drops the padding, so every image counts once.

Resuming: pipelines are built with `enable_checkpointing=True`; `state_dict()` asks the
iterator for its checkpoint (reader position and every random generator) of the last batch
handed out, and a loader that loads it rebuilds the pipeline from it, so the next batch has the
same images and the same crops as the uninterrupted run. A state without a DALI checkpoint (saved
by the torchvision backend) is reached by running the pipeline up to its position.

Unreadable files. Measured with DALI 2.4 on the CPU pipeline: a truncated or non-image file (or
a format nvImageCodec lacks, such as GIF) makes `run()` raise `RuntimeError` ("Error in CPU
operator `nvidia.dali.fn.decoders.image` ... nvImageCodec failure") without naming the file, and
the pipeline declares itself invalid; a file that cannot be read fails in
`nvidia.dali.fn.readers.file` instead ("File mapping failed: PATH"). Grayscale and CMYK JPEGs
decode to RGB and a PNG named .JPEG decodes (the decoder sniffs the format). Checking every file
up front would cost a full decode of the data set per run, so instead, only for a decoder
failure: the candidate files (the batches the pipeline may have had in flight) are bisected
with small CPU pipelines of the same decoder (and a full decode, since a random crop can miss
the broken part of a file) to find the broken ones; each must still be readable from Python
(else the original error is raised: a file-system fault, not a bad image); they are replaced in
the file list by a flat mean-colour JPEG (zero after normalisation, same label), and the
pipeline is rebuilt from the last recovery checkpoint. The file is logged and listed in
`loader.bad_files`. Reader errors, and more than half a batch of undecodable files, raise.
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
from ran_bench.data.sampling import LoaderBase, check_bad_share, train_order, train_per_rank, val_range
from ran_bench.data.torchvision_loader import CIFAR_PAD, RATIO, SCALE, val_resize_size

log = logging.getLogger("ran_bench.data")

READER = "Reader"
PREFETCH = 2  # DALI's default prefetch_queue_depth
# Batches between the checkpoints that a failed pipeline is rebuilt from: at most this many good
# batches are decoded again after an unreadable file, and `checkpoints()` (whose cost the DALI
# docs warn about) is not called after every batch.
RECOVERY_EVERY = 32
DECODER_OP = "nvidia.dali.fn.decoders."  # how DALI names a decoder in its error messages


def _placeholder_jpeg(owner: object, size: int) -> str:
    """A flat mean-colour JPEG that stands in for an unreadable file, deleted with `owner`."""
    d = tempfile.mkdtemp(prefix="ran_bench_dali_")
    path = Path(d) / "placeholder.JPEG"
    Image.new("RGB", (size, size), tuple(round(m) for m in MEAN_255)).save(path, "JPEG", quality=95)
    weakref.finalize(owner, shutil.rmtree, d, True)
    return str(path)


def _decode(jpegs, *, train: bool, augmentation: str, device: str):
    """The pipeline's decoder op: a random-crop decoder for ImageNet training, a full decode
    otherwise. Shared with `find_undecodable`, which must test files with the same op."""
    from nvidia.dali import fn, types

    if train and augmentation == "imagenet":
        return fn.decoders.image_random_crop(
            jpegs, device=device, output_type=types.RGB, random_area=list(SCALE),
            random_aspect_ratio=list(RATIO), num_attempts=100)
    return fn.decoders.image(jpegs, device=device, output_type=types.RGB)


def _build_pipeline(files: list[str], labels: list[int], *, train: bool, size: int, batch_size: int,
                    shard_id: int, num_shards: int, num_threads: int, seed: int, device_id: int | None,
                    channels_last: bool, fp16: bool, augmentation: str = "imagenet",
                    checkpoint: str | None = None):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, label = fn.readers.file(
            files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
            random_shuffle=False, stick_to_shard=True, pad_last_batch=not train, name=READER)
        images = _decode(jpegs, train=train, augmentation=augmentation, device="mixed" if gpu else "cpu")
        mirror = fn.random.coin_flip(probability=0.5) if train else 0
        if augmentation == "cifar":
            images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop(images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)
            if train:  # a window shifted by -4..4 px, black outside = zero padding + random crop
                shift = fn.random.uniform(values=list(range(-CIFAR_PAD, CIFAR_PAD + 1)), shape=[2],
                                          dtype=types.INT32)
                images = fn.slice(images, start=shift, shape=[size, size], axis_names="HW",
                                  out_of_bounds_policy="pad", fill_values=0)
        elif train:
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=True)
        else:
            images = fn.resize(images, resize_shorter=val_resize_size(size),
                               interp_type=types.INTERP_LINEAR, antialias=True)
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


def is_decoder_error(error: BaseException) -> bool:
    """True when a DALI pipeline error comes from decoding an image (not from reading a file)."""
    return DECODER_OP in str(error)


def find_undecodable(paths: list[str], *, train: bool = False, augmentation: str = "imagenet",
                     num_threads: int = 1) -> list[str]:
    """The files among `paths` that the loader's decoder cannot decode, found by bisection with
    small CPU pipelines. A file counts as undecodable when the pipeline's decoder op fails on it
    or a full decode does (a random crop can miss the broken part of a truncated file). Errors
    that are not decoding errors (a file that cannot be read) propagate."""
    from nvidia.dali import fn, pipeline_def, types

    def decodes(part: list[str]) -> bool:
        bs = min(len(part), 32)

        @pipeline_def(batch_size=bs, num_threads=num_threads, device_id=None, seed=0)
        def probe():
            data, _ = fn.readers.file(files=part, pad_last_batch=True)
            same = _decode(data, train=train, augmentation=augmentation, device="cpu")
            if train and augmentation == "imagenet":
                return same, fn.decoders.image(data, device="cpu", output_type=types.RGB)
            return same

        pipe = probe()
        try:
            pipe.build()
            for _ in range(-(-len(part) // bs)):
                pipe.run()
        except RuntimeError as e:
            if not is_decoder_error(e):
                raise
            return False
        finally:
            del pipe
        return True

    if not paths or decodes(paths):
        return []
    if len(paths) == 1:
        return list(paths)
    mid = len(paths) // 2
    kw = dict(train=train, augmentation=augmentation, num_threads=num_threads)
    return find_undecodable(paths[:mid], **kw) + find_undecodable(paths[mid:], **kw)


class DaliLoader(LoaderBase):
    """`build_loader(..., backend="dali")`; see `ran_bench.data.build_loader`."""

    backend = "dali"

    def __init__(self, files: list[str], labels: list[int], *, split: str, size: int, batch_size: int,
                 rank: int, world_size: int, num_threads: int, seed: int, channels_last: bool,
                 dtype: torch.dtype, device: torch.device, augmentation: str = "imagenet"):
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
        self.augmentation = augmentation
        self.num_threads = num_threads
        self.channels_last = channels_last
        self.dtype = dtype
        self.device = torch.device(device)
        self.device_id = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._checkpoint: str | None = None  # DALI checkpoint of a pending resume
        self._it = None  # the iterator of the current pass, asked for its checkpoint by state_dict
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
            fp16=self.dtype == torch.float16, augmentation=self.augmentation, checkpoint=checkpoint)
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                   last_batch_policy=policy, auto_reset=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._begin()
        if start >= len(self):  # resumed at the end of the epoch: nothing left to decode
            return
        # The pipeline starts at `base` (batch `base_pos`): a DALI checkpoint of a resume, else the
        # epoch's start, from where the batches before `start` are run and dropped (a state saved
        # by another backend: same samples, DALI's own augmentation randomness). Every
        # RECOVERY_EVERY batches `base` moves up; an undecodable file rebuilds from it.
        base, base_pos = (self._checkpoint, start) if start > 0 and self._checkpoint else (None, 0)
        self._checkpoint = None
        self._it = it = None
        pos = base_pos
        while pos < len(self):
            try:
                if it is None:  # the iterator decodes its first batches when it is created
                    it, pos = self._iterator(base), base_pos
                batch = next(it)[0]
            except StopIteration:
                break
            except RuntimeError as e:
                self._it = it = None
                self._replace_bad_files(e, pos)  # raises unless the error was a few undecodable files
                continue
            pos += 1
            if pos % RECOVERY_EVERY == 0 and pos < len(self):
                base, base_pos = it.checkpoints()[0], pos
            if pos > self._consumed:  # not a batch skipped to reach `start` or decoded again
                self._it = it
                self._consumed = pos
                yield self._to_torch(batch)
        self._it = None  # the pass is complete: free the pipeline (its position is the epoch's end)

    def _to_torch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW = channels_last
        images = images.to(self.dtype)
        labels = batch["labels"].reshape(-1).to(device=self.device, dtype=torch.int64)
        return images, labels

    def _replace_bad_files(self, error: RuntimeError, pos: int) -> None:
        """Find the undecodable files among those the pipeline failing at batch `pos` may have
        been reading and swap them for the placeholder; re-raise `error` when it is not a
        decoding error, when no such file is found or when one cannot even be read (a
        file-system fault), and raise UnreadableImagesError when more than half a batch fails."""
        if not is_decoder_error(error):
            raise error
        files, _ = self._epoch_lists()
        lo = self._shard_start() + pos * self.batch_size
        hi = lo + (PREFETCH + 2) * self.batch_size
        shard_end = self._shard_start() + self.num_samples
        window = files[lo:min(hi, shard_end)]  # whole batches from `pos` on
        candidates = sorted(set(window) - {self._placeholder})
        lines = [ln.strip() for ln in str(error).splitlines() if "failure" in ln or "Error in" in ln]
        log.warning("DALI pipeline failed (%s); looking for undecodable files among %d candidates",
                    " ".join(lines)[:300] or type(error).__name__, len(candidates))
        bad = find_undecodable(candidates, train=self.train, augmentation=self.augmentation,
                               num_threads=self.num_threads)
        if not bad:
            raise error
        for path in bad:
            try:
                with open(path, "rb") as f:
                    f.read()
            except OSError as read_error:
                raise error from read_error
        bad_set = set(bad)
        for start in range(0, len(window), self.batch_size):  # the share is per batch, as in torchvision
            check_bad_share([f for f in window[start:start + self.batch_size] if f in bad_set], self.batch_size)
        self._replace(bad)
        for path in bad:
            self._note_bad(path, "DALI could not decode it")

    def _replace(self, paths: list[str]) -> None:
        if self._placeholder is None:
            self._placeholder = _placeholder_jpeg(self, self.size)
        replace = set(paths)
        self.files = [self._placeholder if f in replace else f for f in self.files]

    def _shard_start(self) -> int:
        if self.train:
            return self.rank * self.num_samples
        return val_range(len(self.files), rank=self.rank, world_size=self.world_size).start

    # -- resumable state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._consumed > 0 and self._it is not None:
            # the checkpoint of the last batch handed out (the iterator keeps one per output)
            state["dali_checkpoint"] = self._it.checkpoints()[0]
        else:
            state["dali_checkpoint"] = self._checkpoint if self._consumed > 0 and self._checkpoint else ""
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # also restores bad_files
        ckpt = state.get("dali_checkpoint") if state.get("backend") == self.backend else None
        self._checkpoint = ckpt or None
        self._it = None
        known = [p for p in self.bad_files if p in self.files]
        if known:
            self._replace(known)
