"""`python -m benchmarks` runs and reports sane numbers (not a speed test); the FLOP counts agree;
`benchmarks.hlo_traffic` reads kernels and their bytes off a compiled step; and the package a
training job imports stays free of the benchmarks and of torch."""

import argparse
import functools
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import harness, hlo_traffic, table
from vit_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny shapes: the `testing` model at 32 px, batch 8 over the 8 fake devices of conftest.py.
TINY = ["--model_name", "testing", "--image_size", "32", "--batch", "8"]
SPEED = ["speed", *TINY, "--steps", "2", "--warmup", "1", "--peak_size", "256", "--json"]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "benchmarks", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
    env=dict(os.environ),
  )


def _json(*args: str) -> dict:
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout[:2000]}"
  return json.loads(lines[0])


def _positive(result: dict, *keys: str) -> None:
  for key in keys:
    value = result[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


# ---------------------------------------------------------------------------------------------
# The package boundary.


@pytest.mark.parametrize(
  "modules, forbidden",
  [
    # The GPU machines that run speed, ab and hlo have no TensorFlow installed.
    ("benchmarks.speed, benchmarks.ab, benchmarks.hlo", ("tensorflow", "clu", "torch")),
    # A training job needs neither PyTorch nor the measuring tools.
    ("vit_jax.train", ("torch", "timm", "benchmarks")),
  ],
  ids=["gpu_benchmarks_without_tensorflow", "training_without_torch"],
)
def test_imports_stay_within_their_side(modules, forbidden):
  code = (
    f"import sys, {modules}; "
    f"bad = [m for m in {forbidden!r} if m in sys.modules]; "
    "assert not bad, bad"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
    env=dict(os.environ),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_package_never_imports_the_benchmarks():
  for path in glob.glob(os.path.join(REPO, "vit_jax", "*.py")):
    with open(path) as f:
      source = f.read()
    assert "import benchmarks" not in source and "from benchmarks" not in source, path


def test_entry_point_lists_its_subcommands_and_refuses_others():
  proc = _run("--help", timeout=60)
  assert proc.returncode == 0
  for name in ("speed", "ab", "hlo", "input", "table", "all"):
    assert f"  {name} " in proc.stdout
  proc = _run("bench", timeout=60)
  assert proc.returncode != 0 and "unknown subcommand 'bench'" in proc.stderr


# ---------------------------------------------------------------------------------------------
# speed and ab.


def test_speed_train_with_timm():
  # Eager timm: torch.compile of even this model takes ~20 s on 2 cores (the suite times both).
  r = _json(*SPEED, "--mode", "train", "--compare", "timm", "--timm_compile", "off")
  assert (r["model_name"], r["mode"], r["batch"], r["image_size"]) == ("testing", "train", 8, 32)
  assert r["num_devices"] == jax.device_count()
  _positive(
    r,
    "images_per_sec",
    "mfu",
    "peak_flops",
    "step_time_s",
    "compile_s",
    "flops_per_image",
    "flops_per_image_xla",
    "flops_per_image_analytic",
    "timm_images_per_sec",
    "timm_mfu",
    "ratio_vs_timm",
    "num_params",
  )
  assert len(r["step_times_s"]) == 2
  assert r["ratio_vs_timm"] == pytest.approx(r["images_per_sec"] / r["timm_images_per_sec"])
  assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_sec"] / r["peak_flops"])
  assert r["timm_execution"] == "eager" and r["timm_compile_error"] is None
  assert r["timm_threads"] == os.cpu_count() and r["timm_device"] == "cpu"
  assert r["cotangent_boundaries"]  # auto: on for the CPU backend
  assert table.render([r]).count("\n| testing |") == 1


def test_speed_inference_bfloat16_remat():
  r = _json(
    *SPEED,
    "--mode",
    "inference",
    "--dtype",
    "bfloat16",
    "--remat",
    "--remat_policy",
    "dots_saveable",
    "--cotangent_boundaries",
    "off",
  )
  assert (r["mode"], r["dtype"], r["peak_matmul_dtype"]) == ("inference", "bfloat16", "bfloat16")
  assert r["remat"] and r["remat_policy"] == "dots_saveable"
  assert not r["cotangent_boundaries"]
  _positive(r, "images_per_sec", "mfu", "peak_flops", "compile_s", "flops_per_image")
  assert "timm_images_per_sec" not in r


def test_speed_bad_arguments_fail_cleanly():
  proc = _run("speed", "--remat_policy", "dots_saveable", timeout=120)
  assert proc.returncode == 2 and "--remat_policy needs --remat" in proc.stderr
  proc = _run("speed", "--model_name", "R50+ViT-B_16", timeout=120)
  assert proc.returncode == 2 and "a ResNet+ViT hybrid" in proc.stderr


def test_ab_of_the_cotangent_boundaries():
  r = _json("ab", *TINY, "--rounds", "1", "--steps", "1")
  assert (r["model_name"], r["batch"], r["image_size"]) == ("testing", 8, 32)
  _positive(r, "step_s_off", "step_s_on", "compile_s_off", "compile_s_on")
  assert r["speedup"] == pytest.approx(r["step_s_off"] / r["step_s_on"])


def test_config_flags_reach_the_model():
  parser = argparse.ArgumentParser()
  harness.add_model_flags(parser)
  args = parser.parse_args(
    [
      "--model_name",
      "testing",
      "--recompute_gelu",
      "--remat",
      "--remat_policy",
      "dots_saveable",
      "--attention",
      "xla",
      "--cotangent_boundaries",
      "off",
      "--dtype",
      "bfloat16",
    ]
  )
  model = harness.get_model(harness.make_config(args), 3)
  assert model.recompute_gelu and model.remat and model.remat_policy == "dots_saveable"
  assert model.attention_impl is None and model.cotangent_boundaries is False
  assert model.dtype == jnp.bfloat16
  # 'auto' follows the compile target's platform, not this machine's.
  args.cotangent_boundaries, args.attention = "auto", "auto"
  gpu = harness.get_model(harness.make_config(args, platform="cuda"), 3)
  assert gpu.cotangent_boundaries is False and gpu.attention_impl == "cudnn"
  assert harness.get_model(harness.make_config(args, platform="cpu"), 3).cotangent_boundaries


# ---------------------------------------------------------------------------------------------
# FLOPs.


@pytest.mark.parametrize("name,gflops", [("ViT-B_16", 35.2), ("ViT-Ti_16", 2.5)])
def test_analytic_flops_match_the_published_counts(name, gflops):
  """2 x the often-quoted multiply-add counts (17.6 and 1.26 GMACs) at 224 px."""
  flops = harness.analytic_flops(models.get_model(name, 1000), 224)
  assert flops["forward"] / 1e9 == pytest.approx(gflops, rel=0.01)
  assert flops["train"] == 3 * flops["forward"]


def test_xla_cost_analysis_agrees_with_the_analytic_count():
  """ViT-Ti/16 forward at 224 px: XLA's count is the matmuls plus a few % of elementwise work."""
  model = models.get_model("ViT-Ti_16", 1000)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)[
    "params"
  ]
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  per_image = harness.xla_flops(compiled) / 2
  analytic = harness.analytic_flops(model, 224)["forward"]
  assert 1.0 <= per_image / analytic < 1.05


# ---------------------------------------------------------------------------------------------
# hlo.


def _kernels(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return hlo_traffic.kernel_traffic(jax.jit(fn).lower(*args).compile().as_text())


def test_a_matmul_moves_its_operands_and_its_result():
  (kernel,) = _kernels(lambda a, b: a @ b, (64, 128), (128, 32))
  assert kernel.is_matmul and not kernel.is_attention
  assert kernel.bytes == 4 * (64 * 128 + 128 * 32 + 64 * 32)


def test_elementwise_work_after_a_matmul_is_a_separate_non_matmul_kernel():
  kernels = _kernels(lambda a, b: jnp.tanh(a @ b) + 1.0, (64, 128), (128, 32))
  summary = hlo_traffic.summarize(kernels)
  assert summary["matmul_bytes"] == 4 * (64 * 128 + 128 * 32 + 64 * 32)
  assert summary["other_bytes"] > 0
  assert summary["traffic_bytes"] == sum(k.bytes for k in kernels)


def test_ops_of_every_block_and_transform_are_grouped():
  group = hlo_traffic.op_group
  assert group(
    "jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_3/"
    "MlpBlock_0/Dense_0/reduce_sum"
  ) == ("backward: Transformer/encoderblock_N/MlpBlock_0/Dense_0/reduce_sum")
  assert group(
    "jit(train_step)/jvp(VisionTransformer)/Transformer/encoderblock_11/"
    "MultiHeadDotProductAttention_0/jit(_pad)/pad"
  ) == ("Transformer/encoderblock_N/MultiHeadDotProductAttention_0/pad")


def test_text_without_an_entry_computation_is_an_error():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_traffic.kernel_traffic("HloModule m\n")


def test_hlo_reports_the_testing_models_training_step_here():
  r = _json("hlo", "--target", "local", *TINY, "--json")
  assert (r["model_name"], r["mode"], r["batch"], r["num_devices"]) == (
    "testing",
    "train",
    8,
    jax.device_count(),
  )
  assert r["kernels"] > 0 and r["matmul_bytes"] > 0 and r["other_bytes"] > 0
  assert sum(v["bytes"] for v in r["by_kind"].values()) == r["traffic_bytes"]
  assert r["traffic_bytes"] == r["matmul_bytes"] + r["attention_bytes"] + r["other_bytes"]
  assert r["compiled_memory"]["total"] > 0
  assert r["cotangent_boundaries"]  # auto, for a CPU target
  assert any("encoderblock_N" in op for op, _ in r["top_other_ops"])


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


@pytest.mark.skipif(
  _has_cuda_plugin(), reason="jax's CUDA plugin is installed here: the H100 target works"
)
def test_hlo_h100_target_without_the_cuda_plugin_says_what_to_install():
  proc = _run("hlo", "--target", "h100", *TINY)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "jax-cuda13-plugin" in last, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# table.


def test_table_of_the_recorded_results_and_its_update(tmp_path):
  results = os.path.join(REPO, "benchmarks", "results")
  doc = tmp_path / "doc.md"
  doc.write_text(
    "before\n<!-- benchmark-table:cpu:start -->\nold\n<!-- benchmark-table:cpu:end -->\nafter\n"
  )
  proc = _run(
    "table",
    *(os.path.join(results, f) for f in ("cpu-ViT-Ti_16.jsonl", "cpu-ViT-B_16.jsonl")),
    "--update",
    str(doc),
    "--section",
    "cpu",
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = doc.read_text()
  assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
  assert "Measured on: AMD EPYC, 2 cores" in text and text.count("| ViT-B/16 |") == 4
  proc = _run(
    "table", *(os.path.join(results, f) for f in ("cpu-ViT-Ti_16.jsonl", "gpu.jsonl")), timeout=60
  )
  assert proc.returncode != 0 and "one table, one machine" in proc.stderr
