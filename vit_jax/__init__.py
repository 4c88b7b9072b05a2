"""vit_jax: fine-tune the original Google Vision Transformer checkpoints in JAX/Flax."""

__version__ = "0.1.0"
