"""BiT ResNetV2, the ViT paper's CNN baseline: presets, the original `.npz` layout, timm parity."""

import sys

# `import tensorflow` and then triton (which timm/torchvision import) segfaults: say so instead.
if "tensorflow" in sys.modules and "triton" not in sys.modules:
  raise ImportError(
    "tensorflow was imported before torch/timm in this pytest process; put "
    "`import torch, timm` at the top of tests/conftest.py"
  )
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch  # first: before anything imports tensorflow

from configs import common
from tests import npz_fixtures
from vit_jax import attention, checkpoint, convert, models

torch.set_num_threads(2)

R50 = (3, 4, 6, 3)
# timm's own resnetv2_*_bit adds 1e-8 to the kernel variance in its weight standardisation, the
# original BiT code (and ours) 1e-10. Against kernels of variance 1/fan_in (>= 2e-4 in R50x1) that
# is a relative 2.5e-5 at most, per channel and mostly undone by the next GroupNorm: measured
# 1.6e-5 on R50x1 logits of magnitude ~1 (1.7e-5 with timm's epsilon on our side too, so float32
# summation order dominates). The converter's tolerance covers it; its own export keeps 1e-10.
TOLERANCE = convert.DEFAULT_TOLERANCE

# Parameter counts: BiT-M with its 21,843-class head, BiT-S with 1,000, BiT-tiny with 3 (its
# Fashion-MNIST use). timm 1.0.31 counts the same for resnetv2_{depth}x{width}_bit (checked below).
GOLDEN = {
  "BiT-M-R50x1": 68_256_659,
  "BiT-M-R50x3": 345_399_315,
  "BiT-M-R101x1": 87_248_787,
  "BiT-M-R101x3": 516_015_123,
  "BiT-M-R152x2": 321_728_979,
  "BiT-M-R152x4": 1_107_299_923,
  "BiT-S-R50x1": 25_549_352,
  "BiT-S-R50x3": 217_319_080,
  "BiT-S-R101x1": 44_541_480,
  "BiT-S-R101x3": 387_934_888,
  "BiT-S-R152x2": 236_335_208,
  "BiT-S-R152x4": 936_533_224,
  # By hand: root 7*7*3*32 = 4,704; stage 1 (32 -> 128): unit01 with proj 19,136, unit02 17,024;
  # stage 2 (128 -> 256): unit01 with proj 94,336, unit02 70,400; final norm 512; head 771.
  "BiT-tiny": 207_523,
}


def _classes(name: str) -> int:
  return {"M": 21843, "S": 1000}.get(name.split("-")[1], 3)


