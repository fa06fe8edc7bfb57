"""The synthetic backend: one batch of random tensors made once on the device, for measuring
model throughput without any input pipeline in the way."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ran_bench.data.sampling import LoaderBase


class SyntheticLoader(LoaderBase):
    """`num_samples` random images per epoch for this rank (the same batch every step)."""

    backend = "synthetic"

    def __init__(self, *, split: str, size: int, batch_size: int, num_samples: int, num_classes: int,
                 rank: int, world_size: int, seed: int, channels_last: bool, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(split=split, num_samples=num_samples, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed)
        device = torch.device(device)
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        images = torch.randn(batch_size, 3, size, size, generator=g).to(device=device, dtype=dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.images = images
        self.labels = torch.randint(num_classes, (batch_size,), generator=g).to(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._begin()
        for i in range(start, len(self)):
            n = min(self.batch_size, self.num_samples - i * self.batch_size)
            self._consumed += 1
            yield (self.images, self.labels) if n == self.batch_size else (self.images[:n], self.labels[:n])
