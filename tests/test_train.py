"""Training end to end on 8 fake CPU devices, the `testing` model and a generated image folder."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import testing as testing_config
from tests import npz_fixtures
from tests.image_folders import COLORS, write_colour_folder
from vit_jax import checkpoint, config_checks, models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 colour classes, 24 train and 7 test JPEGs each (7 * 3 = 21: eval has a remainder)."""
  return write_colour_folder(tmp_path_factory.mktemp("colours"))


def _config(folder, **overrides):
  config = common.with_overrides(testing_config.get_config(), {"dataset": folder, **overrides})
  config.unlock()
  return config


def _run(tmp_path, folder, name, **overrides):
  workdir = str(tmp_path / name)
  summary = train.train_and_evaluate(_config(folder, **overrides), workdir)
  return workdir, summary


def _params(workdir):
  return checkpoint.load(os.path.join(workdir, "params.npz"))


def _assert_same_params(a, b, atol):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), _params(a), _params(b))
  assert max(jax.tree.leaves(diffs)) <= atol


@pytest.fixture(scope="module")
def jit_run(tmp_path_factory, folder):
  return _run(tmp_path_factory.mktemp("runs"), folder, "jit")


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------


def test_training_lowers_the_loss(jit_run):
  losses = [m["train_loss"] for m in _metrics(jit_run[0]) if "train_loss" in m]
  assert losses[-1] < 0.5 * losses[0]


def test_checkpoints_at_exactly_the_configured_cadence(jit_run):
  assert _steps(jit_run[0]) == [4, 8, 12]


def test_evaluation_counts_every_example_once_val_during_training_test_at_the_end(jit_run):
  rows = _metrics(jit_run[0])
  vals = [m for m in rows if "val_count" in m]
  assert [m["step"] for m in vals] == [6, 12]
  assert all(m["val_count"] == 6 for m in vals)  # val_fraction 0.1 of 24 per class: 2 each
  tests = [m for m in rows if "test_count" in m]
  assert [(m["step"], m["test_count"]) for m in tests] == [(12, 21)]  # batch_eval 16: padded


def test_run_exports_the_original_format_with_class_names(jit_run):
  workdir, summary = jit_run
  assert checkpoint.load_metadata(os.path.join(workdir, "params.npz"))["class_names"] == sorted(
    COLORS
  )
  with np.load(os.path.join(workdir, "params.npz")) as npz:
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in npz.files
  assert summary["step"] == 12 and summary["test_accuracy"] > 0.9


def test_tensorboard_events_are_written(jit_run):
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(jit_run[0]))


def test_pmap_and_jit_give_the_same_parameters(tmp_path, folder, jit_run):
  pmap_dir, _ = _run(tmp_path, folder, "pmap", parallelism="pmap")
  _assert_same_params(pmap_dir, jit_run[0], atol=1e-5)


def test_fsdp_gives_the_same_parameters_as_data_parallel(tmp_path, folder, jit_run):
  fsdp_dir, _ = _run(tmp_path, folder, "fsdp", fsdp=True)
  _assert_same_params(fsdp_dir, jit_run[0], atol=1e-5)


def test_fsdp_shards_large_parameters_over_the_data_axis():
  from vit_jax import sharding

  mesh = sharding.make_mesh()
  tree = {
    "big": jax.ShapeDtypeStruct((768, 3072), np.float32),
    "small": jax.ShapeDtypeStruct((768,), np.float32),
  }
  s = sharding.state_shardings(tree, mesh, fsdp=True)
  assert s["big"].spec == jax.sharding.PartitionSpec(None, "data")
  assert s["small"].spec == jax.sharding.PartitionSpec()


def test_gradient_accumulation_equals_the_large_batch(tmp_path, folder):
  # float32 momentum: a bfloat16 buffer rounds summation-order noise (1e-7) up to 1e-5 in 12 steps.
  large, _ = _run(tmp_path, folder, "large", optim_dtype="float32")
  accum, _ = _run(tmp_path, folder, "accum", accum_steps=4, optim_dtype="float32")
  _assert_same_params(accum, large, atol=1e-5)


