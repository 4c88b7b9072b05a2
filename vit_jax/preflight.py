"""Compiles the real training and evaluation steps for a Cloud TPU slice, here, without a TPU.

    python -m vit_jax.preflight --config=configs/shoes.py --topology=v5e:2x4 [--json]
        [--num_classes=N] [--config.FIELD=VALUE ...]

libtpu (requirements-tpu.txt) describes a slice (`jax.experimental.topologies`) and runs the
real TPU compiler over a mesh of its devices. The steps come from `program.build_program`, the
code `train.py` runs, with the config's model, optimizer, accumulation and FSDP shardings; only
shapes are compiled, so neither the data nor the pretrained file is needed. Reported per chip:
parameters and optimizer state, temporaries, the total against the chip's memory, the
collectives, and the compiler's step-time estimate. When the run does not fit, the levers a user
would pull (accum_steps, model.remat, fsdp) are tried and the first that fits is printed.

Exit status: 0 fits, 1 does not fit, 2 an `error:` line (topology, config value, libtpu).
"""

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Iterator, Optional

from vit_jax import tpu_slices
from vit_jax.tpu_slices import CHIP_SOURCE, CHIPS, GIB

DEFAULT_NUM_CLASSES = 1000
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class PreflightError(ValueError):
  """A config value the preflight cannot compile; the message says which and what to do."""


def _shard_bytes(abstract: Any, shardings: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
  return int(sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in leaves))


_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_BITS = {"pred": 8, "bf16": 16}


def _shape_bytes(shape: str, largest: bool) -> int:
  sizes = []
  for dtype, dims in _SHAPE.findall(shape):
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n * bits // 8)
  return max(sizes, default=0) if largest else sum(sizes)


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Collectives of a compiled module: kind, count and bytes moved (their results' sizes)."""
  found: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      shape, kind, start = m.groups()
      # An async start returns (operands, results, ...): its largest buffer is the data.
      found.setdefault(kind, []).append(_shape_bytes(shape, largest=bool(start)))
  return [dict(kind=k, count=len(v), bytes=sum(v)) for k, v in sorted(found.items())]


@dataclasses.dataclass
class Step:
  """One compiled step's memory plan (per chip) and the compiler's view of it."""

  seconds_to_compile: float
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  flops: Optional[float]
  estimate_s: Optional[float]  # cost_analysis()["optimal_seconds"] when positive
  collectives: list
  # The TPU compiler refuses a program whose buffers exceed HBM: its message, and the
  # temporaries it says were needed (the only memory figure such a compile gives).
  out_of_memory: Optional[str] = None

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries


_UNITS = dict(K=2**10, M=2**20, G=2**30, T=2**40)
_NEEDED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")


def _arg_bytes(args: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  leaves = jax.tree.leaves(args)
  return _shard_bytes(leaves, [a.sharding for a in leaves])


def compile_step(fn: Any, *args: Any) -> Step:
  """Compiles jitted `fn` for `args` (ShapeDtypeStructs with shardings) and reads its plan."""
  import jax  # pylint: disable=g-import-not-at-top

  t = time.time()
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    msg = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    m = _NEEDED.search(msg)
    need = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0
    return Step(time.time() - t, _arg_bytes(args), 0, 0, need, None, None, [], msg)
  seconds = time.time() - t
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  est = cost.get("optimal_seconds")
  return Step(
    seconds_to_compile=seconds,
    arguments=int(m.argument_size_in_bytes),
    outputs=int(m.output_size_in_bytes),
    aliased=int(m.alias_size_in_bytes),
    temporaries=int(m.temp_size_in_bytes),
    flops=float(cost["flops"]) if cost.get("flops") else None,
    estimate_s=float(est) if est is not None and est > 0 else None,
    collectives=collectives(compiled.as_text()),
  )


def analyse(config: Any, topology: str, num_classes: int, devices: Optional[list] = None) -> dict:
  """Compiles `config`'s train and eval steps for `topology`; the report as a dict."""
  import jax  # pylint: disable=g-import-not-at-top

  with tpu_slices.quiet_stderr():  # TensorFlow (under the input pipeline) logs at import
    from vit_jax import config_checks, program, sharding  # pylint: disable=g-import-not-at-top

  devices = devices if devices is not None else tpu_slices.topology_devices(topology)
  try:
    config_checks.validate_config(config, num_devices=len(devices), needs_data=False)
  except config_checks.ConfigError as e:
    raise PreflightError(str(e)) from None
  if config.parallelism != "jit":
    raise PreflightError(
      f"config.parallelism={config.parallelism!r}: the preflight compiles the 'jit' path (the "
      "one that spans TPU hosts); rerun with --config.parallelism=jit"
    )
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  if chip is None:
    raise PreflightError(f"--topology={topology!r}: no memory figure for {kind!r}")
  mesh = sharding.make_mesh(devices)
  prog = program.build_program(config, num_classes, mesh, platform="tpu")
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), prog.abstract, prog.shardings
  )
  batch_sharding = sharding.batch_sharding(mesh)
  train_batch, eval_batch = (
    {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in b.items()}
    for b in program.batch_shapes(config)
  )
  train_step = compile_step(prog.train_step, state, train_batch)
  eval_step = compile_step(prog.eval_step, state["params"], eval_batch)
  params = _shard_bytes(prog.abstract["params"], prog.shardings["params"])
  opt = _shard_bytes(prog.abstract["opt_state"], prog.shardings["opt_state"])
  state_bytes = _shard_bytes(prog.abstract, prog.shardings)
  # During evaluation the training state stays resident beside the eval step's batch and buffers.
  eval_total = (
    state_bytes + eval_step.arguments - params + eval_step.outputs + eval_step.temporaries
  )
  total = max(train_step.peak, eval_total)
  chips = len(devices)
  # The compiler costs a loop's body once: with accumulation, the step is accum_steps of them
  # (this counts the optimizer update accum_steps times too: a slight overestimate).
  est = train_step.estimate_s and train_step.estimate_s * config.accum_steps
  flops = train_step.flops and train_step.flops * config.accum_steps
  model = prog.model
  return dict(
    topology=tpu_slices.topology_name(topology),
    accelerator_type=topology if topology != tpu_slices.topology_name(topology) else None,
    device_kind=kind,
    chips=chips,
    processes=len({d.process_index for d in devices}),
    hbm_bytes_per_chip=chip["hbm"],
    hbm_source=CHIP_SOURCE,
    num_classes=num_classes,
    model=config.model_name,
    dtype=jax.numpy.dtype(model.dtype).name,
    image_size=config.pp.crop,
    batch=config.batch,
    accum_steps=config.accum_steps,
    fsdp=bool(config.fsdp),
    remat=getattr(model, "remat_policy", None) if getattr(model, "remat", False) else None,
    # Per chip (bytes):
    params_bytes=params,
    optimizer_bytes=opt,
    argument_bytes=train_step.arguments,  # the train step's inputs: state and batch shard
    temp_bytes=train_step.temporaries,
    train_total_bytes=train_step.peak,
    eval_temp_bytes=eval_step.temporaries,
    eval_total_bytes=eval_total,
    total_bytes=total,
    fits=total <= chip["hbm"] and not (train_step.out_of_memory or eval_step.out_of_memory),
    out_of_memory=train_step.out_of_memory or eval_step.out_of_memory,
    compile_seconds=train_step.seconds_to_compile + eval_step.seconds_to_compile,
    compile_seconds_train=train_step.seconds_to_compile,
    compile_seconds_eval=eval_step.seconds_to_compile,
    collectives=train_step.collectives,
    eval_collectives=eval_step.collectives,
    # The compiler's own step-time estimate (cost_analysis "optimal_seconds"), when positive.
    estimated_step_seconds=est,
    estimated_images_per_sec_per_chip=config.batch / est / chips if est else None,
    estimated_mfu=flops / est / chip["peak_flops"] if est and flops else None,
    suggestion=None,
  )


