"""The original `.npz` format: exact loading, strict merging, resizing, export, clear errors.

timm's own `.npz` loader is the independent reader: it must read the same fixtures and compute
the same logits as the Flax model.
"""

import functools
import json
import logging as pylogging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util

from tests import npz_fixtures
from vit_jax import checkpoint, models, models_vit

torch.set_num_threads(2)


def _flax_model(f, num_classes, **kw):
  return models_vit.VisionTransformer(
    num_classes=num_classes,
    patch_size=f["patch"],
    hidden_size=f["hidden"],
    mlp_dim=f["mlp"],
    num_heads=f["heads"],
    num_layers=f["layers"],
    **kw,
  )


def _timm_model(f, num_classes, image_size, **kw):
  return timm.models.vision_transformer.VisionTransformer(
    img_size=image_size,
    patch_size=f["patch"],
    embed_dim=f["hidden"],
    depth=f["layers"],
    num_heads=f["heads"],
    mlp_ratio=f["mlp"] / f["hidden"],
    num_classes=num_classes,
    act_layer="gelu_tanh",
    **kw,
  ).eval()


def _images(n, size, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _timm_forward(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _timm_load_strict(model, path):
  """timm's loader, audited: every timm parameter written, every array in the file used."""
  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float("nan"))
  model.load_pretrained(path)
  unwritten = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
  assert unwritten == []
  with np.load(path) as npz:
    file_numel = sum(npz[k].size for k in npz.files)
  assert file_numel == sum(p.numel() for p in model.parameters())  # nothing left unused
  return model


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "tiny.npz"
  return npz_fixtures.write_npz(path, npz_fixtures.google_vit_arrays(**npz_fixtures.TINY))


# ---------------------------------------------------------------------------------------------
# Loading: exact structure and the same function as timm.


def test_load_gives_exactly_the_model_tree(tiny_npz):
  f = npz_fixtures.TINY
  model = _flax_model(f, f["num_classes"])
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(want["params"], sep="/").items()}
  got = {
    k: v.shape for k, v in traverse_util.flatten_dict(checkpoint.load(tiny_npz), sep="/").items()
  }
  assert got == want


def test_tiny_logits_match_timm(tiny_npz):
  f = npz_fixtures.TINY
  x = _images(4, 32)
  flax_out = _flax_model(f, f["num_classes"]).apply({"params": checkpoint.load(tiny_npz)}, x)
  timm_out = _timm_forward(_timm_load_strict(_timm_model(f, f["num_classes"], 32), tiny_npz), x)
  np.testing.assert_allclose(flax_out, timm_out, atol=1e-5, rtol=1e-5)


def test_gap_classifier_logits_match_timm(tmp_path):
  f = dict(npz_fixtures.TINY, classifier="gap")
  path = npz_fixtures.write_npz(tmp_path / "gap.npz", npz_fixtures.google_vit_arrays(**f))
  x = _images(2, 32)
  flax_out = _flax_model(f, 5, classifier="gap").apply({"params": checkpoint.load(path)}, x)
  timm_model = _timm_model(f, 5, 32, class_token=False, global_pool="avg", fc_norm=False)
  np.testing.assert_allclose(
    flax_out, _timm_forward(_timm_load_strict(timm_model, path), x), atol=1e-5, rtol=1e-5
  )


@pytest.fixture(scope="module")
def b16_in21k(tmp_path_factory):
  """A file with the real ViT-B_16.npz (ImageNet-21k) structure: 202 arrays."""
  path = tmp_path_factory.mktemp("b16") / "ViT-B_16.npz"
  return npz_fixtures.write_npz(path, npz_fixtures.google_vit_arrays(**npz_fixtures.B16_IN21K))


def test_b16_in21k_file_has_the_real_structure(b16_in21k):
  with np.load(b16_in21k) as npz:
    assert len(npz.files) == 202
    assert sum(npz[k].size for k in npz.files) == 103_186_515