def _count(model, image_size: int = 32) -> int:
  x = jnp.zeros((1, image_size, image_size, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def _timm_forward(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.inference_mode():
    return model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _flax_forward(model, params, images: np.ndarray) -> np.ndarray:
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply({"params": params}, jnp.asarray(images)))


@pytest.fixture(scope="module")
def r50_npz(tmp_path_factory) -> str:
  """An R50x1 file in the original layout (a 10-class head: the 21,843-class one only costs)."""
  path = tmp_path_factory.mktemp("bit") / "BiT-M-R50x1.npz"
  return npz_fixtures.write_npz(
    path, npz_fixtures.bit_arrays(num_layers=R50, width=64, num_classes=10)
  )


@pytest.fixture(scope="module")
def r50_flax(r50_npz) -> tuple[np.ndarray, np.ndarray]:
  """(images, logits) of BiT-M-R50x1 loaded from `r50_npz` by checkpoint.load, at 64 px."""
  images = convert.check_images(2, 64)
  model = models.get_model("BiT-M-R50x1", 10)
  return images, _flax_forward(model, checkpoint.load(r50_npz), images)


@pytest.fixture
def tiny_npz(tmp_path) -> str:
  """A file shaped as BiT-tiny, with a 7-class head."""
  arrays = npz_fixtures.bit_arrays(num_layers=(2, 2), width=32, num_classes=7)
  return npz_fixtures.write_npz(tmp_path / "tiny.npz", arrays)


# --- Presets ---------------------------------------------------------------------------------


def test_every_bit_preset_has_a_golden_count():
  assert set(models.BIT_CONFIGS) == set(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_parameter_count(name):
  assert _count(models.get_model(name, _classes(name))) == GOLDEN[name]


def test_golden_counts_are_timms():
  for name, count in GOLDEN.items():
    if name == "BiT-tiny":
      continue
    depth, width = name.split("-R")[1].split("x")
    timm_model = timm.create_model(
      f"resnetv2_{depth}x{width}_bit", num_classes=_classes(name), device="meta"
    )
    assert sum(p.numel() for p in timm_model.parameters()) == count, name


def test_bit_takes_the_shared_config_model_block_and_refuses_vit_fields():
  config = common.get_config()
  config.model.dropout_rate = 0.0  # off: as configs/testing.py sets it
  model = models.get_model("BiT-tiny", 3, **config.model)
  assert models.is_bit(model) and model.patch_size == 1
  with pytest.raises(ValueError, match="representation_size=64: BiT-tiny is a BiT ResNet"):
    models.get_model("BiT-tiny", 3, representation_size=64)


def test_training_config_with_a_bit_preset_validates(tmp_path):
  from configs import testing  # pylint: disable=g-import-not-at-top
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top

  config = testing.get_config()
  config.unlock()
  config.dataset, config.model_name = str(tmp_path), "BiT-M-R50x1"
  config.from_scratch, config.pretrained_dir = False, str(tmp_path)
  (tmp_path / "BiT-M-R50x1.npz").touch()
  config_checks.validate_config(config)
  assert config_checks.pretrained_path(config) == str(tmp_path / "BiT-M-R50x1.npz")


def test_a_bit_takes_any_image_size_where_a_hybrid_needs_a_multiple_of_its_tokens(tmp_path):
  from configs import testing  # pylint: disable=g-import-not-at-top
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top

  config = testing.get_config()
  config.unlock()
  config.dataset, config.model_name, config.pp.crop = str(tmp_path), "BiT-tiny", 28
  config_checks.validate_config(config)  # global pooling: 28 px is fine for a CNN
  config.model_name = "R+ViT-tiny_8"
  with pytest.raises(config_checks.ConfigError, match="config.pp.crop=28 is not a multiple"):
    config_checks.validate_config(config)


def test_resnet_override_changes_depths_and_width():
  model = models.get_model("BiT-S-R50x1", 3, resnet=dict(num_layers=(1,), width_factor=None))
  # root 9,408; unit01 (64 -> 256) with proj 16,384 + 4,096 + 36,864 + 16,384 + norms 384;
  # final norm 512; head 771.
  assert _count(model) == 84_803


def test_metadata_round_trip():
  model = models.get_model("BiT-tiny", 3)
  meta = models.model_metadata(model, image_size=32, class_names=["a", "b", "c"])
  assert meta["architecture"] == dict(
    family="bit", resnet=dict(num_layers=[2, 2], width_factor=0.5)
  )
  assert models.model_from_metadata(json.loads(json.dumps(meta))) == model


# --- The original .npz layout ------------------------------------------------------------------


def test_fixture_is_the_layout_timms_loader_reads(r50_npz):
  """The fixture is written independently of vit_jax; timm's own loader must fill every
  parameter of its resnetv2_50x1_bit from it, with nothing left over."""
  model = timm.create_model("resnetv2_50x1_bit", num_classes=10)
  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float("nan"))
  model.load_pretrained(r50_npz)
  assert not any(torch.isnan(p).any() for p in model.parameters())
  with np.load(r50_npz) as npz:
    assert sum(npz[k].size for k in npz.files) == sum(p.numel() for p in model.parameters())


def test_r50x1_logits_match_timm_reading_the_same_file(r50_npz, r50_flax):
  images, got = r50_flax
  timm_model = timm.create_model("resnetv2_50x1_bit", num_classes=10)
  timm_model.load_pretrained(r50_npz)
  want = _timm_forward(timm_model, images)
  diff = float(np.max(np.abs(got - want)))
  print(f"R50x1 at 64 px: max |logit| {np.max(np.abs(want)):.3g}, max |diff| {diff:.3g}")
  assert diff <= TOLERANCE


def test_save_npz_writes_the_original_layout_back(tiny_npz, tmp_path):
  out = str(tmp_path / "again.npz")
  checkpoint.save_npz(checkpoint.load(tiny_npz), out)
  with np.load(tiny_npz) as a, np.load(out) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_load_pretrained_resets_the_head_and_says_so(tiny_npz, caplog):
  model = models.get_model("BiT-tiny", 3)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)  # nothing to compile
  with caplog.at_level(logging.INFO):
    params = checkpoint.load_pretrained(
      pretrained_path=tiny_npz, init_params=init, model_config=model
    )
  assert "head reset: head/conv2d/kernel (1, 1, 256, 7) -> (1, 1, 256, 3)" in caplog.text
  np.testing.assert_array_equal(params["head"]["conv2d"]["kernel"], np.zeros((1, 1, 256, 3)))
  gamma = np.load(tiny_npz)["resnet/block2/unit02/c/group_norm/gamma"]
  np.testing.assert_array_equal(params["block2"]["unit02"]["c"]["group_norm"]["scale"], gamma)


def test_load_pretrained_names_what_differs(tiny_npz):
  model = models.get_model("BiT-tiny", 3, resnet=dict(num_layers=(2, 3)))
  init = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )["params"]
  with pytest.raises(checkpoint.CheckpointError, match=r"block2/unit03/a/group_norm/bias"):
    checkpoint.load_pretrained(pretrained_path=tiny_npz, init_params=init, model_config=model)


