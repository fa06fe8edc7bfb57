"""The unfused roofline of one training step: the images/s no kernel-per-op execution can beat.

One training step of the trainer runs on the meta device (shapes only: no memory, no arithmetic)
under a dispatch mode that sees every aten op and records its FLOPs (torch.utils.flop_counter's
formulas) and the bytes of its tensor inputs and outputs (CONVENTION below). The roofline time of
a step is the sum over ops of max(FLOPs / peak, bytes / bandwidth): each op alone, reading its
inputs from and writing its outputs to HBM. Fusion lowers the bytes, so a fused step can beat it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ran_bench.config import OptimConfig, load_config, recipe
from ran_bench.errors import InputError
from ran_bench.models import create_model, model_info
from ran_bench.recipe import build_criterion, build_optimizer

KINDS = ("convolution", "matmul", "batch norm", "elementwise", "pooling/upsampling", "loss/other", "optimizer")

CONVENTION = [
    "one training step on the meta device: forward under bf16 autocast with fp32 master weights (convolution "
    "and matmul inputs cast to bf16, the loss in fp32), channels_last, cross-entropy, backward, then a "
    "steady-state SGD step (momentum buffers exist) with the recipe's momentum, Nesterov, weight decay, foreach",
    "FLOPs per op: torch.utils.flop_counter's formulas (convolutions and matrix products; other ops 0)",
    "bytes per op: its tensor inputs + outputs at each tensor's element size (bf16 activations 2; fp32 weights, "
    "gradients, momentum and BN statistics 4; max-pool indices 8), an expanded (stride-0) dimension once; views "
    "(view, t, expand, detach), in-place metadata changes and bare allocations (empty) move none",
    "roofline: images/s = batch / sum over ops of max(FLOPs / peak, bytes / bandwidth), every op unfused; "
    "per-image figures are per-step figures over the batch, the optimizer step shared by the batch",
]


@dataclass(frozen=True)
class DeviceSpec:
    """A device's data-sheet limits (dense, no sparsity: a limit, not a measurement): bf16
    tensor-core peak and HBM bandwidth."""

    name: str
    peak_tflops: float
    bandwidth_tbs: float
    source: str


DEVICES: dict[str, DeviceSpec] = {
    "a100": DeviceSpec("A100 80GB SXM", 312.0, 2.039, "NVIDIA A100 data sheet"),
    "h100": DeviceSpec("H100 SXM", 989.0, 3.35, "NVIDIA H100 data sheet"),
    "h200": DeviceSpec("H200 SXM", 989.0, 4.8, "NVIDIA H200 data sheet"),
    # HGX B200 (1000 W) data sheet: 36 PFLOP/s bf16 with sparsity and 64 TB/s over 8 GPUs.
    "b200": DeviceSpec("B200 (HGX)", 2250.0, 8.0, "NVIDIA HGX B200 data sheet, per GPU, dense"),
}


def device_spec(name: str) -> DeviceSpec:
    """The device `name` of DEVICES (any case); InputError naming the known ones otherwise."""
    if name.lower() not in DEVICES:
        raise InputError(f"unknown device {name!r}; known: {', '.join(DEVICES)} "
                         "(or give --peak-tflops and --bandwidth)")
    return DEVICES[name.lower()]


@dataclass(frozen=True)
class OpCost:
    """One aten op of a step: its name, kind, FLOPs and bytes moved."""

    op: str
    kind: str
    flops: int
    bytes: int


# --------------------------------------------------------------------------------------------
# Counting one op

# Ops that only allocate (no element read or written), and _unsafe_view, a view not tagged as one.
_ALLOCATE_ONLY = {f"aten::{n}" for n in
                  "empty empty_like empty_strided new_empty new_empty_strided _unsafe_view".split()}
# Ops whose `self` gives a shape, not data: the destination of a copy or fill, the model of a *_like.
_UNREAD_SELF = {f"aten::{n}" for n in ("copy_ fill_ zero_ ones_like zeros_like full_like new_zeros new_ones "
                                       "new_full _foreach_copy_ _foreach_zero_").split()}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of `t`: a stride-0 (expanded) dimension is stored once."""
    elements = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elements * t.element_size() if t.numel() else 0


