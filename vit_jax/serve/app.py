"""The recognizer's FastAPI app: the page, /healthz, /api/info, /api/predict, /api/attention.

A bad upload (not an image, truncated, empty, enormous declared dimensions, over max_upload_mb)
gets a 4xx {"error": "..."} naming the file and the problem; nothing in a request names a path on
the server. Concurrent requests are batched (`batching`).
"""

import os
import threading
from typing import Any, Optional

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
  """The FastAPI app serving `backend` (backends.Backend). `warm=False` leaves warming
  to `app.state.warm_up()` (the CLI runs it in a thread while /healthz answers 503). `examples`:
  a folder whose images the page offers as sample photos (listed once, at start)."""
  # Imported here so that `--help` and argument errors answer without loading the web stack.
  import fastapi  # pylint: disable=g-import-not-at-top
  from fastapi import responses  # pylint: disable=g-import-not-at-top
  from starlette import concurrency  # pylint: disable=g-import-not-at-top

  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  from vit_jax.serve import batching, page, uploads  # pylint: disable=g-import-not-at-top

  app = fastapi.FastAPI(title="ViT recognizer", docs_url=None, redoc_url=None)
  batcher = batching.Batcher(backend, max_batch=max_batch)
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
  async def index():
    return page.PAGE

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
      "precision": getattr(backend, "precision", "fp32"),
      "threads": getattr(backend, "threads", None),
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
    return predict.preprocess(uploads.decode(name, data), size)

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
      except uploads.UploadError as e:
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
    except uploads.UploadError as e:
      return error(400, str(e))
    heat = await concurrency.run_in_threadpool(backend.attention_map, image)
    return responses.Response(uploads.overlay_png(image, heat), media_type="image/png")

  return app
