"""Training configuration: YAML files in `configs/` mapped onto typed dataclasses (OmegaConf).

`load_config(path, overrides)` merges a YAML file and `key=value` overrides onto the `Config`
schema below. Unknown keys, wrong types and invalid choices fail on load with one message that
names the file, the key's full path and, for choices, the valid values.

Conventions (the paper's ImageNet recipe is the default):
- `optim.lr_per_256` is the learning rate for 256 images; the learning rate used is
  `lr_per_256 * optim.global_batch_size / 256` (linear scaling: 0.1 per 256 -> 0.4 at 1024).
- `schedule.total_steps`, `schedule.milestones` and `schedule.warmup_steps` count optimizer steps
  at a global batch of `schedule.reference_batch_size` (256 by default, the paper's unit) and are
  rescaled to the configured global batch, so the schedule covers the same number of images.
- `optim.global_batch_size` is a fact of the run: with fewer devices it is kept by gradient
  accumulation (global = world size x per-device batch x accumulation steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ran_bench.errors import UserError


class ConfigError(ValueError, UserError):
    """A configuration that does not match the schema or is inconsistent."""


AUGMENTATIONS = ("imagenet", "cifar")  # data.augmentation, see ran_bench.data.build_loader

# Keys that define a run's trajectory and record. A resumed run must keep them: the optimizer and
# scheduler states restore the checkpoint's learning rate, momentum and weight decay over new
# values, the step counter means images only at the old global batch, and results.json would
# claim a recipe that only part of the run followed. schedule.max_steps is not among them: raising
# it is how a partial run is continued.
RESUME_KEYS = ("model.name", "model.options", "data.train_size", "data.label_noise", "data.augmentation",
               "optim.global_batch_size", "optim.lr_per_256", "optim.momentum", "optim.nesterov",
               "optim.weight_decay", "optim.label_smoothing", "schedule.kind", "schedule.reference_batch_size",
               "schedule.total_steps", "schedule.milestones", "schedule.warmup_steps", "seed")


# Enum member names are what YAML files and overrides spell.
class Backend(Enum):
    dali = "dali"  # NVIDIA DALI (GPU JPEG decoding when CUDA is present)
    torchvision = "torchvision"  # PIL + torchvision transforms in worker processes
    synthetic = "synthetic"  # random tensors, for throughput and tests; needs data.num_classes
    auto = "auto"  # dali on CUDA when installed, torchvision otherwise


class Precision(Enum):
    auto = "auto"  # bf16 autocast on GPUs with bf16 hardware (Ampere+), fp16 on older GPUs, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # autocast with a gradient scaler, for GPUs without bf16; CUDA only


class ScheduleKind(Enum):
    step = "step"  # multiply the learning rate by 0.1 at each milestone (the paper)
    cosine = "cosine"  # cosine decay to 0 at total_steps


# model.compile: `false` (eager) or the torch.compile mode the trainer compiles its model with; the
# functional API because torch's mode names have hyphens. Not offered: reduce-overhead (CUDA graphs),
# which crashes in evaluation after training under DDP (pytorch 128218) and whose graphs BatchNorm's
# buffer updates keep from replaying (pytorch 139207).
CompileMode = Enum("CompileMode", [(m, m) for m in ("false", "default", "max-autotune", "max-autotune-no-cudagraphs")])


@dataclass
class ModelConfig:
    name: str = MISSING  # a registered model, see `ran_bench.models.list_models()`
    options: dict[str, Any] = field(default_factory=dict)  # passed to create_model(name, **options)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    channels_last: bool = False
    # false, default, max-autotune or max-autotune-no-cudagraphs (CompileMode); the booleans of older
    # configs and checkpoints are read as false and default
    compile: CompileMode = CompileMode.false


@dataclass
class DataConfig:
    name: str = "imagenet"  # data set name recorded in results.json
    root: Optional[str] = None  # ImageNet layout: root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG
    backend: Backend = Backend.auto
    train_size: int = 224
    test_sizes: list[int] = field(default_factory=lambda: [224])
    num_classes: Optional[int] = None  # None: the number of class folders in root/train
    num_threads: Optional[int] = None  # decoding threads/workers per process; None: the loader's default
    label_noise: float = 0.0  # fraction of training labels changed to a different class
    # "imagenet": random-resized crop + flip, val resize to size/0.875 + centre crop; "cifar": the
    # paper's CIFAR recipe (4-pixel zero padding + random crop + flip, val on the native images)
    augmentation: str = "imagenet"


@dataclass
class OptimConfig:
    global_batch_size: int = 256
    per_device_batch_size: int = 32  # the paper: at least 32 images per GPU
    lr_per_256: float = 0.1  # learning rate for 256 images, scaled linearly with global_batch_size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.step
    reference_batch_size: int = 256  # the global batch the three step counts below are given at
    total_steps: int = 530_000
    milestones: list[int] = field(default_factory=lambda: [200_000, 400_000, 500_000])
    warmup_steps: int = 0  # linear warm-up from 0 to the base learning rate
    max_steps: Optional[int] = None  # stop after this many (real) steps; the run is then partial


@dataclass
class CheckpointConfig:
    every_steps: int = 5000  # real optimizer steps
    keep_last: int = 3


@dataclass
class EvalConfig:
    every_steps: int = 0  # real optimizer steps; 0: only at the end of training
    batch_size: int = 100  # per device


# log.trackers: the experiment trackers Accelerate knows (accelerate.utils.LoggerType, less "all", which
# would pick whatever happens to be installed), each with the modules that provide it and its pip package.
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "'aim<4'"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}


@dataclass
class LogConfig:
    every_steps: int = 50  # a metrics.jsonl line and a point in each tracker every this many steps
    trackers: list[str] = field(default_factory=list)  # names of TRACKERS, e.g. [tensorboard, mlflow]
    project: str = "ran-bench"  # the trackers' project (MLflow experiment, W&B project, TensorBoard folder)
    tensorboard: bool = False  # the old spelling of trackers: [tensorboard], still read

    def __post_init__(self) -> None:
        # Configs and run directories of earlier versions say `tensorboard: true`; they keep working.
        if self.tensorboard:
            if "tensorboard" not in self.trackers:
                self.trackers = [*self.trackers, "tensorboard"]
            self.tensorboard = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    precision: Precision = Precision.auto

    # Derived values: the recipe's numbers at this run's global batch.
    @property
    def lr(self) -> float:
        """Base learning rate at the configured global batch (linear scaling from 0.1 per 256)."""
        return self.optim.lr_per_256 * self.optim.global_batch_size / 256

    def _rescale(self, steps: int) -> int:
        return round(steps * self.schedule.reference_batch_size / self.optim.global_batch_size)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule at the configured global batch."""
        return self._rescale(self.schedule.total_steps)

    @property
    def milestones(self) -> list[int]:
        return [self._rescale(m) for m in self.schedule.milestones]

    @property
    def warmup_steps(self) -> int:
        return self._rescale(self.schedule.warmup_steps)

    @property
    def stop_step(self) -> int:
        """The step this run stops at: the schedule's end, or schedule.max_steps if earlier."""
        if self.schedule.max_steps is None:
            return self.total_steps
        return min(self.schedule.max_steps, self.total_steps)


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): warm-up, then step decay or cosine."""
    base = cfg.lr
    warmup = cfg.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.schedule.kind is ScheduleKind.cosine:
        span = max(1, cfg.total_steps - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return base * 0.1 ** sum(step >= m for m in cfg.milestones)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or only defaults when `path` is None), apply `key=value` overrides,
    check types, choices and cross-field rules. Raises ConfigError naming the file and key."""
    if path is None:
        return _build(None, "defaults", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (the paper's recipes are configs/*.yaml)")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors come in several types
        # The parser's message spans lines; the command line prints the error as one.
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return _build(node, str(path), overrides)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def recipe(name: str) -> Config | None:
    """The training recipe of model `name`, configs/<name>.yaml; None where it has none."""
    path = CONFIG_DIR / f"{name}.yaml"
    return load_config(path) if path.is_file() else None


def config_from_yaml(text: str, where: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Like `load_config`, from YAML text (the config embedded in a checkpoint)."""
    return _build(OmegaConf.create(text), where, overrides)


def _build(node, where: str, overrides) -> Config:
    schema = OmegaConf.structured(Config)
    if node is not None and not OmegaConf.is_dict(node):
        raise ConfigError(f"{where}: expected a YAML mapping of sections (model:, data:, optim:, ...)")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr_per_256=0.05)")
    try:
        layers = [schema] + ([node] if node is not None else [])
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers[1:]:
            _read_compile_boolean(layer)
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{where}: required keys not set: {', '.join(missing)}")
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, where, schema, overrides)) from None
    validate(cfg, where)
    return cfg


def _read_compile_boolean(layer) -> None:
    """model.compile was a boolean before it named a mode: true is torch.compile's default mode,
    false is eager. Rewrites a boolean in `layer` (a YAML file's or the overrides') to that name."""
    model = layer.get("model") if OmegaConf.is_dict(layer) else None
    if not OmegaConf.is_dict(model) or "compile" not in model or OmegaConf.is_interpolation(model, "compile"):
        return
    if isinstance(model["compile"], bool):
        model["compile"] = "default" if model["compile"] else "false"


def _describe(e: OmegaConfBaseException, where: str, schema, overrides) -> str:
    key = getattr(e, "full_key", None) or "?"
    message = str(getattr(e, "msg", "") or e).splitlines()[0]
    source = f"{where} (or the overrides {list(overrides)})" if overrides else where
    text = f"{source}: key '{key}': {message}"
    if "not in" in message:  # unknown key: list the valid keys of its section
        section = schema
        for part in key.split(".")[:-1]:
            section = section.get(part) if OmegaConf.is_dict(section) else None
        if OmegaConf.is_dict(section):
            text += f"; valid keys here: {', '.join(section.keys())}"
    return text


def validate(cfg: Config, where: str = "config", world_size: int | None = None) -> None:
    """Cross-field checks. With `world_size` (at run time), also that the global batch splits over
    the devices and that a data root is set. Whether `model.name` is registered is checked where the
    model is built (`ran_bench.models.create_model` names the known ones)."""
    def fail(message: str):
        raise ConfigError(f"{where}: {message}")

    o, s = cfg.optim, cfg.schedule
    for key, value in [("optim.global_batch_size", o.global_batch_size),
                       ("optim.per_device_batch_size", o.per_device_batch_size),
                       ("schedule.reference_batch_size", s.reference_batch_size),
                       ("schedule.total_steps", s.total_steps), ("data.train_size", cfg.data.train_size),
                       ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                       ("eval.batch_size", cfg.eval.batch_size), ("log.every_steps", cfg.log.every_steps)]:
        if value < 1:
            fail(f"{key} must be >= 1, got {value}")
    if o.global_batch_size % o.per_device_batch_size:
        fail(f"optim.global_batch_size ({o.global_batch_size}) must be a multiple of "
             f"optim.per_device_batch_size ({o.per_device_batch_size})")
    if o.lr_per_256 <= 0:
        fail(f"optim.lr_per_256 must be > 0, got {o.lr_per_256}")
    if cfg.total_steps < 1:
        fail(f"schedule.total_steps ({s.total_steps} at batch {s.reference_batch_size}) is below one step "
             f"at global batch {o.global_batch_size}")
    if list(s.milestones) != sorted(s.milestones):
        fail(f"schedule.milestones must be increasing, got {list(s.milestones)}")
    if s.max_steps is not None and s.max_steps < 1:
        fail(f"schedule.max_steps must be >= 1 or null, got {s.max_steps}")
    if not cfg.data.test_sizes or min(cfg.data.test_sizes) < 1:
        fail(f"data.test_sizes must list at least one positive size, got {list(cfg.data.test_sizes)}")
    if not 0.0 <= cfg.data.label_noise < 1.0:
        fail(f"data.label_noise is a fraction in [0, 1), got {cfg.data.label_noise}")
    if cfg.data.augmentation not in AUGMENTATIONS:
        fail(f"data.augmentation: unknown value {cfg.data.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    unknown = [name for name in cfg.log.trackers if name not in TRACKERS]
    if unknown:
        fail(f"log.trackers: unknown tracker {', '.join(map(repr, unknown))}; choose from {', '.join(TRACKERS)}")
    if not cfg.log.project.strip():
        fail("log.project must not be empty (it names the trackers' project, e.g. ran-bench)")
    if cfg.data.backend is Backend.synthetic and cfg.data.num_classes is None:
        fail("data.num_classes must be set for the synthetic backend")
    if world_size is not None:
        if cfg.data.backend is not Backend.synthetic and not cfg.data.root:
            fail(f"data.root is not set (backend {cfg.data.backend.name} reads images); "
                 "pass data.root=/path/to/imagenet, or data.backend=synthetic")
        per_step = world_size * o.per_device_batch_size
        if o.global_batch_size % per_step:
            fail(f"optim.global_batch_size ({o.global_batch_size}) must be a multiple of world size "
                 f"({world_size}) x optim.per_device_batch_size ({o.per_device_batch_size}) = {per_step}; "
                 f"change optim.per_device_batch_size or the number of processes")


def check_resume(saved: Config, new: Config, checkpoint: str) -> None:
    """Refuse to resume `checkpoint` (trained with `saved`) under a config that changes any of
    RESUME_KEYS; ConfigError lists each key with its old and new value."""
    old_values, new_values = _plain(saved), _plain(new)
    changed = [(key, _select(old_values, key), _select(new_values, key)) for key in RESUME_KEYS
               if _select(old_values, key) != _select(new_values, key)]
    if changed:
        listing = "; ".join(f"{key}: {old!r} in the checkpoint, {value!r} now" for key, old, value in changed)
        raise ConfigError(
            f"{checkpoint} was trained with a different recipe ({listing}); resuming would continue with the "
            f"checkpoint's learning rate, schedule and weights under a config that does not describe them. "
            f"Keep the old values (drop the overrides, or restore the run's config.yaml), or train with the new "
            f"ones in a new run directory (--run-dir)")


def _plain(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def _select(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step so that every step sees `optim.global_batch_size` images."""
    validate(cfg, world_size=world_size)
    return cfg.optim.global_batch_size // (world_size * cfg.optim.per_device_batch_size)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