def _bytes_of(value) -> int:
    return sum(tensor_bytes(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def op_bytes(func, args: tuple, kwargs: dict, out) -> int:
    """Bytes an op reads plus bytes it writes, from its schema: every tensor argument is read
    (except write-only ones), every fresh output and every mutated argument is written."""
    schema = func._schema
    if func.is_view or torch.Tag.inplace_view in func.tags or schema.name in _ALLOCATE_ONLY:
        return 0
    values = [*zip(schema.arguments, args), *((a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs)]
    moved = 0
    for arg, value in values:
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        unread = (mutated and arg.kwarg_only) or (arg.name == "self" and schema.name in _UNREAD_SELF)
        moved += _bytes_of(value) * ((not unread) + mutated)
    outputs = out if len(schema.returns) > 1 else (out,)
    moved += sum(_bytes_of(value) for ret, value in zip(schema.returns, outputs) if ret.alias_info is None)
    return moved


def op_flops(func, args: tuple, kwargs: dict, out) -> int:
    """FLOPs of an op by torch.utils.flop_counter's registered formula; 0 where it has none."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    if func._overloadpacket is torch.ops.aten.convolution_backward and args[9] != 1:
        return _grouped_conv_backward_flops(formula, args, out)
    return int(formula(*args, **kwargs, out_val=out))


def _grouped_conv_backward_flops(formula, args: tuple, out) -> int:
    """The backward of a grouped convolution. torch's formula counts its weight gradient `groups`
    times (fixed by pytorch#183405), which costs what the forward costs: torch's forward formula."""
    grad_out, images, weight, _, stride, padding, dilation, transposed, output_padding, groups, mask = args
    data = formula(*args[:10], [mask[0], False, False], out_val=out)
    forward = flop_registry[torch.ops.aten.convolution]
    weights = forward(images, weight, None, stride, padding, dilation, transposed, output_padding, groups,
                      out_val=grad_out) if mask[1] else 0
    return int(data + weights)


# Kinds by the op's name, lower-cased without underscores: the first that matches.
_KIND_PATTERNS = (
    ("convolution", re.compile(r"conv")),
    ("matmul", re.compile(r"^(mm|addmm|bmm|baddbmm|addbmm|matmul|linear)")),
    ("batch norm", re.compile(r"batchnorm")),
    ("pooling/upsampling", re.compile(r"pool|upsample")),
    ("loss/other", re.compile(r"loss|softmax")),
)


def _global_pool(sizes, dims) -> bool:
    """A mean over both spatial dims of an NCHW tensor: global average pooling, which is what
    adaptive_avg_pool2d(1) runs as. Autograd keeps negative dims as unsigned 64-bit integers."""
    signed = {(d - 2**64 if d >= 2**63 else d) % 4 for d in dims} if len(sizes) == 4 else set()
    return signed == {2, 3}


def name_kind(name: str) -> str:
    """The kind of an op by its name alone ("aten::cudnn_convolution", "addmm", "NativeBatchNormBackward0"):
    the first of _KIND_PATTERNS that matches the name after its last "::", lower-cased without
    underscores; elementwise otherwise. Shared with the profiler's table (`ran-bench bench train --profile`)."""
    plain = name.split("::")[-1].replace("_", "").lower()
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(plain)), "elementwise")


def op_kind(func, args: tuple, node=None) -> str:
    """The kind of an op by its name (unnamed: elementwise); a mean over the spatial dims and its
    backward (an expand and a div under the mean's autograd `node`) are pooling. No other op is classed
    by its node: autograd sums a reused tensor's gradients under the node that made the second one."""
    schema_name = func._schema.name
    if node is not None and node.name().startswith("MeanBackward") and schema_name in ("aten::expand", "aten::div"):
        return "pooling/upsampling" if _global_pool(node._saved_self_sym_sizes, node._saved_dim) else "elementwise"
    if schema_name == "aten::mean" and len(args) > 1 and _global_pool(args[0].shape, args[1]):
        return "pooling/upsampling"
    return name_kind(schema_name)


class OpCounter(TorchDispatchMode):
    """Records the OpCost of every aten op run under it; `optimizer` marks the ops of an optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpCost] = []
        self.optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket not in flop_registry:
            with self:  # a composite op runs as its parts, as FlopCounterMode counts it
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        flops, moved = op_flops(func, args, kwargs, out), op_bytes(func, args, kwargs, out)
        if flops or moved:
            kind = "optimizer" if self.optimizer else op_kind(func, args, torch._C._current_autograd_node())
            self.ops.append(OpCost(str(func._overloadpacket), kind, flops, moved))
        return out


# --------------------------------------------------------------------------------------------
# One training step

# torch.autocast("cuda", bfloat16)'s cast lists (ATen's autocast_mode.h), by the name of the torch
# function called; autocast does not act on meta tensors, so its casts are made here.
_LOWER_PRECISION = set("conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d prelu "
                       "addmm addmv addr matmul einsum mm mv linear addbmm baddbmm bmm chain_matmul".split())
_FP32 = set("acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus "
            "layer_norm group_norm cosine_similarity nll_loss cross_entropy kl_div l1_loss smooth_l1_loss "
            "huber_loss mse_loss binary_cross_entropy_with_logits dist cdist renorm logsumexp".split())
_FP32_OUTPUT = set("softmax log_softmax sum prod cumsum cumprod".split())  # given dtype=float32


class BF16Autocast(TorchFunctionMode):
    """The casts of torch.autocast("cuda", dtype=torch.bfloat16) on any device: fp32 inputs of
    convolutions and matrix products are cast to bf16 (a weight once per forward, as autocast
    caches it), bf16 inputs of the fp32 ops (losses, exp, log, ...) to fp32."""

    def __init__(self) -> None:
        super().__init__()
        self._casts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _LOWER_PRECISION:
            args, kwargs = self._cast((args, kwargs), torch.float32, torch.bfloat16)
        elif name in _FP32:
            args, kwargs = self._cast((args, kwargs), torch.bfloat16, torch.float32)
        elif name in _FP32_OUTPUT and "dtype" not in kwargs and _is_float(args[0] if args else None):
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)

    def _cast(self, tree, source: torch.dtype, target: torch.dtype):
        leaves, spec = tree_flatten(tree)
        return spec.unflatten([self._cast_one(x, target) if _is_float(x, source) else x for x in leaves])

    def _cast_one(self, x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
        if not (x.is_leaf and x.requires_grad):
            return x.to(target)
        if id(x) not in self._casts:  # the source is kept, so its id is not reused while cached
            self._casts[id(x)] = (x, x.to(target))
        return self._casts[id(x)][1]


def _is_float(x, dtype: torch.dtype | None = None) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and (dtype is None or x.dtype == dtype)


def count_step(model: nn.Module, size: int, batch: int, criterion: nn.Module | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> list[OpCost]:
    """The ops of one training step of `model` on `batch` fp32 channels_last images of side `size`,
    on its parameters' device: forward under bf16 autocast, loss (default: cross-entropy), backward,
    then a steady-state step of `optimizer` (default: SGD, momentum 0.9, Nesterov, weight decay 1e-4,
    foreach); an uncounted step first creates the state (momentum buffers) every later step finds."""
    device = next(model.parameters()).device
    images = torch.empty(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(batch, dtype=torch.int64, device=device)
    criterion = criterion or nn.CrossEntropyLoss()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                             weight_decay=1e-4, foreach=True)
    counter = OpCounter()
    model.train()
    with counter:
        with BF16Autocast():
            loss = criterion(model(images), labels)
        loss.backward()
    optimizer.step()
    counter.optimizer = True
    with counter:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return counter.ops


@lru_cache(maxsize=32)
def model_step(name: str, size: int, batch: int) -> tuple[OpCost, ...]:
    """The ops of one training step of registered model `name` on `batch` images of side `size`,
    with its recipe's model options, loss and optimizer, on the meta device."""
    cfg = recipe(name) or load_config(None, [f"model.name={name}"])
    with torch.device("meta"):
        model = create_model(name, num_classes=model_info(name).default_num_classes, **cfg.model.options)
    model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    for group in optimizer.param_groups:
        group["foreach"] = True  # CUDA's default; torch picks the per-tensor loop for meta tensors
    return tuple(count_step(model, size, batch, build_criterion(cfg), optimizer))


# --------------------------------------------------------------------------------------------
# The roofline

@dataclass(frozen=True)
class KindCost:
    """The ops of one kind in one step: FLOPs, bytes, and seconds at the roofline."""

    kind: str
    flops: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class OpTotal:
    """One aten op summed over a step: calls, bytes and their share of the step's bytes."""

    op: str
    kind: str
    calls: int
    bytes: int
    share: float


@dataclass(frozen=True)
class Roofline:
    """The unfused roofline of one training step of `model` on `device` (per-step figures)."""

    model: str
    size: int
    batch: int
    device: DeviceSpec
    kinds: tuple[KindCost, ...]
    top_ops: tuple[OpTotal, ...]
    memory_bound_share: float  # of the roofline time, in ops where bytes / bandwidth > FLOPs / peak

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kinds)

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.kinds)

    @property
    def seconds(self) -> float:
        return sum(k.seconds for k in self.kinds)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds

    def to_dict(self) -> dict:
        """Figures per trained image (GFLOP, GB, µs at the roofline), in total and per kind."""
        def per_image(c) -> dict:
            return {"gflop": c.flops / self.batch / 1e9, "gb": c.bytes / self.batch / 1e9,
                    "us": c.seconds / self.batch * 1e6}
        return {"model": self.model, "size": self.size, "batch": self.batch, "device": asdict(self.device),
                "images_per_s": self.images_per_s, "per_image": per_image(self),
                "kinds": {k.kind: per_image(k) for k in self.kinds},
                "memory_bound_share": self.memory_bound_share, "top_ops": [asdict(op) for op in self.top_ops]}


