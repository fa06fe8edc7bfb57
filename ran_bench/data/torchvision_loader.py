"""The torchvision backend: PIL decoding in DataLoader worker processes.

Same semantics as the DALI pipeline (see `ran_bench.data.dali`). augmentation "imagenet":
train = random-resized crop (area 0.08-1, aspect ratio 3/4-4/3) resized to `size` + random
horizontal flip; val = resize the shorter side to `size / 0.875` + centre crop. augmentation
"cifar" (the paper's CIFAR recipe): resize the shorter side to `size` + centre crop (the
identity for 32x32 images); train then pads 4 black pixels on every side, takes a random
`size` x `size` crop and flips at random. Both normalise with the ImageNet mean/std. Workers
return uint8 images; conversion, normalisation, dtype and memory format happen on `device`
(4x less to copy and the GPU does the arithmetic).

Augmentation randomness is a function of (seed, epoch, sample index), not of worker timing, so
a resumed epoch sees the same crops as the uninterrupted one.

Unreadable files: an image whose bytes cannot be decoded (truncated, corrupt, not an image)
becomes a flat mean-colour image and is listed in `loader.bad_files`; a file that cannot be
*read* (missing, no permission, I/O error) raises UnreadableFileError, since that is a file-system
fault and not a bad image, and so does a batch in which most images fail to decode.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as F

from ran_bench.data.folder import MEAN_255, STD_255
from ran_bench.data.sampling import (
    LoaderBase,
    UnreadableFileError,
    check_bad_share,
    train_indices,
    train_per_rank,
    val_range,
)
from ran_bench.preemption import ignore_stop_signals, starting_workers

log = logging.getLogger("ran_bench.data")

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_FRACTION = 0.875
CIFAR_PAD = 4  # pixels of black padding on every side before the CIFAR random crop


def val_resize_size(size: int) -> int:
    """Shorter side before the centre crop: size / 0.875 (256 for 224)."""
    return int(size / CROP_FRACTION + 0.5)


def val_geometry(height: int, width: int, size: int, short: int | None = None) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of resizing the shorter side to
    `short` (default `val_resize_size(size)`) and centre-cropping `size` x `size`, with DALI's
    rounding (`resize_shorter`, then a centred crop), so both backends crop the same pixels."""
    short = val_resize_size(size) if short is None else short
    if height <= width:
        rh, rw = short, max(1, int(width * short / height + 0.5))
    else:
        rh, rw = max(1, int(height * short / width + 0.5)), short
    return rh, rw, int((rh - size) * 0.5 + 0.5), int((rw - size) * 0.5 + 0.5)