@pytest.mark.parametrize(
  "other", [dict(parallelism="pmap"), dict(accum_steps=4)], ids=["pmap", "accumulation"]
)
def test_with_dropout_jit_pmap_and_accumulation_give_the_same_parameters(tmp_path, folder, other):
  # Each example's dropout mask comes from (seed, step, its row in the global batch), not from
  # the device or micro-batch that computes it.
  stochastic = {
    "model.dropout_rate": 0.1,
    "model.stochastic_depth": 0.1,
    "optim_dtype": "float32",
    "total_steps": 6,
    "eval_every": 100,
  }
  jit_dir, _ = _run(tmp_path, folder, "jit_dropout", **stochastic)
  other_dir, _ = _run(tmp_path, folder, "other_dropout", **stochastic, **other)
  _assert_same_params(other_dir, jit_dir, atol=1e-5)
  plain_dir, _ = _run(
    tmp_path,
    folder,
    "no_dropout",
    **{**stochastic, "model.dropout_rate": 0.0, "model.stochastic_depth": 0.0},
  )
  with pytest.raises(AssertionError):  # dropout did act: the test compares something
    _assert_same_params(plain_dir, jit_dir, atol=1e-5)


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, folder):
  # A good run to step 4 (its checkpoint), then the same workdir resumed with a learning rate
  # that overflows the parameters: the run must stop at the first non-finite step after 4,
  # saving nothing, and leave checkpoint 4 as it was.
  workdir, _ = _run(tmp_path, folder, "nan", total_steps=4)
  assert _steps(workdir) == [4]
  good = _params(workdir)  # the export of step 4
  with pytest.raises(train.TrainingDiverged, match=r"diverged at step (\d+)") as error:
    _run(tmp_path, folder, "nan", base_lr=1e30, total_steps=12, progress_every=1)
  message = str(error.value)
  diverged_at = int(message.split("diverged at step ")[1].split(":")[0])
  assert diverged_at > 4 and "last good checkpoint (step 4)" in message
  assert _steps(workdir) == [4]
  restored, _ = checkpoint.load_for_inference(os.path.join(workdir, "checkpoints", "4"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), restored, good)
  assert max(jax.tree.leaves(diffs)) == 0


def test_pretrained_npz_at_a_new_resolution_and_class_count(tmp_path, folder):
  # The `testing` architecture saved as an in21k file: 16 px (grid 1x1), pre_logits, zero head.
  arrays = npz_fixtures.google_vit_arrays(
    hidden=10,
    mlp=10,
    heads=2,
    layers=1,
    patch=16,
    grid=1,
    num_classes=21843,
    pre_logits=True,
    zero_head=True,
  )
  path = npz_fixtures.write_npz(tmp_path / "testing.npz", arrays)
  # base_lr 0: every update is exactly zero, so the export is the run's initial state.
  workdir, summary = _run(
    tmp_path,
    folder,
    "pretrained",
    from_scratch=False,
    pretrained_path=path,
    total_steps=4,
    base_lr=0.0,
  )
  assert summary["origin"] == f"pretrained {path}"
  params = _params(workdir)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 10)  # 2x2+1
  assert params["head"]["kernel"].shape == (10, 3) and "pre_logits" not in params
  # The run started from the file's weights: every encoder array of the export is the file's, bit
  # for bit (random weights are not), and the 1x1 grid resized to 2x2 repeats its one token.
  with np.load(os.path.join(workdir, "params.npz")) as exported:
    for key, value in arrays.items():
      if key.startswith(("head/", "pre_logits/")) or key.endswith("pos_embedding"):
        continue
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
    posemb = exported["Transformer/posembed_input/pos_embedding"][0]
  file_posemb = arrays["Transformer/posembed_input/pos_embedding"][0]
  np.testing.assert_array_equal(posemb, file_posemb[[0, 1, 1, 1, 1]])  # class token, 4 x grid


# ---------------------------------------------------------------------------------------------
# Resume and pre-emption, with real processes.


def _start(workdir, *args):
  cmd = [
    sys.executable,
    "-m",
    "vit_jax.main",
    "--config=configs/testing.py",
    f"--workdir={workdir}",
    *args,
  ]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, workdir, min_step, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    ckpts = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpts) and any(int(d) >= min_step for d in os.listdir(ckpts) if d.isdigit()):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  raise TimeoutError(f"no checkpoint >= {min_step} in {workdir}")


LONG = ["--config.total_steps=300", "--config.eval_every=1000", "--config.progress_every=5"]


