"""Few-shot linear evaluation: the closed-form ridge classifier, the sample, the features, and
the evaluator on the command line and during training."""

import json
import os

import numpy as np
import pytest

from vit_jax import fewshot

FMNIST_SLICE = os.path.join(os.path.dirname(__file__), "data", "fashion_mnist_slice.npz")


# --- The classifier ---------------------------------------------------------------------------


def test_ridge_equals_lstsq_of_the_augmented_least_squares_problem():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 3))
  for l2 in (1e-3, 0.5, 40.0):
    # min |x w - y|^2 + l2 |w|^2  ==  min |[x; sqrt(l2) I] w - [y; 0]|^2
    augmented = np.concatenate([x, np.sqrt(l2) * np.eye(5)])
    expected = np.linalg.lstsq(augmented, np.concatenate([y, np.zeros((5, 3))]), rcond=None)[0]
    np.testing.assert_allclose(fewshot.ridge(x, y, l2), expected, rtol=1e-10, atol=1e-12)


def test_ridge_with_more_features_than_examples_equals_lstsq_too():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(4, 9)), rng.normal(size=(4, 2))
  augmented = np.concatenate([x, np.sqrt(0.1) * np.eye(9)])
  expected = np.linalg.lstsq(augmented, np.concatenate([y, np.zeros((9, 2))]), rcond=None)[0]
  np.testing.assert_allclose(fewshot.ridge(x, y, 0.1), expected, rtol=1e-10, atol=1e-12)


def test_leave_one_out_errors_equal_refitting_without_each_example():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 3))
  grid = (0.01, 1.0, 100.0)
  brute = []
  for l2 in grid:
    errors = []
    for i in range(len(x)):
      keep = np.arange(len(x)) != i
      w = fewshot.ridge(x[keep], y[keep], l2)
      errors.append(np.mean((x[i] @ w - y[i]) ** 2))
    brute.append(np.mean(errors))
  np.testing.assert_allclose(fewshot.loo_squared_errors(x, y, grid), brute, rtol=1e-9)


def test_a_seed_draws_the_same_balanced_sample_every_time():
  labels = np.repeat(np.arange(3), 40)[np.random.default_rng(3).permutation(120)]
  first = fewshot.sample_indices(labels, 3, 5, seed=7)
  np.testing.assert_array_equal(first, fewshot.sample_indices(labels, 3, 5, seed=7))
  np.testing.assert_array_equal(np.bincount(labels[first]), [5, 5, 5])
  assert len(set(first)) == 15
  assert not np.array_equal(first, fewshot.sample_indices(labels, 3, 5, seed=8))


def test_a_smaller_shot_count_draws_a_prefix_of_a_larger_ones_sample():
  labels = np.repeat(np.arange(4), 30)
  one = fewshot.sample_indices(labels, 4, 1, seed=0).reshape(4, 1)
  ten = fewshot.sample_indices(labels, 4, 10, seed=0).reshape(4, 10)
  np.testing.assert_array_equal(one, ten[:, :1])


def test_a_class_with_too_few_examples_is_named():
  with pytest.raises(fewshot.FewshotError, match="class 1 has 2 training examples, fewer than 5"):
    fewshot.sample_indices(np.array([0] * 9 + [1] * 2), 2, 5, seed=0)


def test_separable_classes_are_classified_perfectly_from_five_shots():
  rng = np.random.default_rng(4)
  centres = 10.0 * np.eye(3, 4)
  train_y, test_y = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 50)
  train_x = centres[train_y] + rng.normal(size=(60, 4))
  test_x = centres[test_y] + rng.normal(size=(150, 4))
  table = fewshot.evaluate_features((train_x, train_y), (test_x, test_y), 3, shots=(5, 10), seeds=3)
  assert table["5"]["min"] == 1.0 and table["10"]["min"] == 1.0
  assert len(table["5"]["accuracies"]) == 3 and table["5"]["std"] == 0.0


def test_the_classifier_uses_the_l2_strength_with_the_smallest_leave_one_out_error():
  rng = np.random.default_rng(6)
  train_x, train_y = rng.normal(size=(30, 6)), np.repeat(np.arange(3), 10)
  train_x[:, 0] += train_y  # a weak signal: neither end of the grid wins
  test_x, test_y = rng.normal(size=(20, 6)), np.repeat(np.arange(2), 10)
  _, l2 = fewshot.fit_and_score(train_x, train_y, test_x, test_y, 3)
  x = fewshot.design_matrix(train_x, train_x.mean(0), train_x.std(0) + 1e-5)
  errors = fewshot.loo_squared_errors(x, 2.0 * np.eye(3)[train_y] - 1.0, fewshot.L2_GRID)
  assert l2 == fewshot.L2_GRID[int(np.argmin(errors))]
  assert fewshot.L2_GRID[0] < l2 < fewshot.L2_GRID[-1]


