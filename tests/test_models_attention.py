"""The Residual Attention Network family and the CIFAR pre-activation ResNet-164.

ImageNet parameter and multiply-add counts are taken on the meta device (shapes only); every model also
runs one real forward and backward pass at batch 2 (ImageNet models once each at 224, Attention-56
also at 320; CIFAR models at 32).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import ran_bench.models  # noqa: F401  (registers the zoo with timm)
from ran_bench.models import count_macs, count_params, create_model, list_models, model_info
from ran_bench.models.preact_resnet import PreActBottleneck
from ran_bench.models.residual_attention import AttentionModule, MaskBranch, ResidualAttentionNet

IMAGENET = ["attention56", "attention92", "attentionnext56", "attentionnext92"]
CIFAR = ["cifar_resnet164", "cifar_attention56", "cifar_attention92", "cifar_attention128",
         "cifar_attention164", "cifar_attention236", "cifar_attention452"]


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.fixture(scope="module")
def imagenet_counts() -> dict[str, tuple[int, int]]:
    """(parameters, multiply-adds at 224) of each ImageNet model, counted once."""
    counts = {}
    for name in IMAGENET:
        model = meta_model(name)
        counts[name] = (count_params(model), count_macs(model, 224))
    return counts


def test_registered() -> None:
    assert set(IMAGENET) <= set(list_models("imagenet"))
    assert set(CIFAR) <= set(list_models("cifar"))
    assert all(model_info(n).input_size == 32 and model_info(n).default_num_classes == 10 for n in CIFAR)


# --------------------------------------------------------------------------------------------
# Forward and backward


def _forward_backward(model: nn.Module, size: int, batch: int = 2) -> None:
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 10)
    logits.logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_forward_backward_224_and_any_size(imagenet_counts, name: str) -> None:
    """Trains at 224; the same parameters also run at 299 and 320 (Table 7's test sizes)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    _forward_backward(model, 224)
    model.eval()
    with torch.no_grad():
        for size in (299, 320):
            assert model(torch.zeros(1, 3, size, size)).shape == (1, 10)
    # Same count as the 1000-class model at 224 once the classifier's size is accounted for.
    assert count_params(model) == imagenet_counts[name][0] - 990 * (model.num_features + 1)


def test_attention56_forward_backward_320() -> None:
    """Table 7 tests Attention-92 at 320: the masks resize to whatever maps they meet."""
    torch.manual_seed(0)
    _forward_backward(create_model("attention56", num_classes=10), 320, batch=1)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    _forward_backward(create_model(name, num_classes=10), 32)


def test_timm_create_model_after_import() -> None:
    with torch.device("meta"):
        model = timm.create_model("attention92", num_classes=100)
    assert isinstance(model, ResidualAttentionNet)
    assert model.fc.out_features == 100


# --------------------------------------------------------------------------------------------
# Counts against the paper and the authors' released definitions


@pytest.mark.parametrize(
    "name, params, macs",
    [
        # The authors' released Caffe definitions, counted (paper.md; issue 2's acceptance figures).
        ("attention56", 31.81e6, 6.27e9),
        ("attention92", 52.47e6, 10.53e9),
        ("attentionnext56", 31.32e6, 6.42e9),
    ],
)
def test_counts_match_released_definitions(imagenet_counts, name: str, params: float, macs: float) -> None:
    ours_params, ours_macs = imagenet_counts[name]
    assert ours_params == pytest.approx(params, rel=0.005)
    assert ours_macs == pytest.approx(macs, rel=0.005)


@pytest.mark.parametrize(
    "name, paper_millions, rel",
    [
        ("cifar_resnet164", 1.7, 0.02),  # Table 6
        ("cifar_attention92", 1.9, 0.10),  # Table 6
        ("cifar_attention236", 5.1, 0.10),  # Table 6
        ("cifar_attention452", 8.6, 0.10),  # Table 6
    ],
)
def test_cifar_parameters_match_table6(name: str, paper_millions: float, rel: float) -> None:
    assert count_params(create_model(name)) == pytest.approx(paper_millions * 1e6, rel=rel)


def _trunk_units(model: nn.Module) -> int:
    """Residual units on the trunk path: everything but the units inside mask branches."""
    in_masks = {id(u) for m in model.modules() if isinstance(m, MaskBranch) for u in m.modules()}
    return sum(isinstance(u, PreActBottleneck) and id(u) not in in_masks for u in model.modules())


@pytest.mark.parametrize("name, depth", [("attention56", 56), ("attention92", 92), ("cifar_attention56", 56),
                                         ("cifar_attention92", 92), ("cifar_attention128", 128),
                                         ("cifar_attention164", 164), ("cifar_attention236", 236)])
def test_trunk_depth(name: str, depth: int) -> None:
    """Depth = stem conv + 3 layers per trunk unit + classifier (Table 2; 36m + 20 on CIFAR)."""
    model = meta_model(name) if model_info(name).dataset == "imagenet" else create_model(name)  # small: CPU is quicker
    assert 1 + 3 * _trunk_units(model) + 1 == depth


def test_attention92_has_1_2_3_modules_and_mask_activations() -> None:
    model = meta_model("attention92")
    modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    assert [m.mask_branch.depth for m in modules] == [3, 2, 2, 1, 1, 1]
    assert all(isinstance(m.mask_activation, nn.Sigmoid) for m in modules)


def test_stage_mask_depths_pool_to_7x7() -> None:
    """Stage 1 pools 3 times with 2 skips, stage 2 twice with 1, stage 3 once with none: 7x7 at the bottom."""
    model = meta_model("attention56")
    modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    sizes: list[set[int]] = [set() for _ in modules]
    for i, module in enumerate(modules):
        for unit in module.mask_branch.modules():
            if isinstance(unit, PreActBottleneck):
                unit.register_forward_hook(lambda m, a, out, i=i: sizes[i].add(out.shape[-1]))
    model(torch.zeros(1, 3, 224, 224, device="meta"))
    assert sizes == [{28, 14, 7}, {14, 7}, {7}]
    assert [len(m.mask_branch.skips) for m in modules] == [2, 1, 0]


# --------------------------------------------------------------------------------------------
# The attention module and its options


def _module(**kwargs) -> AttentionModule:
    torch.manual_seed(0)
    module = AttentionModule(16, PreActBottleneck, mask_depth=2, p=1, t=2, r=0, **kwargs)
    return module.eval()


def _capture_mask(module: AttentionModule, store: dict, zero: bool = False):
    def hook(m, inputs, output):
        store["input"], store["mask"] = inputs[0], output
        return torch.zeros_like(output) if zero else None

    return module.mask_activation.register_forward_hook(hook)


@torch.no_grad()
def test_arl_with_zero_mask_returns_trunk_output() -> None:
    module = _module(residual_attention=True)
    x = torch.randn(2, 16, 12, 12)
    _capture_mask(module, {}, zero=True)
    assert torch.allclose(module(x), module.trunk(module.pre(x)))


@torch.no_grad()
def test_nal_with_zero_mask_returns_zeros() -> None:
    module = _module(residual_attention=False)
    x = torch.randn(2, 16, 12, 12)
    _capture_mask(module, {}, zero=True)
    assert torch.count_nonzero(module(x)) == 0


@torch.no_grad()
@pytest.mark.parametrize("residual", [True, False])
def test_merge_is_one_plus_mask_times_trunk(residual: bool) -> None:
    module = _module(residual_attention=residual)
    x = torch.randn(2, 16, 12, 12)
    seen: dict = {}
    _capture_mask(module, seen)
    out = module(x)
    trunk = module.trunk(module.pre(x))
    expected = (1 + seen["mask"]) * trunk if residual else seen["mask"] * trunk
    assert torch.allclose(out, expected, atol=1e-6)
    assert 0 < seen["mask"].min() and seen["mask"].max() < 1  # mixed attention: a sigmoid


@torch.no_grad()
def test_channel_attention_has_unit_l2_norm_over_channels() -> None:
    module = _module(attention="channel")
    seen: dict = {}
    _capture_mask(module, seen)
    module(torch.randn(2, 16, 12, 12))
    norms = seen["mask"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # The direction is the input's: the mask is the input divided by its per-position norm.
    assert torch.allclose(seen["mask"] * seen["input"].norm(dim=1, keepdim=True), seen["input"], atol=1e-5)


@torch.no_grad()
def test_spatial_attention_is_sigmoid_of_per_channel_standardised_values() -> None:
    activation = _module(attention="spatial").mask_activation
    x = 1 + 3 * torch.randn(2, 16, 12, 12)
    mask = activation(x)
    logits = torch.logit(mask.double())
    # Each channel of each image, standardised over its 12x12 positions: mean 0, standard deviation 1.
    assert torch.allclose(logits.mean(dim=(2, 3)), torch.zeros(2, 16, dtype=torch.double), atol=1e-4)
    assert torch.allclose(logits.std(dim=(2, 3), correction=0), torch.ones(2, 16, dtype=torch.double), atol=1e-4)
    expected = torch.sigmoid((x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True, correction=0))
    assert torch.allclose(mask, expected, atol=1e-5)


def _mask_unit_sizes(module: AttentionModule, x: torch.Tensor) -> list[int]:
    sizes = []
    for unit in module.mask_branch.modules():
        if isinstance(unit, PreActBottleneck):
            unit.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1]))
    module(x)
    return sizes


