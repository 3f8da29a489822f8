"""How many rows would a SparseK query block read if keys could only be gathered in octets?

A Hopper TMA copy into a wgmma operand tile must cover 8 consecutive rows
(``bench_octet_tma.py``), so a Mosaic GPU kernel of the SparseK layer would store K/V in some key
order and read, for every query block, each octet holding at least one key of the block's union
(the keys some query of the block selects). This simulates the layer's selection on CPU (random
normal scores plus the default position slope; top-k of the keys at least ``w`` behind each
query: key p is selected by the queries [p + w, end_p)) and counts, for keys ordered by
(position bucket, end descending), octet rows / union rows per block, against the union cut into
64-slot tiles (what the Triton gathered kernels read). No GPU; numpy only.

    python benchmarks/octet_layout_sim.py --out benchmarks/results/octet_layout_sim.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import pathlib

import numpy as np


def key_ends(z, k, w):
    """end_p: key p is selected by queries [p + w, end_p) (end_p = p + w: never)."""
    S = len(z)
    end = np.minimum(np.arange(S) + w, S)
    heap = []
    for t in range(w, S):
        p = t - w
        if len(heap) < k:
            heapq.heappush(heap, (z[p], p))
            end[p] = S
        elif z[p] > heap[0][0]:
            _, old = heapq.heapreplace(heap, (z[p], p))
            end[old] = t
            end[p] = S
    return end


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--slopes", default="0.001,0.0")
    ap.add_argument("--block_q", default="64,128")
    ap.add_argument("--buckets", default="128,256,512,1024,2048,4096")
    ap.add_argument("--every", type=int, default=7, help="simulate every n-th query block")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    S, k, w = args.seq, args.k, args.window
    rows = []
    print("| slope | block_q | bucket | octet rows / union | 64-slot tiles / union |")
    print("|---|---|---|---|---|")
    for slope in map(float, args.slopes.split(",")):
        z = np.random.default_rng(0).standard_normal(S) + slope * np.arange(S)
        end = key_ends(z, k, w)
        pos = np.arange(S)
        start = pos + w
        alive = end > start
        for bq in map(int, args.block_q.split(",")):
            for bucket in map(int, args.buckets.split(",")):
                order = np.lexsort((-end, pos // bucket))
                octet = np.empty(S, np.int64)
                octet[order] = np.arange(S) // 8
                union = octet_rows = tile_rows = 0
                for i0 in range((w // bq) * bq, S, bq * args.every):
                    u = np.nonzero(alive & (start < i0 + bq) & (end > i0))[0]
                    union += len(u)
                    octet_rows += 8 * len(np.unique(octet[u]))
                    tile_rows += -(-len(u) // 64) * 64
                row = dict(slope=slope, block_q=bq, bucket=bucket, octet_over_union=octet_rows / union,
                           tiles_over_union=tile_rows / union)
                rows.append(row)
                print(f"| {slope:g} | {bq} | {bucket} | {row['octet_over_union']:.3f} | {row['tiles_over_union']:.3f} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
