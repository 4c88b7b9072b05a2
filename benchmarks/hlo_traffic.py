"""What XLA compiled a step into: its kernels and the bytes each one reads and writes.

`kernel_traffic(compiled.as_text())` lists the kernels that the entry computation of an optimised
HLO module launches (fusions, library calls such as cuBLAS matmuls and cuDNN attention, copies),
each with the bytes of its operands plus its result: the memory traffic the kernel needs if
nothing stays in cache. Summed, and divided by the device's memory bandwidth, it is a lower bound
on the time of the step's memory-bound part; summed per JAX op (`op_name` metadata), it says where
that traffic comes from. It is read off the compiled program, not timed. Not counted: kernels
inside `conditional`/`while` bodies (the entry's own kernels only) and cuBLAS workspaces; an
in-place update counts its whole buffer.

`deviceless_gpu_mesh()` is a one-device mesh of an H100 that is not here: with jax's CUDA plugin
installed, XLA:GPU compiles for it on a machine without a GPU (deviceless ahead-of-time
compilation), so what XLA makes of our step on an H100 can be read on a CPU-only machine.
"""

import collections
import dataclasses
import os
import re
from typing import Any

import jax

# An H100 80GB HBM3 (SXM) as XLA:GPU's target config describes it (stream_executor's
# GpuDeviceInfoProto); cuDNN and CUDA versions as jax 0.10.2's CUDA 13 plugin wheels ship them.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 24 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_MEMORY_BANDWIDTH = 3.35232e12  # bytes/s, as in the target config

# Set before jax starts its backends. Without a GPU the plugin's version check cannot query the
# CUDA libraries; Triton GEMM tiling and autotuning need a device (cuBLAS serves every matmul).
DEVICELESS_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
DEVICELESS_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"

_NOT_KERNELS = frozenset(
  (
    "parameter",
    "get-tuple-element",
    "bitcast",
    "tuple",
    "constant",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
  )
)
_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*?)\)(?:, (.*))?$")


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str
  kind: str  # the opcode, 'fusion:<kind>' or 'custom-call:<target>'
  bytes: int  # operands + result
  op_name: str  # the JAX op it came from (first of its op_name metadata), '' if none
  is_matmul: bool  # a dot or convolution: a library call, or a fusion around one

  @property
  def is_attention(self) -> bool:
    return "fmha" in self.kind


def _array_bytes(shape: str, skip_workspace: bool = False) -> int:
  arrays = _ARRAY.findall(shape)
  if skip_workspace and len(arrays) > 1 and arrays[-1][0] in ("s8", "u8"):
    arrays = arrays[:-1]  # a library call's scratch buffer (cuBLAS s8, cuDNN u8), not data
  total = 0.0
  for dtype, dims in arrays:
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def _entry(hlo_text: str) -> str:
  start = hlo_text.find("\nENTRY ")
  if start < 0:
    raise ValueError("no ENTRY computation in the HLO text (expected compiled.as_text())")
  end = hlo_text.find("\n}", start)
  return hlo_text[start : end if end >= 0 else None]


def _computations(hlo_text: str) -> dict[str, str]:
  """{'%name': body} of the module's non-entry computations (fusion bodies among them)."""
  return {
    m.group(1): m.group(2)
    for m in re.finditer(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)
  }


def kernel_traffic(hlo_text: str) -> list[Kernel]:
  """The kernels of the entry computation of an optimised HLO module, with their bytes."""
  bodies = _computations(hlo_text)
  shapes: dict[str, str] = {}
  kernels = []
  for line in _entry(hlo_text).splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, operands, attrs = m.groups()
    attrs = attrs or ""
    shapes[name] = shape
    if opcode in _NOT_KERNELS:
      continue
    kind, matmul = opcode, opcode in ("dot", "convolution")
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    if target:
      kind = f"custom-call:{target.group(1)}"
      matmul = any(s in target.group(1) for s in ("cublas", "gemm", "conv", "matmul"))
    elif opcode == "fusion":
      fusion_kind = re.search(r"kind=(\w+)", attrs)
      kind = f"fusion:{fusion_kind.group(1) if fusion_kind else '?'}"
      calls = re.search(r"calls=(%[\w.\-]+)", attrs)
      matmul = bool(calls) and re.search(r" (dot|convolution)\(", bodies.get(calls.group(1), ""))
    read = sum(_array_bytes(shapes.get(op, "")) for op in re.findall(r"%[\w.\-]+", operands))
    written = _array_bytes(shape, skip_workspace=opcode == "custom-call")
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    kernels.append(
      Kernel(
        name=name,
        kind=kind,
        bytes=read + written,
        op_name=op_name.group(1).split(";")[0] if op_name else "",
        is_matmul=bool(matmul),
      )
    )
  return kernels