@pytest.mark.parametrize("file_kind", ["bit", "vit"])
def test_a_checkpoint_of_the_other_family_is_one_clear_error(tmp_path, file_kind):
  if file_kind == "bit":
    arrays = npz_fixtures.bit_arrays(num_layers=(1,), width=32, num_classes=3)
    model, want = models.get_model("testing", 3), "a BiT ResNet checkpoint, but the model is a ViT"
  else:
    arrays = npz_fixtures.google_vit_arrays(**npz_fixtures.TINY)
    model, want = models.get_model("BiT-tiny", 3), "a ViT checkpoint, but the model is a BiT"
  path = npz_fixtures.write_npz(tmp_path / "other.npz", arrays)
  init = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )["params"]
  with pytest.raises(checkpoint.CheckpointError, match=want) as e:
    checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=model)
  assert str(e.value).startswith(path) and "\n" not in str(e.value)


# --- Export to timm, ONNX; not hf ----------------------------------------------------------------


def test_timm_export_of_a_fine_tuned_r50x1_reloads_in_timm(r50_npz, r50_flax, tmp_path):
  """A fine-tuned model (params.npz + params.json, as train exports it) -> the converter -> timm's
  own `create_model('local-dir:...')`: the same logits. (The converter's own parity check, which
  would compile R50x1 again, is exercised on BiT-tiny below.)"""
  params = checkpoint.load(r50_npz)
  for name, keep in (("kernel", np.s_[..., :3]), ("bias", np.s_[:3])):  # a 3-class head
    params["head"]["conv2d"][name] = params["head"]["conv2d"][name][keep]
  meta = models.model_metadata(
    models.get_model("BiT-M-R50x1", 3), image_size=64, class_names=["cat", "dog", "shoe"]
  )
  checkpoint.save_npz(params, str(tmp_path / "params.npz"), metadata=meta)
  out = tmp_path / "timm"
  convert.convert(str(tmp_path / "params.npz"), str(out), "timm", num_check_images=0)
  with open(out / "config.json") as f:
    config = json.load(f)
  assert config["architecture"] == "resnetv2_50x1_bit"
  assert config["label_names"] == meta["class_names"]
  reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
  images, logits = r50_flax
  want = logits[:, :3]  # the 10-class model's first three logits: the same head columns
  np.testing.assert_allclose(_timm_forward(reloaded, images), want, atol=TOLERANCE, rtol=0)


def test_tiny_bit_exports_to_timm_and_onnx_not_hf(tmp_path):
  # Small kernels (variance 1e-4 / fan_in: 1e-7 to 3e-6): with timm's standardisation epsilon
  # (1e-8) the logits would move by 6.8e-4 (measured); the export keeps the original's (1e-10),
  # so float32 noise is all that is left.
  arrays = npz_fixtures.bit_arrays(num_layers=(2, 2), width=32, num_classes=7)
  small = lambda k: 0.01 if k.endswith("standardized_conv2d/kernel") else 1
  arrays = {k: v * small(k) for k, v in arrays.items()}
  tiny_npz = npz_fixtures.write_npz(tmp_path / "tiny.npz", arrays)
  result = convert.convert(
    tiny_npz, str(tmp_path / "timm"), "timm", model_name="BiT-tiny", tolerance=1e-5
  )
  print(f"BiT-tiny, small kernels: timm export max |logit diff| {result.max_abs_diff:.3g}")
  result = convert.convert(
    tiny_npz, str(tmp_path / "onnx"), "onnx", model_name="BiT-tiny", image_size=32, tolerance=1e-5
  )
  assert result.max_abs_diff <= 1e-5
  with pytest.raises(convert.ConversionError, match="BiT ResNet.*--format timm or onnx"):
    convert.convert(tiny_npz, str(tmp_path / "hf"), "hf", model_name="BiT-tiny")


def test_converter_refuses_a_bit_file_as_a_vit(tiny_npz, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="BiT ResNet checkpoint, but the model"):
    convert.convert(tiny_npz, str(tmp_path / "out"), "timm", model_name="ViT-tiny_4")


# --- What looks like attention ------------------------------------------------------------------


def test_class_activation_map_averages_to_the_top_logit(tiny_npz):
  model = models.get_model("BiT-tiny", 7)
  params = checkpoint.load(tiny_npz)
  images = convert.check_images(3, 32)
  raw = attention.class_activation_maps(model, params, images)
  logits = _flax_forward(model, params, images)
  np.testing.assert_allclose(raw.mean(axis=(1, 2)), logits.max(axis=-1), atol=1e-5)
  maps = attention.attention_maps(model, params, images)
  assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
  assert "class activation map" in attention.map_kind(model)
