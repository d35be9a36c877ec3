"""mim4dd-jax: dataset distillation with mutual-information maximisation in JAX/Flax."""

__version__ = "0.1.0"
