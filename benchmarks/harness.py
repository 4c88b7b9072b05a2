"""What the benchmarks share: the model flags, the config and model they build, our real jitted
step, timing, FLOP counts and the measured matmul peak.

What is timed is what training runs: `steps.make_train_step` (forward, backward, the optax update
of `optim.make_optimizer`), jitted by `sharding.Jit` over the data-parallel mesh with the state
donated, as `train.train_and_evaluate` jits it. The batch is synthetic and already on the
devices, so the step is measured and not the input pipeline (`python -m benchmarks input` measures
that). Each call is followed by `block_until_ready`; the reported step time is the median of the
timed calls after warm-up, and compilation is timed on its own (`lower(...).compile()`).

MFU (model FLOPs utilisation) = FLOPs per image x images/s / peak FLOP/s, where the peak is a large
matmul timed on the same devices, in the same dtype and the same process (a measured, reachable
peak, not a datasheet number). FLOPs per image are the model's (`analytic_flops`), cross-checked
against XLA's cost analysis of the compiled step (`flops_xla_over_analytic`, `mfu_xla`).

The timm twin (`benchmarks.timm_twin`) times the same model in PyTorch, in a process of its own;
`add_timm` joins the two. Nothing here imports torch.
"""

import argparse
import functools
import json
import math
import os
import platform as platform_lib
import statistics
import sys
import time
from typing import Any, Callable, Optional, TextIO

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from vit_jax import models, models_vit, optim, sharding, steps

MODES = ("train", "inference")
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


# ---------------------------------------------------------------------------------------------
# Flags, config and model.


