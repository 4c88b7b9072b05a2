"""Flax -> timm / Hugging Face export: logit parity with the real libraries, errors, CLI."""

import sys

# `import tensorflow` and then triton (which timm/torchvision import) segfaults: say so instead.
if "tensorflow" in sys.modules and "triton" not in sys.modules:
  raise ImportError(
    "tensorflow was imported before torch/timm in this pytest process; put "
    "`import torch, timm` at the top of tests/conftest.py"
  )
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import textwrap

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import timm
import torch  # first: before anything imports tensorflow
import transformers
from PIL import Image

from vit_jax import checkpoint, convert, models

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _REPO / "scripts" / "convert_to_pytorch.py"
_FLOAT32_TOL = 1e-5


def _random_params(model, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Realistic scales: kernels N(0, 1/fan_in), LN scale 1 +- 0.2, nonzero biases and head.

  (With the init's zero head and 1e-6 biases every comparison would pass trivially.)
  """
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False)
  )["params"]
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in flax.traverse_util.flatten_dict(dict(abstract), sep="/").items():
    shape = leaf.shape
    if key.endswith("/scale"):
      value = 1 + rng.uniform(-0.2, 0.2, shape)
    elif key.endswith("/kernel"):
      if re.search(r"/(query|key|value)/kernel$", key):
        fan_in = shape[0]  # (D, heads, head_dim)
      else:  # Dense (in, out), attention out (heads, head_dim, D), Conv (h, w, in, out)
        fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(0, fan_in**-0.5, shape)
    else:  # biases, cls, position embeddings
      value = rng.normal(0, 0.3, shape)
    flat[key] = value.astype(np.float32)
  return flat


def _make(name: str, image_size: int, num_classes: int = 10, seed: int = 0, **overrides):
  """(flat params, resolved metadata) of a randomly weighted preset."""
  model = models.get_model(name, num_classes, **overrides)
  flat = _random_params(model, image_size, seed)
  meta = models.model_metadata(
    model, image_size=image_size, class_names=[f"class_{i}" for i in range(num_classes)]
  )
  return flat, convert.resolve_metadata(flat, meta, f"<{name}>")


def _export_and_check(tmp_path, fmt, flat, meta, images, tolerance=_FLOAT32_TOL):
  out = str(tmp_path / fmt)
  export = convert.export_timm if fmt == "timm" else convert.export_hf
  outputs = export(flat, meta, out)
  return convert.check_export(out, fmt, flat, meta, images, outputs=outputs, tolerance=tolerance)


def _save_npz(tmp_path, flat, meta=None, name="model.npz") -> str:
  path = str(tmp_path / name)
  checkpoint.save_npz(flax.traverse_util.unflatten_dict(flat, sep="/"), path, metadata=meta)
  return path


# --- Parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name,size,gelu_approximate",
  [
    ("testing", 32, True),
    ("testing", 32, False),  # exact GELU -> timm 'gelu' / HF 'gelu'
    ("ViT-Ti_16", 224, True),
  ],
)
def test_logits_match_flax(tmp_path, name, size, gelu_approximate):
  flat, meta = _make(name, size, gelu_approximate=gelu_approximate)
  images = convert.check_images(2, size)
  diffs = {fmt: _export_and_check(tmp_path, fmt, flat, meta, images) for fmt in convert.FORMATS}
  print(f"{name} gelu_approximate={gelu_approximate}: max |logit diff| {diffs}")
  assert all(d <= _FLOAT32_TOL for d in diffs.values())


def test_logits_match_flax_b16(tmp_path):
  flat, meta = _make("ViT-B_16", 224, num_classes=1000)
  images = convert.check_images(2, 224)
  want = convert.flax_forward(flat, meta, images)  # once: a B/16 compile costs seconds
  assert np.abs(want).max() > 1.0  # a real head: the comparison is not trivially zero
  diffs = {}
  for fmt, export, load in (
    ("timm", convert.export_timm, convert.load_timm),
    ("hf", convert.export_hf, convert.load_hf),
  ):
    export(flat, meta, str(tmp_path / fmt))
    got = convert.torch_forward(load(str(tmp_path / fmt)), images)
    diffs[fmt] = float(np.abs(got - want).max())
  print(f"ViT-B_16: max |logit diff| {diffs}, max |logit| {np.abs(want).max():.3g}")
  assert all(d <= _FLOAT32_TOL for d in diffs.values())


@pytest.mark.parametrize("fmt", convert.FORMATS)
def test_wrong_gelu_variant_is_detected(tmp_path, fmt):
  flat, meta = _make("ViT-tiny_4", 32)  # 4 layers, 64 tokens: measured 3.9e-4
  wrong = json.loads(json.dumps(meta))
  wrong["architecture"]["gelu_approximate"] = not meta["architecture"]["gelu_approximate"]
  export = convert.export_timm if fmt == "timm" else convert.export_hf
  outputs = export(flat, wrong, str(tmp_path))
  images = convert.check_images(4, 32)
  diff = convert.check_export(
    str(tmp_path), fmt, flat, meta, images, outputs=outputs, tolerance=np.inf
  )
  print(f"{fmt}: wrong GELU variant: max |logit diff| {diff:.3g}")
  assert diff > 1e-4
  with pytest.raises(convert.ParityError, match="differ from the Flax model"):
    convert.check_export(str(tmp_path), fmt, flat, meta, images, outputs=outputs)


def test_timm_loading_routes(tmp_path):
  flat, meta = _make("testing", 32, num_classes=5)
  convert.export_timm(flat, meta, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  assert config["label_names"] == meta["class_names"]
  assert config["model_args"]["act_layer"] == "gelu_tanh"
  x = torch.from_numpy(convert.check_images(2, 32).transpose(0, 3, 1, 2).copy())
  routes = [
    convert.load_timm(str(tmp_path)),
    timm.create_model(f"local-dir:{tmp_path}", pretrained=True),
    # The overlay needs num_classes: otherwise timm drops a head whose size differs from the
    # registered model's default (1000) and loads non-strictly.
    timm.create_model(
      config["architecture"],
      pretrained=True,
      pretrained_cfg_overlay=dict(
        file=str(tmp_path / "model.safetensors"), num_classes=config["num_classes"]
      ),
      **config["model_args"],
    ),
  ]
  with torch.inference_mode():
    outs = [m.eval()(x) for m in routes]
  want = convert.flax_forward(flat, meta, x.numpy().transpose(0, 2, 3, 1))
  for out in outs:
    np.testing.assert_allclose(out.numpy(), want, atol=_FLOAT32_TOL, rtol=0)


# --- Hugging Face pipeline ---------------------------------------------------------------------


def _top2_margin(logits: np.ndarray) -> float:
  top = np.sort(logits)[::-1]
  return float(top[0] - top[1])


def test_hf_pipeline_top1_equals_flax_argmax(tmp_path):
  flat, meta = _make("testing", 32, num_classes=10, seed=3)
  assert convert.export_hf(flat, meta, str(tmp_path)) == "logits"
  classify = transformers.pipeline("image-classification", model=str(tmp_path))
  processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  rng = np.random.default_rng(1)
  for shape in ((32, 32, 3), (57, 41, 3)):  # the trained size, and one the processor resizes
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    pixels = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    if shape[:2] == (32, 32):  # ViTImageProcessor: x / 255, then (x - 0.5) / 0.5
      manual = (np.asarray(image, np.float32) / 255 - 0.5) / 0.5
      np.testing.assert_allclose(pixels, manual, atol=1e-6)
    logits = convert.flax_forward(flat, meta, pixels[None])[0]
    assert _top2_margin(logits) > 1e-3  # no near-tie that float noise could flip
    top = classify(image, top_k=1)[0]
    assert top["label"] == meta["class_names"][int(np.argmax(logits))]


# --- Variants: gap, resolution, pre_logits, bfloat16 -------------------------------------------


def test_gap_exports_to_timm_not_hf(tmp_path):
  flat, meta = _make("testing", 48, classifier="gap")
  assert "cls" not in flat
  images = convert.check_images(2, 48)
  assert _export_and_check(tmp_path, "timm", flat, meta, images) <= _FLOAT32_TOL
  with open(tmp_path / "timm" / "config.json") as f:
    args = json.load(f)["model_args"]
  assert (args["class_token"], args["global_pool"], args["fc_norm"]) == (False, "avg", False)
  with pytest.raises(convert.ConversionError, match="gap.*--format timm"):
    convert.export_hf(flat, meta, str(tmp_path / "hf"))


@pytest.mark.parametrize(
  "resnet,patch",
  [
    (None, 2),  # the preset's root-only stem (as R_Ti_16)
    ({"num_layers": (1, 1), "width_factor": 0.5}, 1),  # bottleneck stages (as R50)
  ],
)
def test_hybrid_exports_to_timm_not_hf(tmp_path, resnet, patch):
  flat, meta = _make("R+ViT-tiny_8", 32, resnet=resnet, patch_size=patch)
  assert flat["conv_root/kernel"].shape == (7, 7, 3, 32)
  images = convert.check_images(2, 32)
  # The converter's default tolerance: timm's StdConv adds 1e-8 to the variance, the original
  # adds 1e-5 to the standard deviation (measured: 3.6e-7 root only, 1.2e-5 with stages).
  diff = _export_and_check(
    tmp_path, "timm", flat, meta, images, tolerance=convert.DEFAULT_TOLERANCE
  )
  print(f"hybrid {resnet}: max |logit diff| {diff:.3g}")
  with pytest.raises(convert.ConversionError, match="hybrid.*--format timm"):
    convert.export_hf(flat, meta, str(tmp_path / "hf"))


def test_hybrid_that_timm_registers_loads_through_create_model(tmp_path):
  flat, meta = _make("R+ViT-Ti_16", 224, num_classes=5)
  convert.export_timm(flat, meta, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architecture"] == "vit_tiny_r_s16_p8_224"
  model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
  images = convert.check_images(2, 224)
  # timm's own hybrid keeps its GroupNorm epsilon (1e-5; load_timm uses Flax's 1e-6).
  np.testing.assert_allclose(
    convert.torch_forward(model, images),
    convert.flax_forward(flat, meta, images),
    atol=1e-3,
    rtol=1e-3,
  )


def test_hybrid_without_metadata_and_at_a_size_timm_cannot_patch(tmp_path):
  flat, _ = _make("R+ViT-tiny_8", 32, num_classes=3)
  path = _save_npz(tmp_path, flat)  # no .json: the size follows from grid, patch and stem
  result = convert.convert(path, str(tmp_path / "timm"), "timm", model_name="R+ViT-tiny_8")
  assert result.max_abs_diff <= convert.DEFAULT_TOLERANCE
  with open(tmp_path / "timm" / "config.json") as f:
    assert json.load(f)["model_args"]["img_size"] == 32
  flat, meta = _make("R+ViT-tiny_8", 28)  # a 7x7 stem map: 3x3 patches of 2, one row dropped
  with pytest.raises(convert.ConversionError, match="7x7 feature map.*HybridEmbed"):
    convert.export_timm(flat, meta, str(tmp_path / "odd"))


def test_npz_without_metadata_at_48px(tmp_path):
  flat, _ = _make("testing", 48, num_classes=4)
  path = _save_npz(tmp_path, flat)  # no .json: an original-style file
  for fmt in convert.FORMATS:
    result = convert.convert(path, str(tmp_path / fmt), fmt, model_name="testing")
    assert result.max_abs_diff <= _FLOAT32_TOL
  with open(tmp_path / "timm" / "config.json") as f:
    config = json.load(f)
  assert config["model_args"]["img_size"] == 48
  assert config["label_names"] == [f"LABEL_{i}" for i in range(4)]
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["image_size"] == 48
  with open(tmp_path / "hf" / "preprocessor_config.json") as f:
    assert json.load(f)["size"] == {"height": 48, "width": 48}


def test_pre_logits(tmp_path):
  flat, meta = _make("testing", 32, num_classes=6, representation_size=8)
  flat = {
    **flat,
    "head/kernel": np.zeros_like(flat["head/kernel"]),
    "head/bias": np.zeros_like(flat["head/bias"]),
  }  # as Google's in21k release
  with pytest.raises(convert.ConversionError, match="pre_logits.*--format hf"):
    convert.export_timm(flat, meta, str(tmp_path / "timm"))
  # hf: ViTModel whose pooler is tanh(pre_logits): pooler_output = the Flax features.
  images = convert.check_images(2, 32)
  out = str(tmp_path / "hf")
  assert convert.export_hf(flat, meta, out) == "features"
  diff = convert.check_export(
    out, "hf", flat, meta, images, outputs="features", tolerance=_FLOAT32_TOL
  )
  assert isinstance(convert.load_hf(out), transformers.ViTModel)
  print(f"pre_logits features: max diff {diff:.3g}")
  trained_head = {**flat, "head/kernel": np.ones_like(flat["head/kernel"])}
  with pytest.raises(convert.ConversionError, match="trained head"):
    convert.export_hf(trained_head, meta, str(tmp_path / "hf2"))


def test_bfloat16_npz(tmp_path):
  flat, meta = _make("testing", 32, num_classes=3)
  path = _save_npz(tmp_path, flat, name="f32.npz")
  with np.load(path) as npz:  # the file's own (pre-Linen) names, values as bfloat16
    bf16 = {k: npz[k].astype(ml_dtypes.bfloat16) for k in npz.files}
  path = str(tmp_path / "bf16.npz")
  np.savez(path, **bf16)
  result = convert.convert(path, str(tmp_path / "out"), "timm", model_name="testing")
  assert result.max_abs_diff <= _FLOAT32_TOL
  sd = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  assert {v.dtype for v in sd.values()} == {np.dtype(np.float32)}
  rounded = flat["head/bias"].astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(sd["head.bias"], rounded)


def test_failed_check_writes_nothing(tmp_path):
  flat, meta = _make("testing", 32)
  path = _save_npz(tmp_path, flat, meta)
  out = tmp_path / "out"
  with pytest.raises(convert.ParityError):
    convert.convert(path, str(out), "timm", tolerance=1e-12)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]


def test_training_workdir(tmp_path):
  """A workdir (run.json + orbax checkpoints/<step>/default) via checkpoint.load_for_inference."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  flat, meta = _make("testing", 32, num_classes=3)
  with open(tmp_path / "run.json", "w") as f:
    json.dump(dict(meta, config={}), f)
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  mngr.save(
    7,
    args=ocp.args.StandardSave(
      {"params": flax.traverse_util.unflatten_dict(flat, sep="/"), "step": np.int32(7)}
    ),
  )
  mngr.wait_until_finished()
  result = convert.convert(str(tmp_path), str(tmp_path / "out"), "hf")
  assert result.max_abs_diff <= _FLOAT32_TOL
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["id2label"]["2"] == "class_2"


def test_module_imports_neither_tensorflow_nor_torch():
  code = (
    "import sys, vit_jax.convert; "
    "print(sorted(m for m in ('tensorflow', 'torch', 'timm', 'transformers') "
    "if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
  ).stdout
  assert out.strip() == "[]"


# --- Bad input ---------------------------------------------------------------------------------


def _bad_inputs(tmp_path):
  flat, meta = _make("testing", 32)
  text = tmp_path / "notes.npz"
  text.write_text("not a checkpoint")
  hybrid = str(tmp_path / "hybrid.npz")
  np.savez(
    hybrid,
    **flat,
    **{
      "conv_root/kernel": np.zeros((7, 7, 3, 64), np.float32),
      "gn_root/scale": np.ones((1, 1, 1, 64), np.float32),
    },
  )
  bare = _save_npz(tmp_path, flat, name="bare.npz")
  return [
    (str(text), {}, "not a readable .npz"),
    (hybrid, {"model_name": "testing"}, "no ResNet stem in the model 'testing', one in the file"),
    (bare, {"model_name": "ViT-Ti_16"}, "does not match model 'ViT-Ti_16'"),
    (bare, {}, "pass --model_name"),
    (bare, {"model_name": "testing", "image_size": 64}, "position embeddings are 2x2"),
    (_save_npz(tmp_path, flat, meta, name="meta.npz"), {"model_name": "ViT-B_16"}, "differs"),
  ]


def test_bad_input_errors_name_the_file(tmp_path):
  for path, kwargs, message in _bad_inputs(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as e:
      convert.convert(path, str(tmp_path / "out"), "timm", **kwargs)
    assert str(e.value).startswith(path) and message in str(e.value), str(e.value)
  assert not (tmp_path / "out").exists()


# --- CLI and the README serving snippet ----------------------------------------------------------


def _cli_main():
  spec = importlib.util.spec_from_file_location("convert_to_pytorch", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_cli_bad_input_exit_code_2_without_traceback(tmp_path, capsys):
  main = _cli_main()
  flat, _ = _make("testing", 32)
  bare = _save_npz(tmp_path, flat, name="bare.npz")
  rc = main(
    [
      "--checkpoint",
      bare,
      "--format",
      "timm",
      "--output",
      str(tmp_path / "o"),
      "--model_name",
      "ViT-B_16",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith(f"error: {bare}: does not match") and "Traceback" not in err


def _serving_snippet() -> str:
  doc = _SCRIPT.read_text().split('"""')[1]
  block = doc.split("Serving the hf export from PyTorch")[1].split("\n\n")[1]
  return textwrap.dedent(block)


def test_cli_end_to_end_and_serving_snippet(tmp_path, monkeypatch):
  flat, meta = _make("testing", 32, num_classes=4, seed=5)
  meta = {**meta, "class_names": ["sandal", "sneaker", "boot", "loafer"]}
  path = _save_npz(tmp_path, flat, meta, name="vit_shoes.npz")
  env = {**os.environ, "PYTHONPATH": str(_REPO)}
  proc = subprocess.run(
    [
      sys.executable,
      str(_SCRIPT),
      "--checkpoint",
      path,
      "--format",
      "hf",
      "--output",
      "exported/vit_hf",
      "--num_check_images",
      "2",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert "max |logits difference| vs Flax" in proc.stdout
  out = tmp_path / "exported" / "vit_hf"
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
  # The snippet from the script's docstring, run exactly as written.
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)).save(
    tmp_path / "photo.jpg"
  )
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(_serving_snippet(), namespace)  # pylint: disable=exec-used
  predictions = namespace["predictions"]
  assert len(predictions) == 4 and predictions[0]["label"] in meta["class_names"]
