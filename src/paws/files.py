"""Files a command writes: checked before the work starts, written whole or not at all.

An output path is checked before any long work (:func:`check_out_dir`, :func:`check_out_file`):
a path that names an existing file where a folder is needed, that lies below a file, or whose
folder cannot be written ends the command in its first second, not after the training. Every
file is written through a temporary file in the same folder, flushed, fsynced and renamed over
the old one (:func:`write_atomic`), so a full disk or a killed process leaves the previous file
as it was, never a half-written or empty one.

The text files paws reads back (configs, a run directory's CSV and JSON files) are read through
:func:`read_text`, so that a file in another encoding, or binary data where text should be, ends
in one line naming the file.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from paws.errors import UserError

__all__ = [
    "write_atomic",
    "write_with",
    "write_folder_files",
    "check_out_dir",
    "check_out_file",
    "reason",
    "disk_of",
    "check_not_input",
    "read_text",
]


def reason(e: OSError) -> str:
    """The words of an OS error, without its errno prefix."""
    return e.strerror or str(e) or type(e).__name__


def read_text(path: str | Path, what: str, fix: str) -> str:
    """The text of ``path``: UTF-8, a UTF-8 byte-order mark allowed.

    Args:
        path: the file.
        what: what the file is, for the message ("config", "run file").
        fix: what the user should do about a file that is not such text.

    Raises:
        UserError: a file that cannot be read, is UTF-16 or other non-UTF-8 bytes, or holds NUL
            bytes (binary data), naming the file, the first bad byte and ``fix``.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {reason(e)}") from e
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{what} {path} is UTF-16 text, not UTF-8; {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); {fix}"
        ) from e
    if "\x00" in text:
        raise UserError(f"{what} {path} holds binary data, not text; {fix}")
    return text


def write_with(path: str | Path, write: Callable[[IO[bytes]], None], noun: str = "") -> None:
    """Write ``path`` atomically with ``write(binary file)``: a temporary file beside it,
    fsynced, renamed over it, then the folder fsynced, so that a crash or a full disk leaves
    the old file or the new one, never a part. This is every file paws writes. A path that is
    not a regular file (``/dev/null``, a pipe) is written in place: renaming over it would
    replace the device.

    Args:
        path: the file.
        write: writes the content into the binary file it is given.
        noun: what the file is, for the error (``"checkpoint"``): "could not write checkpoint
            ...; the previous checkpoint is intact" (or "no earlier checkpoint exists").

    Raises:
        UserError: naming the path when it cannot be written (a full disk, no permission); an
            existing file keeps its old content.
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        try:
            with open(path, "wb") as f:
                write(f)
        except OSError as e:
            raise _write_error(path, e, noun) from e
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"could not write {path}: {reason(e)}; check the folder") from e
    try:
        # mkstemp makes the file private; give it the mode a plain write would have.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = os_error(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise _write_error(path, cause, noun) from e
        raise


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``, if any: torch.save reports a failed write (a full disk) as a
    RuntimeError whose context is the OSError."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _full(e: OSError) -> bool:
    """Whether ``e`` is a full disk: ENOSPC (or a quota), or numpy's short write, which says
    "N requested and M written" with no errno."""
    text = str(e)
    short = "requested and" in text and "written" in text
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or short


def disk_of(path: str | Path) -> str:
    """The disk a path lies on, in words: its mount point and the space left there."""
    folder = _nearest_existing(Path(path).absolute())
    mount = folder if folder.is_dir() else folder.parent
    while not os.path.ismount(mount) and mount.parent != mount:
        mount = mount.parent
    try:
        free = shutil.disk_usage(folder if folder.is_dir() else folder.parent).free
    except OSError:
        return f"the disk mounted at {mount}"
    return f"the disk mounted at {mount}, {free / 1e6:,.1f} MB free"


def _write_error(path: Path, e: OSError, noun: str) -> UserError:
    what = f"{noun} " if noun else ""
    if path.is_file():
        kept = f"; the previous {noun or 'file'} is intact"
    else:
        kept = f"; no earlier {noun} exists at that path" if noun else ""
    cause = f"no space left on {disk_of(path)}" if _full(e) else reason(e)
    return UserError(f"could not write {what}{path}: {cause}{kept}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be
    opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process's umask, read without changing it (Linux), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` (UTF-8) or bytes to ``path`` atomically (:func:`write_with`)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    write_with(path, lambda f: f.write(data))


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists, refusing a file on the way."""
    cur = path
    while not cur.exists():
        if cur.parent == cur:
            break
        cur = cur.parent
    return cur


