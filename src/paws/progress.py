"""Progress display: a tqdm bar on a terminal, plain periodic lines otherwise, nothing if quiet.

Only rank 0 shows progress. :func:`set_quiet` (the ``paws --quiet`` option) silences everything
but results and errors; data-loader workers started after it inherit the setting.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

__all__ = ["Progress", "quiet", "set_quiet", "muted", "info"]

_QUIET = False


def set_quiet(on: bool) -> bool:
    """Switch progress output off (``on``) or back on; returns the previous setting."""
    global _QUIET
    previous, _QUIET = _QUIET, bool(on)
    return previous


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """No progress or status lines inside the block (work repeated out of sight, such as the
    folds the final model is chosen on); the setting before it is restored after."""
    previous = set_quiet(True)
    try:
        yield
    finally:
        set_quiet(previous)


def quiet() -> bool:
    """Whether progress output is switched off (``--quiet``), or this is not rank 0."""
    if _QUIET:
        return True
    from paws import distributed  # torch: not imported until something is shown

    return not distributed.is_main()


def info(message: str) -> None:
    """Print a status line (to stderr) unless quiet, above any progress bar."""
    if not quiet():
        tqdm.write(message, file=sys.stderr)


class Progress:
    """Progress over ``total`` units starting at ``initial``.

    On a terminal: a tqdm bar with ETA and the latest values. Elsewhere (CI logs, files): one
    plain line every ``every`` seconds.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, every: float = 30.0):
        self.total, self.desc, self.n = total, desc, initial
        self.every, self.start, self.last = every, time.time(), 0.0
        self.start_n = initial
        self.values: dict[str, str] = {}
        self.bar = None
        if not quiet() and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **values: float | str) -> None:
        """Advance by ``n`` and show ``values`` (floats are printed with 4 significant digits)."""
        self.n += n
        self.values = {
            k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()
        }
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix(self.values, refresh=False)
            return
        now = time.time()
        if not quiet() and (now - self.last >= self.every or self.n >= self.total):
            self.last = now
            rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            fields = " ".join(f"{k}={v}" for k, v in self.values.items())
            eta_s = f"{eta / 60:.1f} min" if eta != float("inf") else "?"
            print(
                f"{self.desc} {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%)"
                f" eta {eta_s} {fields}".rstrip(),
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
