"""Files written whole: a full disk is named, and leaves the old file."""

from __future__ import annotations

import pytest

from paws.errors import UserError
from paws.files import write_with


def test_numpys_short_write_on_a_full_disk_names_the_disk(tmp_path):
    path = tmp_path / "emb.npy"
    path.write_bytes(b"old")

    def short(f):
        f.write(b"part")
        raise OSError("172416 requested and 131040 written")  # np.save's words, no errno

    with pytest.raises(UserError) as e:
        write_with(path, short)
    line = str(e.value)
    assert line.startswith(f"could not write {path}: no space left on the disk mounted at ")
    assert line.endswith("MB free; the previous file is intact")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"]