def add_model_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
  """The flags that choose the model, shapes and step (all but those named in `skip`)."""
  flags: dict[str, dict[str, Any]] = {
    "model_name": dict(default="ViT-B_16", help="a vit_jax.models preset"),
    "batch": dict(type=int, default=32, help="global batch over all devices"),
    "image_size": dict(type=int, default=224),
    "mode": dict(choices=MODES, default="train"),
    "dtype": dict(
      choices=models.DTYPES, default="float32", help="compute dtype (parameters stay float32)"
    ),
    "num_classes": dict(type=int, default=1000),
    "optimizer": dict(choices=("sgd", "adamw"), default="sgd"),
    "remat": dict(action="store_true", help="rematerialise each encoder block"),
    "remat_policy": dict(
      default=None,
      choices=models_vit.REMAT_POLICIES,
      help="with --remat: what a block keeps (default nothing_saveable)",
    ),
    "recompute_gelu": dict(
      action="store_true",
      help="keep only GELU's input for the backward pass (config.model.recompute_gelu)",
    ),
    "attention": dict(
      choices=("auto", "xla", "cudnn"),
      default="auto",
      help="auto: cuDNN fused attention on NVIDIA GPUs with bfloat16, else XLA's",
    ),
    "cotangent_boundaries": dict(
      choices=("auto", "on", "off"),
      default="auto",
      help="config.model.cotangent_boundaries (auto: on for the CPU backend)",
    ),
    "fsdp": dict(action="store_true", help="shard params and optimizer state"),
  }
  for name, kwargs in flags.items():
    if name not in skip:
      parser.add_argument(f"--{name}", **kwargs)


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits through `parser.error` on flags that cannot be measured."""
  if args.remat_policy and not args.remat:
    parser.error("--remat_policy needs --remat")
  if min(args.batch, args.image_size) < 1:
    parser.error("--batch and --image_size must be positive")
  preset = models.MODEL_CONFIGS.get(args.model_name)
  if preset is None:
    parser.error(
      f"--model_name {args.model_name}: unknown; known: {', '.join(models.MODEL_CONFIGS)}"
    )
  if models.is_bit(preset):
    parser.error(
      f"--model_name {args.model_name}: a BiT ResNet; the analytic FLOP count (for the MFU) "
      "and the timm twin cover plain ViTs only"
    )
  if preset.get("resnet") is not None:
    parser.error(
      f"--model_name {args.model_name}: a ResNet+ViT hybrid; the analytic FLOP count "
      "(for the MFU) and the timm twin cover plain ViTs only"
    )


def resolve_attention(attention: str, dtype: str, platform: Optional[str] = None) -> Optional[str]:
  """'auto' -> cuDNN fused attention on NVIDIA GPUs in bf16 (it needs fp16/bf16), else XLA's.

  `platform`: where the step runs (default: the first device's platform).
  """
  if attention == "auto":
    platform = platform or jax.devices()[0].platform
    return "cudnn" if platform in GPU_PLATFORMS and dtype == "bfloat16" else None
  return None if attention == "xla" else attention


def make_config(
  args: argparse.Namespace, platform: Optional[str] = None
) -> ml_collections.ConfigDict:
  """The default training config (configs/common.py) with the flags of `add_model_flags`.

  `platform` is the compile target's (default: where jax runs); it resolves `--attention auto`
  and `--cotangent_boundaries auto` (left to `models.get_model` when None).
  """
  config = common.get_config()
  config.model_name = args.model_name
  config.batch = args.batch
  config.pp.crop = args.image_size
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  if args.remat_policy:
    config.model.remat_policy = args.remat_policy
  config.model.recompute_gelu = args.recompute_gelu
  config.model.attention_impl = resolve_attention(args.attention, args.dtype, platform) or ""
  boundaries = {"on": True, "off": False}.get(args.cotangent_boundaries)
  if boundaries is None and platform is not None:
    boundaries = models.cotangent_boundaries_default(platform)
  config.model.cotangent_boundaries = boundaries
  config.optimizer = args.optimizer
  config.fsdp = args.fsdp
  config.from_scratch = True
  config.lock()
  return config


def get_model(config: ml_collections.ConfigDict, num_classes: int) -> models_vit.VisionTransformer:
  """The model `config` describes, as training builds it."""
  return models.get_model(config.model_name, num_classes, **config.model)


# ---------------------------------------------------------------------------------------------
# FLOPs.


def analytic_flops(model: models_vit.VisionTransformer, image_size: int) -> dict[str, int]:
  """Real FLOPs (a multiply-add is 2) of one image's forward pass, by part; matmuls only.

  With p the patch size, D the width, M the MLP width, L the layers, C the classes,
  N = (image_size / p)^2 patches and T = N (+1 with a class token) tokens:
    patch embedding  2 N (3 p^2) D
    q, k, v          L 2 T D (3 D)
    attention logits L 2 T^2 D       (q.k over all heads)
    weighted sum     L 2 T^2 D       (softmax(logits).v)
    out projection   L 2 T D^2
    MLP              L 2 T D M x 2
    pre_logits, head 2 D R, 2 R C    (R = representation size, else D)
  LayerNorm, softmax, GELU and residual adds are left out (about 1-2 % more). A training step is
  counted as 3 x forward (the backward pass computes gradients for activations and weights).
  """
  p, d, m, layers = model.patch_size, model.hidden_size, model.mlp_dim, model.num_layers
  n = (image_size // p) ** 2
  t = n + (1 if model.classifier == "token" else 0)
  rep = model.representation_size
  parts = {
    "patch_embedding": 2 * n * 3 * p * p * d,
    "qkv": layers * 2 * t * d * 3 * d,
    "attention_logits": layers * 2 * t * t * d,
    "attention_weighted_sum": layers * 2 * t * t * d,
    "attention_out": layers * 2 * t * d * d,
    "mlp": layers * 2 * t * d * m * 2,
    "pre_logits": 2 * d * rep if rep else 0,
    "head": 2 * (rep or d) * (model.num_classes or 0),
  }
  forward = sum(parts.values())
  return dict(parts, forward=forward, train=3 * forward)


def xla_flops(compiled: Any) -> Optional[float]:
  """FLOPs of one call of a compiled computation, per device, from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  (some backends do not implement it)
    logging.warning("XLA cost analysis unavailable: %s", e)
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def time_calls(fn: Callable[[], Any], *, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `fn` after `warmup` calls, each waited for."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def device_peak_memory() -> Optional[int]:
  """Largest peak bytes in use over the local devices, where the backend reports it (not CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def compiled_memory(compiled: Any) -> Optional[dict[str, int]]:
  """XLA's static memory plan of a compiled computation, per device (every backend has one)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  return dict(
    arguments=int(m.argument_size_in_bytes),
    outputs=int(m.output_size_in_bytes),
    aliased=int(m.alias_size_in_bytes),
    temp=int(m.temp_size_in_bytes),
    total=int(total),
  )


def measure_peak_flops(
  mesh: jax.sharding.Mesh,
  dtype: str,
  *,
  size: Optional[int] = None,
  reps: int = 4,
  warmup: int = 1,
  steps: int = 5,
) -> dict[str, Any]:
  """FLOP/s of a chain of `reps` square matmuls of side `size` on every device of `mesh`.

  Each device multiplies its own (size, size) matrices; the chain (y <- y @ w, w scaled by
  1/sqrt(size) so values stay finite in bf16) keeps XLA from hoisting or merging the products.
  """
  platform = jax.devices()[0].platform
  size = size or (8192 if platform in GPU_PLATFORMS + ("tpu",) else 2048)
  n = mesh.size
  spec = NamedSharding(mesh, P(sharding.DATA))
  dt = jnp.dtype(dtype)

  @functools.partial(jax.jit, out_shardings=(spec, spec))
  def make():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, size, size), jnp.float32).astype(dt)
    w = (jax.random.normal(kw, (n, size, size), jnp.float32) / math.sqrt(size)).astype(dt)
    return x, w

  @functools.partial(jax.jit, in_shardings=(spec, spec), out_shardings=spec)
  def chain(x, w):
    return jax.lax.fori_loop(0, reps, lambda _, y: jnp.einsum("bij,bjk->bik", y, w), x)

  x, w = make()
  times = time_calls(lambda: chain(x, w), warmup=warmup, steps=steps)
  flops = 2.0 * size**3 * reps * n
  # The fastest call, not the median: a peak is what the devices can reach, and other load only
  # slows calls down (a median caught in a slow spell once gave an MFU above 100 %).
  return dict(
    peak_flops=flops / min(times),
    peak_matmul_size=size,
    peak_matmul_dtype=dtype,
    peak_matmul_reps=reps,
    peak_times_s=times,
  )


