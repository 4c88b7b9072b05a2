"""The TPU preflight: the real TPU compiler (libtpu) on described slices, tiny models.

Skips, with the reason, where libtpu cannot load (requirements-tpu.txt not installed).
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import common, testing
from vit_jax import preflight, program, sharding, tpu_slices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = (
  "topology device_kind chips processes hbm_bytes_per_chip argument_bytes temp_bytes total_bytes "
  "fits compile_seconds collectives estimated_images_per_sec_per_chip suggestion"
).split()

jax.devices()  # this process's own backend (CPU) first: libtpu below only describes slices


def devices(name: str) -> list:
  try:
    return tpu_slices.topology_devices(name)
  except tpu_slices.TopologyError as e:
    if "libtpu" in str(e) or "TPU_LIBRARY_PATH" in str(e):
      pytest.skip(f"libtpu cannot load here: {e}")
    raise


def config(**overrides):
  return common.with_overrides(testing.get_config(), overrides)


def preflight_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  devices("v5e:2x2")  # skip where libtpu cannot load
  cmd = [sys.executable, "-m", "vit_jax.preflight", "--config=configs/testing.py", *args]
  return subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
  )


def test_accelerator_types_name_their_topology_and_host_layout():
  assert tpu_slices.topology_name("v5litepod-16") == "v5e:4x4"
  assert tpu_slices.topology_name("v4-16") == "v4:2x2x2"  # v4 types count TensorCores
  assert tpu_slices.topology_name("v5p-8") == "v5p:2x2x1"
  assert tpu_slices.topology_name("v6e-8") == "v6e:2x4"
  # As jax sees them on the VMs: v4 megacore (a device per chip); v5e-8 on one host.
  v4 = devices("v4-8")
  assert (len(v4), len({d.process_index for d in v4})) == (4, 1)
  v5e = devices("v5litepod-8")
  assert (len(v5e), len({d.process_index for d in v5e})) == (8, 1)
  v5e16 = devices("v5litepod-16")
  assert (len(v5e16), len({d.process_index for d in v5e16})) == (16, 4)


def test_json_report_of_a_single_host_slice():
  r = preflight_cli("--topology=v5e:2x2", "--num_classes=10", "--json")
  assert r.returncode == 0, r.stderr
  report = json.loads(r.stdout)
  assert set(REQUIRED) <= set(report)
  assert (report["chips"], report["processes"], report["device_kind"]) == (4, 1, "TPU v5 lite")
  assert report["fits"] is True and report["suggestion"] is None
  assert report["dtype"] == "bfloat16"  # the TPU default of model.dtype=None
  assert report["total_bytes"] >= report["argument_bytes"] + report["temp_bytes"] > 0
  assert report["hbm_bytes_per_chip"] == 16 * 2**30
  assert [c["kind"] for c in report["collectives"]] == ["all-reduce"]  # gradients, metrics


def test_fsdp_splits_the_state_on_a_multi_process_slice():
  slice_ = devices("v5e:4x4")
  kw = dict(model_name="ViT-tiny_4", batch=64, batch_eval=64)
  replicated = preflight.analyse(config(**kw), "v5e:4x4", 10, slice_)
  fsdp = preflight.analyse(config(**kw, fsdp=True), "v5e:4x4", 10, slice_)
  assert (replicated["chips"], replicated["processes"]) == (16, 4)
  # Leaves under 2**14 elements stay replicated; ViT-tiny_4's matrices are split 16 ways.
  assert fsdp["params_bytes"] < replicated["params_bytes"] / 2
  assert fsdp["optimizer_bytes"] < replicated["optimizer_bytes"] / 2
  assert fsdp["argument_bytes"] < replicated["argument_bytes"]
  assert "all-gather" in {c["kind"] for c in fsdp["collectives"]}
  assert "all-gather" not in {c["kind"] for c in replicated["collectives"]}


# ViT-tiny_4 at 64 px (257 tokens), 64 images per chip: the TPU compiler gives this step no
# estimate on v5e, and its activations are most of its memory.
TINY = dict(model_name="ViT-tiny_4", batch=256, batch_eval=64, **{"pp.crop": 64})


@pytest.fixture(scope="module")
def tiny_v5e() -> dict:
  return preflight.analyse(config(**TINY), "v5e:2x2", 10, devices("v5e:2x2"))


def test_remat_lowers_the_temporaries(tiny_v5e):
  remat = preflight.analyse(
    config(**TINY, **{"model.remat": True}), "v5e:2x2", 10, devices("v5e:2x2")
  )
  assert remat["remat"] == "nothing_saveable" and tiny_v5e["remat"] is None
  assert remat["temp_bytes"] < 0.7 * tiny_v5e["temp_bytes"]


def test_an_oversized_batch_does_not_fit_and_its_suggestion_does():
  args = ["--topology=v5e:2x2", "--num_classes=10", "--json", "--config.model_name=ViT-tiny_4"]
  r = preflight_cli(*args, "--config.batch=524288")
  assert r.returncode == 1, r.stderr
  report = json.loads(r.stdout)
  assert report["fits"] is False and report["total_bytes"] > report["hbm_bytes_per_chip"]
  flags = report["suggestion"]["flags"].split()
  # bfloat16 images (free, the model computes in bfloat16 on TPU) and accumulation, in that order.
  assert flags[0] == "--config.pp.bfloat16=True" and flags[1].startswith("--config.accum_steps=")
  again = preflight_cli(*args, "--config.batch=524288", *flags)
  assert again.returncode == 0, again.stderr
  assert json.loads(again.stdout)["fits"] is True


def compiler_estimate(c, slice_: list) -> float:
  """The compiler's own optimal_seconds for `c`'s train step, compiled here directly."""
  mesh = sharding.make_mesh(slice_)
  prog = program.build_program(c, 10, mesh, platform="tpu")
  to_args = lambda tree, shardings: jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )
  batch = program.batch_shapes(c)[0]
  batch_sharding = {k: sharding.batch_sharding(mesh) for k in batch}
  compiled = prog.train_step.lower(
    to_args(prog.abstract, prog.shardings), to_args(batch, batch_sharding)
  ).compile()
  return compiled.cost_analysis().get("optimal_seconds", -1.0)


def test_the_estimate_is_absent_exactly_when_the_compiler_gives_none(tiny_v5e):
  assert compiler_estimate(config(**TINY), devices("v5e:2x2")) <= 0
  assert tiny_v5e["estimated_step_seconds"] is None
  assert tiny_v5e["estimated_images_per_sec_per_chip"] is None
  assert tiny_v5e["estimated_mfu"] is None

  slice_, c = devices("v5p:2x2x1"), config()
  estimate = compiler_estimate(c, slice_)
  assert estimate > 0
  report = preflight.analyse(c, "v5p:2x2x1", 10, slice_)
  assert report["estimated_step_seconds"] == pytest.approx(estimate)
  assert report["estimated_images_per_sec_per_chip"] == pytest.approx(c.batch / estimate / 4)


@pytest.mark.parametrize(
  "args, says",
  [
    (["--topology=v5e:3x3"], "--topology='v5e:3x3'"),
    (["--topology=bogus"], "--topology='bogus'"),
    (["--topology=v5e:2x2", "--config.batch=30"], "config.batch=30 is not divisible by the 4"),
    (["--topology=v5e:2x2", "--config.nope=1"], "no such config field"),
    (["--topology=v5e:2x2"], "libtpu"),  # with TPU_LIBRARY_PATH at a missing file, below
  ],
)
def test_bad_input_is_one_error_line(args, says):
  env = {"TPU_LIBRARY_PATH": "/nonexistent/libtpu.so"} if says == "libtpu" else None
  r = preflight_cli(*args, "--num_classes=10", env=env)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
  if says == "libtpu":
    assert "pip install -r requirements-tpu.txt" in lines[0]


def test_pmap_is_refused_with_the_flag_to_use():
  with pytest.raises(preflight.PreflightError, match="--config.parallelism=jit"):
    preflight.analyse(config(parallelism="pmap"), "v5e:2x2", 10, devices("v5e:2x2"))
