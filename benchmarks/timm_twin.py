"""The timm half of `python -m benchmarks speed --compare timm`, run in a process of its own.

  python -m benchmarks.timm_twin SPEED_FLAGS...   (benchmarks.speed starts it; stdout: one JSON)

timm: the same architecture (`timm_export.timm_model_args`) with the same initial weights
(`timm_export.timm_state_dict`, loaded strictly), the same batch, SGD with momentum and gradient
clipping, in the settings a PyTorch user would pick: channels-last, `torch.compile` when it works
and is faster, bf16 autocast for `--dtype bfloat16`, TF32 matmuls for float32 on CUDA (what XLA
uses by default on GPU). A process of its own, started before ours measures, so that the two
frameworks never hold the accelerator's memory or the CPU's threads at the same time.
"""

# torch and timm before anything imports TensorFlow (vit_jax.train does): importing triton, which
# torch.compile loads, after TensorFlow crashes the process.
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Optional

import flax
import ml_collections
import numpy as np
import timm  # pylint: disable=g-bad-import-order
import torch  # pylint: disable=g-bad-import-order
import torch.nn.functional as F
from absl import logging
from timm.models import vision_transformer as timm_vit

from benchmarks import harness, speed
from vit_jax import convert, models, models_vit
from vit_jax.convert import timm_export


def measure_timm(
  model: models_vit.VisionTransformer,
  params: Any,
  config: ml_collections.ConfigDict,
  *,
  mode: str,
  num_classes: int,
  warmup: int,
  steps: int,
  compile_mode: str = "auto",
  threads: Optional[int] = None,
) -> dict[str, Any]:
  """Times the same model in timm (PyTorch): training step or inference forward.

  `params` are our initial parameters (host tree); timm loads them strictly, which also proves
  that the architecture is the same. compile_mode: 'on' (torch.compile), 'off' (eager) or 'auto'
  (both timed, the faster reported; a torch.compile failure falls back to eager).
  """
  convert.check_import_order()
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  threads = threads or os.cpu_count()
  if device.type == "cpu":
    torch.set_num_threads(threads)
  else:
    # XLA's default float32 matmul precision on GPU is TF32; give torch the same.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  size, batch, dtype = config.pp.crop, config.batch, config.model.dtype
  meta = models.model_metadata(model, image_size=size)
  flat = {
    k: np.array(v, np.float32)  # a writable copy: torch.from_numpy shares memory
    for k, v in flax.traverse_util.flatten_dict(dict(params), sep="/").items()
  }
  net = timm_vit.VisionTransformer(
    **timm_export.timm_model_args(meta),
    pos_drop_rate=model.dropout_rate,
    proj_drop_rate=model.dropout_rate,
    attn_drop_rate=model.attention_dropout_rate,
    drop_path_rate=model.stochastic_depth,
  )
  net.load_state_dict(
    {k: torch.from_numpy(v) for k, v in timm_export.timm_state_dict(flat, meta).items()},
    strict=True,
  )
  net = net.to(device, memory_format=torch.channels_last)
  gen = torch.Generator().manual_seed(0)
  images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(
    device, memory_format=torch.channels_last
  )
  labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
  autocast = (
    torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == "bfloat16"
    else contextlib.nullcontext()
  )
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

  if mode == "train":
    net.train()
    opt = torch.optim.SGD(
      net.parameters(),
      lr=config.base_lr,
      momentum=config.momentum,
      weight_decay=config.weight_decay,
    )

    def step_with(fwd):
      def step():
        with autocast:
          loss = F.cross_entropy(
            fwd(images).float(), labels, label_smoothing=config.label_smoothing
          )
        loss.backward()
        if config.grad_norm_clip:
          torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_norm_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss

      return step
  else:
    net.eval()

    def step_with(fwd):
      def step():
        with torch.inference_mode(), autocast:
          out = fwd(images)
        sync()
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
    return dict(
      first_call_s=first,
      step_times_s=times,
      step_time_s=float(statistics.median(times)),
      peak_memory_bytes=(
        int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
      ),
    )

  runs: dict[str, dict[str, Any]] = {}
  compile_error = None
  if compile_mode in ("auto", "on"):
    try:
      runs["compiled"] = run(torch.compile(net))
    except Exception as e:  # pylint: disable=broad-except
      compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      logging.warning("torch.compile failed (%s); timm runs eagerly", compile_error)
      torch._dynamo.reset()  # pylint: disable=protected-access
  if compile_mode in ("off", "auto") or not runs:
    runs["eager"] = run(net)
  best = min(runs, key=lambda k: runs[k]["step_time_s"])
  chosen = runs[best]
  return dict(
    timm_images_per_sec=batch / chosen["step_time_s"],
    timm_step_time_s=chosen["step_time_s"],
    timm_step_times_s=chosen["step_times_s"],
    timm_first_call_s=chosen["first_call_s"],
    timm_execution=best,
    timm_compile_error=compile_error,
    timm_images_per_sec_by_execution={k: batch / v["step_time_s"] for k, v in runs.items()},
    timm_peak_memory_bytes=chosen["peak_memory_bytes"],
    timm_device=str(device),
    timm_threads=torch.get_num_threads() if device.type == "cpu" else None,
    timm_autocast_bf16=dtype == "bfloat16",
    timm_channels_last=True,
    torch_version=torch.__version__,
    timm_version=timm.__version__,
  )


def main(argv: Optional[list[str]] = None) -> None:
  args = speed.parse_args(sys.argv[1:] if argv is None else list(argv))
  stdout = harness.reserve_stdout()
  logging.set_verbosity(logging.INFO)
  config = harness.make_config(args)
  model = harness.get_model(config, args.num_classes)
  result = measure_timm(
    model,
    harness.initial_params(config, model),
    config,
    mode=args.mode,
    num_classes=args.num_classes,
    warmup=args.warmup,
    steps=args.steps,
    compile_mode=args.timm_compile,
  )
  harness.write_json(stdout, result)


if __name__ == "__main__":
  main()
