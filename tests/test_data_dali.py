"""The DALI pipeline's GPU decoder settings and output layout, checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ran_bench import data
from ran_bench.data import build_loader, list_samples
from ran_bench.data.dali import (
    DEVICE_MEMORY_PADDING,
    HOST_MEMORY_PADDING,
    HW_DECODER_LOAD,
    HW_POOL_BYTES,
    LARGEST_IMAGE,
    build_pipeline,
    decoder_kwargs,
)
from ran_bench.data.demo import make_demo

pytestmark = pytest.mark.skipif(not data.dali_available(), reason="NVIDIA DALI is not installed")
GPU_ARGS = {"hw_decoder_load", "device_memory_padding", "host_memory_padding", "preallocate_width_hint",
            "preallocate_height_hint"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali") / "d"
    make_demo(root, seed=2, num_classes=2, train_per_class=4, val_per_class=3, min_side=40, max_side=64)
    return root


def test_mixed_decoder_gets_the_hardware_share_and_the_preallocation_hints():
    kw = decoder_kwargs("mixed", 16)
    assert kw == dict(hw_decoder_load=HW_DECODER_LOAD, device_memory_padding=DEVICE_MEMORY_PADDING,
                      host_memory_padding=HOST_MEMORY_PADDING, preallocate_width_hint=LARGEST_IMAGE[0],
                      preallocate_height_hint=LARGEST_IMAGE[1])
    assert 0.9 <= kw["hw_decoder_load"] <= 1.0
    # every name is an argument of both decoder ops, so a typo cannot wait for a GPU to show up
    from nvidia.dali import backend

    for op in ("decoders__ImageRandomCrop", "decoders__Image"):
        schema = backend.GetSchema(op)
        assert all(schema.HasArgument(name) for name in kw), op


def test_hardware_pool_hint_shrinks_with_the_batch_and_keeps_the_aspect_ratio():
    big = decoder_kwargs("mixed", 256)
    w, h = big["preallocate_width_hint"], big["preallocate_height_hint"]
    assert 256 * w * h * 3 <= HW_POOL_BYTES < 256 * (w + 2) * (h + 2) * 3
    assert w / h == pytest.approx(LARGEST_IMAGE[0] / LARGEST_IMAGE[1], rel=1e-3)
    assert decoder_kwargs("mixed", 1)["preallocate_width_hint"] == LARGEST_IMAGE[0]


def test_cpu_decoder_gets_none_of_the_gpu_arguments():
    assert decoder_kwargs("cpu", 128) == {}
    with pytest.raises(ValueError, match="mixed"):
        decoder_kwargs("gpu", 128)


@pytest.mark.parametrize("train", [True, False])
def test_cpu_pipeline_is_built_without_gpu_arguments_and_emits_nhwc_for_channels_last(demo, train):
    files, labels, _ = list_samples(demo, "train" if train else "val")
    for channels_last, layout in ((True, "HWC"), (False, "CHW")):
        pipe = build_pipeline(files, labels, train=train, size=32, batch_size=4, shard_id=0, num_shards=1,
                              num_threads=1, seed=0, device_id=None, channels_last=channels_last, fp16=False)
        serialized = pipe.serialize()
        assert not any(name.encode() in serialized for name in GPU_ARGS)
        images, _ = pipe.run()
        assert images.layout() == layout
        assert images.as_tensor().shape() == ([4, 32, 32, 3] if channels_last else [4, 3, 32, 32])
        del pipe


def test_channels_last_batch_is_the_nhwc_buffer_seen_as_nchw(demo):
    ld = build_loader(demo, "val", size=32, batch_size=4, backend="dali", num_threads=1, channels_last=True)
    x, _ = next(iter(ld))
    assert x.shape == (4, 3, 32, 32)
    assert x.stride() == (32 * 32 * 3, 1, 32 * 3, 3)  # NHWC storage: no transposed copy was made
    assert x.is_contiguous(memory_format=torch.channels_last)
