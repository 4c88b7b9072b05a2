"""Speed of training and inference: images/s, compile time, memory and MFU, with timm beside it.

What is timed is what training runs: `train.make_train_step` (forward, backward, the optax update
of `optim.make_optimizer`), jitted over the data-parallel mesh of `sharding` with the state donated,
as `train.train_and_evaluate` jits it. The batch is synthetic and already on the devices, so the
step is measured and not the input pipeline (`scripts/benchmark_input.py` measures that). Each call
is followed by `block_until_ready`; the reported step time is the median of the timed calls after
warm-up, and compilation is timed on its own (`lower(...).compile()`).

MFU (model FLOPs utilisation) = FLOPs per image x images/s / peak FLOP/s, where the peak is a large
matmul timed on the same devices, in the same dtype and the same process (a measured, reachable
peak, not a datasheet number). FLOPs per image are the model's (`analytic_flops`), cross-checked
against XLA's cost analysis of the compiled step (`flops_xla_over_analytic`, `mfu_xla`).

timm: the same architecture (`convert.timm_model_args`) with the same initial weights
(`convert.timm_state_dict`, loaded strictly), the same batch, SGD with momentum and gradient
clipping, in the settings a PyTorch user would pick: channels-last, `torch.compile` when it works
and is faster, bf16 autocast for `dtype='bfloat16'`, TF32 matmuls for float32 on CUDA (what XLA
uses by default on GPU). `scripts/benchmark.py` runs it in a child process just before ours: the
two frameworks never hold the accelerator's memory or the CPU's threads at the same time, and
torch is imported before TensorFlow there (the other order crashes: environment.md §4).
"""

import contextlib
import functools
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import convert, models, models_vit, optim, sharding, train

MODES = ("train", "inference")
DTYPES = ("float32", "bfloat16")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


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
  except Exception as e:  # some backends do not implement it
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
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  return dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
              aliased=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes), total=int(total))


def _median(times: list[float]) -> float:
  return float(statistics.median(times))


def measure_peak_flops(mesh: jax.sharding.Mesh, dtype: str, *, size: Optional[int] = None,
                       reps: int = 4, warmup: int = 1, steps: int = 5) -> dict[str, Any]:
  """FLOP/s of a chain of `reps` square matmuls of side `size` on every device of `mesh`.

  Each device multiplies its own (size, size) matrices; the chain (y <- y @ w, w scaled by
  1/sqrt(size) so values stay finite in bf16) keeps XLA from hoisting or merging the products.
  """
  platform = jax.devices()[0].platform
  size = size or (8192 if platform in _GPU_PLATFORMS + ("tpu",) else 2048)
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
  flops = 2.0 * size ** 3 * reps * n
  # The fastest call, not the median: a peak is what the devices can reach, and other load on a
  # shared machine only slows calls down (a median caught in a slow spell gave MFUs above 100 %).
  return dict(peak_flops=flops / min(times), peak_matmul_size=size, peak_matmul_dtype=dtype,
              peak_matmul_reps=reps, peak_times_s=times)


# ---------------------------------------------------------------------------------------------
# Our model.

def resolve_attention(attention: str, dtype: str, platform: Optional[str] = None
                      ) -> Optional[str]:
  """'auto' -> cuDNN fused attention on NVIDIA GPUs in bf16 (it needs fp16/bf16), else XLA's.

  `platform`: where the step runs (default: the first device's platform).
  """
  if attention == "auto":
    platform = platform or jax.devices()[0].platform
    return "cudnn" if platform in _GPU_PLATFORMS and dtype == "bfloat16" else None
  return None if attention == "xla" else attention


def _synthetic_batch(mesh: jax.sharding.Mesh, batch: int, image_size: int,
                     num_classes: int) -> dict[str, jax.Array]:
  """Images in [-1, 1] and labels, generated on the devices with the batch sharding."""
  @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
  def make():
    ki, kl = jax.random.split(jax.random.key(1))
    return dict(
        image=jax.random.uniform(ki, (batch, image_size, image_size, 3), jnp.float32, -1.0, 1.0),
        label=jax.random.randint(kl, (batch,), 0, num_classes, jnp.int32))
  return make()