def val_crop(img: Image.Image, size: int, augmentation: str = "imagenet") -> Image.Image:
    """The validation transform: the shorter side to size / 0.875 (to `size` for the CIFAR recipe,
    which tests the native image), bilinear, and a centre `size` x `size` crop."""
    rh, rw, top, left = val_geometry(img.height, img.width, size, short=size if augmentation == "cifar" else None)
    img = F.resize(img, [rh, rw], interpolation=F.InterpolationMode.BILINEAR)  # PIL: no-op at rh x rw
    return F.crop(img, top, left, size, size)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (3xHxW or Nx3xHxW) to float32 normalised by the ImageNet mean/std, what the loaders yield."""
    mean = torch.tensor(MEAN_255, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD_255, device=images.device).view(3, 1, 1)
    return images.float().sub_(mean).div_(std)


def _aug_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (1 << 63)


class ImageFiles(Dataset):
    """Decodes `files[i]` to a 3-channel uint8 CHW tensor with the train or val transform.

    Keys are `(index, aug_seed)`. Returns `(image, label, index, ok, read_error)`; a file whose
    bytes do not decode gives a flat mean-colour image (zero after normalisation) with its label
    and `ok=False`, so one bad file costs one meaningless sample instead of the run. A file that
    cannot be read gives the same with `read_error` = the cause, which the loader raises as
    UnreadableFileError (a worker's own exception would reach the user as a multi-line traceback).
    """

    def __init__(self, files: list[str], labels: list[int], size: int, train: bool,
                 augmentation: str = "imagenet"):
        self.files = files
        self.labels = labels
        self.size = size
        self.train = train
        self.cifar = augmentation == "cifar"

    def __len__(self) -> int:
        return len(self.files)

    def _transform(self, img: Image.Image, aug_seed: int) -> torch.Tensor:
        size = self.size
        if not self.train:
            return F.pil_to_tensor(val_crop(img, size, "cifar" if self.cifar else "imagenet"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            if self.cifar:
                dy, dx = torch.randint(0, 2 * CIFAR_PAD + 1, (2,)).tolist()
            else:
                top, left, h, w = RandomResizedCrop.get_params(img, SCALE, RATIO)
            flip = bool(torch.rand(1) < 0.5)
        if self.cifar:
            # the native image, then = pad CIFAR_PAD zeros on every side and crop at (dy, dx): F.crop pads with 0
            img = F.crop(val_crop(img, size, "cifar"), dy - CIFAR_PAD, dx - CIFAR_PAD, size, size)
        else:
            img = F.resized_crop(img, top, left, h, w, [size, size], interpolation=F.InterpolationMode.BILINEAR)
        if flip:
            img = F.hflip(img)
        return F.pil_to_tensor(img)

    def __getitem__(self, key: tuple[int, int]):
        index, aug_seed = key
        try:
            with open(self.files[index], "rb") as f:
                data = f.read()
        except OSError as e:  # returned, not raised: the main process raises one clean error for it
            return self._flat(), self.labels[index], index, False, e.strerror or str(e)
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")  # grayscale, CMYK, palette and RGBA all become RGB
        except Exception as e:  # noqa: BLE001
            # The bytes are already in memory, so whatever PIL raises here is about the image, not
            # the file system: truncated data, a corrupt header, or a header claiming a size past
            # PIL's DecompressionBombError limit (a plain Exception, not an OSError).
            log.debug("cannot decode %s: %s", self.files[index], e)
            return self._flat(), self.labels[index], index, False, ""
        return self._transform(img, aug_seed), self.labels[index], index, True, ""

    def _flat(self) -> torch.Tensor:
        out = torch.tensor([round(m) for m in MEAN_255], dtype=torch.uint8).view(3, 1, 1)
        return out.expand(3, self.size, self.size).contiguous()


class _KeySampler(Sampler):
    """Yields `(index, aug_seed)` for the loader's current epoch, from its start position."""

    def __init__(self, loader: TorchvisionLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader._epoch_indices()) - self.loader._start_sample

    def __iter__(self) -> Iterator[tuple[int, int]]:
        ld = self.loader
        for i in ld._epoch_indices()[ld._start_sample:]:
            yield i, _aug_seed(ld.seed, ld.epoch, i)


class TorchvisionLoader(LoaderBase):
    """`build_loader(..., backend="torchvision")`; see `ran_bench.data.build_loader`."""

    backend = "torchvision"

    def __init__(self, files: list[str], labels: list[int], *, split: str, size: int, batch_size: int,
                 rank: int, world_size: int, num_threads: int, seed: int, channels_last: bool,
                 dtype: torch.dtype, device: torch.device, augmentation: str = "imagenet"):
        n = len(files)
        self._n = n
        if split == "train":
            num_samples = train_per_rank(n, world_size=world_size, batch_size=batch_size)
        else:
            num_samples = len(val_range(n, rank=rank, world_size=world_size))
        super().__init__(split=split, num_samples=num_samples, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        self.files = files
        self.size = size
        self.channels_last = channels_last
        self.dtype = dtype
        self.device = torch.device(device)
        self._start_sample = 0
        self._mean = torch.tensor(MEAN_255, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_255, device=self.device).view(1, 3, 1, 1)
        self._loader = DataLoader(
            ImageFiles(files, labels, size, self.train, augmentation), batch_size=batch_size,
            sampler=_KeySampler(self), num_workers=num_threads, drop_last=self.train,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if num_threads > 0 else None, worker_init_fn=ignore_stop_signals)

    def _epoch_indices(self) -> list[int] | range:
        if self.train:
            return train_indices(self._n, rank=self.rank, world_size=self.world_size, seed=self.seed,
                                 epoch=self.epoch, batch_size=self.batch_size)
        return val_range(self._n, rank=self.rank, world_size=self.world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._begin()
        self._start_sample = start * self.batch_size
        with starting_workers():  # the workers start here
            batches = iter(self._loader)
        for images, labels, index, ok, read_errors in batches:
            for i, cause in zip(index.tolist(), read_errors):
                if cause:
                    raise UnreadableFileError(self.files[i], cause)
            if not bool(ok.all()):
                bad = [self.files[i] for i in index[~ok].tolist()]
                check_bad_share(bad, self.batch_size)
                for path in bad:
                    self._note_bad(path, "PIL could not decode it")
            # One pass converts the uint8 batch to float and, for channels_last, to NHWC; the in-place
            # normalisation and the dtype cast keep that layout (no second copy of the batch).
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            images = images.to(self.device, non_blocking=True).to(torch.float32, memory_format=layout)
            images = images.sub_(self._mean).div_(self._std).to(self.dtype)
            self._consumed += 1
            yield images, labels.to(self.device, non_blocking=True)
