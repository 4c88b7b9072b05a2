"""vit_jax.hlo_traffic reads kernels and their bytes off a compiled step; scripts/benchmark_hlo.py
reports them (for this machine's devices here; its H100 target needs jax's CUDA plugin)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vit_jax import hlo_traffic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark_hlo.py")


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
  group = hlo_traffic._op_group  # pylint: disable=protected-access
  assert group("jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_3/"
               "MlpBlock_0/Dense_0/reduce_sum") == (
                   "backward: Transformer/encoderblock_N/MlpBlock_0/Dense_0/reduce_sum")
  assert group("jit(train_step)/jvp(VisionTransformer)/Transformer/encoderblock_11/"
               "MultiHeadDotProductAttention_0/jit(_pad)/pad") == (
                   "Transformer/encoderblock_N/MultiHeadDotProductAttention_0/pad")


def test_text_without_an_entry_computation_is_an_error():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_traffic.kernel_traffic("HloModule m\n")


def test_script_reports_the_testing_models_training_step_here():
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--target", "local", "--model_name", "testing", "--image_size",
       "32", "--batch", "8", "--json"], capture_output=True, text=True, timeout=300, cwd=REPO,
      env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r["model_name"], r["mode"], r["batch"], r["num_devices"]) == (
      "testing", "train", 8, jax.device_count())
  assert r["kernels"] > 0 and r["matmul_bytes"] > 0 and r["other_bytes"] > 0
  assert sum(v["bytes"] for v in r["by_kind"].values()) == r["traffic_bytes"]
  assert r["traffic_bytes"] == r["matmul_bytes"] + r["attention_bytes"] + r["other_bytes"]
  assert r["compiled_memory"]["total"] > 0
  assert any("encoderblock_N" in op for op, _ in r["top_other_ops"])


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


@pytest.mark.skipif(_has_cuda_plugin(),
                    reason="jax's CUDA plugin is installed here: the H100 target works")
def test_h100_target_without_the_cuda_plugin_says_what_to_install():
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--target", "h100", "--model_name", "testing", "--image_size",
       "32", "--batch", "8"], capture_output=True, text=True, timeout=300, cwd=REPO,
      env=dict(os.environ))
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "jax-cuda13-plugin" in last, proc.stderr[-2000:]
