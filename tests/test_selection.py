"""Model selection on validation, test read once at the end: the splits, the best checkpoint,
early stopping, epochs and `python -m vit_jax.sweep`."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import common
from configs import testing as testing_config
from tests.image_folders import COLORS, write_colour_folder
from vit_jax import checkpoint, config_checks, input_pipeline, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A constant learning rate after warmup (linear decay to the same value): the schedule does not
# depend on total_steps, so runs of different lengths take the same steps.
CONSTANT_LR = dict(decay_type="linear", base_lr=0.1, linear_end=0.1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """train/ (24 per colour), val/ (4 per colour) and test/ (7 per colour)."""
  root = tmp_path_factory.mktemp("colours")
  write_colour_folder(root)
  write_colour_folder(root / "extra", train_per_class=4, test_per_class=0)
  os.rename(root / "extra" / "train", root / "val")
  return str(root)


def _config(folder, **overrides):
  config = common.with_overrides(testing_config.get_config(), {"dataset": folder, **overrides})
  config.unlock()
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def selected(tmp_path_factory, folder):
  """A run choosing on val_accuracy, with the split of every evaluation recorded."""
  seen = []
  real = input_pipeline.get_eval_dataset

  def recording(config, info, **kwargs):
    seen.append(kwargs.get("split", "test"))
    return real(config, info, **kwargs)

  input_pipeline.get_eval_dataset = recording
  try:
    workdir = str(tmp_path_factory.mktemp("selected"))
    summary = train.train_and_evaluate(
      _config(folder, best_metric="val_accuracy", eval_every=3), workdir
    )
  finally:
    input_pipeline.get_eval_dataset = real
  return workdir, summary, seen


# --- Splits ----------------------------------------------------------------------------------


def test_a_val_folder_is_the_validation_split(folder):
  info = input_pipeline.get_dataset_info(_config(folder))
  assert info.num_examples == {"train": 72, "val": 12, "test": 21}
  assert all("/val/" in p for p in info.source.splits["val"].data)


def test_without_a_val_folder_val_is_a_stratified_fraction_of_train_the_same_every_time(tmp_path):
  root = write_colour_folder(tmp_path / "data", train_per_class=30)
  config = _config(root, val_fraction=0.2)
  first, again = (input_pipeline.get_dataset_info(config).source.splits for _ in range(2))
  val, rest = first["val"], first["train"]
  assert np.bincount(val.labels).tolist() == [6, 6, 6]  # 20 % of each class's 30
  assert not set(val.data) & set(rest.data) and len(val.data) + len(rest.data) == 90
  assert val.data.tolist() == again["val"].data.tolist()


def test_a_val_class_that_train_lacks_is_an_error_naming_its_folder(tmp_path):
  root = write_colour_folder(tmp_path / "data")
  write_colour_folder(tmp_path / "more", train_per_class=1, test_per_class=0)
  os.rename(tmp_path / "more" / "train", root + "/val")
  os.rename(root + "/val/red", root + "/val/purple")
  with pytest.raises(ValueError, match=r"val/purple has no counterpart.*missing from train"):
    input_pipeline.get_dataset_info(_config(root))


def test_val_fraction_zero_has_no_validation_and_refuses_a_best_metric(tmp_path):
  root = write_colour_folder(tmp_path / "data")
  assert input_pipeline.get_dataset_info(_config(root, val_fraction=0.0)).num_examples["val"] == 0
  with pytest.raises(config_checks.ConfigError, match="needs a validation split"):
    train.train_and_evaluate(
      _config(root, val_fraction=0.0, best_metric="val_accuracy"), str(tmp_path / "w")
    )


# --- Evaluation during training is on val; test once, at the end -------------------------------


def test_the_model_sees_the_test_split_only_after_the_last_step(selected):
  workdir, summary, seen = selected
  assert seen == ["val"] * 4 + ["test", "test"]  # steps 3, 6, 9, 12; final and best params
  rows = _metrics(workdir)
  assert [r["step"] for r in rows if "val_accuracy" in r] == [3, 6, 9, 12]
  assert [r["step"] for r in rows if "test_accuracy" in r] == [12]
  assert [r["step"] for r in rows if "best_test_accuracy" in r] == [12]
  assert all(r["val_count"] == 12 for r in rows if "val_count" in r)


def test_the_best_checkpoint_names_val_accuracy_as_what_chose_it(selected):
  workdir, summary, _ = selected
  meta = checkpoint.load_metadata(os.path.join(workdir, "best_params.npz"))
  assert meta["best_metric"] == "val_accuracy" and meta["chosen_on"] == "val"
  assert meta["best_step"] == summary["best_step"]
  vals = {r["step"]: r["val_accuracy"] for r in _metrics(workdir) if "val_accuracy" in r}
  assert vals[summary["best_step"]] == max(vals.values())
  assert summary["best_test_count"] == summary["test_count"] == 21


def test_best_metric_on_the_test_split_is_refused_saying_what_to_use(folder):
  with pytest.raises(config_checks.ConfigError, match=r"test split.*use 'val_loss'"):
    config_checks.validate_config(_config(folder, best_metric="test_loss"))


# --- Early stopping -----------------------------------------------------------------------------


def _early(folder, workdir, total_steps):
  config = _config(
    folder,
    best_metric="val_accuracy",
    early_stop_patience=2,
    eval_every=2,
    total_steps=total_steps,
    checkpoint_every=2,
    **CONSTANT_LR,
  )
  return train.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, folder):
  workdir = str(tmp_path_factory.mktemp("early"))
  return workdir, _early(folder, workdir, 60)


def test_early_stopping_ends_the_run_and_exports_the_best(stopped):
  workdir, summary = stopped
  stop, best = summary["early_stop"]["step"], summary["best_step"]
  assert summary["step"] == stop == best + 2 * 2 < 60  # 2 evaluations without improvement
  assert "did not improve" in summary["early_stop"]["reason"]
  assert checkpoint.load_metadata(os.path.join(workdir, "best_params.npz"))["best_step"] == best
  assert [r["step"] for r in _metrics(workdir) if "test_accuracy" in r] == [stop]


def test_a_rerun_of_a_stopped_run_trains_no_further(stopped, folder):
  workdir, summary = stopped
  again = _early(folder, workdir, 60)
  assert again["first_step"] == again["step"] == summary["step"]


def test_a_resumed_run_keeps_its_patience_count(tmp_path, stopped, folder):
  _, summary = stopped
  workdir = str(tmp_path / "resumed")
  first = _early(folder, workdir, summary["best_step"] + 2)  # ends 1 evaluation after the best
  assert "early_stop" not in first
  resumed = _early(folder, workdir, 60)
  assert resumed["first_step"] == summary["best_step"] + 2
  assert resumed["early_stop"]["step"] == summary["early_stop"]["step"]


# --- Epochs ------------------------------------------------------------------------------------


def test_epochs_become_ceil_of_epochs_times_train_over_batch(folder):
  config, line = config_checks.resolve_schedule(
    _config(folder, total_steps=0, num_epochs=2.5, warmup_steps=0, warmup_epochs=0.5), 72
  )
  assert (config.total_steps, config.warmup_steps) == (6, 2)  # ceil(180 / 32), ceil(36 / 32)
  assert "ceil(2.5 x 72 train examples / batch 32) = 6 steps" in line


def test_a_run_by_epochs_trains_exactly_that_many_steps(tmp_path, folder):
  summary = train.train_and_evaluate(
    _config(folder, total_steps=0, num_epochs=1.0, eval_every=100), str(tmp_path / "epochs")
  )
  assert summary["step"] == 3 and "= 3 steps" in summary["schedule"]  # ceil(72 / 32)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(num_epochs=2.0), r"num_epochs=2.0 and config.total_steps=12 are both set"),
    (dict(warmup_epochs=1.0), r"warmup_epochs=1.0 and config.warmup_steps=2 are both set"),
    (dict(early_stop_patience=3), r"early_stop_patience needs config.best_metric"),
  ],
)
def test_conflicting_schedule_fields_are_one_error(folder, overrides, message):
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate_config(_config(folder, **overrides))


# --- Sweeps ------------------------------------------------------------------------------------


def _sweep(workdir, folder, *extra):
  cmd = [sys.executable, "-m", "vit_jax.sweep", "--config=configs/testing.py"]
  cmd += [f"--workdir={workdir}", f"--config.dataset={folder}", "--config.eval_every=4"]
  cmd += ["--sweep=base_lr=0.1,1e30", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def test_a_killed_sweep_resumes_skips_finished_points_and_never_chooses_a_diverged_one(
  tmp_path, folder
):
  workdir = tmp_path / "sweep"
  proc = _sweep(workdir, folder)
  first = workdir / "base_lr=0.1" / "sweep_point.json"
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert first.exists(), proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGKILL)  # during the second point
  proc.wait()
  finished = first.stat().st_mtime_ns
  proc = _sweep(workdir, folder)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "base_lr=0.1 finished before" in err and first.stat().st_mtime_ns == finished
  result = json.loads((workdir / "sweep.json").read_text())
  status = {p["name"]: p["status"] for p in result["points"]}
  assert status == {"base_lr=0.1": "done", "base_lr=1e+30": "failed"}
  assert result["chosen"] == "base_lr=0.1" and result["metric"] == "val_accuracy"
  assert "chosen: base_lr=0.1 (val_accuracy on the val split)" in out
  assert result["test"]["count"] == 21
  report = json.loads((workdir / "report" / "report.json").read_text())
  assert report["source"]["split"] == "test" and "val_accuracy on the val split" in str(report)
  assert (workdir / "best_params.npz").exists() and (workdir / "sweep.png").exists()
  table = (workdir / "sweep.md").read_text()
  assert "**base_lr=0.1** (chosen)" in table and "failed: training diverged" in table
  assert sorted(COLORS) == checkpoint.load_metadata(str(workdir / "best_params.npz"))["class_names"]


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--sweep=base_lrr=0.1,0.2", "config has no field 'base_lrr'"),
    ("--sweep=total_steps=10,2.5", "'2.5' is not an int"),
  ],
)
def test_a_bad_grid_is_one_error_line_before_anything_trains(tmp_path, folder, flag, message):
  proc = subprocess.run(
    [sys.executable, "-m", "vit_jax.sweep", "--config=configs/testing.py"]
    + [f"--workdir={tmp_path / 'w'}", f"--config.dataset={folder}", flag],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and "error: --sweep=" in proc.stderr and message in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()
