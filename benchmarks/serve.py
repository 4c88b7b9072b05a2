r"""Latency and throughput of the recognizer server (vit_jax.serve) at 1 and N concurrent clients,
every CPU option side by side, with timm's own inference beside them, in one run.

  python -m benchmarks serve --model_name ViT-B_16 --image_size 224 --num_classes 1000 \
      --backends jax,torch,onnx,onnx-int8 --timm eager,compile [--write_doc]
  python -m benchmarks serve --checkpoint workdirs/demo/finetune --backends jax,onnx-int8

Each backend's server starts as a subprocess on a free port (as a user would); its load time is
from the start of the process until /healthz answers 200 (model load and warm-up). Then each
client thread posts one JPEG per request (a synthetic photo at the model's input size, so decoding
and resizing are counted) and waits for the answer. Reported per client count: the p50 / p95
request latency and images/s (requests / wall time). onnx-int8 is the onnx backend on
model.int8.onnx (onnxruntime dynamic quantization).

The timm rows run in this process, without HTTP: the same timm model the torch backend serves,
timm's own eval transforms on the same JPEG, eager or `torch.compile`d; N clients are a batch of N
per forward pass (what the server runs for N waiting requests), and the latency is that pass's.
Their load time is the model's creation (and, compiled, the first passes).

Without --checkpoint the model is the preset --model_name with random weights (latency does not
depend on the weights; onnx-int8 is then quantized without the accuracy gate, which needs real
weights and data); torch and onnx get it through scripts/convert_to_pytorch.py. Rows go to
benchmarks/results/serve.jsonl (replaced by each run); --write_doc renders them into
docs/serving.md.
"""

import argparse
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_checkpoint(model_name: str, image_size: int, num_classes: int, out_dir: str) -> str:
  """params.npz (+ .json) of the preset with random weights; returns its path."""
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import checkpoint, models  # pylint: disable=g-import-not-at-top

  model = models.get_model(model_name, num_classes)
  params = jax.jit(
    lambda: model.init(
      jax.random.key(0), np.zeros((1, image_size, image_size, 3), np.float32), train=False
    )["params"]
  )()
  path = os.path.join(out_dir, "params.npz")
  checkpoint.save_npz(
    params,
    path,
    metadata=models.model_metadata(
      model, image_size=image_size, class_names=[f"class_{i}" for i in range(num_classes)]
    ),
  )
  return path


BACKENDS = ("jax", "torch", "onnx", "onnx-int8")
TIMM_MODES = ("eager", "compile")
RESULTS = os.path.join(REPO, "benchmarks", "results", "serve.jsonl")
DOC = os.path.join(REPO, "docs", "serving.md")


def export(path: str, backend: str, out_dir: str, gated: bool) -> str:
  """The checkpoint the backend reads: the .npz itself, or its timm / ONNX export (made once).
  onnx-int8 with `gated` goes through convert_to_pytorch.py --int8 (its test-split check)."""
  if backend == "jax":
    return path
  fmt = "timm" if backend == "torch" else "onnx"
  out = os.path.join(out_dir, fmt)
  int8 = backend == "onnx-int8"
  if not os.path.isdir(out) or (int8 and gated):
    command = [sys.executable, os.path.join(REPO, "scripts", "convert_to_pytorch.py")]
    command += ["--checkpoint", path, "--format", fmt, "--output", out]
    subprocess.run(command + (["--int8"] if int8 and gated else []), check=True)
  if int8 and not gated:
    from vit_jax.convert import onnx_int8  # pylint: disable=g-import-not-at-top

    onnx_int8.quantize(os.path.join(out, "model.onnx"), os.path.join(out, "model.int8.onnx"))
  return out