# ---------------------------------------------------------------------------------------------
# Our step.


def _synthetic_batch(
  mesh: jax.sharding.Mesh, batch: int, image_size: int, num_classes: int
) -> dict[str, jax.Array]:
  """Images in [-1, 1] and labels, generated on the devices with the batch sharding."""

  @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
  def make():
    ki, kl = jax.random.split(jax.random.key(1))
    return dict(
      image=jax.random.uniform(ki, (batch, image_size, image_size, 3), jnp.float32, -1.0, 1.0),
      label=jax.random.randint(kl, (batch,), 0, num_classes, jnp.int32),
    )

  return make()


def jitted_step(
  config: ml_collections.ConfigDict,
  model: models_vit.VisionTransformer,
  mesh: jax.sharding.Mesh,
  *,
  mode: str,
  num_classes: int,
) -> tuple[Any, tuple[Any, ...], Callable[[], Any], Any]:
  """The jitted step that `mode` measures, its arguments as sharded `jax.ShapeDtypeStruct`s, the
  training state's init function and its shardings. Nothing is allocated: a mesh of devices that
  are not here (a deviceless compile, `benchmarks.hlo`) works too.

  train: jitted by `sharding.Jit` as training jits it (state sharded and donated, metrics left on
  the devices); args (state, batch). inference: the forward pass; args (params, images).
  """
  batch, size = config.batch, config.pp.crop
  tx, lr_fn = optim.make_optimizer(config)
  init = functools.partial(steps.init_state, model=model, tx=tx, image_size=size, seed=config.seed)
  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.fsdp)
  batch_sharding = sharding.batch_sharding(mesh)
  spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  images = spec(jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32), batch_sharding)
  if mode == "train":
    step = sharding.Jit(mesh, shardings).train_step(
      steps.make_train_step(model, tx, lr_fn, config, num_classes)
    )
    labels = spec(jax.ShapeDtypeStruct((batch,), jnp.int32), batch_sharding)
    args = (jax.tree.map(spec, abstract, shardings), dict(image=images, label=labels))
    return step, args, init, shardings
  forward = lambda params, images: model.apply({"params": params}, images, train=False)
  step = jax.jit(
    forward, in_shardings=(shardings["params"], batch_sharding), out_shardings=batch_sharding
  )
  params = jax.tree.map(spec, abstract["params"], shardings["params"])
  return step, (params, images), init, shardings


