"""Registers, spills and shared memory of a layer's Pallas Triton kernels, without a GPU.

Lowers a layer's forward+backward for an H100 on the CPU (an abstract GPU device), keeps the
Triton IR of every Pallas Triton kernel with its num_warps / num_stages, compiles each with the
``triton`` package (``pip install triton``: it bundles ``ptxas``) for sm_90 and runs the
``ptxas`` bundled with it (``-v``) for the register count, spill stores / loads and stack frame,
and its ``nvdisasm`` for static SASS counts (instructions, global loads, local loads / stores).
Prints a table, writes JSON.

A proxy, not the GPU's numbers: the GPU machine compiles the same IR with the Triton inside its
jaxlib, whose version differs from the pip ``triton`` here, so counts can differ; compare
settings against each other in one run of this script, and time the promising ones on the GPU
(``profile_layer.py``). What it is for: a kernel that spills (255 registers and local-memory
traffic: ``ncu_key_dkv_1123e.txt`` showed what that costs) is visible here in seconds of CPU.

    python3 benchmarks/triton_regs.py --layers sea_token,sparsek --out /tmp/regs.json
    python3 benchmarks/triton_regs.py --layers sea_token --sea_kernel_options '{"dkv_tiles": [64, 32]}'
    python3 benchmarks/triton_regs.py --layers sparsek --kernel_options '{"num_warps": [4, 4, 8, 4, 4, 4]}'
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

# triton 3.9 warns unless this is set; 1 keeps FP fusion on, as the GPU's Triton compiles
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(__file__))
from bench_layers import sea_functions, sparsek_functions  # noqa: E402
from common import SEA_LAYER, SPARSEK_LAYER, env_info, kernel_options_json  # noqa: E402

from sea_jax.attention.base import AttentionDims  # noqa: E402
from sea_jax.attention.sea import SEAOptions  # noqa: E402
from sea_jax.attention.sparsek import SparseKOptions  # noqa: E402

LAYERS = ("sparsek", "sea", "sea_token")
PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


@contextlib.contextmanager
def captured_triton_kernels():
    """Collect (name, num_warps, num_stages, ttir text) of every Pallas Triton kernel lowered
    inside the block (wraps two functions of jax's Pallas Triton backend; jax internals)."""
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import core as triton_core
    from jax._src.pallas.triton import pallas_call_registration as reg

    kernels, params = [], {}
    rules = getattr(pallas_core, "_backend_lowering_rules", {})  # CompilerParams class -> (rule, platform)
    lower_call, lower_module = reg.pallas_call_lowering, reg.lowering.lower_jaxpr_to_triton_module
    registered = rules.get(triton_core.CompilerParams)

    def call(ctx, *nodes, compiler_params=None, **kw):
        cp = compiler_params
        params["warps"] = 4 if cp is None or cp.num_warps is None else cp.num_warps
        params["stages"] = 3 if cp is None or cp.num_stages is None else cp.num_stages
        return lower_call(ctx, *nodes, compiler_params=compiler_params, **kw)

    def module(jaxpr, *a, **kw):
        res = lower_module(jaxpr, *a, **kw)
        name = jaxpr.debug_info.func_name if jaxpr.debug_info else "kernel"
        kernels.append(dict(name=name, warps=params["warps"], stages=params["stages"],
                            ttir=res.module.operation.get_asm(enable_debug_info=False)))
        return res

    reg.pallas_call_lowering, reg.lowering.lower_jaxpr_to_triton_module = call, module
    if registered is not None:
        rules[triton_core.CompilerParams] = (call, registered[1])
    try:
        yield kernels
    finally:
        reg.pallas_call_lowering, reg.lowering.lower_jaxpr_to_triton_module = lower_call, lower_module
        if registered is not None:
            rules[triton_core.CompilerParams] = registered


def lower_for_h100(fn, args):
    """Lower jitted ``fn`` for CUDA with an H100 as the (abstract) device, on any host."""
    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        fn.trace(*args).lower(lowering_platforms=("cuda",))


def ptxas_report(ptx: str) -> dict:
    """ptxas -v of PTX for sm_90a with the newest ptxas bundled with triton that accepts it,
    plus the resulting cubin's static SASS counts (:func:`sass_counts`)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        errors = []
        for exe in ("ptxas-blackwell", "ptxas"):
            exe = os.path.join(bindir, exe)
            if not os.path.exists(exe):
                continue
            r = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                text = r.stdout + r.stderr
                report = {key: int(m.group(1)) if (m := rx.search(text)) else 0 for key, rx in PTXAS_RE.items()}
                return dict(report, **sass_counts(os.path.join(bindir, "nvdisasm"), os.path.join(tmp, "k.cubin")))
            errors.append(f"{os.path.basename(exe)}: {r.stderr.strip()[-300:]}")
    raise RuntimeError("no ptxas bundled with triton accepted the PTX: " + " | ".join(errors))


SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def sass_counts(nvdisasm: str, cubin: str) -> dict:
    """Static SASS counts of the cubin (every path of every branch, not executed counts): all
    instructions, global loads (LDG; async copies LDGSTS apart) and local-memory (spill) loads /
    stores. Empty when nvdisasm is missing or fails."""
    if not os.path.exists(nvdisasm):
        return {}
    r = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
    if r.returncode:
        return {}
    ops = [m.group(1) for m in SASS_OP.finditer(r.stdout)]
    return dict(sass=len(ops), sass_ldg=ops.count("LDG"), sass_ldl=ops.count("LDL"), sass_stl=ops.count("STL"))


def compile_report(kernel: dict, dump: str | None = None) -> dict:
    """Compile one captured kernel; ``dump``: a path prefix to write its .ttir / .ttgir / .ptx."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ttir")
        with open(path, "w") as f:
            f.write(kernel["ttir"])
        compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=kernel["warps"], num_stages=kernel["stages"]))
    if dump:
        os.makedirs(os.path.dirname(os.path.abspath(dump)), exist_ok=True)
        for ext, text in (("ttir", kernel["ttir"]), ("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"])):
            with open(f"{dump}.{ext}", "w") as f:
                f.write(text)
    return dict(ptxas_report(compiled.asm["ptx"]), shared_kib=round(compiled.metadata.shared / 1024, 1))


