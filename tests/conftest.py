"""Test setup: 8 fake CPU devices, quiet TF, and torch imported before TensorFlow.

torch's triton segfaults when imported after TensorFlow, so any test
process that may use both imports torch first.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

try:
  import timm  # noqa: F401
  import torch  # noqa: F401  (import order, see above)
except ImportError:
  pass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`

import tempfile  # noqa: E402

# The input pipeline caches image checks per folder; keep the tests' caches out of ~/.cache.
os.environ.setdefault("VIT_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="vit_jax_test_cache_"))
