"""Speed, A/B, compiled-program and input-throughput benchmarks of vit_jax (not part of the
package a training job imports). Run from the repository root: `python -m benchmarks --help`."""
