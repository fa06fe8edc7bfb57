"""torch.compile of the trainer's model: every registered model traces without a graph break,
`model.compile` names a mode (and still reads the booleans of older configs), and the compiled
model and training step compute what the eager ones do."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn

from ran_bench.config import ConfigError, config_from_yaml, load_config, to_yaml
from ran_bench.models import create_model, list_models
from ran_bench.recipe import build_criterion, build_optimizer, train_step

# The smallest input side each model takes (the Inception stems need 75 px); batch 2 for BatchNorm.
MIN_SIZE = {"inception_resnet_v1": 75, "inception_resnet_v2": 75}


# -- no graph breaks ----------------------------------------------------------------------------
class _Recorded(nn.Module):
    """Stands in for a child module: returns the output the child gave in the eager forward."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out, persistent=False)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.out


def _first_calls(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """(args, kwargs, output) of the first call of every module in one eager forward, and call counts."""
    calls, counts = {}, {}

    def hook(module, args, kwargs, out):
        counts[module] = counts.get(module, 0) + 1
        calls.setdefault(module, (args, kwargs, out))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return calls, counts


def _slots(module: nn.Module):
    """(owner, name, child) of every module `module`'s forward calls directly (ModuleList items too)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from ((child, key, item) for key, item in child.named_children())
        else:
            yield module, name, child


def _structure(module: nn.Module) -> tuple:
    """What decides which code a module's forward runs: its class, its plain attributes, its children's classes."""
    attrs = tuple(sorted((k, repr(v)) for k, v in vars(module).items() if not k.startswith("_") and k != "training"))
    return type(module), attrs, tuple((name, type(child)) for _, name, child in _slots(module))


@pytest.fixture(scope="module")
def explained() -> set:
    return set()  # structures already traced, shared by the models of this module's run


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_compiles_without_a_graph_break(name, explained):
    """torch._dynamo.explain finds no graph break in the training forward of `name`.

    Tracing a whole model takes dynamo 20-90 s on 2 cores (all 17: over 10 minutes), so each module
    of the model that has children is traced on its own, on the input it got in an eager forward,
    with the children it calls once replaced by their recorded outputs (torch.nn's own layers are
    traced whole). A break is always in some module's own forward code, so none in any module
    means none in the model; a module structure already traced for an earlier model is not traced again."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    size = MIN_SIZE.get(name, 32)
    calls, counts = _first_calls(model, torch.randn(2, 3, size, size))
    for module, (args, kwargs, _) in calls.items():
        if type(module).__module__.startswith("torch.nn.") or not list(module.children()):
            continue  # torch's own layers and containers are traced inside their owner
        key = _structure(module)
        if key in explained:
            continue
        stubbed = [(owner, slot, child) for owner, slot, child in _slots(module)
                   if counts.get(child) == 1 and isinstance(calls[child][2], torch.Tensor)]
        for owner, slot, child in stubbed:
            owner._modules[slot] = _Recorded(calls[child][2])
        try:
            report = torch._dynamo.explain(module)(*args, **kwargs)
        finally:
            for owner, slot, child in stubbed:
                owner._modules[slot] = child
            torch._dynamo.reset()
        # One graph, or none where every op of the forward is in a replaced child.
        assert report.graph_count <= 1 and not report.break_reasons, \
            f"{name}: {type(module).__name__}: {report.break_reasons}"
        explained.add(key)


# -- compiled = eager ---------------------------------------------------------------------------
# Inductor takes over 5 minutes to compile this model's forward and backward on 2 busy cores, so the
# tests compile with aot_eager: the graphs the trainer's compile captures (dynamo, AOT autograd's joint
# forward-backward, functionalized BatchNorm buffer updates), run by eager kernels, not inductor's.
BACKEND = "aot_eager"
# float64: the compiled graph computes the same function, but in float32 its other summation order
# (BatchNorm statistics and their gradients) changes the stem's gradient by about 1e-4 relative after
# the 56-layer backward, and SGD steps amplify that chaotically (1% of the loss by the third step).
# In float64 the rounding is about 1e-15, so a tight tolerance tells a changed function from rounding.
TOL = dict(rtol=1e-7, atol=1e-9)


def _attention_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("cifar_attention56", num_classes=10).train().double()


def test_compiled_attention_model_gives_the_eager_outputs_and_running_statistics():
    eager = _attention_model()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend=BACKEND)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for _ in range(2):  # the second call runs the cached graph on the updated BatchNorm buffers
        torch.testing.assert_close(compiled(x), eager(x), **TOL)
    for (name, a), b in zip(eager.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b, a, **TOL, msg=name)


def test_compiled_train_step_gives_the_eager_loss_and_weights():
    """The recipe's train_step on the model as the trainer compiles it: same loss, same weights
    after three SGD steps (Nesterov, weight decay) as the eager step."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = load_config(None, ["model.name=cifar_attention56", "model.compile=default"])
    eager = _attention_model()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend=BACKEND)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(10, (2,), generator=g))
               for _ in range(3)]
    runs = []
    for model, params in ((eager, eager), (compiled, compiled_module)):
        optimizer, criterion = build_optimizer(cfg, params), build_criterion(cfg)
        runs.append([train_step(accelerator, model, optimizer, criterion, x, y) for x, y in batches])
    torch.testing.assert_close(torch.stack(runs[1]), torch.stack(runs[0]), **TOL)
    for (name, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        torch.testing.assert_close(b, a, **TOL, msg=name)


# -- model.compile ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, mode", [("false", None), ("default", "default"), ("max-autotune", "max-autotune"),
                                         ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
                                         ("true", "default"), ("False", None)])
def test_model_compile_names_a_mode_and_reads_the_old_booleans(value, mode):
    cfg = load_config(None, ["model.name=attention56", f"model.compile={value}"])
    assert (cfg.model.compile.value if cfg.model.compile.value != "false" else None) == mode
    # A run directory's config.yaml and a checkpoint's embedded config read back the same mode.
    assert config_from_yaml(to_yaml(cfg), "config.yaml").model.compile is cfg.model.compile


def test_an_older_config_with_a_boolean_compile_still_loads(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  name: attention56\n  compile: true\n")
    assert load_config(path).model.compile.value == "default"
    path.write_text("model:\n  name: attention56\n  compile: false\n")
    assert load_config(path).model.compile.value == "false"


@pytest.mark.parametrize("value", ["reduce-overhead", "fast", "1"])
def test_an_unknown_compile_mode_names_the_valid_ones(value):
    with pytest.raises(ConfigError, match=r"key 'model.compile': Invalid value .*expected one of \[false, default, "
                                          r"max-autotune, max-autotune-no-cudagraphs\]"):
        load_config(None, ["model.name=attention56", f"model.compile={value}"])
