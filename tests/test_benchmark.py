"""scripts/benchmark.py runs and reports sane numbers (not a speed test), and the FLOP counts agree."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import benchmark, models, models_vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")
# Tiny shapes: the `testing` model at 32 px, batch 8 over the 8 fake devices of conftest.py.
BASE = ["--model_name", "testing", "--image_size", "32", "--batch", "8", "--steps", "2",
        "--warmup", "1", "--peak_size", "256", "--json"]


def _run(*extra: str) -> dict:
  proc = subprocess.run([sys.executable, SCRIPT, *BASE, *extra], capture_output=True, text=True,
                        timeout=300, cwd=REPO, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout[:2000]}"
  return json.loads(lines[0])


def _positive(result: dict, *keys: str) -> None:
  for key in keys:
    value = result[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_train_with_timm():
  # Eager timm: torch.compile of even this model takes ~20 s on 2 cores (the suite times both).
  r = _run("--mode", "train", "--compare", "timm", "--timm_compile", "off")
  assert (r["model_name"], r["mode"], r["batch"], r["image_size"]) == ("testing", "train", 8, 32)
  assert r["num_devices"] == jax.device_count()
  _positive(r, "images_per_sec", "mfu", "peak_flops", "step_time_s", "compile_s",
            "flops_per_image", "flops_per_image_xla", "flops_per_image_analytic",
            "timm_images_per_sec", "timm_mfu", "ratio_vs_timm", "num_params")
  assert len(r["step_times_s"]) == 2
  assert r["ratio_vs_timm"] == pytest.approx(r["images_per_sec"] / r["timm_images_per_sec"])
  assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_sec"] / r["peak_flops"])
  assert r["timm_execution"] == "eager" and r["timm_compile_error"] is None
  assert r["timm_threads"] == os.cpu_count() and r["timm_device"] == "cpu"
  assert r["cotangent_boundaries"]  # auto: on for the CPU backend


def test_cotangent_boundaries_ab_script():
  script = os.path.join(REPO, "scripts", "benchmark_boundaries.py")
  proc = subprocess.run([sys.executable, script, "--model_name", "testing", "--image_size", "32",
                         "--batch", "8", "--rounds", "1", "--steps", "1"], capture_output=True,
                        text=True, timeout=300, cwd=REPO, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r["model_name"], r["batch"], r["image_size"]) == ("testing", 8, 32)
  _positive(r, "step_s_off", "step_s_on", "compile_s_off", "compile_s_on")
  assert r["speedup"] == pytest.approx(r["step_s_off"] / r["step_s_on"])


def test_inference_bfloat16_remat():
  r = _run("--mode", "inference", "--dtype", "bfloat16", "--remat",
           "--remat_policy", "dots_saveable")
  assert (r["mode"], r["dtype"], r["peak_matmul_dtype"]) == ("inference", "bfloat16", "bfloat16")
  assert r["remat"] and r["remat_policy"] == "dots_saveable"
  _positive(r, "images_per_sec", "mfu", "peak_flops", "compile_s", "flops_per_image")
  assert "timm_images_per_sec" not in r


def test_bad_arguments_fail_cleanly():
  proc = subprocess.run([sys.executable, SCRIPT, "--remat_policy", "dots_saveable"],
                        capture_output=True, text=True, timeout=60, cwd=REPO)
  assert proc.returncode == 2 and "--remat_policy needs --remat" in proc.stderr
  proc = subprocess.run([sys.executable, SCRIPT, "--model_name", "R50+ViT-B_16"],
                        capture_output=True, text=True, timeout=60, cwd=REPO)
  assert proc.returncode == 2 and "a ResNet+ViT hybrid" in proc.stderr


@pytest.mark.parametrize("name,gflops", [("ViT-B_16", 35.2), ("ViT-Ti_16", 2.5)])
def test_analytic_flops_match_the_published_counts(name, gflops):
  """2 x the often-quoted multiply-add counts (17.6 and 1.26 GMACs) at 224 px."""
  flops = benchmark.analytic_flops(models.get_model(name, 1000), 224)
  assert flops["forward"] / 1e9 == pytest.approx(gflops, rel=0.01)
  assert flops["train"] == 3 * flops["forward"]


def test_xla_cost_analysis_agrees_with_the_analytic_count():
  """ViT-Ti/16 forward at 224 px: XLA's count is the matmuls plus a few % of elementwise work."""
  model = models.get_model("ViT-Ti_16", 1000)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          images)["params"]
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  per_image = benchmark.xla_flops(compiled) / 2
  analytic = benchmark.analytic_flops(model, 224)["forward"]
  assert 1.0 <= per_image / analytic < 1.05


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_policies_keep_the_gradients(policy):
  """A speed option, not a new function: rematerialised gradients equal the plain ones."""
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  plain = models.get_model("testing", 3, dropout_rate=0.0)
  remat = models.get_model("testing", 3, dropout_rate=0.0, remat=True, remat_policy=policy)
  params = jax.tree.map(lambda p: p + 0.1, plain.init(jax.random.key(0), x)["params"])
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, train=True) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_remat_policy_is_a_clear_error():
  model = models.get_model("testing", 3, remat=True, remat_policy="everything")
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_padded_attention_is_the_same_function():
  """The cuDNN path pads ViT's 197 tokens to 256 and masks them: same outputs as unpadded."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 197, 3, 8)) for i in range(3))
  want = jax.nn.dot_product_attention(q, k, v)
  got = models_vit.padded_dot_product_attention(q, k, v, implementation=None, multiple=64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-6)
  grads = [jax.grad(lambda q: jnp.sum(f(q) ** 2))(q) for f in (
      lambda q: jax.nn.dot_product_attention(q, k, v),
      lambda q: models_vit.padded_dot_product_attention(q, k, v, implementation=None))]
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)