def test_b16_in21k_features_match_timm(b16_in21k):
  # The in21k head is zeros: compare features. timm has no pre_logits layer, so compare the
  # encoder_norm class token (timm, num_classes=0) with the Flax model without pre_logits, and
  # check the Flax pre_logits is tanh(Dense) of exactly that.
  f = npz_fixtures.B16_IN21K
  x = _images(1, 224)
  params = checkpoint.load(b16_in21k)
  feats = _flax_model(f, 0).apply(
    {"params": {k: v for k, v in params.items() if k not in ("pre_logits", "head")}}, x
  )
  timm_model = timm.create_model(
    "vit_base_patch16_224", pretrained=False, num_classes=0, act_layer="gelu_tanh"
  ).eval()
  timm_model.load_pretrained(b16_in21k)
  np.testing.assert_allclose(feats, _timm_forward(timm_model, x), atol=1e-5, rtol=1e-5)
  rep = _flax_model(f, 0, representation_size=768).apply(
    {"params": {k: v for k, v in params.items() if k != "head"}}, x
  )
  pl = params["pre_logits"]
  np.testing.assert_allclose(rep, np.tanh(feats @ pl["kernel"] + pl["bias"]), atol=1e-5)


def test_b16_finetuned_head_logits_match_timm(tmp_path):
  f = dict(npz_fixtures.B16_IN21K, num_classes=10, pre_logits=False, zero_head=False)
  path = npz_fixtures.write_npz(tmp_path / "b16_ft.npz", npz_fixtures.google_vit_arrays(**f))
  x = _images(1, 224, seed=3)
  flax_out = models.get_model("ViT-B_16", 10).apply({"params": checkpoint.load(path)}, x)
  timm_model = timm.create_model(
    "vit_base_patch16_224", pretrained=False, num_classes=10, act_layer="gelu_tanh"
  ).eval()
  np.testing.assert_allclose(
    flax_out, _timm_forward(_timm_load_strict(timm_model, path), x), atol=1e-5, rtol=1e-5
  )


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a pretrained file.


def _init_params(model, image_size):
  x = jnp.zeros((1, image_size, image_size, 3))
  return jax.tree.map(np.asarray, model.init(jax.random.key(0), x)["params"])


def test_load_pretrained_drops_pre_logits_resets_head_and_resizes(tmp_path, caplog):
  f = dict(npz_fixtures.TINY, pre_logits=True, num_classes=21843, zero_head=True)
  arrays = npz_fixtures.google_vit_arrays(**f)
  path = npz_fixtures.write_npz(tmp_path / "in21k.npz", arrays)
  model = _flax_model(f, 3)
  init = _init_params(model, 56)  # grid 4x4 -> 7x7
  with caplog.at_level(pylogging.INFO):
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=model)
  assert "pre_logits" not in params
  np.testing.assert_array_equal(params["head"]["kernel"], init["head"]["kernel"])
  pos = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pos.shape == (1, 50, 32)
  np.testing.assert_array_equal(pos[:, 0], arrays["Transformer/posembed_input/pos_embedding"][:, 0])
  np.testing.assert_array_equal(params["embedding"]["kernel"], arrays["embedding/kernel"])
  assert "drop-head variant" in caplog.text and "resized variant" in caplog.text
  assert "head reset" in caplog.text


def test_posembed_resize_224_to_384_matches_torch_bilinear_corner_aligned():
  # scipy zoom order=1 samples corner-aligned: equal to torch bilinear with align_corners=True.
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 197, 768)).astype(np.float32)
  out = checkpoint.interpolate_posembed(posemb, 577, has_class_token=True)
  grid = torch.from_numpy(posemb[0, 1:].reshape(14, 14, 768)).permute(2, 0, 1)[None]
  ref = torch.nn.functional.interpolate(grid, size=(24, 24), mode="bilinear", align_corners=True)
  ref = ref[0].permute(1, 2, 0).reshape(576, 768).numpy()
  assert out.shape == (1, 577, 768)
  np.testing.assert_array_equal(out[0, 0], posemb[0, 0])  # the class slot, untouched
  np.testing.assert_allclose(out[0, 1:], ref, atol=1e-5)


def test_representation_layer_is_kept_when_the_model_has_one(tmp_path):
  f = dict(npz_fixtures.TINY, pre_logits=True)
  arrays = npz_fixtures.google_vit_arrays(**f)
  path = npz_fixtures.write_npz(tmp_path / "rep.npz", arrays)
  model = _flax_model(f, 5, representation_size=32)
  params = checkpoint.load_pretrained(
    pretrained_path=path, init_params=_init_params(model, 32), model_config=model
  )
  np.testing.assert_array_equal(params["pre_logits"]["kernel"], arrays["pre_logits/kernel"])


# ---------------------------------------------------------------------------------------------
# Export.


