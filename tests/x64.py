"""float64 inside a `with` block, on every supported jax version."""

import jax

if hasattr(jax, "enable_x64"):
    def enable_x64():
        return jax.enable_x64(True)
else:  # older jax
    from jax.experimental import enable_x64  # noqa: F401
