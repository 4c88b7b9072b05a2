"""vit_jax.evaluate and the training hooks (config.report, config.best_metric): predictions,
report, figures and page of a trained tiny model; attention rollout; bad input.

One tiny training run serves the module (`run`). Its test folders are renamed one step round
(blue images labelled green, ...): the better the model learns the training labels, the worse its
test loss, so its best evaluation is an early one and its report has mistakes to show.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.special
from sklearn import calibration
from sklearn import metrics as skm

from configs import testing as testing_config
from tests.image_folders import COLORS, write_colour_folder
from vit_jax import attention, checkpoint, config_checks, evaluate, models, train
from vit_jax.evaluation import figures as eval_figures
from vit_jax.evaluation import html_report
from vit_jax.evaluation import metrics as eval_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_SLICE = os.path.join(REPO, "tests", "data", "fashion_mnist_slice.npz")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FIGURES = (
  "confusion_matrix",
  "roc_curves",
  "reliability_diagram",
  "training_curves",
  "mistakes",
  "attention",
)


def _config(dataset, **overrides):
  config = testing_config.get_config()
  config.unlock()
  config.dataset = dataset
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 colour classes, 24 train, 4 val and 7 test JPEGs each; the val and test class folders
  rotated, so that learning the colours raises the val and test losses."""
  root = pathlib.Path(write_colour_folder(tmp_path_factory.mktemp("colours")))
  write_colour_folder(root / "extra", train_per_class=4, test_per_class=0)
  os.rename(root / "extra" / "train", root / "val")
  names = sorted(COLORS)
  for split in ("val", "test"):
    for name in names:
      os.rename(root / split / name, root / split / f"_{name}")
    for old, new in zip(names, names[1:] + names[:1]):
      os.rename(root / split / f"_{old}", root / split / new)
  return str(root)


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder):
  """The `testing` model, 12 steps, evaluated at 4, 8, 12; the latest checkpoint kept, the best
  (lowest val loss) apart; the report written at the end. Returns (workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp("run") / "workdir")
  config = _config(folder, report=True, best_metric="val_loss", eval_every=4, keep_checkpoints=1)
  return workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def trained(run):
  return run[0]


def _report_dir(workdir):
  return os.path.join(workdir, "report")


def _load_json(path):
  with open(path) as f:
    return json.load(f)


def _evaluate(capsys, *args):
  """vit_jax.evaluate's main in this process: (exit code, stderr lines)."""
  code = evaluate.main([str(a) for a in args])
  return code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------------------------------------
# The report.


def test_report_equals_scikit_learn_recomputed_from_the_predictions(trained):
  out = _report_dir(trained)
  report = _load_json(os.path.join(out, "report.json"))
  with np.load(os.path.join(out, "predictions.npz")) as npz:
    logits, labels, names = npz["logits"], npz["labels"], list(npz["class_names"])
  assert report["count"] == len(labels) == 21  # the whole test split, padding excluded
  assert logits.dtype == np.float32 and logits.shape == (21, 3) and names == sorted(COLORS)
  probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
  predicted = logits.argmax(axis=1)
  assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
  assert report["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
  assert report["weighted_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="weighted"))
  p, r, f, s = skm.precision_recall_fscore_support(labels, predicted, zero_division=0)
  for c, name in enumerate(names):
    assert report["per_class"][name] == pytest.approx(
      dict(precision=p[c], recall=r[c], f1=f[c], support=s[c])
    )
    assert report["roc_auc_ovr_per_class"][name] == pytest.approx(
      skm.roc_auc_score(labels == c, probs[:, c])
    )
  assert report["roc_auc_ovr_macro"] == pytest.approx(
    skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
  )
  assert report["log_loss"] == pytest.approx(skm.log_loss(labels, probs), rel=1e-5)
  assert report["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
  # ECE: calibration_curve's bins of the top-class confidence, weighted by their counts.
  confidence, correct = probs.max(axis=1), predicted == labels
  accuracy, mean_confidence = calibration.calibration_curve(correct, confidence, n_bins=15)
  counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], confidence))
  counts = counts[counts > 0]
  assert report["ece"] == pytest.approx(
    np.sum(counts / counts.sum() * np.abs(accuracy - mean_confidence)), abs=1e-6
  )
  assert "top5_accuracy" not in report  # 3 classes
  assert eval_metrics.report_from_predictions(os.path.join(out, "predictions.npz")) == {
    k: v for k, v in report.items() if k != "source"
  }


