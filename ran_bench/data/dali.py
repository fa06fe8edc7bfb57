"""The DALI backend: NVIDIA DALI decodes and augments (GPU `mixed` decoding when CUDA is there).

augmentation "imagenet": train = `decoders.image_random_crop` (area 0.08-1, aspect ratio
3/4-4/3, the paper's scale and aspect augmentation), resize to `size`, random horizontal flip;
val = decode, resize the shorter side to `size / 0.875`, centre crop. augmentation "cifar":
decode, resize the shorter side to `size`, centre crop (the identity for 32x32 images); train
then takes a `size` x `size` window shifted by -4..4 pixels with black outside the image (= 4-pixel
zero padding + random crop) and flips at random. Both normalise with the ImageNet mean/std in
`crop_mirror_normalize`, in float32 or float16 (bfloat16 is converted from float32 on the device,
DALI has no bfloat16 output), NCHW or NHWC (channels_last): with channels_last DALI writes NHWC and
the batch is that buffer seen as a channels_last NCHW tensor, with no transpose.

GPU decoding (`decoder_kwargs("mixed", batch_size)`): the share of JPEGs sent to the hardware
decoder (`hw_decoder_load`, as NVIDIA's MLPerf ResNet-50 configs for H100 set it) and the memory
pre-allocation hints production pipelines set: nvJPEG's per-thread device and host buffers sized
for the largest ImageNet image (NVIDIA's DeepLearningExamples values), and the hardware decoder's
batch pool sized for that image too (MLPerf's width/height hints), scaled down when the batch would
make the pool larger than HW_POOL_BYTES. Without the hints nvJPEG reallocates as larger images
arrive and GPU memory grows (DALI issues 486, 1434, 4295). These arguments apply to the `mixed`
decoder only and are not passed to the CPU one.

Sharding: the training reader gets the epoch's file list (`ran_bench.data.sampling`: the same
order the torchvision backend reads) with `shard_id` = global rank and `num_shards` = world size,
cut so all shards are equal and whole batches. The validation reader gets only this rank's slice
(`val_range`; DALI's reader refuses more shards than files, and a rank may have none), pads the
last batch and `LastBatchPolicy.PARTIAL` drops the padding, so every image counts once.

Resuming: pipelines are built with `enable_checkpointing=True`; `state_dict()` asks the
iterator for its checkpoint (reader position and every random generator) of the last batch
handed out, and a loader that loads it rebuilds the pipeline from it, so the next batch has the
same images and the same crops as the uninterrupted run. A state without a DALI checkpoint (saved
by the torchvision backend) is reached by running the pipeline up to its position.

Unreadable files. Measured with DALI 2.4 on the CPU pipeline: DALI's decoders crash the process
(segfault, in about half of the runs) on a file whose header they cannot parse (a text file, a
GIF, an empty file, random bytes), while `fn.peek_image_shape` raises a clean `RuntimeError` for
all of them; so every decoder's input is made to depend on peek's output (`_checked`), and no
header reaches a decoder unparsed. A file truncated after its header passes peek and makes the
decoder raise. Neither error names the file reliably, and the pipeline declares itself invalid.
The reader reads with plain file I/O (`dont_use_mmap`): an empty file then reaches peek like any
other bad image, instead of failing the reader's memory mapping; a file that cannot be read fails
in `nvidia.dali.fn.readers.file`. Grayscale and CMYK JPEGs decode to RGB and a PNG named .JPEG
decodes (the decoder sniffs the format). Checking every file up front would cost a full decode
of the data set per run, so instead, only for a peek or decoder failure: the candidate files
(the batches the pipeline may have had in flight) are bisected with small CPU pipelines of the
same ops (and a full decode, since a random crop can miss the broken part of a file) to find the
broken ones; each must still be readable from Python (else UnreadableFileError: a file-system
fault, not a bad image); they are replaced in the file list by a flat mean-colour JPEG (zero
after normalisation, same label), and the pipeline is rebuilt from the last recovery checkpoint.
The file is logged and listed in `loader.bad_files`. A reader error raises UnreadableFileError
naming the file, and more than half a batch of undecodable files raises UnreadableImagesError.
A failed pipeline is freed at once (the error's traceback frames are cleared): left in a
reference cycle, it could be garbage-collected in a process forked later (a torchvision
DataLoader worker), where DALI's destructor deadlocks.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ran_bench.data.folder import MEAN_255, STD_255
from ran_bench.data.sampling import (
    LoaderBase,
    UnreadableFileError,
    check_bad_share,
    read_fault,
    train_order,
    train_per_rank,
    val_range,
)
from ran_bench.data.torchvision_loader import CIFAR_PAD, RATIO, SCALE, val_resize_size

log = logging.getLogger("ran_bench.data")

READER = "Reader"
PREFETCH = 2  # DALI's default prefetch_queue_depth
# Batches between the checkpoints that a failed pipeline is rebuilt from: at most this many good
# batches are decoded again after an unreadable file, and `checkpoints()` (whose cost the DALI
# docs warn about) is not called after every batch.
RECOVERY_EVERY = 32
# How DALI names the ops that parse image bytes in its error messages.
IMAGE_OPS = ("nvidia.dali.fn.decoders.", "nvidia.dali.fn.peek_image_shape")

# GPU (`mixed`) decoder settings, see the module docstring.
HW_DECODER_LOAD = 0.99  # NVIDIA's MLPerf ResNet-50 on H100; DALI's default is 0.65
DEVICE_MEMORY_PADDING = 211_025_920  # bytes per decoding thread, on the GPU
HOST_MEMORY_PADDING = 140_544_512  # bytes per pinned host buffer (two per decoding thread)
LARGEST_IMAGE = (5980, 6430)  # width, height hints: the largest ImageNet image (MLPerf's hints)
HW_POOL_BYTES = 2 << 30  # cap of the hardware decoder's pool: batch x width x height x 3 bytes


def _placeholder_jpeg(owner: object, size: int) -> str:
    """A flat mean-colour JPEG that stands in for an unreadable file, deleted with `owner`."""
    d = tempfile.mkdtemp(prefix="ran_bench_dali_")
    path = Path(d) / "placeholder.JPEG"
    Image.new("RGB", (size, size), tuple(round(m) for m in MEAN_255)).save(path, "JPEG", quality=95)
    weakref.finalize(owner, shutil.rmtree, d, True)
    return str(path)


def _read(files: list[str], **kwargs):
    """`fn.readers.file` with plain file I/O, so an empty file is a bad image, not a reader error."""
    from nvidia.dali import fn

    return fn.readers.file(files=files, random_shuffle=False, dont_use_mmap=True, **kwargs)


def _checked(jpegs):
    """`jpegs` passed on only once `fn.peek_image_shape` has parsed every header of the batch: a
    reshape to their own shape plus 0 x the peeked height makes the decoder wait for peek, which
    raises cleanly where DALI 2.4's decoders can crash the process (see the module docstring)."""
    from nvidia.dali import fn

    height = fn.peek_image_shape(jpegs)[0]
    return fn.reshape(jpegs, shape=jpegs.shape() + height * 0)