def photo(size: int) -> bytes:
  """A JPEG at the model's input size: a gradient with noise, like a photo to the codec."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
  pixels = np.stack([x, y, 1 - x], axis=-1) * 200 + rng.normal(0, 20, (size, size, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(
  checkpoint: str, backend: str, max_batch: int
) -> tuple[subprocess.Popen, str, float]:
  """(process, URL, seconds from the start until /healthz answered 200)."""
  import requests  # pylint: disable=g-import-not-at-top

  port = _free_port()
  kind, precision = ("onnx", "int8") if backend == "onnx-int8" else (backend, None)
  start = time.perf_counter()
  proc = subprocess.Popen(
    [sys.executable, "-m", "vit_jax.serve", "--checkpoint", checkpoint, "--backend", kind]
    + ["--port", str(port), "--max_batch", str(max_batch)]
    + (["--precision", precision] if precision else []),
    cwd=REPO,
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  url = f"http://127.0.0.1:{port}"
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
    try:
      if requests.get(url + "/healthz", timeout=5).status_code == 200:
        return proc, url, time.perf_counter() - start
    except requests.ConnectionError:
      pass
    time.sleep(0.2)


def measure(url: str, data: bytes, clients: int, requests_total: int) -> dict[str, Any]:
  """p50/p95 latency (ms) and images/s with `clients` threads posting one image each time."""
  import requests  # pylint: disable=g-import-not-at-top

  sessions = [requests.Session() for _ in range(clients)]

  def post(i: int) -> float:
    start = time.perf_counter()
    r = sessions[i % clients].post(
      url + "/api/predict", files={"file": ("photo.jpg", data)}, timeout=300
    )
    r.raise_for_status()
    return time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(post, range(2 * clients)))  # warm connections and caches
    start = time.perf_counter()
    latencies = list(pool.map(post, range(requests_total)))
    wall = time.perf_counter() - start
  return dict(clients=clients, requests=requests_total, **_summary(latencies, requests_total, wall))


def _summary(latencies: Sequence[float], images: int, wall: float) -> dict[str, float]:
  ms = np.asarray(latencies) * 1000
  return dict(
    p50_ms=round(float(np.percentile(ms, 50)), 1),
    p95_ms=round(float(np.percentile(ms, 95)), 1),
    images_per_s=round(images / wall, 2),
  )


def timm_rows(
  timm_dir: str, data: bytes, clients: Sequence[int], requests_total: int, mode: str
) -> list[dict[str, Any]]:
  """timm's own inference of the torch backend's model, in this process (see the docstring)."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  from vit_jax.serve import backends  # pylint: disable=g-import-not-at-top

  threads = backends.default_threads()
  torch.set_num_threads(threads)
  start = time.perf_counter()
  model = convert.load_timm(timm_dir).eval()
  transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
  # dynamic=False: one static graph per batch size, as the JAX server compiles per bucket.
  forward = torch.compile(model, dynamic=False) if mode == "compile" else model

  def batch(n: int) -> Any:
    return torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for _ in range(n)])

  with torch.inference_mode():
    for n in clients * 3:  # compiles (or warms) each batch size before any timing
      forward(batch(n))
    load = time.perf_counter() - start
    rows = []
    for n in clients:
      latencies, t0 = [], time.perf_counter()
      for _ in range(max(1, requests_total // n)):
        t = time.perf_counter()
        forward(batch(n))
        latencies.append(time.perf_counter() - t)
      wall = time.perf_counter() - t0
      row = dict(clients=n, requests=len(latencies) * n, threads=threads, load_s=round(load, 1))
      rows.append(dict(row, **_summary(latencies, len(latencies) * n, wall)))
  return rows


def render(rows: list[dict[str, Any]]) -> str:
  """The markdown table of one run, with its hardware line."""
  r0 = rows[0]
  lines = [
    f"CPU: {r0['host_cpu']}, {r0['cores']} cores; load average {r0['load_average']} before the "
    "run; "
    f"{r0['model']} at {r0['image_size']} px, {r0['weights']} weights, server --max_batch "
    f"{r0['max_batch']}, {r0['requests']} timed requests per row.",
    "",
    "| backend | precision | clients | p50 latency | p95 latency | images/s | load time |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['backend']} | {r['precision']} | {r['clients']} | {r['p50_ms']:,.0f} ms | "
      f"{r['p95_ms']:,.0f} ms | {r['images_per_s']:.2f} | {r['load_s']:.1f} s |"
    )
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks serve", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--checkpoint", help="a served checkpoint (else random weights)")
  parser.add_argument("--model_name", default="R+ViT-tiny_8")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=3)
  parser.add_argument("--backends", default="jax", help=f"comma-separated: {','.join(BACKENDS)}")
  parser.add_argument("--timm", default="", help=f"comma-separated timm rows: {TIMM_MODES}")
  parser.add_argument("--clients", default="1,8", help="comma-separated client counts")
  parser.add_argument("--requests", type=int, default=64, help="timed requests per client count")
  parser.add_argument("--max_batch", type=int, default=8, help="the server's --max_batch")
  parser.add_argument("--write_doc", action="store_true", help="render the table into the doc")
  args = parser.parse_args(argv)
  backends_wanted = [b for b in args.backends.split(",") if b]
  timm_modes = [m for m in args.timm.split(",") if m]
  if bad := [b for b in backends_wanted if b not in BACKENDS] + [
    m for m in timm_modes if m not in TIMM_MODES
  ]:
    parser.error(f"unknown backend or timm mode {bad}: backends {BACKENDS}, timm {TIMM_MODES}")
  clients = [int(c) for c in args.clients.split(",")]
  from benchmarks import harness  # pylint: disable=g-import-not-at-top

  common = dict(
    weights="checkpoint" if args.checkpoint else "random",
    max_batch=args.max_batch,
    host_cpu=harness.host_cpu(),
    cores=len(os.sched_getaffinity(0)),
    load_average=harness.load_average(),
  )
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    path = args.checkpoint or random_checkpoint(
      args.model_name, args.image_size, args.num_classes, tmp
    )
    info = None
    for backend in backends_wanted:
      served = export(path, backend, tmp, gated=bool(args.checkpoint))
      proc, url, load = start_server(served, backend, args.max_batch)
      try:
        import requests  # pylint: disable=g-import-not-at-top

        info = requests.get(url + "/api/info", timeout=10).json()
        data = photo(info["image_size"])
        for n in clients:
          row = dict(
            model=info["model_name"],
            image_size=info["image_size"],
            backend=backend,
            precision=info["precision"],
            threads=info["threads"],
            load_s=round(load, 1),
            **common,
            **measure(url, data, n, args.requests),
          )
          rows.append(row)
          print(json.dumps(row), flush=True)
      finally:
        proc.terminate()
        proc.wait(timeout=30)
    for mode in timm_modes:
      timm_dir = export(path, "torch", tmp, gated=False)
      size = info["image_size"] if info else args.image_size
      name = info["model_name"] if info else args.model_name
      for r in timm_rows(timm_dir, photo(size), clients, args.requests, mode):
        row = dict(model=name, image_size=size, backend=f"timm {mode} (in-process)")
        row = dict(row, precision="fp32", **common, **r)
        rows.append(row)
        print(json.dumps(row), flush=True)
  if rows:
    with open(RESULTS, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    print(render(rows))
    if args.write_doc:
      from benchmarks import table  # pylint: disable=g-import-not-at-top

      table.update(DOC, "serve", render(rows))


if __name__ == "__main__":
  main()
