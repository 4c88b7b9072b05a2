"""Cloud TPU slices as libtpu describes them on a machine without a TPU: accelerator types and
topology names, the slice's devices laid out over hosts as on Cloud TPU VMs, and the chip facts
(memory, peak FLOP/s) that compile-only devices do not carry.
"""

import contextlib
import os
import re
import sys
from typing import Any, Iterator, Optional


class TopologyError(ValueError):
  """A topology name, or a missing libtpu; the message says which and what to do."""


# Chip facts the compile-only devices do not carry (they have no memory_stats): HBM per chip and
# peak bf16 matmul FLOP/s per chip, from Google Cloud's TPU system-architecture pages.
GIB = 2**30
CHIPS = {
  "TPU v4": dict(hbm=32 * GIB, peak_flops=275e12),
  "TPU v5 lite": dict(hbm=16 * GIB, peak_flops=197e12),
  "TPU v5": dict(hbm=95 * GIB, peak_flops=459e12),
  "TPU v6 lite": dict(hbm=32 * GIB, peak_flops=918e12),
}
CHIP_SOURCE = "Cloud TPU system architecture pages (vit_jax/tpu_slices.py CHIPS)"
_INSTALL = "pip install -r requirements-tpu.txt  (libtpu==0.0.42.1, for jax 0.10.2)"
# scripts/setup.sh installs libtpu here, outside site-packages: only the preflight loads it, so
# no other command on a CPU machine probes for a TPU (and prints libtpu's warnings).
_PRIVATE_LIBTPU = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
  """libtpu writes warnings about the absent TPU VM straight to fd 2; they are not the user's."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


# Cloud TPU accelerator types -> libtpu topologies. v4 and v5p types count TensorCores (two per
# chip), v5e (v5litepod) and v6e types count chips; the shapes are Cloud TPU's default ones.
_CUBES = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
}
_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v6e)-(\d+)$")


def topology_name(name: str) -> str:
  """libtpu's topology for `name`: an accelerator type ('v5litepod-16' -> 'v5e:4x4', 'v4-16' ->
  'v4:2x2x2') or already a topology ('v5e:4x4')."""
  m = _ACCELERATOR.match(name)
  if not m:
    return name
  gen, n = m.group(1), int(m.group(2))
  shape = _CUBES.get(n // 2) if gen in ("v4", "v5p") else _GRIDS.get(n)
  if shape is None:
    raise TopologyError(f"--topology={name!r}: not a Cloud TPU accelerator type this table knows")
  return f"{dict(v5litepod='v5e').get(gen, gen)}:{shape}"


def libtpu_path() -> Optional[str]:
  """The libtpu.so the preflight loads: $TPU_LIBRARY_PATH, else scripts/setup.sh's install, else
  None (jax then looks in site-packages)."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  if path is None and os.path.exists(_PRIVATE_LIBTPU):
    path = _PRIVATE_LIBTPU
  return path


def topology_devices(name: str) -> list:
  """The devices of the TPU slice `name` (libtpu's names: 'v5e:2x4', 'v4:2x2x1', ..., or an
  accelerator type: 'v5litepod-16'), laid out over hosts as on Cloud TPU VMs."""
  path = libtpu_path()
  if path is not None and not os.path.exists(path):
    raise TopologyError(f"TPU_LIBRARY_PATH={path} does not exist; unset it, or {_INSTALL}")
  if path is not None:
    os.environ["TPU_LIBRARY_PATH"] = path
  # Only compiling: no TPU is opened, so several preflights may load libtpu at once (by default
  # the second would fail on libtpu's lock file, which guards a TPU against two owners).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  name = topology_name(name)
  gen, _, shape = name.partition(":")
  options: dict[str, Any] = {}
  if gen == "v4":  # v4 VMs run megacore: one device per chip, as jax sees them there
    options["chip_config_name"] = "megacore"
  if gen in ("v5e", "v6e") and shape in ("2x4", "4x2"):  # the 8-chip single-host VMs
    options["chips_per_host_bounds"] = tuple(map(int, shape.split("x"))) + (1,)
  try:
    with quiet_stderr():
      topo = topologies.get_topology_desc(platform="tpu", topology_name=name, **options)
  except RuntimeError as e:
    if "not installed" in str(e) or "TPU support" in str(e):
      raise TopologyError(f"libtpu is not installed; {_INSTALL}") from None
    if isinstance(e, jax.errors.JaxRuntimeError):
      msg = str(e).split(":", 1)[-1].strip().splitlines()[0]
      raise TopologyError(f"--topology={name!r}: {msg}") from None
    raise
  return list(topo.devices)
