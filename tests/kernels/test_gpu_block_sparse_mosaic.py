"""The Mosaic GPU (Hopper) block-sparse forward.

On CPU (every run): the kernel is lowered for an abstract H100 (Pallas -> Mosaic GPU, the step
that catches API and layout errors; there is no interpret mode for wgmma pipelines), the
support check names why a call cannot take the kernel, and the public entry rejects bad
``forward`` / Mosaic options with errors naming them.

On a Hopper GPU (skipped elsewhere, as there is nothing to run it on): forward and gradients
(Mosaic forward + Triton backward) against the XLA reference and an explicit dense masked
softmax, random layouts with empty / full / one-block rows, odd lengths, GQA, sliding windows.
Tolerances (relative norm error vs float32 / float64 references): bf16 1.5e-2 forward,
3e-2 gradients; fp16 3e-3 / 5e-3.
"""

import os
import re
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # kernel_reference.py lives beside this file
from kernel_reference import dense_attention_jnp, random_block_mask, rel_err  # noqa: E402

from sea_jax.kernels import BlockLayout, block_sparse_attention  # noqa: E402
from sea_jax.kernels import gpu_block_sparse as gbs  # noqa: E402
from sea_jax.kernels import gpu_block_sparse_mosaic as mosaic  # noqa: E402


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ----------------------------------------------------------------------------- CPU
def _lower_for_h100(fn, *avals):
    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "dtype,D,H,K,G,block_q,block_k,block_kv,stages,causal,window",
    [
        (jnp.bfloat16, 128, 4, 2, 2, 128, 128, 128, 2, True, None),
        (jnp.float16, 64, 3, 1, 1, 256, 128, 64, 3, True, 300),
        (jnp.bfloat16, 128, 2, 2, 2, 128, 64, 64, 2, False, None),
    ],
)
def test_lowers_to_mosaic_gpu_for_h100(dtype, D, H, K, G, block_q, block_k, block_kv, stages, causal, window):
    B, S = 2, 1024
    kw = dict(seq_k=S - 37, block_q=block_q, block_k=block_k, causal=causal, window=window,
              scale=D**-0.5, block_kv=block_kv, stages=stages)
    sds = jax.ShapeDtypeStruct
    nq, nk = S // block_q, S // block_k
    text = _lower_for_h100(
        lambda *a: mosaic.block_sparse_forward_mosaic(*a, **kw),
        sds((B, S, H, D), dtype), sds((B, S, K, D), dtype), sds((B, S, K, D), dtype),
        sds((B, G, nq, nk), jnp.int32), sds((B, G, nq), jnp.int32))
    assert re.findall(r"stablehlo.custom_call @(\w+)", text) == ["mosaic_gpu_v2"]
    assert f"tensor<{B}x{H}x{S}xf32>" in text  # the log-sum-exp output the Triton backward reads


