"""WKV-4 on the CPU: the reference loop vs the chunked op, forward and forward+backward.

Run: python bench/wkv4_cpu.py [--chunk-lens 8,16,32] [--repeats 5]
Prints a markdown table: times in ms, the best of --repeats runs (robust to other load on a shared
machine); ratio = reference / chunked.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from rwkv_infctx.ops.wkv4.chunked import CHUNK_LEN, WKV4Chunked
from rwkv_infctx.ops.wkv4.reference import WKV4Reference

SHAPES = [(1, 512, 64), (1, 512, 256), (4, 512, 256), (1, 512, 1024)]


def _inputs(B: int, T: int, C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    td = (torch.rand(C, generator=g) * 8 - 5).requires_grad_()
    tf = (torch.rand(C, generator=g) * 3 - 2).requires_grad_()
    k = torch.randn(B, T, C, generator=g).requires_grad_()
    v = torch.randn(B, T, C, generator=g).requires_grad_()
    bb = torch.rand(B, C, generator=g) * 3 + 0.5
    aa = (torch.randn(B, C, generator=g) * bb).requires_grad_()
    pp = (torch.randn(B, C, generator=g) + 1).requires_grad_()
    return [td, tf, k, v, aa, bb.requires_grad_(), pp]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def _fwd(apply, inputs):
    def run():
        with torch.no_grad():
            apply(*inputs)

    return run


def _fwd_bwd(apply, inputs):
    def run():
        out = apply(*inputs)
        loss = out[0].square().sum() + out[1].sum() + out[2].sum() + out[3].sum()
        torch.autograd.grad(loss, inputs)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunk-lens", default=str(CHUNK_LEN), help="comma-separated chunk lengths")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chunk_lens = [int(x) for x in args.chunk_lens.split(",")]

    print(
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} · {torch.get_num_threads()} threads · fp32 · best of {args.repeats}\n"
    )
    cols = ["B", "T", "C", "L", "ref fwd ms", "chunked fwd ms", "fwd ratio"]
    cols += ["ref fwd+bwd ms", "chunked fwd+bwd ms", "fwd+bwd ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for B, T, C in SHAPES:
        inputs = _inputs(B, T, C)
        ref_f = _time(_fwd(WKV4Reference.apply, inputs), args.repeats)
        ref_fb = _time(_fwd_bwd(WKV4Reference.apply, inputs), args.repeats)
        for L in chunk_lens:

            def chunked(*xs, L=L):
                return WKV4Chunked.apply(*xs, L)

            ch_f = _time(_fwd(chunked, inputs), args.repeats)
            ch_fb = _time(_fwd_bwd(chunked, inputs), args.repeats)
            print(
                f"| {B} | {T} | {C} | {L} | {ref_f:.1f} | {ch_f:.2f} | {ref_f / ch_f:.1f}x "
                f"| {ref_fb:.1f} | {ch_fb:.2f} | {ref_fb / ch_fb:.1f}x |"
            )


if __name__ == "__main__":
    main()