def layer_function(name, seq, args):
    H, K, D = 16, args.kv_heads, 128
    dims = AttentionDims(H, K, D, H * D)
    sds = jax.ShapeDtypeStruct
    q, kv, x = sds((1, seq, H, D), jnp.bfloat16), sds((1, seq, K, D), jnp.bfloat16), sds((1, seq, H * D), jnp.bfloat16)
    if name == "sparsek":
        sk = SparseKOptions(**{**SPARSEK_LAYER, **json.loads(args.options), "impl": "pallas_gpu"})
        (params,), _, fwd_bwd = sparsek_functions(dims, sk)
        return fwd_bwd, (jax.tree.map(lambda a: sds(a.shape, a.dtype), params), q, kv, kv, x)
    gran = "block" if name == "sea" else "token"
    ko = kernel_options_json(args.sea_kernel_options) if args.sea_kernel_options else None
    opts = SEAOptions(**SEA_LAYER, granularity=gran, impl="pallas_gpu", select_impl="xla", kernel_options=ko)
    (params,), _, fwd_bwd = sea_functions(dims, opts)
    return fwd_bwd, (jax.tree.map(lambda a: sds(a.shape, a.dtype), params), q, kv, kv)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="sparsek,sea,sea_token", help=f"comma-separated, of {LAYERS}")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--kv_heads", type=int, default=16)
    ap.add_argument("--options", default="{}", help="JSON of SparseKOptions fields for 'sparsek'")
    ap.add_argument("--kernel_options", default=None,
                    help="JSON of gathered_attention kernel_options for 'sparsek' (as profile_layer.py)")
    ap.add_argument("--sea_kernel_options", default=None,
                    help="JSON of block_sparse_attention kernel_options for 'sea' / 'sea_token'")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "triton_regs.json"))
    ap.add_argument("--dump", default=None, help="folder for each kernel's Triton IR, TTGIR (layouts) and PTX")
    args = ap.parse_args()
    layers = args.layers.split(",")
    for name in layers:
        if name not in LAYERS:
            raise ValueError(f"--layers: unknown layer {name!r}; allowed: {', '.join(LAYERS)}")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise SystemExit("triton_regs.py needs the `triton` package: pip install triton") from e
    if args.kernel_options:
        import sea_jax.kernels as sea_kernels

        sea_kernels.gathered_attention = functools.partial(
            sea_kernels.gathered_attention, kernel_options=kernel_options_json(args.kernel_options))

    import triton

    out = dict(env=dict(env_info(), triton=triton.__version__), args=vars(args), rows=[])
    print(f"triton {triton.__version__} (the GPU's jaxlib Triton differs: compare settings within one run)")
    print("| layer | kernel | warps | stages | registers | spill stores B | spill loads B | stack B | shared KiB "
          "| SASS | LDG | LDL / STL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in layers:
        fn, fargs = layer_function(name, args.seq, args)
        with captured_triton_kernels() as kernels:
            lower_for_h100(fn, fargs)
        unique = {}  # the same kernel lowered more than once (e.g. per merge step) is compiled once
        for kern in kernels:
            key = (kern["name"], kern["warps"], kern["stages"], kern["ttir"])
            unique.setdefault(key, dict(kern, lowered=0))["lowered"] += 1
        for kern in unique.values():
            row = dict(layer=name, kernel=kern["name"], warps=kern["warps"], stages=kern["stages"],
                       lowered=kern["lowered"],
                       **compile_report(kern, args.dump and os.path.join(args.dump, f"{name}_{kern['name']}")))
            out["rows"].append(row)
            print(f"| {name} | {row['kernel']} | {row['warps']} | {row['stages']} | {row['registers']} | "
                  f"{row['spill_stores']} | {row['spill_loads']} | {row['stack']} | {row['shared_kib']} | "
                  f"{row.get('sass', '-')} | {row.get('sass_ldg', '-')} | {row.get('sass_ldl', '-')} / "
                  f"{row.get('sass_stl', '-')} |", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