def test_octet_gather_lowers_and_checks_its_table():
    """octets=: 8-row TMA copies from a storage table (a K/V gather a Hopper TMA can make)."""
    B, S, H, K, D = 1, 512, 2, 2, 128
    kw = dict(seq_k=S, block_q=128, block_k=128, causal=True, window=None, scale=D**-0.5,
              block_kv=64, stages=2)
    sds = jax.ShapeDtypeStruct
    avals = (sds((B, S, H, D), jnp.bfloat16), sds((B, S, K, D), jnp.bfloat16), sds((B, S, K, D), jnp.bfloat16),
             sds((B, K, S // 128, S // 128), jnp.int32), sds((B, K, S // 128), jnp.int32))
    text = _lower_for_h100(lambda *a: mosaic.block_sparse_forward_mosaic(*a[:5], octets=a[5], **kw),
                           *avals, sds((B, K, S // 8), jnp.int32))
    assert re.findall(r"stablehlo.custom_call @(\w+)", text) == ["mosaic_gpu_v2"]
    x = jnp.zeros((B, S, H, D), jnp.bfloat16)
    idx, cnt = jnp.zeros(avals[3].shape, jnp.int32), jnp.zeros(avals[4].shape, jnp.int32)
    for bad in (jnp.zeros((B, K, S // 16), jnp.int32), jnp.zeros((B, K, S // 8), jnp.float32)):
        with pytest.raises(ValueError, match=r"octets must be int32 \[1, 2, 64\]"):
            mosaic.block_sparse_forward_mosaic(x, x, x, idx, cnt, octets=bad, **kw)


def test_support_check_names_the_reason():
    ok_kw = dict(dtype=jnp.bfloat16, head_dim=128, block_q=128, block_k=128, has_weights=False,
                 has_segments=False, interpret=False, check_device=False)
    assert mosaic.mosaic_forward_supported(**ok_kw) == (True, "")
    for change, word in [(dict(dtype=jnp.float32), "dtype"), (dict(head_dim=96), "head_dim"),
                         (dict(block_q=64), "block_q"), (dict(block_k=32), "block_k"),
                         (dict(has_weights=True), "weights"), (dict(has_segments=True), "segment"),
                         (dict(interpret=True), "interpret")]:
        ok, why = mosaic.mosaic_forward_supported(**{**ok_kw, **change})
        assert not ok and word in why, (change, why)
    if jax.default_backend() == "cpu":
        ok, why = mosaic.mosaic_forward_supported(**{**ok_kw, "check_device": True})
        assert not ok and "Hopper" in why


def test_public_entry_rejects_bad_forward_options():
    B, S, H, D = 1, 256, 2, 64
    x = jnp.zeros((B, S, H, D), jnp.bfloat16)
    lay = BlockLayout.causal(S, S, 128, 128)
    call = lambda **o: block_sparse_attention(x, x, x, lay, impl="pallas_gpu", interpret=True,  # noqa: E731
                                              kernel_options=o)
    with pytest.raises(ValueError, match="forward must be one of"):
        call(forward="cuda")
    with pytest.raises(ValueError, match="forward='mosaic' cannot run this call: interpret"):
        call(forward="mosaic")
    with pytest.raises(ValueError, match="mosaic_block_kv must be a multiple of 64"):
        gbs._mosaic_block_kv(96, 128)
    with pytest.raises(ValueError, match="mosaic_block_kv must be a multiple of 64"):
        gbs._mosaic_block_kv(256, 128)
    with pytest.raises(ValueError, match="mosaic_stages must be an int >= 2"):
        gbs._stages(1)
    # "auto" in interpret mode falls back to the Triton forward (which does run on CPU)
    assert gbs._forward_impl("auto", jnp.bfloat16, 64, 128, 128, False, False, True) == "triton"


# ----------------------------------------------------------------------------- GPU
needs_hopper = pytest.mark.skipif(not mosaic._is_hopper(), reason="the Mosaic GPU kernel needs a Hopper GPU")


@needs_hopper
@pytest.mark.parametrize(
    "dtype,D,S,H,K,block_q,block_k,block_kv,window",
    [
        (jnp.bfloat16, 128, 1000, 8, 2, 128, 128, 128, None),
        (jnp.float16, 64, 777, 4, 4, 256, 128, 64, 300),
        (jnp.bfloat16, 64, 640, 6, 1, 128, 64, 64, 100),
    ],
)
def test_matches_references_on_gpu(dtype, D, S, H, K, block_q, block_k, block_kv, window):
    rng = _rng("mosaic", S, H, K, D)
    B = 2
    q, k, v, ct = (jnp.asarray(rng.standard_normal((B, S, n, D)), dtype) for n in (H, K, K, H))
    nq, nk = -(-S // block_q), -(-S // block_k)
    mask = random_block_mask(rng, B, K, nq, nk)
    lay = BlockLayout.from_mask(mask, block_q, block_k)
    opts = dict(forward="mosaic", mosaic_block_kv=block_kv)

    def f(impl, q, k, v):
        return block_sparse_attention(q, k, v, lay, impl=impl, window=window,
                                      kernel_options=opts if impl == "pallas_gpu" else None)

    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(lambda *a: f("pallas_gpu", *a), q, k, v)
    ref, vjp_ref = jax.vjp(lambda *a: f("xla", *a), up(q), up(k), up(v))
    # vectorised (the loop version in kernel_reference is for tiny shapes): [B, H, T, S]
    t, s = np.arange(S)[:, None], np.arange(S)[None, :]
    blocks = mask[:, np.arange(H) // (H // K)][:, :, t // block_q, s // block_k]
    allowed = blocks & (s <= t) & (True if window is None else (t - s < window))
    dense = dense_attention_jnp(up(q), up(k), up(v), jnp.asarray(allowed))
    fwd_tol, grad_tol = (1.5e-2, 3e-2) if dtype == jnp.bfloat16 else (3e-3, 5e-3)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(out, ref) < fwd_tol and rel_err(out, dense) < fwd_tol
    seen = allowed.any(axis=-1)  # [B, H, T]: rows with nothing visible are exactly 0
    assert not np.asarray(out, np.float32).transpose(0, 2, 1, 3)[~seen].any()
    for g, gr in zip(vjp(ct), vjp_ref(up(ct))):
        assert np.isfinite(np.asarray(g, np.float32)).all()
        assert rel_err(g, gr) < grad_tol


@needs_hopper
def test_octet_gather_matches_contiguous_reads_on_gpu():
    """K/V stored with their 8-row octets shuffled per KV head, read back through octets=: the
    output and log-sum-exp equal the contiguous kernel's exactly, and the XLA reference's."""
    rng = _rng("octets")
    B, S, H, K, D, block = 1, 1024, 4, 2, 128, 128
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, n, D)), jnp.bfloat16) for n in (H, K, K))
    nq = S // block
    mask = random_block_mask(rng, B, K, nq, nq)
    lay = BlockLayout.from_mask(mask, block, block)
    where = np.stack([rng.permutation(S // 8) for _ in range(K)])[None].astype(np.int32)  # [B, K, S / 8]
    inverse = np.argsort(where, axis=-1)  # storage octet p holds key octet inverse[p]

    def scatter(x):
        xo = np.asarray(x, np.float32).reshape(B, S // 8, 8, K, D)
        return jnp.asarray(np.stack([xo[:, inverse[0, h], :, h] for h in range(K)], axis=3).reshape(B, S, K, D),
                           jnp.bfloat16)

    kw = dict(seq_k=S, block_q=block, block_k=block, causal=True, window=None, scale=D**-0.5,
              block_kv=64, stages=2)
    tables = (jnp.asarray(lay.kv_index), jnp.asarray(lay.kv_count))
    o_ref, lse_ref = mosaic.block_sparse_forward_mosaic(q, k, v, *tables, **kw)
    o, lse = mosaic.block_sparse_forward_mosaic(q, scatter(k), scatter(v), *tables, octets=jnp.asarray(where), **kw)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_ref))
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    xla = block_sparse_attention(up(q), up(k), up(v), lay, impl="xla")
    assert rel_err(o, xla) < 1.5e-2