@torch.no_grad()
def test_local_conv_mask_has_same_units_and_no_sampling(monkeypatch) -> None:
    x = torch.randn(1, 16, 16, 16)
    encoder_decoder = _module(mask="encoder_decoder")
    local = _module(mask="local_conv")
    count_units = lambda m: sum(isinstance(u, PreActBottleneck) for u in m.mask_branch.modules())  # noqa: E731
    assert count_units(local) == count_units(encoder_decoder) == 5  # depth 2: 3 down, 1 skip, 1 up
    assert any(isinstance(m, nn.MaxPool2d) for m in encoder_decoder.mask_branch.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in local.mask_branch.modules())
    assert set(_mask_unit_sizes(encoder_decoder, x)) == {8, 4}
    interpolations = []
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: interpolations.append(1))
    assert set(_mask_unit_sizes(local, x)) == {16}
    assert interpolations == []


class _Identity(nn.Module):
    """A unit that returns its input, to see the mask branch's own wiring."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def test_mask_branch_adds_each_skip_once_and_no_trunk() -> None:
    """Released definitions: up = resize(deeper) + skip(level map), no second addition of the level
    map, and nothing of the trunk in the mask; the last resize goes to the requested size."""
    branch = MaskBranch(4, _Identity, depth=2)
    x = torch.randn(1, 4, 14, 14)
    pool = nn.MaxPool2d(3, 2, padding=1)
    level0 = pool(x)  # 7x7
    level1 = pool(level0)  # 4x4
    up = F.interpolate(level1, size=(7, 7), mode="bilinear", align_corners=True) + level0
    expected = F.interpolate(up, size=(14, 14), mode="bilinear", align_corners=True)
    assert torch.allclose(branch(x, (14, 14)), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"attention": "softmax"}, ValueError, ["attention='softmax'", "'mixed'", "'channel'", "'spatial'"]),
        ({"mask": "unet"}, ValueError, ["mask='unet'", "'encoder_decoder'", "'local_conv'"]),
        ({"residual_attention": "yes"}, TypeError, ["residual_attention", "True", "False"]),
        ({"p": -1}, ValueError, ["p must be an integer >= 0"]),
        ({"t": 0}, ValueError, ["t must be an integer >= 1"]),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, error: type, words: list[str]) -> None:
    with pytest.raises(error) as info:
        create_model("cifar_attention56", **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_options_reach_every_module() -> None:
    model = create_model("cifar_attention92", attention="spatial", residual_attention=False, mask="local_conv")
    modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    assert len(modules) == 6
    assert all(type(m.mask_activation).__name__ == "SpatialNormSigmoid" and not m.residual_attention
               and m.mask_branch.local for m in modules)


def test_preactivation_unit_structure() -> None:
    """Projection shortcut: a strided 1x1 conv on the pre-activated input, no BatchNorm; identity: raw input."""
    unit = PreActBottleneck(8, 16, stride=2).eval()
    assert isinstance(unit.shortcut, nn.Conv2d) and unit.shortcut.stride == (2, 2)
    assert unit.conv2.stride == (2, 2) and unit.conv1.stride == (1, 1)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        pre = F.relu(unit.bn1(x))
        unit.conv3.weight.zero_()  # residual branch off: the output is the shortcut alone
        assert torch.allclose(unit(x), unit.shortcut(pre))
        identity = PreActBottleneck(16, 16).eval()
        identity.conv3.weight.zero_()
        y = torch.randn(1, 16, 6, 6)
        assert torch.equal(identity(y), y)