def _accum_steps(config: Any, report: dict, num_devices: int) -> list[int]:
  """accum_steps to try, doubled from the config's: from the smallest the compiled temporaries
  predict could fit (they scale with the micro-batch), then each double."""
  per_device = config.batch // num_devices
  room = report["hbm_bytes_per_chip"] - report["argument_bytes"]
  need = config.accum_steps * report["temp_bytes"] / room if room > 0 else float("inf")
  ks, k = [], config.accum_steps * 2
  while per_device % k == 0:
    ks.append(k)
    k *= 2
  first = next((i for i, k in enumerate(ks) if k >= need), len(ks) - 1)
  return ks[max(first, 0) :]


def _levers(config: Any, report: dict, num_devices: int) -> Iterator[dict[str, Any]]:
  """Config overrides a user would try for the train step, cheapest in step time first."""
  from vit_jax import models, models_vit  # pylint: disable=g-import-not-at-top

  for k in _accum_steps(config, report, num_devices):
    yield {"accum_steps": k}
  vit = config.model_name not in models.BIT_CONFIGS
  if vit and not config.model.get("remat"):
    for policy in reversed(models_vit.REMAT_POLICIES):  # most memory kept first: fastest
      yield {"model.remat": True, "model.remat_policy": policy}
  if not config.fsdp:
    yield {"fsdp": True}
    if vit and not config.model.get("remat"):
      yield {"fsdp": True, "model.remat": True, "model.remat_policy": "nothing_saveable"}


def suggest(config: Any, report: dict, devices: list) -> Optional[dict]:
  """The first overrides whose compiled run fits (`report` is `config`'s, which does not):
  images in bfloat16 when the model computes in it (free: it casts them first thing), a smaller
  `batch_eval` when evaluation does not fit, then the train step's levers."""
  from configs import common  # pylint: disable=g-import-not-at-top

  hbm, chips = report["hbm_bytes_per_chip"], len(devices)
  again = lambda overrides: analyse(
    common.with_overrides(config, overrides), report["topology"], report["num_classes"], devices
  )
  base: dict[str, Any] = {}
  if report["dtype"] == "bfloat16" and not config.pp.bfloat16:
    base = {"pp.bfloat16": True}
    report = again(base)
    if report["fits"]:
      return dict(overrides=base, total_bytes=report["total_bytes"])
  if report["eval_total_bytes"] > hbm:
    n = config.batch_eval
    while report["eval_total_bytes"] > hbm:
      n //= 2
      if n < chips or n % chips:
        return None
      base = {**base, "batch_eval": n}
      report = again(base)
    if report["fits"]:
      return dict(overrides=base, total_bytes=report["total_bytes"])
  for lever in _levers(config, report, chips):
    overrides = {**base, **lever}
    r = again(overrides)
    if r["fits"]:
      return dict(overrides=overrides, total_bytes=r["total_bytes"])
  return None


