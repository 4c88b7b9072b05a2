"""The offline demo end to end (scripts/demo.sh with DEMO_QUICK=1) and vit_jax.predict.

The demo runs on the committed Fashion-MNIST slice (tests/data), a few steps per stage, with the
devices demo.sh chooses (one per core, not the 8 fake ones of the other tests): every artifact is
checked to exist and load. Then predict's error handling, and its numpy preprocessing against the eval pipeline's.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint, predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(REPO, "tests", "data", "fashion_mnist_slice.npz")
FOOTWEAR = ["Sandal", "Sneaker", "Ankle boot"]


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the real single device
  # PYTHON: the demo runs with the interpreter that runs the tests, whatever .venv holds.
  env.update(
    DEMO_QUICK="1",
    DEMO_SKIP_SETUP="1",
    DEMO_FMNIST_DIR=SLICE,
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHON=sys.executable,
  )
  return env


def _demo(workdir: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", os.path.join(REPO, "scripts", "demo.sh"), workdir],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  proc = _demo(workdir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return workdir, proc


def _predict_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "vit_jax.predict", *args],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )


# --- The demo ------------------------------------------------------------------------------------


def test_summary_has_every_result(demo):
  workdir, proc = demo
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  for key in ("test_accuracy", "scratch_test_accuracy", "pretrain_test_accuracy"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary["quick"] is True and summary["test_count"] == 150  # the slice's footwear
  assert {"pretrain", "finetune", "scratch", "predict"} <= set(summary["stage_seconds"])
  assert summary["seconds"] > 0
  assert "summary.json" in proc.stdout  # the script says where the results are


def test_summary_has_the_few_shot_table_of_both_starts(demo):
  workdir, proc = demo
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  for start in ("pretrained", "random"):
    with open(os.path.join(workdir, "fewshot", f"{start}.json")) as f:
      table = json.load(f)["shots"]
    assert list(summary["fewshot"][start]) == ["1", "5", "10", "25"]
    for k, row in table.items():
      assert summary["fewshot"][start][k] == row["mean"] and 0.0 <= row["mean"] <= 1.0
      assert summary["fewshot_std"][start][k] == row["std"]
  assert summary["fewshot"]["pretrained"] != summary["fewshot"]["random"]
  assert "linear 10-shot, pretrained / random" in proc.stdout


def test_demo_writes_the_evaluation_report_of_the_finetuned_model(demo):
  workdir, proc = demo
  report = os.path.join(workdir, "finetune", "report")
  with open(os.path.join(report, "report.json")) as f:
    assert json.load(f)["count"] == 150  # every footwear test image of the slice
  assert os.path.exists(os.path.join(report, "report.html"))
  assert f"{report}/report.html" in proc.stdout and "vit_jax.serve" in proc.stdout


def test_pretrained_file_has_the_in21k_layout(demo):
  workdir, _ = demo
  path = os.path.join(workdir, "checkpoints", "R+ViT-tiny_8-fmnist.npz")
  params = checkpoint.load(path)
  assert params["pre_logits"]["kernel"].shape == (64, 64)  # representation layer, as in21k
  assert params["head"]["kernel"].shape == (64, 7)  # the 7 non-footwear classes
  assert checkpoint.load_metadata(path)["image_size"] == 32  # the fine-tuning resolution
  assert params["conv_root"]["kernel"].shape == (7, 7, 3, 32)  # the hybrid's ResNet root


def test_finetuned_model_changed_head(demo):
  workdir, _ = demo
  npz = os.path.join(workdir, "finetune", "params.npz")
  params, meta = checkpoint.load_for_inference(npz)
  assert "pre_logits" not in params  # dropped by load_pretrained, as for ViT-B_16.npz
  assert params["head"]["kernel"].shape == (64, 3)
  assert meta["class_names"] == FOOTWEAR
  pretrained = checkpoint.load(os.path.join(workdir, "checkpoints", "R+ViT-tiny_8-fmnist.npz"))
  grid = lambda p: p["Transformer"]["posembed_input"]["pos_embedding"].shape[1] - 1
  assert meta["image_size"] == 32 and grid(params) == grid(pretrained) == 16  # 4x4 tokens
  with open(os.path.join(workdir, "finetune", "run.json")) as f:
    assert json.load(f)["config"]["pretrained_path"].endswith("R+ViT-tiny_8-fmnist.npz")
  with open(os.path.join(workdir, "scratch", "run.json")) as f:
    assert json.load(f)["config"]["from_scratch"] is True


def test_finetuning_starts_from_the_pretrained_weights(demo, tmp_path):
  # The demo's fine-tuning config at learning rate 0 (every update exactly zero) for one step:
  # its export is its initial state, which must hold the pretrained file's weights bit for bit.
  # Random weights differ, even those the quick pretraining started from (8 steps away).
  from configs import shoes  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top

  pretrained = os.path.join(demo[0], "checkpoints", "R+ViT-tiny_8-fmnist.npz")
  config = shoes.get_config("demo")
  with config.unlocked():
    config.update(
      pretrained_path=pretrained,
      fashion_mnist_dir=SLICE,
      base_lr=0.0,
      total_steps=1,
      warmup_steps=0,
      batch=8,
      batch_eval=64,
    )
  workdir = str(tmp_path / "lr0")
  assert train.train_and_evaluate(config, workdir)["origin"] == f"pretrained {pretrained}"
  with np.load(pretrained) as want, np.load(os.path.join(workdir, "params.npz")) as got:
    kept = [k for k in want.files if not k.startswith(("head/", "pre_logits/"))]
    assert len(kept) > 50 and "conv_root/kernel" in kept  # the ResNet stem's arrays too
    for key in kept:  # the position embeddings too: pretrained at the fine-tuning resolution
      np.testing.assert_array_equal(got[key], want[key].reshape(got[key].shape), err_msg=key)


def test_predictions_name_the_footwear_classes(demo):
  workdir, _ = demo
  with open(os.path.join(workdir, "predict", "predictions.json")) as f:
    result = json.load(f)
  assert result["class_names"] == FOOTWEAR and not result["errors"]
  assert len(result["predictions"]) == 6
  for p in result["predictions"]:
    assert os.path.isfile(p["image"]) and p["image"].endswith(".png")
    assert [t["label"] for t in p["top_k"]] and {t["label"] for t in p["top_k"]} <= set(FOOTWEAR)
    assert abs(sum(t["probability"] for t in p["top_k"]) - 1.0) < 1e-4  # top 3 of 3 classes


def test_timm_export_matches_the_flax_model(demo):
  workdir, _ = demo
  timm_dir = os.path.join(workdir, "convert", "timm")
  import torch  # pylint: disable=g-import-not-at-top

  from vit_jax import convert  # pylint: disable=g-import-not-at-top

  model = convert.load_timm(timm_dir)  # the ResNet stem is timm's, in HybridEmbed
  assert model.pretrained_cfg["label_names"] == FOOTWEAR
  size = model.pretrained_cfg["input_size"][-1]
  samples = os.path.join(workdir, "samples")
  images = np.stack(
    [
      predict.preprocess(predict.load_rgb(os.path.join(samples, f)), size)
      for f in sorted(os.listdir(samples))
    ]
  )
  with torch.inference_mode():
    logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  flax_probs = predict.Predictor(os.path.join(workdir, "finetune"))(images)
  np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), flax_probs, atol=1e-4)


def test_rerun_skips_finished_stages(demo):
  workdir, _ = demo
  proc = _demo(workdir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("finished before") >= 4
  assert "vit_jax.main" not in proc.stderr  # no training command ran again


# --- predict ---------------------------------------------------------------------------------------


def test_predict_reports_a_corrupt_image_and_classifies_the_rest(demo, tmp_path):
  workdir, _ = demo
  samples = os.path.join(workdir, "samples")
  corrupt = tmp_path / "corrupt.png"
  with open(os.path.join(samples, sorted(os.listdir(samples))[0]), "rb") as f:
    corrupt.write_bytes(f.read()[:40])  # a truncated PNG
  proc = _predict_cli(
    "--checkpoint",
    os.path.join(workdir, "finetune", "params.npz"),
    "--json",
    "--top_k",
    "2",
    samples,
    str(corrupt),
  )
  assert proc.returncode == 1
  result = json.loads(proc.stdout)
  assert len(result["predictions"]) == 6 and all(
    len(p["top_k"]) == 2 for p in result["predictions"]
  )
  assert [e["image"] for e in result["errors"]] == [str(corrupt)]
  assert "corrupt.png" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_text_output_from_a_workdir(demo):
  workdir, _ = demo
  image = os.path.join(workdir, "samples", sorted(os.listdir(os.path.join(workdir, "samples")))[0])
  proc = _predict_cli("--checkpoint", os.path.join(workdir, "finetune"), "--top_k", "1", image)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert (
    lines[0] == image and len(lines) == 2 and lines[1].split()[0] in ("Sandal", "Sneaker", "Ankle")
  )


@pytest.mark.parametrize("bad", ["missing.npz", "not_a_checkpoint.npz", "empty_dir"])
def test_predict_bad_checkpoint_is_one_line_and_exit_2(tmp_path, bad):
  path = tmp_path / bad
  if bad == "not_a_checkpoint.npz":
    path.write_bytes(b"not a zip file")
  elif bad == "empty_dir":
    path.mkdir()
  image = tmp_path / "x.png"
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
  proc = _predict_cli("--checkpoint", str(path), str(image))
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
  assert str(path) in proc.stderr


# --- Preprocessing: the same numbers as the eval pipeline ----------------------------------------


@pytest.mark.parametrize(
  "shape,size",
  [((28, 28), 35), ((28, 28), 28), ((61, 47, 3), 35), ((300, 200, 4), 64), ((20, 33, 2), 16)],
)
def test_preprocess_matches_the_eval_pipeline(tmp_path, shape, size):
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from vit_jax import preprocess as tf_preprocess  # pylint: disable=g-import-not-at-top

  pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  path = str(tmp_path / "image.png")
  mode = "L" if len(shape) == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[shape[-1]]
  Image.fromarray(pixels, mode).save(path)
  pp = ml_collections.ConfigDict(dict(crop=size, eval_resize=0, bfloat16=False))
  want = tf_preprocess.eval_preprocess(tf_preprocess.decode(tf.io.read_file(path)), pp).numpy()
  got = predict.preprocess(predict.load_rgb(path), size)
  assert got.shape == want.shape == (size, size, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
