"""Compile the Pallas Mosaic TPU attention kernels for a real TPU on a CPU-only machine.

Run as a script by an interpreter that has ``libtpu`` (``pip install "jax[tpu]"`` at the
installed jax version); tests/kernels/test_tpu_compile.py runs it in a subprocess so that the
ordinary CPU test process never loads the TPU runtime.

What it does: builds the compile-only devices of a TPU topology
(``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)``, no TPU
attached), a ("data", "model") mesh over them, and ``jax.jit(...).lower(...).compile()``\\ s

* block-sparse attention (:func:`sea_jax.kernels.tpu_shard_map.sharded_block_sparse_attention`)
  forward, and forward + backward (``jax.value_and_grad`` in q, k, v, key weights), with a
  SEA-like layout (per-KV-head top-k key blocks plus the diagonal block);
* gathered attention (:func:`...sharded_gathered_attention`) forward and forward + backward
  (q, k, v, selection weights), with a sliding window;

all in bfloat16 at the given sequence length, inside a ``shard_map`` (batch over "data",
heads over "model"). Inputs are abstract (``jax.ShapeDtypeStruct`` with shardings), so
nothing runs. For every compiled program it prints the compiled memory analysis and the
names, grids and block sizes of the Mosaic kernels found in the lowered module, and writes
them as JSON (``--json``). Exit status 0 only if everything compiled.

``--sharded-interpret`` instead runs both shard_map wrappers in interpret mode on 4 host CPU
devices against the unsharded XLA reference (no libtpu needed).

Usage: python tests/kernels/tpu_compile_check.py [--topology v5e:2x2] [--seq 8192]
           [--json out.json] [--only block_sparse|gathered] [--programs fwd|fwd_bwd|all]
       python tests/kernels/tpu_compile_check.py --sharded-interpret
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# Tell libtpu which chip to expect so that it does not probe the (absent) TPU metadata
# server; must be set before jax initialises its backends.
_ACCELERATOR = {"v5e": "v5litepod-4", "v5p": "v5p-8", "v4": "v4-8", "v6e": "v6e-4"}


def _set_accelerator_env(topology: str) -> None:
    chip = topology.split(":")[0]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCELERATOR.get(chip, "v5litepod-4"))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; TPU devices are compile-only


def memory_dict(compiled) -> dict:
    """The fields of ``compiled.memory_analysis()`` (bytes) as a dict."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
             "alias_size_in_bytes", "generated_code_size_in_bytes",
             "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_temp_size_in_bytes")
    return {n: int(getattr(ma, n)) for n in names if hasattr(ma, n)}


_KERNEL_RE = re.compile(r'kernel_name\s*=\s*"([^"]+)"')


