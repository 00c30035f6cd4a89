"""What the vendor library gives: cuBLAS bf16 (`torch.mm`) vs cuBLASLt int8 (`torch._int_mm`,
int32 out) at FLUX.1-dev's linear shapes, M = 4608, on the GPU of the call.

    python3 benchmarks/cublas_int8.py            # needs torch with CUDA (the device has it)

A reference point for the W1.58A8 kernel's target (NOTES.md item 12): if the vendor's own int8
GEMM is not faster than its bf16 GEMM on this GPU, 2x int8 tensor-core peak alone does not make
an int8 GEMM fast. Timing: CUDA events over 20 passes through 4 rotating input sets (more bytes
than L2), three interleaved rounds, medians. The int8 product is checked exact against float64.
"""

from __future__ import annotations

import argparse
import statistics

M = 4608
FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072),
               (3072, 18432)]


def time_call(fn, arg_sets, iters: int = 20) -> float:
    """Seconds per call of fn over the rotating arg_sets (CUDA events)."""
    import torch
    for a in arg_sets:
        fn(*a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        for a in arg_sets:
            fn(*a)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (iters * len(arg_sets))


def main() -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=M)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {a.m}")
    print("  K -> N    | bf16 us | bf16 TF | int8 us | int8 TOPS | int8 / bf16")
    for k, n in FLUX_SHAPES:
        bf = [(torch.randn(a.m, k, device="cuda", dtype=torch.bfloat16),
               torch.randn(k, n, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
        # cuBLASLt int8 wants a column-major second operand.
        i8 = [(torch.randint(-127, 128, (a.m, k), device="cuda", dtype=torch.int8),
               torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8).t()) for _ in range(4)]
        x, w = i8[0]
        if not torch.equal(torch._int_mm(x, w).double(), x.double() @ w.double()):
            raise RuntimeError(f"torch._int_mm is not exact at {k}->{n}")
        tb, ti = [], []
        for _ in range(a.rounds):
            tb.append(time_call(torch.mm, bf))
            ti.append(time_call(torch._int_mm, i8))
        b, i = statistics.median(tb), statistics.median(ti)
        flop = 2.0 * a.m * k * n
        print(f" {k:>5}->{n:<5} | {b * 1e6:7.1f} | {flop / b / 1e12:7.0f} | {i * 1e6:7.1f} | {flop / i / 1e12:9.0f} | "
              f"{b / i:10.2f}x", flush=True)
        del bf, i8
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