def test_top5_accuracy_is_reported_past_five_classes():
  rng = np.random.default_rng(0)
  labels = np.arange(40) % 7
  logits = rng.normal(size=(40, 7)).astype(np.float32)
  report = eval_metrics.report_from_predictions(
    dict(logits=logits, labels=labels, class_names=[f"shoe {i}" for i in range(7)])
  )
  assert report["top5_accuracy"] == pytest.approx(
    skm.top_k_accuracy_score(labels, eval_metrics.probabilities(logits), k=5)
  )


def test_past_30_classes_the_confusions_are_a_ranked_list_not_a_grid(tmp_path):
  labels = np.repeat(np.arange(31), 2)
  logits = np.eye(31, dtype=np.float32)[(labels + labels % 2) % 31]  # odd class: taken for next
  report = eval_metrics.report_from_predictions(
    dict(logits=logits, labels=labels, class_names=[f"shoe {i:02d}" for i in range(31)])
  )
  assert report["top_confusions"][0] == dict(true="shoe 01", predicted="shoe 02", count=2)
  assert len(report["top_confusions"]) == 15  # the 15 odd classes below 31
  figure = eval_figures.confusion_matrix(
    np.array(report["confusion_matrix"]),
    report["class_names"],
    report["top_confusions"],
    str(tmp_path / "confusions.png"),
  )
  page = html_report.render(report, dict(confusion_matrix=figure), dict(checkpoint="x"))
  assert 'id="top-confusions"' in page and 'id="confusion-matrix"' not in page


def test_predictions_name_every_test_file_once_in_split_order(trained, folder):
  with np.load(os.path.join(_report_dir(trained), "predictions.npz")) as npz:
    ids, labels, names = list(npz["ids"]), npz["labels"], list(npz["class_names"])
  test_files = sorted(
    os.path.join(folder, "test", c, f)
    for c in COLORS
    for f in os.listdir(os.path.join(folder, "test", c))
  )
  assert sorted(ids) == test_files and len(set(ids)) == len(ids)
  assert [names[label] for label in labels] == [os.path.basename(os.path.dirname(i)) for i in ids]


