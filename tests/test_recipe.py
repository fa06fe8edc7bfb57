"""The recipe's optimizer: the multi-tensor SGD the trainer uses updates like torch's per-tensor loop,
and its state resumes bitwise."""

from __future__ import annotations

import copy

import torch

from ran_bench.config import load_config
from ran_bench.recipe import build_optimizer, sgd_implementation


def _net() -> torch.nn.Module:
    """A convolution with bias, BatchNorm and a classifier."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(3, (4,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _assert_bitwise(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_sgd_implementation_is_fused_on_cuda_and_foreach_elsewhere():
    assert sgd_implementation(torch.device("cuda", 0)) == {"fused": True}
    assert sgd_implementation(torch.device("cpu")) == {"foreach": True}


def test_foreach_sgd_updates_bitwise_like_the_per_tensor_loop():
    """Nesterov momentum 0.9 and weight decay 1e-4 as the recipe sets them, over four steps."""
    cfg = load_config(None, ["model.name=attention56"])
    assert (cfg.optim.nesterov, cfg.optim.weight_decay) == (True, 1e-4)
    recipe_model = _net()
    loop_model = copy.deepcopy(recipe_model)
    optimizer = build_optimizer(cfg, recipe_model)
    assert optimizer.defaults["foreach"] is True
    loop = torch.optim.SGD(loop_model.parameters(), lr=cfg.lr, momentum=cfg.optim.momentum, nesterov=True,
                           weight_decay=cfg.optim.weight_decay, foreach=False)
    _steps(recipe_model, optimizer, range(4))
    _steps(loop_model, loop, range(4))
    _assert_bitwise(recipe_model, loop_model)


def test_the_recipes_sgd_resumes_bitwise_from_its_state_dict():
    cfg = load_config(None, ["model.name=attention56"])
    straight = _net()
    first_half = copy.deepcopy(straight)
    optimizer = build_optimizer(cfg, straight)
    _steps(straight, optimizer, range(4))
    half_optimizer = build_optimizer(cfg, first_half)
    _steps(first_half, half_optimizer, range(2))
    resumed = copy.deepcopy(first_half)  # as loaded from a checkpoint: the weights and the optimizer state
    resumed_optimizer = build_optimizer(cfg, resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(half_optimizer.state_dict()))
    _steps(resumed, resumed_optimizer, range(2, 4))
    _assert_bitwise(straight, resumed)
