"""sea_jax kernels."""