def test_report_holds_the_figures_as_png_files(trained):
  out = _report_dir(trained)
  for name in FIGURES:
    with open(os.path.join(out, f"{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.skipif(
  not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
  reason="Debian's chromium and chromium-driver are not installed "
  "(scripts/setup.sh installs them as root)",
)
def test_html_report_shows_its_figures_and_tables_in_a_browser(trained, tmp_path):
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    # Alone in a folder: the page must carry its figures itself.
    shutil.copy(os.path.join(_report_dir(trained), "report.html"), tmp_path / "report.html")
    driver.get(f"file://{tmp_path / 'report.html'}")
    widths = driver.execute_script(
      "return Object.fromEntries(Array.from(document.images, i => [i.id, i.naturalWidth]))"
    )
    matrix = driver.find_element("id", "confusion-matrix").text
  finally:
    driver.quit()
  for figure in FIGURES:
    assert widths.get(f"fig-{figure}", 0) > 0, (figure, widths)
  assert matrix.splitlines()[0].split()[-3:] == sorted(COLORS)


# ---------------------------------------------------------------------------------------------
# The command line.


def test_cli_evaluates_a_workdir_on_the_data_it_trained_on(trained, tmp_path, capsys):
  code, _ = _evaluate(capsys, "--checkpoint", trained, "--output", tmp_path)
  assert code == 0
  with (
    np.load(tmp_path / "predictions.npz") as cli,
    np.load(os.path.join(_report_dir(trained), "predictions.npz")) as hook,
  ):
    np.testing.assert_array_equal(cli["ids"], hook["ids"])
    np.testing.assert_allclose(cli["logits"], hook["logits"], atol=1e-5)
  assert _load_json(tmp_path / "report.json")["source"]["checkpoint"] == trained


def test_bare_params_npz_needs_the_dataset_flag(trained, tmp_path, capsys):
  for name in ("params.npz", "params.json"):
    shutil.copy(os.path.join(trained, name), tmp_path / name)
  code, err = _evaluate(
    capsys, "--checkpoint", tmp_path / "params.npz", "--output", tmp_path / "out"
  )
  assert code == 2 and len(err) == 1 and "give --config.dataset=" in err[0]


def test_bare_params_npz_evaluates_on_fashion_mnist_identified_by_index(trained, tmp_path, capsys):
  # Metadata without class names: the classes are checked by their count only.
  shutil.copy(os.path.join(trained, "params.npz"), tmp_path / "params.npz")
  meta = dict(_load_json(os.path.join(trained, "params.json")), class_names=None)
  with open(tmp_path / "params.json", "w") as f:
    json.dump(meta, f)
  code, _ = _evaluate(
    capsys,
    "--checkpoint",
    tmp_path / "params.npz",
    "--output",
    tmp_path / "out",
    "--config.dataset=fashion_mnist",
    f"--config.fashion_mnist_dir={FMNIST_SLICE}",
    "--config.classes=('Sandal', 'Sneaker', 'Ankle boot')",
  )
  assert code == 0
  with np.load(FMNIST_SLICE) as raw:
    footwear = np.isin(raw["y_test"], (5, 7, 9))
    expected = np.searchsorted([5, 7, 9], raw["y_test"][footwear])
  with np.load(tmp_path / "out" / "predictions.npz") as npz:
    np.testing.assert_array_equal(npz["ids"], np.arange(footwear.sum()))
    np.testing.assert_array_equal(npz["labels"], expected)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--config.dataset=/nonexistent/shoes"], "Dataset folder /nonexistent/shoes does not exist"),
    (["--config.dataset={folder}/train", "--config.test_fraction=0.0"], "test split of .* empty"),
    (["--config.dataset=no_such_tfds_dataset"], "is no tfds dataset either"),
    (
      [
        "--config.dataset=fashion_mnist",
        f"--config.fashion_mnist_dir={FMNIST_SLICE}",
        "--config.classes=('Sandal', 'Sneaker')",
      ],
      r"trained on 3 classes \['blue', 'green', 'red'\], but fashion_mnist has 2 classes "
      r"\['Sandal', 'Sneaker'\]",
    ),
    (["--config.datset=x"], "bad --config flag: .*datset"),
  ],
  ids=["missing-folder", "empty-split", "unknown-tfds", "class-mismatch", "unknown-field"],
)
def test_bad_input_is_one_error_line_and_exit_code_2(
  trained, folder, tmp_path, capsys, flags, message
):
  flags = [f.replace("{folder}", folder) for f in flags]
  code, err = _evaluate(capsys, "--checkpoint", trained, "--output", tmp_path, *flags)
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith("error: ") and re.search(message, err[0]), err[0]


def test_cli_process_exits_2_with_one_line_and_no_traceback(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "vit_jax.evaluate",
      "--checkpoint",
      str(tmp_path / "nowhere"),
      "--output",
      str(tmp_path / "out"),
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    f"error: {tmp_path / 'nowhere'}: no such checkpoint (expected a training workdir, an .npz "
    "or an orbax step folder)"
  ]


# ---------------------------------------------------------------------------------------------
# Attention rollout.


def _tiny(name, image_size, **overrides):
  """A small model with random weights (numpy's: flax's initialisers take seconds to compile)."""
  model = models.get_model(name, 3, **overrides)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, image_size, image_size, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
  return model, params, images


