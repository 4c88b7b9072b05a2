"""`python -m benchmarks vit_vs_cnn --quick` end to end, its stage reuse and flags, and the few-shot
evaluation of a BiT checkpoint (exported with metadata, or an original file without)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import vit_vs_cnn
from vit_jax import checkpoint, fewshot, models, models_bit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vit_vs_cnn")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"))
  before = _results_lines()
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks", "vit_vs_cnn", "--quick", "--json"]
    + ["--workdir", str(tmp / "work")],
    capture_output=True,
    text=True,
    timeout=900,
    cwd=REPO,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout[:2000]}"
  return dict(result=json.loads(lines[0]), workdir=tmp / "work", results_before=before)


def _results_lines() -> list[str]:
  path = vit_vs_cnn.RESULTS
  return path.read_text().splitlines() if path.exists() else []


def test_quick_run_compares_both_models_in_a_table_and_json(quick):
  r = quick["result"]
  assert r["benchmark"] == "vit_vs_cnn" and r["quick"] is True
  assert list(r["models"]) == ["R+ViT-tiny_8", "BiT-tiny"]
  # The presets' sizes at 3 classes (models.py): a matched pair.
  assert r["models"]["R+ViT-tiny_8"]["num_params"] == 214_435
  assert r["models"]["BiT-tiny"]["num_params"] == 207_523
  for name, m in r["models"].items():
    assert m["flops_per_image_xla"] > 1e6 and m["flops_image_size"] == 32, name
    assert m["train_images_per_sec"] > 0 and m["train_images_per_sec_best"] > 0, name
    for key in ("pretrain_test_accuracy", "finetune_test_accuracy"):
      assert 0.0 <= m[key] <= 1.0, (name, key)
    assert m["finetune_test_count"] > 0 and m["pretrain_test_count"] > 0
    for start in ("pretrained", "random"):
      assert set(m["fewshot"][start]) == {"1", "5", "10", "25"}, (name, start)
      assert 0.0 <= m["fewshot"][start]["10"]["mean"] <= 1.0
  assert r["models"]["BiT-tiny"]["fewshot_feature_dim"] == 256  # pooled, not the head's logits
  assert r["models"]["R+ViT-tiny_8"]["fewshot_feature_dim"] == 64  # the representation layer
  for key in ("host_cpu", "cpu_count", "num_devices", "xla_flags"):
    assert r[key], key
  assert isinstance(r["load_average_start"], float)
  table = r["table"]
  assert "| R+ViT-tiny_8 | 214,435 |" in table and "| BiT-tiny | 207,523 |" in table
  assert "| BiT-tiny | random init |" in table and "QUICK" in table
  # A quick run is not a result: nothing appended to benchmarks/results/.
  assert not any('"quick": true' in line for line in _results_lines())


def test_finished_stages_are_recorded_and_a_different_schedule_is_refused(quick):
  for name in vit_vs_cnn.MODELS:
    for stage in ("pretrain", "finetune"):
      record = json.loads((quick["workdir"] / name / stage / "stage.json").read_text())
      assert record["total_steps"] == vit_vs_cnn.QUICK_TRAIN["total_steps"]
  args = vit_vs_cnn.parse_args(["--workdir", str(quick["workdir"])])  # the full schedule
  config = vit_vs_cnn.pretrain_config("BiT-tiny", args)
  with pytest.raises(SystemExit, match="finished 8 steps, this run wants 1500"):
    vit_vs_cnn.train_stage(config, quick["workdir"] / "BiT-tiny" / "pretrain")


def test_bit_pretraining_config_drops_the_representation_layer():
  args = vit_vs_cnn.parse_args(["--quick"])
  bit = vit_vs_cnn.pretrain_config("BiT-tiny", args)
  vit = vit_vs_cnn.pretrain_config("R+ViT-tiny_8", args)
  assert bit.model.representation_size is None and vit.model.representation_size == 64
  assert (bit.pp.crop, bit.optimizer, bit.base_lr) == (vit.pp.crop, vit.optimizer, vit.base_lr)
  finetune = vit_vs_cnn.finetune_config("BiT-tiny", "x.npz", args)
  assert (finetune.pp.crop, finetune.pretrained_path) == (32, "x.npz")


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--rounds", "0"], "--rounds and --steps must be positive"),
    (["--fashion_mnist_dir", "/no/such/dir"], "/no/such/dir: no such file or folder"),
  ],
)
def test_bad_flags_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    vit_vs_cnn.parse_args(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err.strip().splitlines()[-1]


# --- Few-shot features of a BiT ----------------------------------------------------------------


def _bit_tiny_params(num_classes: int):
  model = models.get_model("BiT-tiny", num_classes)
  return model, model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]


def test_bit_feature_model_from_metadata_returns_the_pooled_features(tmp_path):
  model, params = _bit_tiny_params(7)
  meta = models.model_metadata(model, image_size=24, class_names=[str(i) for i in range(7)])
  path = str(tmp_path / "params.npz")
  checkpoint.save_npz(params, path, metadata=meta)
  loaded, loaded_meta = checkpoint.load_for_inference(path)
  features, size = fewshot.checkpoint_model(path, None, loaded, loaded_meta)
  assert isinstance(features, models_bit.BiT) and size == 24
  body = {k: v for k, v in loaded.items() if k != "head"}
  out = features.apply({"params": body}, np.zeros((2, 24, 24, 3), np.float32))
  assert out.shape == (2, 256)


def test_an_original_bit_file_without_metadata_is_evaluated_at_224(tmp_path):
  _, params = _bit_tiny_params(5)
  path = str(tmp_path / "BiT-tiny.npz")
  checkpoint.save_npz(params, path)  # no JSON beside it: as BiT-M-R50x1.npz is published
  loaded, meta = checkpoint.load_for_inference(path)
  assert meta == {}
  model, size = fewshot.checkpoint_model(path, None, loaded, meta)
  assert isinstance(model, models_bit.BiT) and not model.num_classes
  assert size == fewshot.BIT_IMAGE_SIZE == 224
