r"""Markdown tables from the JSON lines of `python -m benchmarks speed --json`.

  python -m benchmarks table benchmarks/results/cpu-*.jsonl \
      [--update docs/benchmarks.md --section cpu]

Prints the table; with --update it replaces the text between the markers
`<!-- benchmark-table:SECTION:start -->` and `<!-- benchmark-table:SECTION:end -->` in that file.
Rows from different machines are refused: their ratios must never be mixed in one table.
"""

import argparse
import json
import re
import sys
from typing import Any, Optional


def _num(x: Any, digits: int = 2) -> str:
  return "–" if x is None else f"{x:,.{digits}f}"


def _pct(x: Any) -> str:
  return "–" if x is None else f"{100 * x:.1f} %"


def _name(r: dict[str, Any]) -> str:
  return r["model_name"].replace("_", "/", 1)  # ViT-B_16 -> ViT-B/16


def _machine(r: dict[str, Any]) -> tuple:
  return (r["host_cpu"], r["cpu_count"], r["platform"], r["device_kind"], r["num_devices"])


def machine_line(rows: list[dict[str, Any]]) -> str:
  """The hardware and versions the rows were measured with."""
  r = rows[0]
  versions = f"jax {r['jax_version']}"
  if r.get("torch_version"):
    versions += f", torch {r['torch_version']}, timm {r['timm_version']}"
  if r["platform"] == "cpu":
    where = (
      f"{r['host_cpu']}, {r['cpu_count']} cores ({r['num_devices']} JAX CPU device; "
      f"torch threads: {r.get('timm_threads', '–')})"
    )
  else:
    where = f"{r['num_devices']} x {r['device_kind']} (host: {r['host_cpu']})"
  flags = f"; XLA_FLAGS=`{r['xla_flags']}`" if r.get("xla_flags") else ""
  return f"Measured on: {where}; {versions}{flags}."


def table(rows: list[dict[str, Any]]) -> str:
  """One row per run: ours, timm, the ratio, MFU of both, compile time, FLOPs, the peak."""
  head = (
    "| model | batch | px | dtype | mode | ours img/s | timm img/s (how) | ours / timm | "
    "MFU ours | MFU timm | peak GFLOP/s | GFLOP/img analytic (XLA) | compile s | "
    "peak memory | load avg |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    # MFU from the model's (analytic) FLOPs, whatever the JSON's version computed.
    mfu = lambda ips, r=r: (
      None if ips is None else (r["flops_per_image_analytic"] * ips / r["peak_flops"])
    )
    timm = r.get("timm_images_per_sec")
    how = r.get("timm_execution", "")
    if r.get("timm_error"):
      timm_cell = "failed"
    elif timm is None:
      timm_cell = "–"
    else:
      timm_cell = f"{timm:,.2f} ({how})"
    ratio = r.get("ratio_vs_timm")
    mem = r.get("peak_memory_bytes") or (r.get("compiled_memory") or {}).get("total")
    mem_cell = (
      "–"
      if not mem
      else f"{mem / 2**30:.2f} GiB" + ("" if r.get("peak_memory_bytes") else " (XLA plan)")
    )
    lines.append(
      f"| {_name(r)} | {r['batch']} | {r['image_size']} | {r['dtype']} | {r['mode']} | "
      f"{r['images_per_sec']:,.2f} | {timm_cell} | "
      f"{'–' if ratio is None else f'**{ratio:.2f}**'} | "
      f"{_pct(mfu(r['images_per_sec']))} | {_pct(mfu(timm))} | {r['peak_flops'] / 1e9:,.0f} | "
      f"{_num(r['flops_per_image_analytic'] / 1e9)} "
      f"({_num((r.get('flops_per_image_xla') or 0) / 1e9 or None)}) | {r['compile_s']:.1f} | "
      f"{mem_cell} | "
      f"{_num(r.get('load_average_start'), 1)}–{_num(r.get('load_average_end'), 1)} |"
    )
  return "\n".join(lines)


def render(rows: list[dict[str, Any]]) -> str:
  """The machine line and the table; exits if the rows come from more than one machine."""
  if not rows:
    return "(no results)"
  machines = {_machine(r) for r in rows}
  if len(machines) > 1:
    sys.exit(
      f"rows from {len(machines)} different machines {sorted(machines)}: one table, one machine"
    )
  # Smaller models first, then batch, training before inference.
  rows = sorted(
    rows,
    key=lambda r: (r["num_params"], r["model_name"], r["dtype"], r["batch"], r["mode"] != "train"),
  )
  return machine_line(rows) + "\n\n" + table(rows)


def update(path: str, section: str, text: str) -> None:
  """Replaces the text between the section's markers in the markdown file `path`."""
  start, end = (f"<!-- benchmark-table:{section}:{k} -->" for k in ("start", "end"))
  with open(path) as f:
    doc = f.read()
  pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
  if not pattern.search(doc):
    sys.exit(f"{path}: no {start} ... {end} markers")
  doc = pattern.sub(lambda _: f"{start}\n{text}\n{end}", doc)
  with open(path, "w") as f:
    f.write(doc)


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks table", description=__doc__.splitlines()[0]
  )
  parser.add_argument("jsonl", nargs="+", help="JSON-lines files of `benchmarks speed --json`")
  parser.add_argument("--update", default=None, help="a markdown file with the section markers")
  parser.add_argument("--section", default="cpu")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  rows = []
  for path in args.jsonl:
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
    if any("images_per_sec" not in r or "platform" not in r for r in rows):
      sys.exit(f"{path}: not the JSON lines of `python -m benchmarks speed --json`")
  text = render(rows)
  print(text)
  if args.update:
    update(args.update, args.section, text)
