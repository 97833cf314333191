"""How long ``paws suggest`` takes among 60,000 images, and its memory among 1,000,000.

Part 1 times ``paws suggest`` end to end (loading, embedding every candidate, choosing) among
Fashion-MNIST's 60,000 training images: a cold start (pixels) and, given a trained run, each
strategy from that run. Part 2 chooses among ``--rows`` (default 1,000,000) embeddings held in a
float16 file on disk, as ``paws suggest`` does above ``memory_rows``: k-means coverage and the
mixed strategy, each in a fresh process whose peak resident memory is printed next to the size
the embeddings would take in memory as float32. The embeddings are unit vectors around 50
random centres (what matters is the number of rows, not their values); embedding 1,000,000
images costs 1,000,000 / 60,000 of part 1's embedding time, chunk by chunk.

    python benchmarks/suggest_scale.py [--run RUN_DIR] [--rows 1000000] [--skip-60k]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(args: list[str]) -> float:
    """Seconds of ``paws --quiet ARGS`` in a fresh process."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "paws", "--quiet", *args], check=True)
    return time.time() - start


def write_rows(path: Path, n: int, dim: int, chunk: int = 65536) -> None:
    """n unit rows around 50 centres into a float16 file, a chunk at a time."""
    from paws.labelling.strategies import MemmapSource, unit_rows

    gen = torch.Generator().manual_seed(0)
    centres = unit_rows(torch.randn(50, dim, generator=gen))
    store = MemmapSource(path, n, dim, mode="w+")
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        which = torch.randint(0, 50, (k,), generator=gen)
        store.write(start, unit_rows(centres[which] + 0.3 * torch.randn(k, dim, generator=gen)))
    store.array.flush()


def choose_child(path: str, n_rows: int, dim: int, strategy: str) -> None:
    """In a fresh process: choose 100 rows, print seconds and peak memory (MiB)."""
    from paws.labelling.strategies import MemmapSource
    from paws.labelling.suggest import choose

    torch.set_num_threads(2)
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    source = MemmapSource(path, n_rows, dim)
    rng = np.random.default_rng(0)
    margin = rng.random(n_rows).astype(np.float32) if strategy == "mixed" else None
    suggested = rng.integers(0, 10, n_rows) if strategy == "mixed" else None
    exclude = np.zeros(n_rows, dtype=bool)
    exclude[:100] = True  # 100 labelled rows
    labelled = source.take(np.arange(100))
    start = time.time()
    rows, _ = choose(strategy, source, 100, labelled, exclude, margin, suggested, seed=0)
    took = time.time() - start
    assert len(rows) == 100 and not exclude[rows].any()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{took:.1f} {peak:.0f} {imported:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained Fashion-MNIST run directory (part 1 from a run)")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128, help="embedding size of part 2")
    p.add_argument("--skip-60k", action="store_true", help="part 2 only")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "next.csv"
        if not a.skip_60k:
            print("among Fashion-MNIST's 60,000 training images, 100 suggestions:")
            s = timed(["suggest", "-n", "100", "--out", str(out)])
            print(f"  cold start (pixels, k-means)       {s:6.1f} s")
            if a.run:
                for strategy in ("mixed", "coverage", "uncertainty", "random"):
                    s = timed(
                        ["suggest", a.run, "-n", "100", "--strategy", strategy, "--out", str(out)]
                    )
                    print(f"  from the run, --strategy {strategy:<11} {s:6.1f} s")
        path = Path(tmp) / "rows.f16"
        write_rows(path, a.rows, a.dim)
        in_memory = a.rows * a.dim * 4 / 2**20
        print(
            f"among {a.rows:,} embeddings of {a.dim} on disk (float32 in memory: "
            f"{in_memory:,.0f} MiB), 100 suggestions:"
        )
        for strategy in ("coverage", "mixed"):
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "from suggest_scale import "
                f"choose_child; choose_child({str(path)!r}, {a.rows}, {a.dim}, {strategy!r})"
            )
            res = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            )
            took, peak, imported = res.stdout.split()
            print(
                f"  --strategy {strategy:<9} {float(took):6.1f} s, peak memory {peak} MiB "
                f"({imported} MiB of it once torch and paws are imported)"
            )


if __name__ == "__main__":
    main()
