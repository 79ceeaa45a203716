"""The hardware ceilings, measured on every visible GPU in the same run as the workloads.

    python bench/ceilings.py --out ceilings.json [--smoke]

- memory bandwidth: a 2 GiB device-to-device copy, counting bytes read plus bytes written;
- bf16 matrix rate: an 8192 x 8192 x 8192 product on random data (zeros run faster and would flatter).
Each is timed with CUDA events after warm-ups, the median of many. On a CPU (--smoke, or no GPU) the
same code runs on small sizes, only to exercise the pipeline; those numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Median seconds of fn() on `device`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(device: torch.device, copy_bytes: int, n: int, dtype: torch.dtype) -> dict:
    src = torch.rand(copy_bytes // 4, device=device)  # random, not zeros
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), warmup=5, reps=30, device=device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    mm_s = timed(lambda: a @ b, warmup=5, reps=20, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": str(device),
        "name": name,
        "copy_GBps": round(2 * copy_bytes / copy_s / 1e9, 1),  # read + written
        "matmul_tflops": round(2 * n**3 / mm_s / 1e12, 2),
        "matmul_n": n,
        "matmul_dtype": str(dtype),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if torch.cuda.is_available() and not args.smoke:
        per_device = []
        for i in range(torch.cuda.device_count()):
            # The events record on the current device: make it the one measured.
            with torch.cuda.device(i):
                per_device.append(measure(torch.device("cuda", i), 2 << 30, 8192, torch.bfloat16))
                torch.cuda.empty_cache()
    else:
        per_device = [measure(torch.device("cpu"), 64 << 20, 512, torch.float32)]
    result = {
        "per_device": per_device,
        # The ratio columns use the mean over GPUs (they should agree within a few percent).
        "copy_GBps": round(statistics.mean(d["copy_GBps"] for d in per_device), 1),
        "matmul_tflops": round(statistics.mean(d["matmul_tflops"] for d in per_device), 2),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
