"""What every config section is built from: a field with a doc and a range, and the largest
counts a config may ask for."""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["knob", "MAX_STEPS", "MAX_EPOCHS", "MAX_BATCH", "MAX_IMAGES", "MAX_SEED"]


# The largest counts a config may ask for: beyond any real run, so that a slip such as
# optim.steps=1e30 is refused at once instead of running for ever (or allocating without end).
MAX_STEPS = 100_000_000  # optim.steps, and any run length derived from epochs
MAX_EPOCHS = 1e6
MAX_BATCH = 1_048_576
MAX_IMAGES = 1_000_000_000
MAX_SEED = 2**63 - 1


def knob(default: Any, doc: str, range: tuple[float | None, float | None] | None = None) -> Any:
    """A dataclass field with a doc string and an optional inclusive (lo, hi) range."""
    meta = {"doc": doc, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