def test_the_l2_strength_is_the_smallest_for_a_linear_target_and_large_for_noise():
  rng = np.random.default_rng(5)
  x = fewshot.design_matrix(rng.normal(size=(40, 8)), 0.0, 1.0)
  linear = x @ rng.normal(size=(9, 2))
  noise = np.sign(rng.normal(size=(40, 2)))
  grid = fewshot.L2_GRID
  assert grid[np.argmin(fewshot.loo_squared_errors(x, linear, grid))] == grid[0]
  assert grid[np.argmin(fewshot.loo_squared_errors(x, noise, grid))] >= 2.0**5


# --- Features, the command line and the training hook -------------------------------------------

FOOTWEAR = ("Sandal", "Sneaker", "Ankle boot")
DATA_FLAG = f"--config.fashion_mnist_dir={FMNIST_SLICE}"


def _exported(tmp_path, name="ViT-tiny_7", image_size=28, representation_size=16):
  """An exported checkpoint (params.npz + params.json) of a seeded random model with a head."""
  import jax

  from vit_jax import checkpoint, models

  model = models.get_model(name, 7, representation_size=representation_size)
  x = np.zeros((1, image_size, image_size, 3), np.float32)
  params = jax.device_get(model.init(jax.random.PRNGKey(1), x)["params"])
  path = str(tmp_path / "params.npz")
  meta = models.model_metadata(
    model, image_size=image_size, class_names=[f"c{i}" for i in range(7)]
  )
  checkpoint.save_npz(params, path, metadata=meta)
  return path, model, params


def _direct_features(model, params, split):
  """Pre-logits of the slice's footwear images, in split order, by a plain model.apply."""
  from vit_jax import data_sources, models, predict

  images, labels = data_sources.load_fashion_mnist(FMNIST_SLICE)[split]
  names = list(data_sources.FASHION_MNIST_CLASSES)
  keep = np.isin(labels, [names.index(c) for c in FOOTWEAR])
  x = np.stack([predict.preprocess(np.repeat(i[..., None], 3, -1), 28) for i in images[keep]])
  body = models.get_model(model.model_name, None, representation_size=model.representation_size)
  params = {k: v for k, v in params.items() if k != "head"}
  relabel = {names.index(c): i for i, c in enumerate(FOOTWEAR)}
  return np.asarray(body.apply({"params": params}, x)), np.array([relabel[y] for y in labels[keep]])


def test_the_table_is_the_ridge_classifier_on_each_images_pre_logits(tmp_path, capsys):
  path, model, params = _exported(tmp_path)
  code = fewshot.main(
    ["--checkpoint", path, "--dataset", "fashion_mnist_shoes", "--shots", "1,5", "--seeds", "2"]
    + ["--json", DATA_FLAG]
  )
  assert code == 0
  result = json.loads(capsys.readouterr().out)
  assert (result["feature_dim"], result["image_size"]) == (16, 28)
  assert (result["train_examples"], result["test_examples"]) == (300, 150)
  train, test = _direct_features(model, params, "train"), _direct_features(model, params, "test")
  want = fewshot.evaluate_features(train, test, 3, shots=(1, 5), seeds=2)
  for k in ("1", "5"):
    np.testing.assert_allclose(result["shots"][k]["accuracies"], want[k]["accuracies"], atol=0.01)
    assert result["shots"][k]["l2"] == want[k]["l2"]


def test_features_are_extracted_in_split_order_on_all_devices(tmp_path):
  from configs import common

  _, model, params = _exported(tmp_path)
  config = common.with_dataset(common.get_config(), "fashion_mnist_shoes")
  config.fashion_mnist_dir, config.pp.crop, config.batch_eval = FMNIST_SLICE, 28, 64
  body = fewshot.checkpoint_model("x", None, params, models_meta(model))[0]
  features = fewshot.FeatureExtractor(config)(body, params)
  want_x, want_y = _direct_features(model, params, "test")
  np.testing.assert_array_equal(features.test[1], want_y)
  np.testing.assert_allclose(features.test[0], want_x, atol=2e-5)
  assert features.class_names == FOOTWEAR


def test_only_the_sampled_train_examples_go_through_the_model(tmp_path):
  from configs import common

  _, model, params = _exported(tmp_path)
  config = common.with_dataset(common.get_config(), "fashion_mnist_shoes")
  config.fashion_mnist_dir, config.pp.crop, config.batch_eval = FMNIST_SLICE, 28, 64
  body = fewshot.checkpoint_model("x", None, params, models_meta(model))[0]
  features = fewshot.FeatureExtractor(config)(body, params, shots=(1, 5), seeds=2)
  want_x, want_y = _direct_features(model, params, "train")
  rows = fewshot.sampled_rows(want_y, 3, (1, 5), 2)
  assert features.train_computed == len(rows) <= 2 * 5 * 3 < len(want_y) == 300
  np.testing.assert_array_equal(np.flatnonzero(np.any(features.train[0] != 0, 1)), rows)
  np.testing.assert_allclose(features.train[0][rows], want_x[rows], atol=2e-5)
  np.testing.assert_array_equal(features.train[1], want_y)


