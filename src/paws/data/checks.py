"""Data that loads but is probably not what the user meant: one warning line each, whichever
source (folder, labels file, Hugging Face, built-in) the sets came from.

These are the user's choices to make, so nothing is refused: a test set made of the labelled
images (its accuracy is that of images PAWS-NN holds as supports, not of new ones), a single
labelled class (every image is predicted as it), a class named ``unknown`` (the answer
``paws predict`` gives to images of no class) and class names that differ only in case or
Unicode form (``Zero`` and ``zero``: one class, or two?).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from paws.data.images import ImageSet

__all__ = ["suspicious"]

# The share of the test images that may also be labelled images before it is worth a line: a
# few exact duplicates between two splits of a public dataset are common and harmless.
OVERLAP_SHARE = 0.01


def suspicious(classes: Sequence[str], labeled: ImageSet, test: ImageSet | None) -> list[str]:
    """The warning lines for the labelled classes and sets of a run (empty when all is well).

    Args:
        classes: the class names, in label order.
        labeled: the labelled images.
        test: the test images, or None.
    """
    lines = []
    if len(classes) == 1:
        lines.append(
            f"warning: only one labelled class ({classes[0]!r}): every image will be predicted "
            "as it; label images of at least 2 classes"
        )
    unknown = [c for c in classes if _folded(c) == "unknown"]
    if unknown:
        lines.append(
            f"warning: a labelled class is named {unknown[0]!r}, the answer paws predict gives "
            "to images of no known class; rename the class to tell the two apart"
        )
    by_fold: dict[str, list[str]] = {}
    for c in classes:
        by_fold.setdefault(_folded(c), []).append(c)
    clash = next((names for names in by_fold.values() if len(names) > 1), None)
    if clash:
        lines.append(
            f"warning: the classes {' and '.join(repr(c) for c in clash)} differ only in case "
            "or Unicode form and are kept apart; rename one if they are one class"
        )
    if test is not None and len(test) and len(labeled):
        known = set(_key_list(labeled))
        both = sum(k in known for k in _key_list(test))
        if both and both >= OVERLAP_SHARE * len(test):
            lines.append(
                f"warning: {both} of {len(test)} test images are labelled images too: their "
                "accuracy is that of the supports, not of new images; give a test folder of "
                "other images"
            )
    return lines


def _folded(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _key_list(s: ImageSet) -> list[object]:
    """What makes each image of ``s`` the same as another: its pixels when in memory, else its
    file (resolved, so that two spellings of one path agree)."""
    if s.images is not None:
        return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in s.images]
    return [Path(f).resolve() for f in s.files or []]