def test_save_npz_then_load_is_bit_exact(tiny_npz, tmp_path):
  params = checkpoint.load(tiny_npz)
  out = tmp_path / "export.npz"
  checkpoint.save_npz(params, out, metadata={"class_names": ["a"]})
  again = checkpoint.load(out)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert json.loads((tmp_path / "export.json").read_text()) == {"class_names": ["a"]}


def test_exported_file_uses_the_original_names_and_timm_reads_every_key(tiny_npz, tmp_path):
  out = str(tmp_path / "export.npz")
  checkpoint.save_npz(checkpoint.load(tiny_npz), out)
  with np.load(out) as a, np.load(tiny_npz) as b:
    assert sorted(a.files) == sorted(b.files)
  f = npz_fixtures.TINY
  _timm_load_strict(_timm_model(f, f["num_classes"], 32), out)


def test_bfloat16_and_float16_arrays_load_as_float32(tmp_path):
  arrays = npz_fixtures.google_vit_arrays(**npz_fixtures.TINY)
  mixed = dict(arrays)
  mixed["embedding/kernel"] = arrays["embedding/kernel"].astype(ml_dtypes.bfloat16)  # -> void
  mixed["head/kernel"] = arrays["head/kernel"].astype(np.float16)
  path = npz_fixtures.write_npz(tmp_path / "mixed.npz", mixed)
  with np.load(path) as npz:
    assert npz["embedding/kernel"].dtype.kind == "V"  # what np.savez does to bfloat16
  params = checkpoint.load(path)
  assert params["embedding"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(
    params["embedding"]["kernel"],
    arrays["embedding/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32),
  )
  np.testing.assert_array_equal(
    params["head"]["kernel"], arrays["head/kernel"].astype(np.float16).astype(np.float32)
  )


# ---------------------------------------------------------------------------------------------
# Bad files: one clear error naming the file (and the key and shapes where that is the issue).


def test_truncated_file_is_a_clear_error(tiny_npz, tmp_path):
  data = open(tiny_npz, "rb").read()
  path = tmp_path / "truncated.npz"
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError, match=r"truncated\.npz: not a readable"):
    checkpoint.load(path)


def test_corrupt_bytes_inside_an_array_are_a_clear_error(tiny_npz, tmp_path):
  data = bytearray(open(tiny_npz, "rb").read())
  mid = len(data) // 2
  data[mid : mid + 64] = bytes(64)
  path = tmp_path / "corrupt.npz"
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match=r"corrupt\.npz: not a readable"):
    checkpoint.load(path)


