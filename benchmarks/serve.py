r"""Latency and throughput of the recognizer server (vit_jax.serve) at 1 and N concurrent clients.

  python -m benchmarks.serve --model_name R+ViT-tiny_8 --image_size 32 [--backend jax|torch|onnx]
  python -m benchmarks.serve --checkpoint workdirs/demo/finetune --clients 1,8 --requests 64

It starts the server as a subprocess on a free port (as a user would), waits for /healthz 200,
then each client thread posts one JPEG per request (a synthetic photo at the model's input size,
so decoding and resizing are counted) and waits for the answer. Reported per client count: the
p50 / p95 request latency and images/s (requests / wall time). Without --checkpoint the model is
the preset --model_name with random weights (latency does not depend on the weights); torch and
onnx backends get it through scripts/convert_to_pytorch.py's conversion (vit_jax.convert).
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


def export(path: str, backend: str, out_dir: str) -> str:
  """The checkpoint the backend reads: the .npz itself, or its timm / ONNX export."""
  if backend == "jax":
    return path
  out = os.path.join(out_dir, backend)
  fmt = "timm" if backend == "torch" else "onnx"
  subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts", "convert_to_pytorch.py"),
      "--checkpoint",
      path,
      "--format",
      fmt,
      "--output",
      out,
    ],
    check=True,
    capture_output=True,
  )
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


def start_server(checkpoint: str, backend: str, max_batch: int) -> tuple[subprocess.Popen, str]:
  import requests  # pylint: disable=g-import-not-at-top

  port = _free_port()
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "vit_jax.serve",
      "--checkpoint",
      checkpoint,
      "--backend",
      backend,
      "--port",
      str(port),
      "--max_batch",
      str(max_batch),
    ],
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
        return proc, url
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
  ms = np.asarray(latencies) * 1000
  return dict(
    clients=clients,
    requests=requests_total,
    p50_ms=round(float(np.percentile(ms, 50)), 1),
    p95_ms=round(float(np.percentile(ms, 95)), 1),
    images_per_s=round(requests_total / wall, 1),
  )


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--checkpoint", help="a served checkpoint (else random weights)")
  parser.add_argument("--model_name", default="R+ViT-tiny_8")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=3)
  parser.add_argument("--backend", default="jax", choices=("jax", "torch", "onnx"))
  parser.add_argument("--clients", default="1,8", help="comma-separated client counts")
  parser.add_argument("--requests", type=int, default=64, help="timed requests per client count")
  parser.add_argument("--max_batch", type=int, default=8, help="the server's --max_batch")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    path = args.checkpoint or random_checkpoint(
      args.model_name, args.image_size, args.num_classes, tmp
    )
    proc, url = start_server(export(path, args.backend, tmp), args.backend, args.max_batch)
    try:
      import requests  # pylint: disable=g-import-not-at-top

      info = requests.get(url + "/api/info", timeout=10).json()
      data = photo(info["image_size"])
      for clients in (int(c) for c in args.clients.split(",")):
        row = dict(
          model=info["model_name"],
          image_size=info["image_size"],
          backend=args.backend,
          weights="checkpoint" if args.checkpoint else "random",
          max_batch=args.max_batch,
          **measure(url, data, clients, args.requests),
        )
        print(json.dumps(row), flush=True)
    finally:
      proc.terminate()
      proc.wait(timeout=30)


if __name__ == "__main__":
  main()