def jitted_step(config: ml_collections.ConfigDict, model: models_vit.VisionTransformer,
                mesh: jax.sharding.Mesh, *, mode: str, num_classes: int
                ) -> tuple[Any, tuple[Any, ...], Callable[[], Any], Any]:
  """The jitted step that `mode` measures, its arguments as sharded `jax.ShapeDtypeStruct`s, the
  training state's init function and its shardings. Nothing is allocated: a mesh of devices that
  are not here (a deviceless compile, `vit_jax.hlo_traffic`) works too.

  train: as train.train_and_evaluate jits it, state sharded and donated, metrics left on the
  devices; args (state, batch). inference: the forward pass; args (params, images).
  """
  batch, size = config.batch, config.pp.crop
  tx, lr_fn = optim.make_optimizer(config)
  init = functools.partial(train._init_state, model=model, tx=tx, image_size=size,  # pylint: disable=protected-access
                           seed=config.seed)
  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.fsdp)
  batch_sharding = sharding.batch_sharding(mesh)
  spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  images = spec(jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32), batch_sharding)
  if mode == "train":
    step = jax.jit(train.make_train_step(model, tx, lr_fn, config, num_classes),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    labels = spec(jax.ShapeDtypeStruct((batch,), jnp.int32), batch_sharding)
    args = (jax.tree.map(spec, abstract, shardings), dict(image=images, label=labels))
    return step, args, init, shardings
  forward = lambda params, images: model.apply({"params": params}, images, train=False)
  step = jax.jit(forward, in_shardings=(shardings["params"], batch_sharding),
                 out_shardings=batch_sharding)
  params = jax.tree.map(spec, abstract["params"], shardings["params"])
  return step, (params, images), init, shardings


def benchmark_ours(config: ml_collections.ConfigDict, model: models_vit.VisionTransformer, *,
                   mode: str, num_classes: int, warmup: int, steps: int) -> dict[str, Any]:
  """Times our training step (mode 'train') or forward pass (mode 'inference').

  `config.batch` is the global batch, `config.pp.crop` the resolution.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  mesh = sharding.make_mesh()
  n_dev, batch, size = mesh.size, config.batch, config.pp.crop
  if batch % n_dev:
    raise ValueError(f"batch {batch} is not divisible by the {n_dev} devices")
  step, _, init, state_shardings = jitted_step(config, model, mesh, mode=mode,
                                               num_classes=num_classes)
  state = jax.jit(init, out_shardings=state_shardings)()
  batch_arrays = _synthetic_batch(mesh, batch, size, num_classes)
  result: dict[str, Any] = dict(
      num_params=int(sum(x.size for x in jax.tree.leaves(state["params"]))))
  args = (state, batch_arrays) if mode == "train" else (state["params"], batch_arrays["image"])

  start = time.perf_counter()
  lowered = step.lower(*args)
  compiled = lowered.compile()
  result["compile_s"] = time.perf_counter() - start

  if mode == "train":
    carry = {"state": state}
    del state

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
  median = _median(times)
  result.update(
      step_time_s=median, step_times_s=times, images_per_sec=batch / median,
      # The SPMD program is one device's share: scale to the whole batch.
      flops_per_image_xla=flops * n_dev / batch if flops else None,
      compiled_memory=compiled_memory(compiled), peak_memory_bytes=device_peak_memory())
  return result


# ---------------------------------------------------------------------------------------------
# timm.

def _torch_sync(torch: Any, device: Any) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def benchmark_timm(model: models_vit.VisionTransformer, params: Any,
                   config: ml_collections.ConfigDict, *, mode: str, dtype: str,
                   num_classes: int, warmup: int, steps: int, compile_mode: str = "auto",
                   threads: Optional[int] = None) -> dict[str, Any]:
  """Times the same model in timm (PyTorch): training step or inference forward.

  `params` are our initial parameters (host tree); timm loads them strictly, which also proves
  that the architecture is the same. compile_mode: 'on' (torch.compile), 'off' (eager) or 'auto'
  (both timed, the faster reported; a torch.compile failure falls back to eager).
  """
  convert._check_import_order()  # pylint: disable=protected-access
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as timm_vit  # pylint: disable=g-import-not-at-top

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  threads = threads or os.cpu_count()
  if device.type == "cpu":
    torch.set_num_threads(threads)
  else:
    # XLA's default float32 matmul precision on GPU is TF32; give torch the same.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  size, batch = config.pp.crop, config.batch
  meta = models.model_metadata(model, image_size=size)
  flat = {k: np.array(v, np.float32)  # a writable copy: torch.from_numpy shares memory
          for k, v in flax.traverse_util.flatten_dict(dict(params), sep="/").items()}
  net = timm_vit.VisionTransformer(
      **convert.timm_model_args(meta), pos_drop_rate=model.dropout_rate,
      proj_drop_rate=model.dropout_rate, attn_drop_rate=model.attention_dropout_rate,
      drop_path_rate=model.stochastic_depth)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in
                       convert.timm_state_dict(flat, meta).items()}, strict=True)
  net = net.to(device, memory_format=torch.channels_last)
  gen = torch.Generator().manual_seed(0)
  images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(
      device, memory_format=torch.channels_last)
  labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
              else contextlib.nullcontext())

  if mode == "train":
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=config.base_lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)

    def step_with(fwd):
      def step():
        with autocast:
          loss = F.cross_entropy(fwd(images).float(), labels,
                                 label_smoothing=config.label_smoothing)
        loss.backward()
        if config.grad_norm_clip:
          torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_norm_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _torch_sync(torch, device)
        return loss
      return step
  else:
    net.eval()

    def step_with(fwd):
      def step():
        with torch.inference_mode(), autocast:
          out = fwd(images)
        _torch_sync(torch, device)
        return out
      return step

  def run(fwd) -> dict[str, Any]:
    if device.type == "cuda":
      torch.cuda.reset_peak_memory_stats(device)
    step = step_with(fwd)
    start = time.perf_counter()
    step()  # compiles under torch.compile
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
      step()
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    return dict(first_call_s=first, step_times_s=times, step_time_s=_median(times),
                peak_memory_bytes=(int(torch.cuda.max_memory_allocated(device))
                                   if device.type == "cuda" else None))

  runs: dict[str, dict[str, Any]] = {}
  compile_error = None
  if compile_mode in ("auto", "on"):
    try:
      runs["compiled"] = run(torch.compile(net))
    except Exception as e:  # pylint: disable=broad-except
      compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      logging.warning("torch.compile failed (%s); timm runs eagerly", compile_error)
      torch._dynamo.reset()  # pylint: disable=protected-access
  if compile_mode == "off" or compile_mode == "auto" or not runs:
    runs["eager"] = run(net)
  best = min(runs, key=lambda k: runs[k]["step_time_s"])
  chosen = runs[best]
  return dict(
      timm_images_per_sec=batch / chosen["step_time_s"], timm_step_time_s=chosen["step_time_s"],
      timm_step_times_s=chosen["step_times_s"], timm_first_call_s=chosen["first_call_s"],
      timm_execution=best, timm_compile_error=compile_error,
      timm_images_per_sec_by_execution={k: batch / v["step_time_s"] for k, v in runs.items()},
      timm_peak_memory_bytes=chosen["peak_memory_bytes"], timm_device=str(device),
      timm_threads=torch.get_num_threads() if device.type == "cpu" else None,
      timm_autocast_bf16=dtype == "bfloat16", timm_channels_last=True,
      torch_version=torch.__version__, timm_version=_timm_version())


def _timm_version() -> str:
  import timm  # pylint: disable=g-import-not-at-top
  return timm.__version__


# ---------------------------------------------------------------------------------------------
# Everything together.

def _load_average() -> Optional[float]:
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
  return platform.processor() or platform.machine()


def initial_params(config: ml_collections.ConfigDict, model: models_vit.VisionTransformer) -> Any:
  """The parameters our benchmark starts from (same seed, same init), as a host tree."""
  tx, _ = optim.make_optimizer(config)
  init = functools.partial(train._init_state, model=model, tx=tx,  # pylint: disable=protected-access
                           image_size=config.pp.crop, seed=config.seed)
  return train.to_host(jax.jit(lambda: init()["params"])())


def run_ours(config: ml_collections.ConfigDict, model: models_vit.VisionTransformer, *,
             mode: str, num_classes: int, warmup: int, steps: int,
             peak_size: Optional[int] = None) -> dict[str, Any]:
  """Benchmarks `model` at config.batch x config.pp.crop; returns one flat dict with the MFU."""
  dtype = config.model.dtype
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  devices = jax.devices()
  out: dict[str, Any] = dict(
      model_name=config.model_name, mode=mode, batch=config.batch, image_size=config.pp.crop,
      dtype=dtype, num_classes=num_classes, remat=bool(model.remat),
      remat_policy=model.remat_policy if model.remat else None,
      recompute_gelu=bool(model.recompute_gelu),
      attention=model.attention_impl or "xla", optimizer=config.optimizer,
      cotangent_boundaries=models_vit.cotangent_boundaries_enabled(model.cotangent_boundaries),
      platform=devices[0].platform, device_kind=devices[0].device_kind,
      num_devices=len(devices), host_cpu=host_cpu(), cpu_count=os.cpu_count(),
      jax_version=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""), warmup=warmup, steps=steps,
      load_average_start=_load_average())
  logging.info("benchmarking %s %s, batch %d at %d px, %s, on %d %s device(s)", config.model_name,
               mode, config.batch, config.pp.crop, dtype, len(devices), devices[0].platform)
  out.update(benchmark_ours(config, model, mode=mode, num_classes=num_classes, warmup=warmup,
                            steps=steps))

  analytic = analytic_flops(model, config.pp.crop)
  out["flops_per_image_analytic"] = analytic["train" if mode == "train" else "forward"]
  out["flops_analytic_forward_parts"] = {k: v for k, v in analytic.items()
                                         if k not in ("forward", "train")}
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
  out["load_average_end"] = _load_average()
  return out


def add_timm(ours: dict[str, Any], timm_result: dict[str, Any]) -> dict[str, Any]:
  """`ours` with the timm measurement, its MFU (same FLOPs and peak) and ours/timm."""
  out = dict(ours, **timm_result)
  if "timm_images_per_sec" in timm_result:
    out["timm_mfu"] = out["flops_per_image"] * out["timm_images_per_sec"] / out["peak_flops"]
    out["ratio_vs_timm"] = out["images_per_sec"] / out["timm_images_per_sec"]
  return out
