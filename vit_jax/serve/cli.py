r"""The recognizer: a web page and a JSON API that classify photos with one loaded model.

  python -m vit_jax.serve --checkpoint workdirs/demo/finetune [--host 127.0.0.1] [--port 8000] \
      [--top_k 5] [--max_batch 32] [--max_upload_mb 10] [--backend jax|torch|onnx] \
      [--precision fp32|int8] [--threads N]

--backend onnx serves a folder's model.int8.onnx when it has one (--precision chooses); onnx and
torch run --threads intra-op threads (default: the cores this process may use) and one inter-op.

The model loads once (a bad checkpoint: one `error:` line, exit 2), then the server listens and
compiles every batch size it will use; GET /healthz answers 503 until that is done, then 200.

  GET  /             the page: pick or drop a photo, see the top-k classes as bars
  GET  /healthz      {"status": "ok", "model_name", "forward_passes"} (503 while warming up)
  GET  /api/info     {"model_name", "backend", "precision", "image_size", "class_names", "top_k"}
  POST /api/predict  multipart, field `file` (one or more): {"predictions": [[{"label",
                     "probability"}, ...], ...]} in upload order

A bad upload (not an image, truncated, empty, enormous declared dimensions, over
--max_upload_mb) gets a 4xx {"error": "..."} naming the file and the problem; nothing in a
request names a path on the server. Concurrent requests are batched (vit_jax/serve/batching.py).
"""

import argparse
import os
import sys
import threading
from typing import Optional, Sequence


def _positive(kind: type):
  def parse(value: str):
    if kind(value) <= 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return kind(value)

  return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
  from vit_jax.serve import app as serve_app  # pylint: disable=g-import-not-at-top
  from vit_jax.serve import backends  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="python -m vit_jax.serve", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="jax: .npz, training workdir or orbax step; torch: timm export folder; onnx: .onnx file",
  )
  parser.add_argument("--backend", default="jax", choices=backends.BACKENDS)
  parser.add_argument(
    "--precision",
    default=None,
    choices=backends.PRECISIONS,
    help="onnx: int8 if the folder has model.int8.onnx, else fp32 (the default)",
  )
  parser.add_argument(
    "--threads",
    type=_positive(int),
    default=None,
    help="onnx and torch intra-op threads (default: the cores this process may use)",
  )
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--top_k", type=_positive(int), default=5, help="classes per photo")
  parser.add_argument(
    "--max_batch", type=_positive(int), default=32, help="most images in one forward pass"
  )
  parser.add_argument(
    "--max_upload_mb", type=_positive(float), default=10.0, help="largest accepted file"
  )
  parser.add_argument("--examples", default=None, help="folder of sample photos for the page")
  args = parser.parse_args(argv)
  if args.examples and not os.path.isdir(args.examples):
    print(f"error: --examples={args.examples}: no such folder", file=sys.stderr)
    return 2
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    backend = backends.load_backend(args.backend, args.checkpoint, args.precision, args.threads)
  except backends.BackendError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import uvicorn  # pylint: disable=g-import-not-at-top

  app = serve_app.create_app(
    backend,
    backend_name=args.backend,
    top_k=args.top_k,
    max_batch=args.max_batch,
    max_upload_mb=args.max_upload_mb,
    warm=False,
    examples=args.examples,
  )

  def warm_and_announce() -> None:
    app.state.warm_up()
    print(
      f"ready: http://{args.host}:{args.port}/ ({backend.model_name}, {args.backend} "
      f"{backend.precision}, {len(backend.class_names)} classes)",
      flush=True,
    )

  threading.Thread(target=warm_and_announce, name="warm-up", daemon=True).start()
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  return 0