def summarize(ops, batch: int, device: DeviceSpec, model: str = "model", size: int = 0, top: int = 8) -> Roofline:
    """The roofline of a step's ops: per kind, FLOPs, bytes and sum over ops of max(FLOPs / peak,
    bytes / bandwidth); the `top` ops by bytes."""
    peak, bandwidth = device.peak_tflops * 1e12, device.bandwidth_tbs * 1e12
    flops, moved, seconds, calls, op_moved = (defaultdict(int), defaultdict(int), defaultdict(float),
                                              defaultdict(int), defaultdict(int))
    memory_bound = 0.0
    for op in ops:
        compute_s, memory_s = op.flops / peak, op.bytes / bandwidth
        flops[op.kind] += op.flops
        moved[op.kind] += op.bytes
        seconds[op.kind] += max(compute_s, memory_s)
        memory_bound += memory_s if memory_s > compute_s else 0.0
        calls[op.op, op.kind] += 1
        op_moved[op.op, op.kind] += op.bytes
    kinds = tuple(KindCost(k, flops[k], moved[k], seconds[k]) for k in KINDS if k in seconds)
    total_bytes, total_s = sum(moved.values()), sum(seconds.values())
    ranked = sorted(op_moved.items(), key=lambda item: -item[1])[:top]
    top_ops = tuple(OpTotal(op, kind, calls[op, kind], b, b / total_bytes if total_bytes else 0.0)
                    for (op, kind), b in ranked)
    return Roofline(model, size, batch, device, kinds, top_ops, memory_bound / total_s if total_s else 0.0)


def roofline(model: str | nn.Module, size: int | None = None, batch: int | None = None,
             device: DeviceSpec | str = "h100") -> Roofline:
    """The unfused roofline of one training step of `model` on `device` (a DeviceSpec or a name of
    DEVICES). A registered model's name counts its recipe's step (default size: its training side;
    default batch: its recipe's per-device batch). An nn.Module is counted as given by `count_step`
    at `size` and `batch` (default 32): build it under torch.device("meta") and make it channels_last
    as the trainer does, else AccumulateGrad copies each conv weight's gradient to the parameter's layout."""
    spec = device if isinstance(device, DeviceSpec) else device_spec(device)
    if isinstance(model, str):
        cfg = recipe(model)  # the side the model is trained at and its per-device batch
        size = size or (cfg.data.train_size if cfg else model_info(model).input_size)
        batch = batch or (cfg.optim if cfg else OptimConfig()).per_device_batch_size
        return summarize(model_step(model, size, batch), batch, spec, model, size)
    if size is None:
        raise InputError("roofline of an nn.Module needs the input size")
    batch = batch or 32
    return summarize(count_step(model, size, batch), batch, spec, type(model).__name__, size)

