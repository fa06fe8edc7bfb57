"""Experiment trackers (issue 14): `log.trackers` through Accelerate's own tracker support.

- The names are Accelerate's; an unknown one is one config error listing the valid ones; the old
  `log.tensorboard: true` still selects TensorBoard, also read back from a run's config.yaml.
- A tracker whose package is not installed is one error line (exit 2) from `ran-bench train`,
  before anything is built or written: no run directory.
- End to end with a real MLflow file store (mlflow-skinny, a test extra): the demo config started
  as scripts/demo.sh runs it (torchrun, 2 processes) and continued in 1 process is one MLflow run
  in RUN_DIR/trackers/mlruns, holding the flattened config of its first launch, and metric
  histories equal to metrics.jsonl's rows, value and step, read back through MLflow's client.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import REPO, run_torchrun
from ran_bench import metrics, trackers
from ran_bench.config import TRACKERS, ConfigError, config_from_yaml, load_config, to_yaml

DEMO = REPO / "configs" / "demo.yaml"
# The demo recipe cut to a few steps: 4 images a step (2 processes x 2, or 1 x 2 x 2 accumulation),
# a metrics line a step, evaluations at step 3 and at the end of each launch.
SHORT = ["optim.global_batch_size=4", "optim.per_device_batch_size=2", "schedule.reference_batch_size=4",
         "schedule.total_steps=6", "schedule.warmup_steps=0", "checkpoint.every_steps=2", "eval.every_steps=3",
         "eval.batch_size=3", "log.every_steps=1", "data.num_threads=0"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from ran_bench.data.demo import make_demo

    root = tmp_path_factory.mktemp("trackers") / "demo"
    make_demo(root, num_classes=3, train_per_class=8, val_per_class=3, min_side=24, max_side=40)
    return root


@pytest.fixture
def no_mlflow_settings(monkeypatch):
    """The runs here use ran-bench's defaults, not a tracking server or experiment set in the shell."""
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)


def _ran_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "ran_bench", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_the_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {str(t) for t in LoggerType} - {"all"}


@pytest.mark.parametrize("names", ["[mlflow,mlfow]", "[all]", "[TensorBoard]"])
def test_an_unknown_tracker_is_one_config_error_listing_the_valid_ones(names):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["model.name=cifar_attention56", f"log.trackers={names}"])
    message = str(caught.value)
    unknown = names.strip("[]").split(",")[-1]
    assert message == f"defaults: log.trackers: unknown tracker '{unknown}'; choose from {', '.join(TRACKERS)}"


def test_an_empty_project_is_a_config_error(tmp_path):
    path = tmp_path / "blank.yaml"
    path.write_text("model: {name: cifar_attention56}\nlog: {trackers: [mlflow], project: ' '}\n")
    with pytest.raises(ConfigError, match=r"log.project must not be empty"):
        load_config(path)


def test_a_tracker_accelerate_leaves_out_is_an_error_not_a_run_without_its_log():
    from accelerate.utils import LoggerType

    accelerator = SimpleNamespace(log_with=[LoggerType.MLFLOW])  # what Accelerate keeps of [mlflow, aim] with aim 4
    with pytest.raises(ConfigError, match=r"^log.trackers: Accelerate \S+ cannot use the installed aim; "):
        trackers.check_accepted(accelerator, ["mlflow", "aim"])
    trackers.check_accepted(accelerator, ["mlflow"])


def test_the_old_tensorboard_key_selects_tensorboard(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model: {name: cifar_attention56}\nlog: {every_steps: 10, tensorboard: true}\n")
    cfg = load_config(old)
    assert cfg.log.trackers == ["tensorboard"]
    # The run directory's config.yaml (read when resuming) keeps the choice, in the new spelling.
    assert config_from_yaml(to_yaml(cfg), "config.yaml").log.trackers == ["tensorboard"]
    assert load_config(old, ["log.trackers=[mlflow,tensorboard]"]).log.trackers == ["mlflow", "tensorboard"]
    assert load_config(None, ["model.name=cifar_attention56", "log.tensorboard=false"]).log.trackers == []


def test_a_tracker_that_is_not_installed_is_one_error_before_anything_runs(tmp_path):
    missing = [name for name in sorted(TRACKERS, key=lambda n: n != "wandb")
               if not any(importlib.util.find_spec(m) for m in TRACKERS[name][0])]
    if not missing:
        pytest.skip("every tracker's package is installed here")
    name = missing[0]
    proc = _ran_bench("train", "--config", str(DEMO), "--run-dir", str(tmp_path / "run"), f"log.trackers=[{name}]")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: log.trackers: {name} not installed: pip install {TRACKERS[name][1]} (or remove it from log.trackers)"]
    assert list(tmp_path.iterdir()) == []  # no run directory: nothing was trained or written


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.slow
@pytest.mark.dist
def test_mlflow_holds_the_config_once_and_the_metrics_of_metrics_jsonl(demo_data, tmp_path, monkeypatch,
                                                                       no_mlflow_settings):
    mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny (the test extra) is not installed")
    run_dir = tmp_path / "demo7"
    first = [*SHORT, f"data.root={demo_data}", "log.trackers=[mlflow]", "schedule.max_steps=4"]
    run_torchrun(["-m", "ran_bench", "train", "--config", str(DEMO), "--run-dir", str(run_dir), *first])
    # Raising schedule.max_steps continues the partial run; MLflow would refuse its new value as a parameter.
    proc = _ran_bench("train", "--run-dir", str(run_dir), "schedule.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-6000:]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked
    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "trackers" / "mlruns").resolve().as_uri())
    experiments = client.search_experiments()
    [run] = client.search_runs([e.experiment_id for e in experiments])  # one run for both launches and ranks
    assert client.get_experiment(run.info.experiment_id).name == "ran-bench"
    assert (run.info.run_name, run.info.status) == ("demo7", "FINISHED")
    assert json.loads((run_dir / "trackers" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    launched = load_config(DEMO, first)
    expected = _leaves(OmegaConf.to_container(OmegaConf.structured(launched), enum_to_str=True))
    assert run.data.params == {key: str(value) for key, value in expected.items()}
    assert run.data.params["schedule.max_steps"] == "4"

    train, evals = metrics.read(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 4, 6]

    def history(key: str) -> list[tuple[int, float]]:
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        return [(m.step, m.value) for m in points]

    for key in ("loss", "lr", "images_per_s"):
        assert history(f"train/{key}") == [(r["step"], r[key]) for r in train], key
    for key in ("top1_err", "top5_err"):
        assert history(f"eval/{key}_32") == [(r["step"], r[key]) for r in evals], key
