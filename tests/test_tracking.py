"""Tracking: TensorBoard and MLflow (a file store) get every epoch's metrics, the recipe and the plan; a missing
logger package is one line naming the extra."""
import sys

import pytest

from finetune import fit
from finetune.recipe import RecipeError, load_recipe
from finetune.tracking import loggers

TINY = ["train.epochs=2", "image.size=32", "train.num_workers=0"]


def test_tensorboard_and_mlflow_hold_every_epoch(textures, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run = fit(textures, "natural", out=tmp_path, name="r", progress=False,
              overrides=TINY + ["train.loggers=[csv, tensorboard, mlflow]"])
    epochs = run.metrics()
    assert len(epochs) == 2 and (run.path / "logs").is_dir()  # the CSV log stays the run's own table

    (events,) = (run.path / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    val = [e.value for e in acc.Scalars("val_acc")]
    assert val == pytest.approx(list(epochs["val_acc"]), abs=1e-6)
    assert len(acc.Scalars("train_loss_epoch")) == 2 and acc.Scalars("final_val_acc")[0].value == pytest.approx(val[-1])

    client = MlflowClient(tracking_uri=store)
    (exp,) = [e for e in client.search_experiments() if e.name == "finetune"]
    (mrun,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(mrun.info.run_id, "val_acc")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(epochs["val_acc"]), abs=1e-6)
    assert len(client.get_metric_history(mrun.info.run_id, "train_loss_epoch")) == 2
    params = mrun.data.params
    assert params["optim.lr"] == "0.001" and params["image.size"] == "32" and params["plan.head"].startswith("trains from 0")
    assert mrun.data.metrics["final_val_acc"] == pytest.approx(val[-1])
    files = {f.path for f in client.list_artifacts(mrun.info.run_id)}
    assert {"recipe.yaml", "plan.txt"} <= files


def test_missing_logger_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as if it were not installed
    with pytest.raises(ImportError, match=r"^train.loggers: wandb needs .*pip install 'finetune\[wandb\]'$"):
        loggers(["csv", "wandb"], tmp_path)
    with pytest.raises(RecipeError, match="train.loggers\\[1\\].*choose one of csv, tensorboard, mlflow, wandb"):
        load_recipe("natural", ["train.loggers=[csv, neptune]"])