def test_sigkill_then_restart_ends_with_the_same_parameters(tmp_path, folder):
  reference, _ = _run(
    tmp_path, folder, "uninterrupted", total_steps=300, eval_every=1000, progress_every=5
  )
  workdir = str(tmp_path / "killed")
  proc = _start(workdir, f"--config.dataset={folder}", *LONG)
  _wait_for_checkpoint(proc, workdir, 8)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL and max(_steps(workdir)) < 300
  again = _start(workdir, f"--config.dataset={folder}", *LONG)
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-3000:]
  assert json.loads(out.strip().splitlines()[-1])["first_step"] >= 8
  _assert_same_params(workdir, reference, atol=0)


def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path, folder):
  workdir = str(tmp_path / "preempted")
  proc = _start(workdir, f"--config.dataset={folder}", *LONG)
  _wait_for_checkpoint(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["preempted"] and summary["step"] < 300
  assert max(_steps(workdir)) == summary["step"]


# ---------------------------------------------------------------------------------------------
# Bad configs: one clear message, before any work.


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(batch=12), "config.batch=12 is not divisible by the 8 devices"),
    (dict(accum_steps=3), "not divisible by config.accum_steps=3"),
    (dict(model_name="ViT-X"), "config.model_name='ViT-X' is unknown"),
    (dict(parallelism="pjit"), "config.parallelism must be 'jit' or 'pmap'"),
    (dict(pp={"crop": 30}), "config.pp.crop=30 is not a multiple"),
    (dict(model={"remat_policy": "all"}), "config.model.remat_policy must be one of"),
    (dict(model={"attention_impl": "flash"}), "config.model.attention_impl must be ''"),
    (
      dict(model_name="R+ViT-tiny_8", pp={"crop": 28}),
      r"config.pp.crop=28 is not a multiple of R\+ViT-tiny_8's pixels per token .* 8",
    ),
    (dict(model={"resnet": {"width_factor": 0.3}}), "config.model.resnet: width_factor 0.3"),
  ],
)
def test_bad_config_values_are_named(folder, overrides, message):
  config = _config(folder)
  for k, v in overrides.items():
    if isinstance(v, dict):
      config[k].update(v)
    else:
      config[k] = v
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate_config(config)


def _model(config, num_classes=3):
  return models.get_model(config.model_name, num_classes, **config.model)


def test_every_config_model_field_is_a_model_field(folder):
  """One path from config to model: config.model passes to get_model as it is."""
  config = _config(folder)
  fields = set(models.models_vit.VisionTransformer.__dataclass_fields__)
  assert set(config.model.keys()) <= fields


def test_model_kernel_options_reach_the_model(folder):
  config = _config(
    folder,
    **{
      "model.remat": True,
      "model.remat_policy": "dots_saveable",
      "model.attention_impl": "cudnn",
      "model.dtype": "bfloat16",
      "model.recompute_gelu": True,
    },
  )
  model = _model(config)
  assert (
    model.remat,
    model.remat_policy,
    model.attention_impl,
    model.dtype,
    model.recompute_gelu,
  ) == (True, "dots_saveable", "cudnn", jnp.bfloat16, True)
  assert _model(_config(folder)).attention_impl is None  # "": XLA's attention


def test_cotangent_boundaries_are_resolved_from_the_platform_once(folder):
  assert _model(_config(folder)).cotangent_boundaries is True  # None: on for the CPU backend
  off = _config(folder, **{"model.cotangent_boundaries": False})
  assert _model(off).cotangent_boundaries is False


def test_resnet_stem_override_reaches_the_model(folder):
  config = _config(folder, model_name="R+ViT-tiny_8", **{"model.resnet.num_layers": (1, 2)})
  resnet = _model(config).resnet
  assert (resnet.num_layers, resnet.width_factor) == ((1, 2), 0.5)  # the preset's width kept
  assert _model(_config(folder)).resnet is None  # a plain ViT stays plain


def test_missing_pretrained_file_says_how_to_download_it(folder):
  config = _config(folder, from_scratch=False, pretrained_dir="/nonexistent")
  with pytest.raises(
    config_checks.ConfigError, match=r"(?s)/nonexistent/testing\.npz not found.*wget"
  ):
    config_checks.pretrained_path(config)


def test_cli_reports_a_user_error_in_one_line_without_traceback(tmp_path, folder):
  proc = _start(str(tmp_path / "bad"), f"--config.dataset={folder}", "--config.batch=12")
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert "error: config.batch=12 is not divisible" in err and "Traceback" not in err