def op_group(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_3/...' ->
  'backward: Transformer/encoderblock_N/...': one row for the same op in every block."""
  direction = "backward: " if "transpose(" in op_name else ""
  path = re.sub(r"^jit\([^)]*\)/", "", op_name)
  while True:  # innermost first: transpose(jvp(VisionTransformer))/ -> ''
    path, n = re.subn(r"\b(transpose|jvp|jit|vmap|remat|checkpoint)\([^()]*\)/?", "", path)
    if not n:
      break
  path = re.sub(r"encoderblock_\d+", "encoderblock_N", path)
  return direction + (path or "(no op name)")


def summarize(
  kernels: list[Kernel], *, bandwidth: float | None = None, top: int = 20
) -> dict[str, Any]:
  """Totals per kind and per JAX op; with `bandwidth` (bytes/s) also the time at that rate."""
  by_kind: dict[str, dict[str, int]] = collections.defaultdict(lambda: dict(count=0, bytes=0))
  by_op: collections.Counter = collections.Counter()
  for k in kernels:
    by_kind[k.kind]["count"] += 1
    by_kind[k.kind]["bytes"] += k.bytes
    if not (k.is_matmul or k.is_attention):
      by_op[op_group(k.op_name)] += k.bytes
  total = sum(k.bytes for k in kernels)
  matmul = sum(k.bytes for k in kernels if k.is_matmul)
  attention = sum(k.bytes for k in kernels if k.is_attention)
  out = dict(
    kernels=len(kernels),
    traffic_bytes=total,
    matmul_bytes=matmul,
    attention_bytes=attention,
    other_bytes=total - matmul - attention,
    by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])),
    top_other_ops=[[op, b] for op, b in by_op.most_common(top)],
  )
  if bandwidth:
    out.update(
      bandwidth_bytes_per_s=bandwidth,
      other_ms_at_bandwidth=1e3 * (total - matmul - attention) / bandwidth,
      traffic_ms_at_bandwidth=1e3 * total / bandwidth,
    )
  return out


def deviceless_gpu_mesh(
  axis_name: str, target_config: str = H100_TARGET_CONFIG
) -> jax.sharding.Mesh:
  """A one-device mesh of the GPU `target_config` describes, for compiling without that GPU.

  Needs jax's CUDA plugin, DEVICELESS_ENV in the environment and DEVICELESS_XLA_FLAGS in
  XLA_FLAGS before jax starts (`benchmarks.hlo` sets them).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  missing = [k for k, v in DEVICELESS_ENV.items() if os.environ.get(k) != v]
  if missing:
    raise RuntimeError(
      f"set {', '.join(f'{k}={DEVICELESS_ENV[k]}' for k in missing)} before "
      "jax starts (deviceless GPU compilation)"
    )
  try:
    topology = topologies.get_topology_desc(
      platform="cuda", target_config=target_config, topology="1x1x1"
    )
  except (NotImplementedError, RuntimeError) as e:
    raise RuntimeError(
      "deviceless GPU compilation needs jax's CUDA plugin: pip install "
      f"'jax-cuda13-plugin[with-cuda]=={jax.__version__}' "
      f"'jax-cuda13-pjrt=={jax.__version__}' ({type(e).__name__}: {e})"
    ) from e
  return jax.sharding.Mesh(topology.devices, (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))
