"""`python -m benchmarks tpu`: the slice-sizing table of docs/tpu.md, from `vit_jax.preflight`.

Each row compiles the shoes recipe (configs/shoes.py: batch 512, SGD momentum, accum_steps 4 at
224 px and 8 at 384 px) for one model and slice with the real TPU compiler, on this machine, and
appends its report to benchmarks/results/tpu.jsonl; rows already there are kept (--force redoes
them). The table is rendered from that file into docs/tpu.md. Memory comes from the compiled
program; the step time is the compiler's estimate, never a measurement.

  python -m benchmarks tpu                                   # every row (hours on 2 cores)
  python -m benchmarks tpu --models ViT-B_16:224 --slices v5p-8 --fsdp off
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Optional

RESULTS = pathlib.Path(__file__).parent / "results" / "tpu.jsonl"
DOC = pathlib.Path(__file__).parent.parent / "docs" / "tpu.md"
MODELS = ("ViT-B_16:224", "ViT-B_16:384", "ViT-L_16:384", "ViT-H_14:224")
# The single-host slices of each generation, then one pod slice each (4 hosts).
SLICES = ("v4-8", "v5litepod-8", "v6e-8", "v5p-8", "v4-32", "v5litepod-16", "v6e-16", "v5p-32")


def _key(r: dict[str, Any]) -> tuple:
  return (r["model"], r["image_size"], r["slice"], r["fsdp"])


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    name = platform.processor() or platform.machine()
  return f"{name}, {os.cpu_count()} cores"


def run_row(model: str, crop: int, slice_name: str, fsdp: bool, num_classes: int) -> dict:
  """One row: the preflight's report (and its suggestion when it does not fit)."""
  import jax  # pylint: disable=g-import-not-at-top

  from configs import shoes  # pylint: disable=g-import-not-at-top
  from vit_jax import preflight, tpu_slices  # pylint: disable=g-import-not-at-top

  config = shoes.get_config(str(crop))
  with config.unlocked():
    config.model_name, config.fsdp = model, fsdp
  devices = tpu_slices.topology_devices(slice_name)
  t = time.time()
  report = preflight.analyse(config, slice_name, num_classes, devices)
  if not report["fits"]:
    report["suggestion"] = preflight.suggest(config, report, devices)
  flags = f"--config.model_name={model}" + (" --config.fsdp=True" if fsdp else "")
  return dict(
    report,
    slice=slice_name,
    command=f"python -m vit_jax.preflight --config=configs/shoes.py:{crop} "
    f"--topology={slice_name} {flags}",
    seconds=time.time() - t,
    host_cpu=_cpu(),
    jax_version=jax.__version__,
    libtpu=_libtpu_version(),
  )


def _libtpu_version() -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  from vit_jax import tpu_slices  # pylint: disable=g-import-not-at-top

  path = tpu_slices.libtpu_path()
  roots = [os.path.dirname(os.path.dirname(path))] if path else None
  for dist in metadata.distributions(path=roots) if roots else metadata.distributions():
    if dist.metadata["Name"] == "libtpu":
      return dist.version
  return "unknown"


def _gib(n: Optional[int]) -> str:
  return "–" if n is None else f"{n / 2**30:.1f}"


def _collectives(r: dict[str, Any]) -> str:
  if r.get("out_of_memory"):
    return "(not compiled: out of memory)"
  return ", ".join(
    f"{c['kind']} x{c['count']} ({c['bytes'] / 2**20:,.0f} MiB)" for c in r["collectives"]
  )