def decoder_kwargs(device: str, batch_size: int) -> dict[str, int | float]:
    """The decoder's tuning arguments for `device` "mixed" (GPU) or "cpu" (none: DALI documents
    them as applying to the mixed backend only). The hardware decoder's size hints are the largest
    ImageNet image, shrunk (same aspect ratio) so that `batch_size` such images fit HW_POOL_BYTES."""
    if device == "cpu":
        return {}
    if device != "mixed":
        raise ValueError(f"DALI decoders run on 'mixed' or 'cpu', not {device!r}")
    width, height = LARGEST_IMAGE
    scale = min(1.0, (HW_POOL_BYTES / (3 * max(batch_size, 1) * width * height)) ** 0.5)
    return dict(hw_decoder_load=HW_DECODER_LOAD, device_memory_padding=DEVICE_MEMORY_PADDING,
                host_memory_padding=HOST_MEMORY_PADDING, preallocate_width_hint=int(width * scale),
                preallocate_height_hint=int(height * scale))


def _decode(jpegs, *, train: bool, augmentation: str, device: str, batch_size: int = 1):
    """The pipeline's decoder op on `_checked` bytes: a random-crop decoder for ImageNet
    training, a full decode otherwise. Shared with `find_undecodable`, which must test files with
    the same op."""
    from nvidia.dali import fn, types

    tuning = decoder_kwargs(device, batch_size)
    if train and augmentation == "imagenet":
        return fn.decoders.image_random_crop(
            jpegs, device=device, output_type=types.RGB, random_area=list(SCALE),
            random_aspect_ratio=list(RATIO), num_attempts=100, **tuning)
    return fn.decoders.image(jpegs, device=device, output_type=types.RGB, **tuning)


