"""Shared test helper: find arrays with two axes >= T in a jaxpr (the "never T x T" checks)."""


def big_arrays(jaxpr, T, found=None):
    """Collect (primitive, shape) of every outvar with two axes >= T, recursing into
    sub-jaxprs (scan / cond / custom_vjp bodies). jaxpr: a ``jax.core.Jaxpr``."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if sum(s >= T for s in shape) >= 2:
                found.append((str(eqn.primitive), shape))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    big_arrays(inner, T, found)
    return found
