"""Experiment trackers (`log.trackers`) through Accelerate's own tracker support (`log_with`).

Accelerate starts the trackers and sends them what `ran-bench train` logs, on the main process
only; the training loop logs each metrics.jsonl row at its step. This module adds what a run
needs around that: one error at start-up for a tracker whose package is missing (Accelerate
would leave it out with a debug line), local stores under RUN_DIR/trackers, the flattened config
as hyper-parameters once per tracker run, and one MLflow run per run directory across launches.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import accelerate
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from omegaconf import OmegaConf

from ran_bench.config import TRACKERS, Config, ConfigError
from ran_bench.fileio import write_json_atomic

log = logging.getLogger("ran_bench.trackers")
TRACKER_DIR = "trackers"  # RUN_DIR/trackers: what the trackers write locally (TensorBoard, MLflow's store)
MLFLOW_RECORD = "mlflow_run.json"  # in TRACKER_DIR: the MLflow run the next launch continues


def check_installed(names: list[str]) -> None:
    """One ConfigError naming every tracker in `names` whose package is not installed."""
    missing = [name for name in names if not any(importlib.util.find_spec(m) for m in TRACKERS[name][0])]
    if missing:
        packages = " ".join(TRACKERS[name][1] for name in missing)
        raise ConfigError(f"log.trackers: {', '.join(missing)} not installed: pip install {packages} (or remove "
                          f"{'it' if len(missing) == 1 else 'them'} from log.trackers)")


def project_config(run_dir: Path) -> ProjectConfiguration:
    """Accelerate's directories for a run: the trackers' local files go to RUN_DIR/trackers."""
    return ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TRACKER_DIR))


def check_accepted(accelerator: Accelerator, names: list[str]) -> None:
    """A ConfigError when Accelerate left out one of `names` although its package is installed
    (a version it cannot use, such as aim 4): the run would go without that log."""
    dropped = [name for name in names if name not in {str(t) for t in accelerator.log_with}]
    if dropped:
        raise ConfigError(f"log.trackers: Accelerate {accelerate.__version__} cannot use the installed "
                          f"{', '.join(dropped)}; install a version it supports or remove it from log.trackers")


def start(accelerator: Accelerator, cfg: Config, run_dir: Path) -> None:
    """Start the trackers of `cfg.log.trackers` in project `cfg.log.project` (call on the main
    process) and give each new tracker run the flattened config. Every launch starts new runs
    (TensorBoard: a new event file) except MLflow's: a launch continues the run directory's MLflow
    run, whose parameters stay those of its first launch."""
    if not cfg.log.trackers:
        return
    init_kwargs = {"mlflow": _mlflow_kwargs(run_dir)} if "mlflow" in cfg.log.trackers else {}
    accelerator.init_trackers(cfg.log.project, init_kwargs=init_kwargs)
    hparams = flat_hparams(cfg)
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            run_id = tracker.tracker.info.run_id
            _save_mlflow_run(run_dir, run_id)
            if init_kwargs["mlflow"].get("run_id") == run_id:
                continue  # MLflow refuses a parameter whose value changes; config.yaml has this launch's
        tracker.store_init_configuration(hparams)


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """The config as `section.key: value` pairs of plain values (others as text)."""
    def flat(prefix: str, node) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                out.update(flat(name + ".", value))
            else:
                out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    return flat("", OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))


def _mlflow_kwargs(run_dir: Path) -> dict[str, Any]:
    """MLflow's run: named after the run directory, stored in RUN_DIR/trackers/mlruns unless
    MLFLOW_TRACKING_URI says otherwise, and the one an earlier launch started if the store has it."""
    import mlflow

    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store unless asked
        mlflow.set_tracking_uri((run_dir / TRACKER_DIR / "mlruns").resolve().as_uri())
    kwargs: dict[str, Any] = {"run_name": run_dir.resolve().name}
    record = run_dir / TRACKER_DIR / MLFLOW_RECORD
    if record.is_file():
        run_id = json.loads(record.read_text()).get("run_id")
        try:
            mlflow.tracking.MlflowClient().get_run(run_id)
            kwargs["run_id"] = run_id
        except mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s of %s is not in %s; starting a new one", run_id, record,
                        mlflow.get_tracking_uri())
    return kwargs


def _save_mlflow_run(run_dir: Path, run_id: str) -> None:
    """RUN_DIR/trackers/mlflow_run.json: the MLflow run the next launch of this run continues."""
    import mlflow

    record = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run_id}
    write_json_atomic(run_dir / TRACKER_DIR / MLFLOW_RECORD, record)
    log.info("MLflow run %s in %s", run_id, record["tracking_uri"])
