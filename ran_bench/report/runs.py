"""Reading run directories for the report: results.json, config.yaml (the model's ablation
options) and metrics.jsonl of each run, with errors that name the file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ran_bench import metrics
from ran_bench.errors import UserError
from ran_bench.results import Results, load_results

# The paper's schedules in images (ImageNet 530k iterations x 256, CIFAR 160k x 64): how much of them a run did.
PAPER_SCHEDULE_IMAGES = {"imagenet": 530_000 * 256, "cifar10": 160_000 * 64, "cifar100": 160_000 * 64}
PAPER_DATASET_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}
# Images of the test sets the paper reports on: an evaluation on fewer is flagged.
FULL_TEST_IMAGES = {"imagenet": 50_000, "cifar10": 10_000, "cifar100": 10_000}

# Constructor defaults of the attention models: a config that does not set an option gets these.
MODEL_OPTION_DEFAULTS = {"attention": "mixed", "residual_attention": True, "mask": "encoder_decoder"}
MODEL_OPTION_CHOICES = {
    "attention": ("mixed", "channel", "spatial"),
    "residual_attention": (True, False),
    "mask": ("encoder_decoder", "local_conv"),
}


class ReportError(ValueError, UserError):
    """A run directory that cannot be reported: a missing or malformed file, named in the message."""


@dataclass
class Run:
    """One run directory: its results, resolved config and metrics log."""

    path: Path
    label: str
    results: Results
    options: dict  # model.options of the config, MODEL_OPTION_DEFAULTS filled in
    train_metrics: list[dict]
    eval_metrics: list[dict]

    @property
    def model(self) -> str:
        return self.results.model

    @property
    def dataset(self) -> str:
        """Data set name normalised for matching: "imagenet", "cifar10" or "cifar100" when the name
        and the number of classes say so; otherwise the name as given, with the classes if the
        name alone would pass for one of the paper's data sets (a 100-class ImageNet subset)."""
        raw, classes = self.results.dataset, self.results.num_classes
        name = raw.lower().replace("-", "").replace("_", "")
        if name.startswith("imagenet"):
            name = "imagenet"
        if name in PAPER_DATASET_CLASSES:
            return name if classes == PAPER_DATASET_CLASSES[name] else f"{raw} ({classes} classes)"
        return raw

    @property
    def label_noise(self) -> float:
        return self.results.label_noise

    @property
    def augmentation(self) -> str:
        """The training augmentation (`data.augmentation`); results.json files written before the
        field existed were all trained with the ImageNet transforms."""
        return getattr(self.results, "augmentation", "imagenet")

    @property
    def schedule_share(self) -> float | None:
        """Images seen as a share of the paper's schedule on the run's data set (None off the
        paper's data sets)."""
        paper_images = PAPER_SCHEDULE_IMAGES.get(self.dataset)
        return None if paper_images is None else self.results.images_seen / paper_images

    @property
    def status(self) -> str:
        return "partial" if self.results.partial else "complete"

    def non_default_options(self) -> dict:
        """Constructor options that change the model from the paper's default (ARL, mixed
        attention, encoder-decoder mask), including any other option such as p, t, r."""
        defaults = MODEL_OPTION_DEFAULTS
        return {k: v for k, v in self.options.items() if k not in defaults or v != defaults[k]}


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory (or its results.json); errors name the file and what is wrong."""
    path = Path(path)
    if path.is_file() and path.name == "results.json":
        path = path.parent
    if not path.is_dir():
        raise ReportError(f"{path}: not a run directory (expected the --run-dir of `ran-bench train`)")
    results = load_results(path / "results.json")
    options = _model_options(path / "config.yaml", results.model)
    train, evals = metrics.read(path)
    return Run(path, path.name, results, options, train, evals)


def _model_options(config_path: Path, model: str) -> dict:
    """The constructor options the run's model was built with (`model.options` of its resolved
    config.yaml). An ablation option the config does not set is the model's constructor default,
    so models without options (the baselines) read as the paper's defaults.
    """
    if not config_path.is_file():
        raise ReportError(f"{config_path}: not found; `ran-bench train` writes the resolved config "
                          "there, and the report needs it to tell which ablation a run belongs to")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{config_path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a mapping of config sections, got {type(config).__name__}")
    section = config.get("model", {})
    if not isinstance(section, dict):
        raise ReportError(f"{config_path}: 'model' must be a mapping, got {section!r}")
    name = section.get("name")
    if name is not None and name != model:
        raise ReportError(f"{config_path}: model.name is {name!r} but results.json says {model!r}; "
                          "the run directory mixes files of two runs")
    values = section.get("options") or {}
    if not isinstance(values, dict):
        raise ReportError(f"{config_path}: model.options must be a mapping, got {values!r}")
    options = {**MODEL_OPTION_DEFAULTS, **values}
    for key, choices in MODEL_OPTION_CHOICES.items():
        value = options[key]
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ReportError(f"{config_path}: model.options.{key} is {value!r}; valid values: {list(choices)}")
    return options


def unique_labels(runs: list[Run]) -> None:
    """Label runs by directory name, adding parent folders where two names collide."""
    for depth in range(1, 8):
        labels = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels):
            break
    for run, label in zip(runs, labels):
        run.label = label