def _bytes(n: int) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def format_report(r: dict) -> str:
  """The report as the terminal shows it."""
  remat = f"remat {r['remat']}" if r["remat"] else "no remat"
  lines = [
    (f"{r['accelerator_type']} = " if r.get("accelerator_type") else "")
    + f"{r['topology']}: {r['chips']} chips ({r['device_kind']}), {r['processes']} "
    f"process{'es' if r['processes'] > 1 else ''}",
    f"{r['model']} {r['dtype']} at {r['image_size']} px, {r['num_classes']} classes"
    f" ({r.get('num_classes_source', 'given')}), batch {r['batch']}, accum_steps {r['accum_steps']}, "
    f"{'fsdp' if r['fsdp'] else 'replicated state'}, {remat}",
    "per chip:",
    f"  parameters            {_bytes(r['params_bytes'])}",
    f"  optimizer state       {_bytes(r['optimizer_bytes'])}",
    f"  train arguments       {_bytes(r['argument_bytes'])} (state and batch shard)",
    f"  train temporaries     {_bytes(r['temp_bytes'])}",
    f"  train step total      {_bytes(r['train_total_bytes'])}",
    f"  eval step total       {_bytes(r['eval_total_bytes'])} (training state resident)",
    f"  chip memory           {_bytes(r['hbm_bytes_per_chip'])} ({r['hbm_source']})",
    f"  fits                  {'yes' if r['fits'] else 'NO'}",
    *([f"  the TPU compiler: {r['out_of_memory']}"] if r["out_of_memory"] else []),
    f"compile: train {r['compile_seconds_train']:.1f} s, eval {r['compile_seconds_eval']:.1f} s",
    "collectives in the train step: "
    + (
      ", ".join(f"{x['kind']} x{x['count']} ({_bytes(x['bytes'])})" for x in r["collectives"])
      or "none"
    ),
  ]
  if r["estimated_step_seconds"]:
    lines.append(
      f"compiler estimate: {r['estimated_step_seconds'] * 1e3:.3g} ms/step, "
      f"{r['estimated_images_per_sec_per_chip']:,.0f} img/s per chip"
      + (f", MFU {r['estimated_mfu']:.1%}" if r["estimated_mfu"] else "")
      + " (an estimate, not a measurement)"
    )
  else:
    lines.append("compiler estimate: no estimate")
  return "\n".join(lines)


def _flags(overrides: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  num_classes, source = FLAGS.num_classes, "--num_classes"
  if num_classes is None:
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top

    try:
      num_classes, source = input_pipeline.get_dataset_info(config).num_classes, "the dataset"
    except Exception:  # pylint: disable=broad-except  (any unreadable dataset: use the default)
      num_classes = DEFAULT_NUM_CLASSES
      source = "default: the dataset is not readable here; set --num_classes"
  try:
    devices = tpu_slices.topology_devices(FLAGS.topology)
    report = analyse(config, FLAGS.topology, num_classes, devices)
    report["num_classes_source"] = source
    fix = None if report["fits"] else suggest(config, report, devices)
  except (PreflightError, ValueError) as e:
    _fail(str(e))
  if fix:
    report["suggestion"] = dict(fix, flags=_flags(fix["overrides"]))
  if FLAGS.json:
    print(json.dumps(report, indent=2))
  else:
    print(format_report(report))
    if not report["fits"]:
      print(
        f"fits with: {_flags(fix['overrides'])} ({_bytes(fix['total_bytes'])} per chip)"
        if fix
        else "no single lever (accum_steps, model.remat, fsdp) makes it fit"
      )
  sys.exit(0 if report["fits"] else 1)


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag or config value as one `error:` line (exit 2)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # An unknown config field arrives as ml_collections' repr-escaped KeyError text.
    reason = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):
      reason = f"no such config field: {reason}"
    _fail(reason if isinstance(e, flags.Error) else f"bad --config flag: {reason}")
    raise


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    "config", None, "Training config (as for vit_jax.main).", lock_config=True
  )
  flags.DEFINE_string("topology", None, "TPU slice as libtpu names it: v5e:2x4, v4:2x2x1, ...")
  flags.DEFINE_integer("num_classes", None, "Class count when the dataset is not readable here.")
  flags.DEFINE_bool("json", False, "Print the report as JSON.")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  # Compiling needs no local accelerator: jax's own backend stays the CPU (no probing for a TPU).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the dataset's reader, when it reads one
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main, flags_parser=_parse_flags)