def test_a_tfds_source_has_no_index_subset():
  from vit_jax import data_sources

  info = data_sources.DatasetInfo(
    ("a",), {"train": 1, "test": 1}, data_sources.TfdsSource(None, {})
  )
  assert data_sources.subset(info, "train", np.array([0])) is None


def models_meta(model):
  from vit_jax import models

  return models.model_metadata(model, image_size=28)


def test_an_original_in21k_file_is_read_with_its_representation_layer(tmp_path):
  from tests import npz_fixtures

  arrays = npz_fixtures.google_vit_arrays(
    hidden=64, mlp=256, heads=4, layers=4, patch=4, grid=7, num_classes=21, pre_logits=True
  )
  path = npz_fixtures.write_npz(tmp_path / "imagenet21k_ViT-tiny_4.npz", arrays)
  result = fewshot.run(path, [DATA_FLAG], dataset="fashion_mnist_shoes", shots=(2,), seeds=1)
  assert (result["model_name"], result["image_size"]) == ("ViT-tiny_4", 28)
  assert result["feature_dim"] == arrays["pre_logits/kernel"].shape[1]


def test_from_scratch_is_a_seeded_random_initialisation_of_the_same_model(tmp_path):
  path, _, _ = _exported(tmp_path)
  run = lambda *flags: fewshot.run(
    path, [DATA_FLAG, *flags], dataset="fashion_mnist_shoes", shots=(5,), seeds=3, from_scratch=True
  )["shots"]["5"]["accuracies"]
  first = run()
  assert run() == first
  assert run("--config.seed=3") != first


@pytest.mark.parametrize(
  "args, message",
  [
    (["--checkpoint", "/nonexistent.npz"], "/nonexistent.npz: no such checkpoint"),
    (["--shots", "200"], "class 0 has 100 training examples, fewer than 200"),
    (["--dataset", "/no/such/folder"], "/no/such/folder"),
    (["--config.batch_eval=7"], "config.batch_eval=7 is not divisible by the 8 devices"),
  ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys, args, message):
  path, _, _ = _exported(tmp_path)
  base = ["--checkpoint", path, "--dataset", "fashion_mnist_shoes", DATA_FLAG]
  if args[0] == "--checkpoint":
    base = base[2:]
  assert fewshot.main(base + args) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_a_file_without_metadata_or_preset_name_asks_for_the_model(tmp_path, capsys):
  from tests import npz_fixtures

  path = npz_fixtures.write_npz(
    tmp_path / "mine.npz", npz_fixtures.google_vit_arrays(**npz_fixtures.TINY)
  )
  assert fewshot.main(["--checkpoint", path, "--dataset", "fashion_mnist_shoes", DATA_FLAG]) == 2
  assert "give --config.model_name=" in capsys.readouterr().err


def test_training_writes_the_same_few_shot_accuracies_as_the_command_line(tmp_path):
  from configs import testing as testing_config
  from vit_jax import train

  config = testing_config.get_config()
  config.unlock()
  config.dataset, config.fashion_mnist_dir = "fashion_mnist", FMNIST_SLICE
  config.total_steps, config.eval_every, config.checkpoint_every = 4, 4, 4
  config.fewshot.datasets, config.fewshot.shots = ("fashion_mnist_shoes",), (1, 5)
  config.fewshot.seeds, config.fewshot.every = 2, 2
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if "fewshot_fashion_mnist_shoes_5shot" in r]
  assert steps == [2, 4]
  cli = fewshot.run(
    os.path.join(workdir, "params.npz"),
    [DATA_FLAG, "--config.batch_eval=16"],
    dataset="fashion_mnist_shoes",
    shots=(1, 5),
    seeds=2,
  )
  for k in ("1", "5"):
    assert summary["fewshot"][f"fewshot_fashion_mnist_shoes_{k}shot"] == pytest.approx(
      cli["shots"][k]["mean"], abs=1e-6
    )


def test_few_shot_config_values_are_named():
  from configs import testing as testing_config
  from vit_jax import config_checks

  config = testing_config.get_config()
  config.unlock()
  config.dataset = "fashion_mnist"
  config.fewshot.datasets, config.fewshot.shots = ("fashion_mnist_shoes",), (0, 5)
  with pytest.raises(config_checks.ConfigError, match=r"config.fewshot.shots must be positive"):
    config_checks.validate_config(config)


def test_the_feature_extraction_benchmark_times_every_image(tmp_path):
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks", "evaluate", "--features", "--model_name", "testing"]
    + ["--image_size", "32", "--num_images", "16", "--batch", "8", "--passes", "2"],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout)
  assert result["benchmark"] == "fewshot_features" and result["num_images"] == 16
  assert result["images_per_sec"] > 0 and len(result["pass_s"]) == 2