def output_layout(channels_last: bool) -> str:
    """`crop_mirror_normalize`'s layout: HWC for a channels_last model (the NHWC batch is used as
    is), else CHW."""
    return "HWC" if channels_last else "CHW"


def build_pipeline(files: list[str], labels: list[int], *, train: bool, size: int, batch_size: int,
                   shard_id: int, num_shards: int, num_threads: int, seed: int, device_id: int | None,
                   channels_last: bool, fp16: bool, augmentation: str = "imagenet",
                   checkpoint: str | None = None):
    """The built DALI pipeline of a loader: (images, labels) batches, decoded on GPU `device_id`
    (`mixed`) or on the CPU (None), laid out as `output_layout(channels_last)`."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, label = _read(files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                             stick_to_shard=True, pad_last_batch=not train, name=READER)
        # peek and reshape run on the CPU bytes in both cases; only the decoder is mixed
        images = _decode(_checked(jpegs), train=train, augmentation=augmentation, device="mixed" if gpu else "cpu",
                         batch_size=batch_size)
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
            output_layout=output_layout(channels_last), crop=(size, size),
            crop_pos_x=0.5, crop_pos_y=0.5, mean=list(MEAN_255), std=list(STD_255), mirror=mirror)
        if gpu:
            label = label.gpu()
        return images, label

    pipe = pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=PREFETCH, checkpoint=checkpoint)
    pipe.build()
    return pipe


def dali_version() -> str:
    """The installed DALI's version (DALI is imported only when a pipeline is needed)."""
    from nvidia.dali import __version__

    return __version__


def is_decoder_error(error: BaseException) -> bool:
    """True when a DALI pipeline error comes from parsing or decoding an image (not from reading
    a file)."""
    return any(op in str(error) for op in IMAGE_OPS)


def reader_fault(error: BaseException, paths: list[str]) -> UnreadableFileError | None:
    """The UnreadableFileError behind a DALI reader `error` among `paths`: the first one Python
    cannot read either, else the one DALI's message names (with DALI's words as the cause)."""
    for path in paths:
        fault = read_fault(path)
        if fault is not None:
            return fault
    lines = [ln.strip() for ln in str(error).splitlines()]
    for path in paths:
        named = [ln for ln in lines if path in ln]
        if named:
            return UnreadableFileError(path, f"DALI's reader: {named[0]}")
    return None


