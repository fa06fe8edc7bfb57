"""The unfused roofline (`ran-bench profile --roofline`): counts against a hand-computed tiny network,
the per-op roofline formula, the byte rules, the SGD step, the CLI and Attention-92 at 224."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn as nn

from ran_bench.cli import main as cli_main
from ran_bench.models import count_params
from ran_bench.roofline import DEVICES, DeviceSpec, OpCost, OpCounter, roofline, summarize

UNIT = DeviceSpec("unit", peak_tflops=1.0, bandwidth_tbs=1.0, source="test")  # 1e12 FLOP/s, 1e12 B/s


def tiny_net() -> nn.Module:
    """conv 3x3 (3 -> 4, no bias) -> BatchNorm(4) -> ReLU -> global average pool -> Linear(4 -> 5),
    on the meta device, channels_last as the trainer makes it."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    return net.to(memory_format=torch.channels_last)


# The tiny net on a batch of N = 2 images 3x8x8 (fp32, as the loader gives them), by hand.
# Sizes: x = 2*3*8*8 = 384 elements; conv weight w = 4*3*3*3 = 108; feature map y = 2*4*8*8 = 512;
# BN statistics c = 4; pooled p = 2*4 = 8; fc weight 5*4 = 20, bias 5; logits 2*5 = 10; labels 2 (int64).
# bf16 = 2 bytes, fp32 = 4, int64 = 8. Bytes = inputs + outputs; an in-place argument is read and written.
CONV_FLOPS = 2 * 2 * 4 * 8 * 8 * (3 * 3 * 3)  # 2 * N * Cout * H * W * (Cin * 3 * 3) = 27,648 per pass
HAND = {
    "convolution": (
        CONV_FLOPS * 2,  # forward + weight gradient (the images need no gradient)
        (384 * 2 + 108 * 2 + 512 * 2)  # forward: x, w in bf16, y out = 2,008
        + (512 * 2 + 384 * 2 + 108 * 2 + 108 * 2),  # backward: dy, x, w in, dw out = 2,224
    ),
    "matmul": (
        3 * (2 * 2 * 4 * 5),  # addmm forward, mm for the input gradient, mm for the weight gradient: 80 each
        (5 * 2 + 8 * 2 + 20 * 2 + 10 * 2)  # addmm: bias, p, w^T in, logits out = 86
        + (10 * 2 + 20 * 2 + 8 * 2)  # dp = dlogits @ w = 76
        + (8 * 2 + 10 * 2 + 20 * 2),  # dw^T = p^T @ dlogits = 76
    ),
    "batch norm": (
        0,
        (512 * 2 + 4 * 4 * 2 + 4 * 4 * 2 * 2)  # forward: y, weight, bias in; running mean/var read and written
        + (512 * 2 + 4 * 4 * 2)  # ... out: normalised y, saved mean and inverse std = 2,176
        + (512 * 2 * 2 + 4 * 4 * 5)  # backward: dy, y, weight, running mean/var, saved mean/invstd in
        + (512 * 2 + 4 * 4 * 2),  # ... out: dy, dweight, dbias = 3,184
    ),
    "elementwise": (
        0,
        (384 * 4 + 384 * 2)  # autocast: images fp32 -> bf16 = 2,304
        + (108 * 4 + 108 * 2) + (20 * 4 + 20 * 2) + (5 * 4 + 5 * 2)  # conv and fc weights, fc bias -> bf16
        + 8 * 2  # num_batches_tracked += 1 (int64, read and written)
        + 512 * 2 * 2  # relu: in, out
        + (10 * 2 + 10 * 4)  # autocast: logits bf16 -> fp32 for the loss
        + 4  # ones_like: the loss gradient seed (written, not read)
        + (10 * 4 + 10 * 2)  # dlogits fp32 -> bf16 (the cast's backward)
        + (10 * 2 + 5 * 2)  # fc bias gradient: sum of dlogits over the batch
        + (5 * 2 + 5 * 4) + (20 * 2 + 20 * 4) + (108 * 2 + 108 * 4)  # weight gradients bf16 -> fp32
        + 512 * 2 * 3,  # threshold_backward: dy, relu output in, dy out
    ),
    "pooling/upsampling": (
        0,
        (512 * 2 + 8 * 2)  # mean over H, W: y in, p out = 1,040
        + (8 * 2 + 512 * 2),  # its backward: dp expanded (stored once) / 64 -> dy = 1,040
    ),
    "loss/other": (
        0,
        (10 * 4 * 2)  # log_softmax: in, out
        + (10 * 4 + 2 * 8 + 4 + 4)  # nll_loss: log-probabilities, labels in; loss, total weight out
        + (4 + 10 * 4 + 2 * 8 + 4 + 10 * 4)  # nll_loss backward: dloss, log-probabilities, labels, total weight; out
        + (10 * 4 * 3),  # log_softmax backward: dlogp, output in, dlogits out
    ),
    # SGD, foreach, steady state, on P = 108 + 4 + 4 + 20 + 5 = 141 fp32 parameters:
    # g' = g + wd * w (reads 2P, writes P); buf *= momentum (P, P); buf += g' (2P, P);
    # g' += momentum * buf (2P, P); w -= lr * g' (2P, P): 14 P elements of 4 bytes.
    "optimizer": (0, 14 * 141 * 4),
}


