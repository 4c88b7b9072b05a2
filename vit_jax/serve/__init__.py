"""The recognizer: a web page and a JSON API that classify photos with one loaded model.

`python -m vit_jax.serve` (`cli`) loads a backend (`backends`: jax, torch, onnx) and serves the
FastAPI app (`app`), which batches concurrent requests (`batching`), checks uploads (`uploads`)
and serves the page (`page`). Importing this package loads neither the web stack nor a model.
"""

from vit_jax.serve.app import create_app
from vit_jax.serve.backends import BACKENDS, Backend, BackendError, load_backend

__all__ = ["BACKENDS", "Backend", "BackendError", "create_app", "load_backend"]