def test_missing_file_and_non_vit_file_are_clear_errors(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint file"):
    checkpoint.load(tmp_path / "nope.npz")
  other = npz_fixtures.write_npz(tmp_path / "other.npz", {"w": np.zeros(3, np.float32)})
  with pytest.raises(checkpoint.CheckpointError, match=r"other\.npz: not a ViT checkpoint"):
    checkpoint.load(other)


# Hybrids: a root-only stem (as R_Ti_16) and one with bottleneck stages (as R50/R26), 32 px.
_HYBRIDS = {"root": ((), 1.0, 2), "stages": ((1, 1), 0.5, 1)}  # num_layers, width_factor, patch


def _timm_hybrid(num_layers, width_factor, f, num_classes, image_size):
  """timm's hybrid ViT, its stem built as timm's own `vision_transformer_hybrid._resnetv2`."""
  from timm.layers import StdConv2dSame  # pylint: disable=g-import-not-at-top
  from timm.models import resnetv2, vision_transformer_hybrid  # pylint: disable=g-import-not-at-top

  conv = functools.partial(StdConv2dSame, eps=1e-8)
  if num_layers:
    backbone = resnetv2.ResNetV2(
      layers=list(num_layers),
      num_classes=0,
      global_pool="",
      preact=False,
      stem_type="same",
      conv_layer=conv,
      width_factor=width_factor,
    )
  else:
    backbone = resnetv2.create_resnetv2_stem(
      3, out_chs=int(64 * width_factor), stem_type="same", preact=False, conv_layer=conv
    )
  embed = functools.partial(vision_transformer_hybrid.HybridEmbed, backbone=backbone)
  return _timm_model(f, num_classes, image_size, embed_layer=embed)


@pytest.mark.parametrize("stem", sorted(_HYBRIDS))
def test_hybrid_logits_match_timm(tmp_path, stem):
  num_layers, width_factor, patch = _HYBRIDS[stem]
  f = dict(npz_fixtures.TINY, patch=patch)
  width = int(64 * width_factor)
  path = npz_fixtures.write_npz(
    tmp_path / f"{stem}.npz", npz_fixtures.hybrid_arrays(num_layers=num_layers, width=width, **f)
  )
  params = checkpoint.load(path)
  assert params["gn_root"]["scale"].shape == (width,)  # stored (1, 1, 1, C)
  model = _flax_model(
    f, f["num_classes"], resnet=dict(num_layers=num_layers, width_factor=width_factor)
  )
  x = _images(2, 32)
  flax_out = np.asarray(model.apply({"params": params}, x))
  timm_model = _timm_load_strict(
    _timm_hybrid(num_layers, width_factor, f, f["num_classes"], 32), path
  )
  # timm's GroupNorm epsilon is 1e-5, Flax's 1e-6; its StdConv adds 1e-8 to the variance where
  # the original adds 1e-5 to the standard deviation.
  np.testing.assert_allclose(flax_out, _timm_forward(timm_model, x), atol=1e-3, rtol=1e-3)


def test_r50_b16_in21k_file_loads_for_fine_tuning_and_matches_timm(tmp_path):
  # The real R50+ViT-B_16.npz (ImageNet-21k) structure: 358
  # arrays and 115,277,971 parameters (pre_logits, zeroed 21,843-class head).
  f = dict(npz_fixtures.B16_IN21K, patch=1)
  arrays = npz_fixtures.hybrid_arrays(num_layers=(3, 4, 9), width=64, **f)
  assert (len(arrays), sum(a.size for a in arrays.values())) == (358, 115_277_971)
  path = npz_fixtures.write_npz(tmp_path / "R50+ViT-B_16.npz", arrays)
  model = models.get_model("R50+ViT-B_16", 0)
  init = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  params = checkpoint.load_pretrained(
    pretrained_path=path, init_params=init, model_config=model
  )  # drops pre_logits and the head
  x = _images(1, 224)
  feats = np.asarray(model.apply({"params": params}, x))
  timm_model = timm.create_model(
    "vit_base_r50_s16_224", pretrained=False, num_classes=0, act_layer="gelu_tanh"
  ).eval()
  timm_model.load_pretrained(path)
  # timm's GroupNorm / StdConv epsilons differ from the original's (§2.4: 2.6e-4 measured).
  np.testing.assert_allclose(feats, _timm_forward(timm_model, x), atol=2e-3, rtol=1e-3)


def test_hybrid_load_pretrained_resizes_the_grid_and_keeps_the_stem(tmp_path):
  f = dict(npz_fixtures.TINY, patch=2, pre_logits=True, zero_head=True)
  arrays = npz_fixtures.hybrid_arrays(num_layers=(), width=32, **f)
  path = npz_fixtures.write_npz(tmp_path / "in21k.npz", arrays)
  model = models.get_model("R+ViT-tiny_8", 3, hidden_size=32, mlp_dim=64, num_layers=2)
  init = model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))["params"]  # a 6x6 grid
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=model)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
  np.testing.assert_array_equal(params["conv_root"]["kernel"], arrays["conv_root/kernel"])
  np.testing.assert_array_equal(params["gn_root"]["bias"], arrays["gn_root/bias"].reshape(32))
  assert "pre_logits" not in params and params["head"]["kernel"].shape == (32, 3)


def test_checkpoint_of_another_depth_lists_the_keys(tiny_npz):
  f = dict(npz_fixtures.TINY, layers=3)
  model = _flax_model(f, 5)
  with pytest.raises(
    checkpoint.CheckpointError, match=r"(?s)tiny\.npz: does not match the model.*encoderblock_2"
  ):
    checkpoint.load_pretrained(
      pretrained_path=tiny_npz, init_params=_init_params(model, 32), model_config=model
    )


def test_shape_mismatch_names_the_key_and_both_shapes(tiny_npz):
  f = dict(npz_fixtures.TINY, mlp=128)
  model = _flax_model(f, 5)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"tiny\.npz: .*MlpBlock_0/Dense_0/bias has shape \(64,\) in the file, "
    r"the model expects \(128,\)",
  ):
    checkpoint.load_pretrained(
      pretrained_path=tiny_npz, init_params=_init_params(model, 32), model_config=model
    )