def render(rows: list[dict[str, Any]]) -> str:
  """The markdown table (GiB per chip), one row per model, slice and FSDP setting."""
  order = {s: i for i, s in enumerate(SLICES)}
  rows = sorted(
    rows, key=lambda r: (r["model"], r["image_size"], order.get(r["slice"], 99), r["fsdp"])
  )
  lines = [
    "| model | px | slice | chips (hosts) | FSDP | params + opt | train temp | total / HBM | fits "
    "| suggestion | collectives (train step) | estimate, img/s/chip |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    fix = r.get("suggestion")
    fix = f"`{' '.join(f'--config.{k}={v}' for k, v in fix['overrides'].items())}`" if fix else ""
    est = r["estimated_images_per_sec_per_chip"]
    lines.append(
      f"| {r['model']} | {r['image_size']} | {r['slice']} ({r['topology']}) | {r['chips']} "
      f"({r['processes']}) | {'yes' if r['fsdp'] else 'no'} "
      f"| {_gib(r['params_bytes'] + r['optimizer_bytes'])} | {_gib(r['temp_bytes'])} "
      f"| {_gib(r['total_bytes'])} / {_gib(r['hbm_bytes_per_chip'])} "
      f"| {'yes' if r['fits'] else '**no**'} | {fix or ('–' if r['fits'] else 'none')} "
      f"| {_collectives(r)} | {f'{est:,.0f} (estimate)' if est else 'no estimate'} |"
    )
  r = rows[0]
  lines += [
    "",
    f"Compiled on: {r['host_cpu']}; jax {r['jax_version']}, libtpu {r['libtpu']}; "
    f"shoes recipe, batch {r['batch']}, {r['num_classes']} classes, {r['dtype']}.",
  ]
  return "\n".join(lines)


def attention_ab(topology: str, tokens: int, batch: int = 64, heads: int = 12) -> list[dict]:
  """XLA's attention and the einsum form against the Pallas TPU flash-attention kernel, forward
  and backward, on one chip of `topology` at ViT-B's head shapes: the compiler's estimates (no
  TPU runs them)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top

  from vit_jax import tpu_slices  # pylint: disable=g-import-not-at-top

  head_dim = 64
  device = tpu_slices.topology_devices(topology)[0]

  def flash(q, k, v, multiple=128):  # the kernel's blocks: tokens padded, padding its own segment
    t = q.shape[1]
    n = -(-t // multiple) * multiple
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    ids = jnp.broadcast_to((jnp.arange(n) >= t).astype(jnp.int32), (q.shape[0], n))
    out = fa.flash_attention(
      pad(q), pad(k), pad(v), segment_ids=fa.SegmentIds(ids, ids), sm_scale=head_dim**-0.5
    )
    return out.transpose(0, 2, 1, 3)[:, :t]

  x = jax.ShapeDtypeStruct(
    (batch, tokens, heads, head_dim),
    jnp.bfloat16,
    sharding=jax.sharding.SingleDeviceSharding(device),
  )
  rows = []

  def einsum(q, k, v):  # models_vit's attention_impl="einsum"
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
    return jnp.einsum(
      "bhqk,bkhd->bqhd", jax.nn.softmax(logits.astype(jnp.float32)).astype(v.dtype), v
    )

  kernels = (("xla", jax.nn.dot_product_attention), ("einsum", einsum), ("pallas_flash", flash))
  for name, attend in kernels:
    loss = lambda q, k, v, attend=attend: attend(q, k, v).astype(jnp.float32).sum()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    est = compiled.cost_analysis().get("optimal_seconds", -1.0)
    rows.append(
      dict(
        topology=topology,
        tokens=tokens,
        kernel=name,
        estimated_ms=est * 1e3 if est > 0 else None,
        temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
      )
    )
  return rows


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks tpu", description=__doc__)
  parser.add_argument("--models", nargs="+", default=list(MODELS), help="MODEL:PX")
  parser.add_argument("--slices", nargs="+", default=list(SLICES))
  parser.add_argument("--fsdp", choices=("off", "on", "both"), default="both")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--force", action="store_true", help="recompile rows already recorded")
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--update", default=str(DOC), help="markdown file to render into ('' off)")
  parser.add_argument(
    "--attention",
    action="store_true",
    help="only the attention A/B (XLA, einsum, Pallas flash) at 197 and 577 tokens on v5p",
  )
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.attention:
    print("| tokens | kernel | estimate, ms (fwd+bwd, batch 64, 12 heads) | temporaries, MiB |")
    print("|---|---|---|---|")
    for tokens in (197, 577):
      for r in attention_ab("v5p:2x2x1", tokens):
        est = f"{r['estimated_ms']:.2f}" if r["estimated_ms"] else "no estimate"
        print(f"| {tokens} | {r['kernel']} | {est} | {r['temp_bytes'] / 2**20:,.0f} |")
    return
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  done = {_key(r) for r in rows}
  for spec in args.models:
    model, _, px = spec.partition(":")
    for slice_name in args.slices:
      for fsdp in {"off": [False], "on": [True], "both": [False, True]}[args.fsdp]:
        key = (model, int(px or 224), slice_name, fsdp)
        if key in done and not args.force:
          continue
        row = run_row(model, key[1], slice_name, fsdp, args.num_classes)
        rows = [r for r in rows if _key(r) != key] + [row]
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(
          f"{spec} {slice_name} fsdp={fsdp}: {_gib(row['total_bytes'])} GiB/chip, "
          f"fits={row['fits']}, {row['seconds']:.0f} s",
          flush=True,
        )
  if args.update and rows:
    from benchmarks import table  # pylint: disable=g-import-not-at-top

    table.update(args.update, "tpu", render(rows))
  print(render(rows) if rows else "no rows")


if __name__ == "__main__":
  main()
