"""Whether ``flush_denormal`` reaches every intra-op thread, and what it saves.

    python bench/denormal_threads.py [--threads 2] [--size 4000000]

The pool starts before any flushing, as in a run (data loading and model
set-up run parallel operations first). Then an elementwise product over
float32 subnormals is timed and its subnormal results counted three ways:
unflushed; with ``torch.set_flush_denormal(True)`` alone, which sets the
calling thread's control register only; inside ``engine.denormals_flushed``,
which sets every thread of the pool. Fastest of 5 blocks of 10 products.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402


def measure(subnormals):
    """``(ms per product, results still subnormal)``."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            subnormals * 0.5
        best = min(best, (time.perf_counter() - start) / 10)
    return best * 1e3, int((subnormals * 0.5).count_nonzero())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4_000_000)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    # bits 713000 as float32: about 1e-39, a subnormal (no float conversion, which would flush it)
    subnormals = torch.full((arguments.size,), 713000, dtype=torch.int32).view(torch.float32)
    measure(subnormals)  # the pool runs before any flushing
    print(f"{arguments.threads} thread(s), {arguments.size:,} float32 subnormals, x * 0.5:")
    rows = [("unflushed", measure(subnormals))]
    torch.set_flush_denormal(True)
    rows.append(("torch.set_flush_denormal(True) alone", measure(subnormals)))
    torch.set_flush_denormal(False)
    with engine.denormals_flushed(True):
        rows.append(("engine.denormals_flushed(True)", measure(subnormals)))
    rows.append(("after it (setting restored)", measure(subnormals)))
    for label, (ms, kept) in rows:
        print(f"  {label:40s} {ms:7.2f} ms per product, {kept:,} results subnormal")


if __name__ == "__main__":
    main()