def mosaic_kernels(lowered_text: str) -> list[str]:
    """Names of the Mosaic (tpu_custom_call) kernels in a lowered StableHLO module."""
    names = _KERNEL_RE.findall(lowered_text)
    if not names:  # older/newer spellings: look for our kernel names directly
        names = re.findall(r"(sea_[a-z_]+)", lowered_text)
    return sorted(set(names))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("block_sparse", "gathered"), default=None)
    ap.add_argument("--programs", choices=("fwd", "fwd_bwd", "all"), default="all",
                    help="compile the forward program, the forward + backward one, or both")
    ap.add_argument("--sharded-interpret", action="store_true",
                    help="instead of compiling: run the shard_map wrappers in interpret mode "
                         "on 4 host CPU devices and compare with the unsharded XLA reference")
    args = ap.parse_args(argv)
    if args.sharded_interpret:
        return sharded_interpret_check()
    _set_accelerator_env(args.topology)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sea_jax.kernels import BlockLayout
    from sea_jax.kernels.tpu_shard_map import (
        sharded_block_sparse_attention,
        sharded_gathered_attention,
    )

    t0 = time.time()
    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    devices = topo.devices
    n = len(devices)
    data = 2 if n % 2 == 0 else 1
    mesh = topologies.make_mesh(topo, (data, n // data), ("data", "model"))
    print(f"topology {args.topology}: {n} x {devices[0].device_kind}, mesh {dict(mesh.shape)}",
          flush=True)

    S = args.seq
    B, H, K, D = 2 * data, 4 * mesh.shape["model"], 2 * mesh.shape["model"], 128
    dt = jnp.bfloat16
    qkv_sharding = NamedSharding(mesh, P("data", None, "model", None))

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    q = sds((B, S, H, D), dt, P("data", None, "model", None))
    k = sds((B, S, K, D), dt, P("data", None, "model", None))
    v = k
    results = []

    def compile_and_report(name, fn, *abstract_args, meta):
        t = time.time()
        lowered = jax.jit(fn).lower(*abstract_args)
        kernels = mosaic_kernels(lowered.as_text())
        compiled = lowered.compile()
        mem = memory_dict(compiled)
        rec = dict(name=name, compile_s=round(time.time() - t, 1), mosaic_kernels=kernels,
                   memory_analysis=mem, **meta)
        results.append(rec)
        print(f"\n== {name}: compiled in {rec['compile_s']} s; Mosaic kernels {kernels}")
        print(f"   config: {meta}")
        print(f"   memory_analysis: {compiled.memory_analysis()}")
        for key_, val in mem.items():
            print(f"     {key_:32s} {val:>14,d} B  ({val / 2**20:9.2f} MiB)")
        sys.stdout.flush()

    # ---------------------------------------------------------------- block sparse
    if args.only in (None, "block_sparse"):
        bq = bk = 256
        nq, nk = S // bq, S // bk
        # a SEA-like layout: per KV head, top-k key blocks of the causal past plus the
        # diagonal block; 12.5 % of the nq x nk blocks per row at most (tables are abstract,
        # only their widths matter for compilation)
        mk = max(1, nk // 8)
        mq = nq
        G = K
        lay = BlockLayout(
            kv_index=sds((B, G, nq, mk), jnp.int32, P("data", "model", None, None)),
            kv_count=sds((B, G, nq), jnp.int32, P("data", "model", None)),
            q_index=sds((B, G, nk, mq), jnp.int32, P("data", "model", None, None)),
            q_count=sds((B, G, nk), jnp.int32, P("data", "model", None)),
            block_q=bq, block_k=bk)
        w = sds((B, S, K), jnp.float32, P("data", None, "model"))
        meta = dict(kernel="block_sparse", batch=B, seq=S, heads=H, kv_heads=K, head_dim=D,
                    dtype="bfloat16", block_q=bq, block_k=bk, max_kv_blocks=mk,
                    max_q_blocks=mq, groups=G, mesh=dict(mesh.shape), topology=args.topology)

        def bs_fwd(q, k, v, lay, w):
            return sharded_block_sparse_attention(q, k, v, lay, mesh=mesh, key_weights=w,
                                                  causal=True)

        def bs_loss(q, k, v, lay, w):
            return jnp.sum(bs_fwd(q, k, v, lay, w).astype(jnp.float32) ** 2)

        bs_grad = jax.value_and_grad(bs_loss, argnums=(0, 1, 2, 4))
        if args.programs in ("fwd", "all"):
            compile_and_report("block_sparse_fwd", bs_fwd, q, k, v, lay, w, meta=meta)
        if args.programs in ("fwd_bwd", "all"):
            compile_and_report("block_sparse_fwd_bwd", bs_grad, q, k, v, lay, w, meta=meta)

    # ------------------------------------------------------------------- gathered
    if args.only in (None, "gathered"):
        bq, topk, window = 128, 256, 256
        nq = S // bq
        U = topk + bq - 1  # union of a block's prefix top-k selections
        idx = sds((B, K, nq, U), jnp.int32, P("data", "model", None, None))
        sel_w = sds((B, K, S, U), jnp.float32, P("data", "model", None, None))
        meta = dict(kernel="gathered", batch=B, seq=S, heads=H, kv_heads=K, head_dim=D,
                    dtype="bfloat16", block_q=bq, slots=U, window=window,
                    mesh=dict(mesh.shape), topology=args.topology)

        def g_fwd(q, k, v, idx, sel_w):
            return sharded_gathered_attention(q, k, v, idx, mesh=mesh, block_q=bq,
                                              window=window, selection_weights=sel_w)

        def g_loss(q, k, v, idx, sel_w):
            return jnp.sum(g_fwd(q, k, v, idx, sel_w).astype(jnp.float32) ** 2)

        g_grad = jax.value_and_grad(g_loss, argnums=(0, 1, 2, 4))
        if args.programs in ("fwd", "all"):
            compile_and_report("gathered_fwd", g_fwd, q, k, v, idx, sel_w, meta=meta)
        if args.programs in ("fwd_bwd", "all"):
            compile_and_report("gathered_fwd_bwd", g_grad, q, k, v, idx, sel_w, meta=meta)

    print(f"\nall {len(results)} programs compiled for {args.topology} in "
          f"{time.time() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(topology=args.topology, jax=jax.__version__, programs=results), f,
                      indent=1)
    return 0


def sharded_interpret_check() -> int:
    """Run both shard_map wrappers in interpret mode on a 2 x 2 mesh of host CPU devices
    (batch over "data", heads over "model") and compare outputs and gradients with the
    unsharded XLA reference. Needs no libtpu. Exit status 0 when they agree."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from sea_jax.kernels import BlockLayout, block_sparse_attention, gathered_attention
    from sea_jax.kernels.tpu_shard_map import (
        sharded_block_sparse_attention,
        sharded_gathered_attention,
    )

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    B, S, H, K, D, bq, bk = 2, 160, 4, 2, 64, 32, 128
    q = jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32)
    nq, nk = -(-S // bq), -(-S // bk)
    mask = rng.random((B, K, nq, nk)) < 0.6
    mask[..., np.arange(nq), np.minimum((np.arange(nq) * bq + bq - 1) // bk, nk - 1)] = True
    layout = BlockLayout.from_mask(mask, bq, bk)  # per batch row and KV head
    w = jnp.asarray(rng.uniform(0, 1.5, (B, S, K)), jnp.float32)
    seg = jnp.asarray(np.where(np.arange(S) < 150, 1, 0)[None].repeat(B, 0), jnp.int32)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    worst = 0.0

    def compare(name, f_sharded, f_ref, *args):
        nonlocal worst
        o1, vjp1 = jax.vjp(f_sharded, *args)
        o2, vjp2 = jax.vjp(f_ref, *args)
        errs = [float(jnp.max(jnp.abs(a - b)) / max(1.0, float(jnp.max(jnp.abs(b)))))
                for a, b in zip((o1,) + vjp1(ct), (o2,) + vjp2(ct))]
        worst = max(worst, max(errs))
        print(f"{name}: max rel error (out, grads) = {['%.1e' % e for e in errs]}", flush=True)

    compare("block_sparse",
            lambda q, k, v, w: sharded_block_sparse_attention(
                q, k, v, layout, mesh=mesh, key_weights=w, segment_ids=seg, interpret=True),
            lambda q, k, v, w: block_sparse_attention(
                q, k, v, layout, key_weights=w, segment_ids=seg, impl="xla"),
            q, k, v, w)

    U = 24
    idx = np.full((B, K, nq, U), -1, np.int32)
    for b, h, i in np.ndindex(B, K, nq):
        n = min(U, i * bq)
        if n:
            idx[b, h, i, :n] = rng.choice(i * bq, n, replace=False)
    idx = jnp.asarray(idx)
    sw = jnp.asarray(rng.uniform(0, 1.5, (B, K, S, U)), jnp.float32)
    compare("gathered",
            lambda q, k, v, sw: sharded_gathered_attention(
                q, k, v, idx, mesh=mesh, block_q=bq, window=20, selection_weights=sw,
                segment_ids=seg, interpret=True),
            lambda q, k, v, sw: gathered_attention(
                q, k, v, idx, block_q=bq, window=20, selection_weights=sw, segment_ids=seg,
                impl="xla"),
            q, k, v, sw)
    ok = worst < 2e-4
    print(f"sharded interpret check on {len(jax.devices())} CPU devices: "
          f"{'OK' if ok else 'MISMATCH'} (worst {worst:.1e}, tolerance 2e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