def time_step(
  config: ml_collections.ConfigDict,
  model: models_vit.VisionTransformer,
  *,
  mode: str,
  num_classes: int,
  warmup: int,
  steps: int,
) -> dict[str, Any]:
  """Times our training step (mode 'train') or forward pass (mode 'inference').

  `config.batch` is the global batch, `config.pp.crop` the resolution.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  mesh = sharding.make_mesh()
  n_dev, batch, size = mesh.size, config.batch, config.pp.crop
  if batch % n_dev:
    raise ValueError(f"batch {batch} is not divisible by the {n_dev} devices")
  step, _, init, state_shardings = jitted_step(
    config, model, mesh, mode=mode, num_classes=num_classes
  )
  state = jax.jit(init, out_shardings=state_shardings)()
  batch_arrays = _synthetic_batch(mesh, batch, size, num_classes)
  result: dict[str, Any] = dict(
    num_params=int(sum(x.size for x in jax.tree.leaves(state["params"])))
  )
  args = (state, batch_arrays) if mode == "train" else (state["params"], batch_arrays["image"])

  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  result["compile_s"] = time.perf_counter() - start

  if mode == "train":
    carry = {"state": state}
    del state, args  # donated: only the carry may hold the state

    def call():
      carry["state"], carry["metrics"] = compiled(carry["state"], batch_arrays)
      return carry["state"], carry["metrics"]
  else:
    call = lambda: compiled(*args)

  jax.block_until_ready(call())  # the first execution allocates buffers: not timed
  # "disallow": any host<->device transfer inside the timed steps would be an error.
  with jax.transfer_guard("disallow"):
    times = time_calls(call, warmup=max(warmup - 1, 0), steps=steps)
  if mode == "train":  # a benchmark of a diverging step would be meaningless
    loss = float(jax.device_get(carry["metrics"]["loss"]))
    if not math.isfinite(loss):
      raise FloatingPointError(f"the training step produced loss {loss}")

  flops = xla_flops(compiled)
  median = float(statistics.median(times))
  result.update(
    step_time_s=median,
    step_times_s=times,
    images_per_sec=batch / median,
    # The SPMD program is one device's share: scale to the whole batch.
    flops_per_image_xla=flops * n_dev / batch if flops else None,
    compiled_memory=compiled_memory(compiled),
    peak_memory_bytes=device_peak_memory(),
  )
  return result


def initial_params(config: ml_collections.ConfigDict, model: models_vit.VisionTransformer) -> Any:
  """The parameters our benchmark starts from (same seed, same init), as a host tree."""
  tx, _ = optim.make_optimizer(config)
  init = functools.partial(
    steps.init_state, model=model, tx=tx, image_size=config.pp.crop, seed=config.seed
  )
  return sharding.to_host(jax.jit(lambda: init()["params"])())


# ---------------------------------------------------------------------------------------------
# The run's context and its record.


def reserve_stdout() -> TextIO:
  """Sends fd 1 to stderr and returns the real stdout, kept for one JSON line alone: libraries
  print to fd 1 from C++ too."""
  sys.stdout.flush()
  stdout = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  return stdout


def json_safe(value: Any) -> Any:
  """Non-finite floats become null (json.dumps would write NaN, which is not JSON)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(stdout: TextIO, result: dict[str, Any]) -> None:
  stdout.write(json.dumps(json_safe(result)) + "\n")
  stdout.flush()


