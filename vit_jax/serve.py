r"""The recognizer: a web page and a JSON API that classify photos with one loaded model.

  python -m vit_jax.serve --checkpoint workdirs/demo/finetune [--host 127.0.0.1] [--port 8000] \
      [--top_k 5] [--max_batch 32] [--max_upload_mb 10] [--backend jax|torch|onnx]

The model loads once (a bad checkpoint: one `error:` line, exit 2), then the server listens and
compiles every batch size it will use; GET /healthz answers 503 until that is done, then 200.

  GET  /             the page: pick or drop a photo, see the top-k classes as bars
  GET  /healthz      {"status": "ok", "model_name", "forward_passes"} (503 while warming up)
  GET  /api/info     {"model_name", "backend", "image_size", "class_names", "top_k"}
  POST /api/predict  multipart, field `file` (one or more): {"predictions": [[{"label",
                     "probability"}, ...], ...]} in upload order

A bad upload (not an image, truncated, empty, enormous declared dimensions, over
--max_upload_mb) gets a 4xx {"error": "..."} naming the file and the problem; nothing in a
request names a path on the server. Concurrent requests are batched (serve_batching).
"""

import argparse
import os
import sys
import threading
from typing import Any, Optional, Sequence

import numpy as np

MAX_FILES_PER_REQUEST = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def create_app(
  backend: Any,
  *,
  backend_name: str = "jax",
  top_k: int = 5,
  max_batch: int = 32,
  max_upload_mb: float = 10.0,
  warm: bool = True,
  examples: Optional[str] = None,
) -> Any:
  """The FastAPI app serving `backend` (serve_backends.Backend). `warm=False` leaves warming
  to `app.state.warm_up()` (the CLI runs it in a thread while /healthz answers 503). `examples`:
  a folder whose images the page offers as sample photos (listed once, at start)."""
  # Imported here so that `--help` and argument errors answer without loading the web stack.
  import fastapi  # pylint: disable=g-import-not-at-top
  from fastapi import responses  # pylint: disable=g-import-not-at-top
  from starlette import concurrency  # pylint: disable=g-import-not-at-top

  from vit_jax import (  # pylint: disable=g-import-not-at-top
    predict,
    serve_batching,
    serve_page,
    serve_uploads,  # pylint: disable=g-import-not-at-top
  )

  app = fastapi.FastAPI(title="ViT recognizer", docs_url=None, redoc_url=None)
  batcher = serve_batching.Batcher(backend, max_batch=max_batch)
  ready = threading.Event()
  limit = int(max_upload_mb * 1024 * 1024)
  k = max(1, min(top_k, len(backend.class_names)))
  size = backend.image_size

  def warm_up() -> None:
    batcher.warm_up((size, size, 3))
    if hasattr(backend, "attention_map"):  # compiles the attention capture before /healthz
      backend.attention_map(np.zeros((size, size, 3), np.float32))
    ready.set()

  app.state.warm_up, app.state.batcher = warm_up, batcher
  if warm:
    warm_up()

  def error(status: int, message: str) -> Any:
    return responses.JSONResponse({"error": message}, status_code=status)

  @app.exception_handler(Exception)
  async def unexpected(request, exc):  # pylint: disable=unused-argument
    return error(500, f"internal error: {type(exc).__name__}")

  @app.get("/", response_class=responses.HTMLResponse)
  async def page():
    return serve_page.PAGE

  @app.get("/healthz")
  async def healthz():
    if not ready.is_set():
      return responses.JSONResponse({"status": "warming up"}, status_code=503)
    return {"status": "ok", "model_name": backend.model_name, "forward_passes": batcher.batches_run}

  @app.get("/api/info")
  async def info():
    return {
      "model_name": backend.model_name,
      "backend": backend_name,
      "image_size": size,
      "class_names": backend.class_names,
      "top_k": k,
      "attention": getattr(backend, "attention_kind", None),
      "examples": sorted(example_files),
    }

  # Sample photos by file name only: a request picks one of these names, never a path.
  example_files = {}
  if examples:
    for name in sorted(os.listdir(examples)):
      if name.lower().endswith(IMAGE_SUFFIXES):
        example_files[name] = os.path.join(examples, name)

  @app.get("/examples/{name}")
  async def example(name: str):
    if name not in example_files:
      return error(404, f"no sample photo {name!r}")
    return responses.FileResponse(example_files[name])

  def prepare(name: str, data: bytes) -> np.ndarray:
    return predict.preprocess(serve_uploads.decode(name, data), size)

  @app.post("/api/predict")
  async def predict_endpoint(request: fastapi.Request):
    if not ready.is_set():
      return error(503, "the model is still warming up; retry when /healthz answers 200")
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit * MAX_FILES_PER_REQUEST:
      return error(413, f"request of {declared} bytes is too large")
    if "multipart/form-data" not in request.headers.get("content-type", ""):
      return error(415, "send multipart/form-data with the photo(s) in the field 'file'")
    try:
      form = await request.form(max_files=MAX_FILES_PER_REQUEST)
    except Exception as e:  # pylint: disable=broad-except  # malformed multipart, too many parts
      return error(400, f"malformed multipart body: {getattr(e, 'detail', e)}")
    files = [f for f in form.getlist("file") if hasattr(f, "read")]
    if not files:
      return error(400, "no file: send the photo(s) in the multipart field 'file'")
    images = []
    for number, upload in enumerate(files, 1):
      name = f"file {number} ({os.path.basename(upload.filename or 'unnamed')})"
      data = await upload.read(limit + 1)
      if len(data) > limit:
        return error(413, f"{name}: larger than the limit of {max_upload_mb:g} MB")
      try:
        images.append(await concurrency.run_in_threadpool(prepare, name, data))
      except serve_uploads.UploadError as e:
        return error(400, str(e))
    probs = await batcher.predict(np.stack(images))
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return {
      "predictions": [
        [{"label": backend.class_names[i], "probability": float(p[i])} for i in row]
        for p, row in zip(probs, best)
      ]
    }

  @app.post("/api/attention", response_class=responses.Response)
  async def attention_endpoint(file: fastapi.UploadFile):
    """One photo -> a PNG of the model's input with its attention rollout overlaid."""
    if not ready.is_set():
      return error(503, "the model is still warming up; retry when /healthz answers 200")
    if not hasattr(backend, "attention_map"):
      return error(
        404,
        f"the {backend_name} backend has no attention maps; serve the Flax "
        "checkpoint (--backend jax) for them",
      )
    name = f"file 1 ({os.path.basename(file.filename or 'unnamed')})"
    data = await file.read(limit + 1)
    if len(data) > limit:
      return error(413, f"{name}: larger than the limit of {max_upload_mb:g} MB")
    try:
      image = await concurrency.run_in_threadpool(prepare, name, data)
    except serve_uploads.UploadError as e:
      return error(400, str(e))
    heat = await concurrency.run_in_threadpool(backend.attention_map, image)
    return responses.Response(serve_uploads.overlay_png(image, heat), media_type="image/png")

  return app


def _positive(kind: type):
  def parse(value: str):
    if kind(value) <= 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return kind(value)

  return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
  from vit_jax import serve_backends  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="python -m vit_jax.serve", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="jax: .npz, training workdir or orbax step; torch: timm export folder; onnx: .onnx file",
  )
  parser.add_argument("--backend", default="jax", choices=serve_backends.BACKENDS)
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
    backend = serve_backends.load_backend(args.backend, args.checkpoint)
  except serve_backends.BackendError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import uvicorn  # pylint: disable=g-import-not-at-top

  app = create_app(
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
      f"ready: http://{args.host}:{args.port}/ ({backend.model_name}, {args.backend}, "
      f"{len(backend.class_names)} classes)",
      flush=True,
    )

  threading.Thread(target=warm_and_announce, name="warm-up", daemon=True).start()
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  return 0


if __name__ == "__main__":
  sys.exit(main())