def find_undecodable(paths: list[str], *, train: bool = False, augmentation: str = "imagenet",
                     num_threads: int = 1) -> list[str]:
    """The files among `paths` that the loader's decoder cannot decode, found by bisection with
    small CPU pipelines. A file counts as undecodable when `fn.peek_image_shape` or the
    pipeline's decoder op fails on it, or a full decode does (a random crop can miss the broken
    part of a truncated file). A file that cannot be read raises UnreadableFileError."""
    from nvidia.dali import fn, pipeline_def, types

    def decodes(part: list[str]) -> bool:
        bs = min(len(part), 32)

        @pipeline_def(batch_size=bs, num_threads=num_threads, device_id=None, seed=0)
        def probe():
            data, _ = _read(part, pad_last_batch=True)
            data = _checked(data)
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
            traceback.clear_frames(e.__traceback__)  # `del pipe` then frees it, see the module docstring
            if not is_decoder_error(e):
                fault = reader_fault(e, part)
                if fault is None:
                    raise
                raise fault from e
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
        decoder = f"GPU {self.device_id} (mixed: {decoder_kwargs('mixed', batch_size)})" \
            if self.device_id is not None else "CPU"
        log.info("DALI %s %s loader: decoding on %s, %s output", dali_version(), split, decoder,
                 output_layout(channels_last))
        self._checkpoint: str | None = None  # DALI checkpoint of a pending resume
        self._it = None  # the iterator of the current pass, asked for its checkpoint by state_dict
        self._placeholder: str | None = None

    # -- the epoch's file list and pipeline ------------------------------------------------------
    def _reader_lists(self) -> tuple[list[str], list[int], int, int, int]:
        """(files, labels, shard_id, num_shards) of the reader and the position of this rank's
        first sample in `files`."""
        if self.train:
            order = train_order(len(self.files), world_size=self.world_size, seed=self.seed,
                                epoch=self.epoch, batch_size=self.batch_size)
            return ([self.files[i] for i in order], [self.labels[i] for i in order], self.rank,
                    self.world_size, self.rank * self.num_samples)
        mine = val_range(len(self.files), rank=self.rank, world_size=self.world_size)
        return self.files[mine.start:mine.stop], self.labels[mine.start:mine.stop], 0, 1, 0

    def _pipeline_seed(self) -> int:
        # Different crops per epoch and per rank, reproducible from the loader's seed.
        return (self.seed * 1_000_003 + self.epoch * 1009 + self.rank) % (1 << 31)

    def _iterator(self, checkpoint: str | None):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        files, labels, shard_id, num_shards, _ = self._reader_lists()
        pipe = build_pipeline(
            files, labels, train=self.train, size=self.size, batch_size=self.batch_size,
            shard_id=shard_id, num_shards=num_shards, num_threads=self.num_threads,
            seed=self._pipeline_seed(), device_id=self.device_id, channels_last=self.channels_last,
            fp16=self.dtype == torch.float16, augmentation=self.augmentation, checkpoint=checkpoint)
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                   last_batch_policy=policy, auto_reset=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._begin()
        if start >= len(self):  # resumed at the end of the epoch, or an empty validation shard
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
                traceback.clear_frames(e.__traceback__)  # frees the failed pipeline now, see the module docstring
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
        been reading and swap them for the placeholder. Raise UnreadableFileError for a file that
        cannot be read (a reader error, or an undecodable file that Python cannot read either: a
        file-system fault), UnreadableImagesError when more than half a batch fails, and `error`
        itself when it is neither a reader nor a decoding error of these files."""
        files, _, _, _, first = self._reader_lists()
        lo = first + pos * self.batch_size
        hi = lo + (PREFETCH + 2) * self.batch_size
        window = files[lo:min(hi, first + self.num_samples)]  # whole batches from `pos` on
        candidates = sorted(set(window) - {self._placeholder})
        if not is_decoder_error(error):
            fault = reader_fault(error, candidates)
            if fault is None:
                raise error
            raise fault from error
        lines = [ln.strip() for ln in str(error).splitlines() if "failure" in ln or "Error in" in ln]
        log.warning("DALI pipeline failed (%s); looking for undecodable files among %d candidates",
                    " ".join(lines)[:300] or type(error).__name__, len(candidates))
        bad = find_undecodable(candidates, train=self.train, augmentation=self.augmentation,
                               num_threads=self.num_threads)
        if not bad:
            raise error
        for path in bad:  # e.g. an I/O error that DALI's reader returned as empty bytes
            fault = read_fault(path)
            if fault is not None:
                raise fault from error
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