def load_average() -> Optional[float]:
  """1-minute load average: above the core count, other processes took part of the CPU."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def host_cpu() -> str:
  """The CPU model name (Linux), for the record of where a number was measured."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform_lib.processor() or platform_lib.machine()


def measure_ours(
  config: ml_collections.ConfigDict,
  model: models_vit.VisionTransformer,
  *,
  mode: str,
  num_classes: int,
  warmup: int,
  steps: int,
  peak_size: Optional[int] = None,
) -> dict[str, Any]:
  """Benchmarks `model` at config.batch x config.pp.crop; returns one flat dict with the MFU."""
  dtype = config.model.dtype
  devices = jax.devices()
  out: dict[str, Any] = dict(
    model_name=config.model_name,
    mode=mode,
    batch=config.batch,
    image_size=config.pp.crop,
    dtype=dtype,
    num_classes=num_classes,
    remat=bool(model.remat),
    remat_policy=model.remat_policy if model.remat else None,
    recompute_gelu=bool(model.recompute_gelu),
    attention=model.attention_impl or "xla",
    optimizer=config.optimizer,
    cotangent_boundaries=bool(model.cotangent_boundaries),
    platform=devices[0].platform,
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    host_cpu=host_cpu(),
    cpu_count=os.cpu_count(),
    jax_version=jax.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    warmup=warmup,
    steps=steps,
    load_average_start=load_average(),
  )
  logging.info(
    "benchmarking %s %s, batch %d at %d px, %s, on %d %s device(s)",
    config.model_name,
    mode,
    config.batch,
    config.pp.crop,
    dtype,
    len(devices),
    devices[0].platform,
  )
  out.update(
    time_step(config, model, mode=mode, num_classes=num_classes, warmup=warmup, steps=steps)
  )

  analytic = analytic_flops(model, config.pp.crop)
  out["flops_per_image_analytic"] = analytic["train" if mode == "train" else "forward"]
  out["flops_analytic_forward_parts"] = {
    k: v for k, v in analytic.items() if k not in ("forward", "train")
  }
  xla = out["flops_per_image_xla"]
  out["flops_xla_over_analytic"] = xla / out["flops_per_image_analytic"] if xla else None
  # MFU counts the model's FLOPs (the analytic count). XLA's cost analysis is the cross-check: on
  # the CPU it is 1-4 % higher (elementwise work), but it also counts rematerialised recomputation
  # and, on GPU, leaves out the matmuls XLA hands to cuBLAS/cuDNN as custom calls.
  out["flops_per_image"], out["flops_source"] = out["flops_per_image_analytic"], "analytic"

  out.update(measure_peak_flops(sharding.make_mesh(), dtype, size=peak_size))
  out["achieved_flops"] = out["flops_per_image"] * out["images_per_sec"]
  out["mfu"] = out["achieved_flops"] / out["peak_flops"]
  out["mfu_xla"] = xla * out["images_per_sec"] / out["peak_flops"] if xla else None
  out["load_average_end"] = load_average()
  return out


def add_timm(ours: dict[str, Any], timm_result: dict[str, Any]) -> dict[str, Any]:
  """`ours` with the timm measurement, its MFU (same FLOPs and peak) and ours/timm."""
  out = dict(ours, **timm_result)
  if "timm_images_per_sec" in timm_result:
    out["timm_mfu"] = out["flops_per_image"] * out["timm_images_per_sec"] / out["peak_flops"]
    out["ratio_vs_timm"] = out["images_per_sec"] / out["timm_images_per_sec"]
  return out