def _writable(folder: Path, what: str, path: Path) -> None:
    """Create and remove a file in ``folder``: the one test of writing that also holds for the
    superuser, read-only file systems and network mounts."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".paws-check.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(
            f"{what} {path} cannot be written ({reason(e)} in {folder}); choose another path"
        ) from e


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """Check that the folder ``path`` can be created (or exists) and be written, creating
    nothing.

    Args:
        path: the output folder.
        what: how the message names it (the option).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        UserError: ``path`` is an existing file, lies below a file, or its folder cannot be
            written.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; choose a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{what} {path} lies below {base}, which is a file; choose another path")
    _writable(base, what, path)
    return path


def check_out_file(path: str | Path, what: str = "--out") -> Path:
    """Check that the file ``path`` can be written (its folder may not exist yet), creating
    nothing; ``/dev/null`` and other devices are accepted.

    Raises:
        UserError: ``path`` is a folder, lies below a file, or its folder cannot be written.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        return path  # a device or a pipe: written in place
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UserError(f"{what} {path} lies below {base}, which is a file; choose another path")
    _writable(base, what, path)
    return path


def write_folder_files(out: str | Path, name: str, write: Callable[[Path], None]) -> list[Path]:
    """Let ``write(path)`` write the file ``name`` as a library does it (the ONNX exporter
    writes a path, and may put its weights beside it) into a staging folder inside ``out``,
    then move each file it wrote into ``out`` through :func:`write_with`: a full disk or a
    failure part-way leaves no truncated file in ``out``, only the old ones.

    Args:
        out: the folder (exists).
        name: the file's name.
        write: writes it to the path it is given (and maybe files beside it).

    Returns:
        The files written into ``out``.

    Raises:
        UserError: naming the file and the disk when it cannot be written.
    """
    out = Path(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".paws-staging.", dir=out))
    except OSError as e:
        raise UserError(f"could not write {out / name}: {reason(e)}; check the folder") from e
    try:
        try:
            write(staging / name)
        except Exception as e:  # noqa: BLE001 - a library's error: an OSError becomes a line
            cause = os_error(e)
            if cause is None:
                raise
            raise _write_error(out / name, cause, "") from e
        written = []
        for f in sorted(staging.iterdir()):
            with open(f, "rb") as src:
                write_with(out / f.name, lambda dst, src=src: shutil.copyfileobj(src, dst))
            written.append(out / f.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_not_input(
    out: str | Path,
    inputs: Sequence[str | Path] = (),
    folders: Sequence[str | Path | None] = (),
    what: str = "--out",
) -> None:
    """Refuse an output that would overwrite what the command reads: one of its ``inputs``
    (an image given to predict, the CSV beside the contact sheet), or a path inside one of
    the ``folders`` of data (a run's labelled, unlabelled or test folder, where an export
    would become images of a class).

    Raises:
        UserError: naming the output and the input it would replace.
    """
    target = Path(os.path.abspath(Path(out).expanduser()))
    real = target.resolve()
    for p in inputs:
        q = Path(p).expanduser()
        if Path(os.path.abspath(q)) == target or q.resolve() == real:
            raise UserError(
                f"{what} {out} is one of the inputs ({p}): writing it would replace it; "
                "choose another path"
            )
    for d in folders:
        if not d:
            continue
        q = Path(d).expanduser().resolve()
        if real == q:
            raise UserError(
                f"{what} {out} is the data {d}: writing it would replace it; choose another path"
            )
        if q in real.parents:
            raise UserError(
                f"{what} {out} lies inside the data folder {d}: the output would become part "
                "of the data; choose a path outside it"
            )