def test_attention_weights_reproduce_each_blocks_attention_output():
  model, params, images = _tiny("ViT-tiny_4", 16)
  weights = attention.attention_weights(model, params, images)
  assert weights.shape == (4, 2, 4, 17, 17)  # layers, images, heads, 16 patches + class token
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-5)
  _, state = jax.jit(
    lambda p, x: model.apply(
      {"params": p}, x, capture_intermediates=True, mutable=["intermediates"]
    )
  )(params, images)
  for i in range(model.num_layers):
    captured = state["intermediates"]["Transformer"][f"encoderblock_{i}"][
      "MultiHeadDotProductAttention_0"
    ]
    out = params["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]["out"]
    heads = np.einsum("bhqk,bkhd->bqhd", weights[i], captured["value"]["__call__"][0])
    rebuilt = np.einsum("bqhd,hdf->bqf", heads, out["kernel"]) + out["bias"]
    np.testing.assert_allclose(rebuilt, captured["__call__"][0], atol=1e-5)


def _numpy_rollout_map(weights, b, classifier):
  """Abnar & Zuidema, one image, plainly: mean over heads, + I, rows to 1, product over layers."""
  tokens = weights.shape[-1]
  joint = np.eye(tokens)
  for layer in weights[:, b]:
    a = layer.mean(axis=0) + np.eye(tokens)
    joint = (a / a.sum(axis=1, keepdims=True)) @ joint
  scores = joint[0, 1:] if classifier == "token" else joint.mean(axis=0)
  grid = int(np.sqrt(len(scores)))
  return scores.reshape(grid, grid) / scores.max()


@pytest.mark.parametrize(
  "name, image_size, overrides",
  [("ViT-tiny_4", 16, {}), ("ViT-tiny_4", 16, dict(classifier="gap")), ("R+ViT-tiny_8", 32, {})],
  ids=["class-token", "gap", "hybrid"],
)
def test_rollout_maps_equal_a_direct_numpy_computation(name, image_size, overrides):
  model, params, images = _tiny(name, image_size, **overrides)
  weights = attention.attention_weights(model, params, images)
  maps = attention.token_maps(model, attention.rollout(weights))
  assert maps.shape == (2, 4, 4)  # 16 px / 4, or the hybrid's 32 px / 8 px per token
  for b in range(2):
    np.testing.assert_allclose(maps[b], _numpy_rollout_map(weights, b, model.classifier), rtol=1e-5)
  upsampled = attention.attention_maps(model, params, images)
  assert upsampled.shape == (2, image_size, image_size)
  cell = image_size // 4  # the brightest pixel lies over the most attended patch
  for b in range(2):
    y, x = np.unravel_index(upsampled[b].argmax(), upsampled[b].shape)
    assert maps[b][y // cell, x // cell] == maps[b].max()
  wording = "from the class token" if model.classifier == "token" else "averaged over tokens"
  assert wording in attention.map_kind(model)


# ---------------------------------------------------------------------------------------------
# config.best_metric.


def test_best_checkpoint_survives_keep_checkpoints_and_is_exported(run):
  workdir, summary = pathlib.Path(run[0]), run[1]
  with open(workdir / "metrics.jsonl") as f:
    losses = {m["step"]: m["val_loss"] for m in map(json.loads, f) if "val_loss" in m}
  best = min(losses, key=losses.get)
  assert sorted(losses) == [4, 8, 12] and best < 12  # the run is built so: the best is early
  assert os.listdir(workdir / "checkpoints") == ["12"]  # keep_checkpoints=1: the latest only
  assert os.listdir(workdir / "checkpoints_best") == [str(best)] and summary["best_step"] == best
  kept, _ = checkpoint.load_for_inference(str(workdir / "checkpoints_best" / str(best)))
  exported = checkpoint.load(str(workdir / "best_params.npz"))
  jax.tree.map(np.testing.assert_array_equal, exported, kept)
  assert checkpoint.load_metadata(str(workdir / "best_params.npz"))["best_step"] == best


def test_best_metric_must_be_a_known_evaluation_metric(folder):
  with pytest.raises(
    config_checks.ConfigError, match="config.best_metric must be '' .* val_accuracy"
  ):
    config_checks.validate_config(_config(folder, best_metric="accuracy"))