@pytest.fixture(scope="module")
def tiny_roofline():
    return roofline(tiny_net(), size=8, batch=2, device=UNIT)


def test_tiny_network_matches_hand_counts(tiny_roofline) -> None:
    counted = {k.kind: (k.flops, k.bytes) for k in tiny_roofline.kinds}
    assert counted == HAND
    assert tiny_roofline.flops == 55_296 + 240


def test_optimizer_kind_is_the_sgd_update(tiny_roofline) -> None:
    """14 fp32 element accesses per parameter per step, whatever the batch: shared by its images."""
    net = tiny_net()
    optimizer = next(k for k in tiny_roofline.kinds if k.kind == "optimizer")
    assert optimizer.bytes == 14 * 4 * count_params(net)
    larger = roofline(net, size=8, batch=6, device=UNIT)
    assert next(k.bytes for k in larger.kinds if k.kind == "optimizer") == optimizer.bytes
    assert next(k.bytes for k in larger.kinds if k.kind == "batch norm") > next(
        k.bytes for k in tiny_roofline.kinds if k.kind == "batch norm")


def test_grouped_convolution_weight_gradient_costs_its_forward() -> None:
    """torch's backward formula counts a grouped convolution's weight gradient `groups` times."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    r = roofline(net.to(memory_format=torch.channels_last), size=8, batch=2, device=UNIT)
    pointwise = 2 * 2 * 4 * 8 * 8 * 3  # 2 * N * Cout * H * W * Cin = 3,072; forward + weight gradient
    grouped = 2 * 2 * 4 * 8 * 8 * (2 * 3 * 3)  # Cin per group = 2: 18,432; forward + input and weight gradients
    assert next(k.flops for k in r.kinds if k.kind == "convolution") == 2 * pointwise + 3 * grouped


def test_roofline_sums_the_max_of_each_op() -> None:
    """One compute-bound op (4 s of FLOPs, 1 s of bytes) and one memory-bound op (1 s, 3 s) on a
    1 TFLOP/s, 1 TB/s device: 4 + 3 = 7 s; the aggregate max(5, 4) = 5 s or the sum 9 s are wrong."""
    ops = [OpCost("aten.convolution", "convolution", flops=4 * 10**12, bytes=10**12),
           OpCost("aten.add", "elementwise", flops=10**12, bytes=3 * 10**12)]
    r = summarize(ops, batch=14, device=UNIT)
    assert r.seconds == pytest.approx(7.0)
    assert r.images_per_s == pytest.approx(14 / 7)
    assert {k.kind: k.seconds for k in r.kinds} == pytest.approx({"convolution": 4.0, "elementwise": 3.0})
    assert r.memory_bound_share == pytest.approx(3 / 7)
    assert [op.op for op in r.top_ops] == ["aten.add", "aten.convolution"]  # by bytes
    assert r.top_ops[0].share == pytest.approx(0.75)


def test_views_move_no_bytes() -> None:
    x = torch.empty(4, 6, device="meta", dtype=torch.bfloat16)
    with OpCounter() as counter:
        x.view(24).t()
        x.t().expand(2, 6, 4)
        x.detach()
        x.unsqueeze(0).as_strided_((6, 4), (1, 6))
        x.clone()
    assert [(op.op, op.bytes) for op in counter.ops] == [("aten.clone", 24 * 2 * 2)]


def test_expanded_input_is_read_once() -> None:
    row = torch.empty(1, 6, device="meta").expand(4, 6)
    with OpCounter() as counter:
        row * 2.0
    assert counter.ops[0].bytes == 6 * 4 + 24 * 4


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(args)
    return rc, out.getvalue(), err.getvalue()


SMALL = ["profile", "--roofline", "--models", "attention56", "--size", "64", "--batch", "4"]


def test_cli_table_per_model_and_kind() -> None:
    rc, out, _ = _run([*SMALL, "--device", "h100,h200"])
    assert rc == 0
    for expected in ("img/s H100 SXM", "img/s H200 SXM", "989 TFLOP/s bf16 dense, 3.35 TB/s",
                     "attention56 at 64 px, batch 4, per trained image:", "µs H100 SXM", "batch norm",
                     "pooling/upsampling", "optimizer", "top ops by bytes:", "aten.convolution_backward",
                     "max(FLOPs / peak, bytes / bandwidth)"):
        assert expected in out, expected
    row = next(line for line in out.splitlines() if line.startswith("attention56 "))
    assert row.split()[1:3] == ["64", "4"]


def test_cli_json_and_custom_device() -> None:
    rc, out, _ = _run([*SMALL, "--peak-tflops", "100", "--bandwidth", "1", "--json"])
    assert rc == 0
    (r,) = json.loads(out)["rooflines"]
    assert r["device"]["peak_tflops"] == 100 and r["device"]["bandwidth_tbs"] == 1
    assert set(r["kinds"]) == {"convolution", "matmul", "batch norm", "elementwise", "pooling/upsampling",
                               "loss/other", "optimizer"}
    assert r["images_per_s"] == pytest.approx(1e6 / r["per_image"]["us"])
    assert r["per_image"]["us"] == pytest.approx(sum(k["us"] for k in r["kinds"].values()))
    # memory-bound at 1 TB/s: at least every byte at the bandwidth
    assert r["per_image"]["us"] >= r["per_image"]["gb"] * 1e9 / 1e12 * 1e6


@pytest.mark.parametrize("args, message", [
    ([*SMALL, "--device", "tpu"], "unknown device 'tpu'"),
    ([*SMALL, "--peak-tflops", "500"], "--peak-tflops and --bandwidth go together"),
    ([*SMALL, "--bandwidth", "3"], "--peak-tflops and --bandwidth go together"),
    ([*SMALL, "--device", "h100", "--peak-tflops", "1", "--bandwidth", "1"], "either --device or --peak-tflops"),
    ([*SMALL, "--peak-tflops", "0", "--bandwidth", "1"], "must be positive"),
    ([*SMALL[:-1], "0"], "--batch must be >= 1"),
    (["profile", "--models", "attention56", "--device", "h100"], "--device applies only with --roofline"),
])
def test_cli_bad_combinations_are_one_error_line(args, message) -> None:
    rc, out, err = _run(args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_attention92_near_the_reference() -> None:
    """An independent count gives 63.0 GFLOP and 1.06 GB per trained image (no optimizer step);
    the optimizer's fp32 update, shared by 32 images, adds about 0.09 GB here."""
    r = roofline("attention92", 224, 32, "h100")
    assert r.size == 224 and r.batch == 32
    assert r.flops / 32 / 1e9 == pytest.approx(63.0, rel=0.10)
    assert r.bytes / 32 / 1e9 == pytest.approx(1.06, rel=0.25)
    # The per-op sum is at least the time of all bytes at the bandwidth and below the reference's 3,150.
    assert 2_000 < r.images_per_s <= 32 / (r.bytes / 3.35e12)
    assert r.images_per_s < roofline("attention92", 224, 32, DEVICES["h200"]).images_per_s
