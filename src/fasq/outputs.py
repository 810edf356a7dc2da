"""Where fasq writes a model directory: which targets are safe to write or replace, and how the directory
is put in place atomically.

Rules (both the in-memory ``fasq.save`` and streaming follow them):

* ``-o`` must not be the input model, contain it, or lie inside it (an ``--overwrite`` there would
  delete the input).
* An existing ``-o`` is replaced only with ``overwrite``, and then only when it is a directory fasq
  itself wrote (it has a ``fasq.json`` manifest) or an empty directory; anything else needs ``force``.
* The directory is built under a temporary name beside the target (``.<name>.tmp-<pid>-*``) and moved
  into place by one rename that never replaces (``renameat2(RENAME_NOREPLACE)``), so of two runs that
  race for one new target exactly one wins and the other fails instead of silently replacing it.
* Temporary directories left by a killed process (``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>``
  whose pid is gone) are removed by the next run on the same target.
* Permissions follow the umask, as any file a program creates would.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAME = "fasq.json"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


class UnsafeOutputError(ValueError):
    """The requested output would destroy the input or a directory fasq did not write."""


def _is_within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both resolved)."""
    return a == b or b in a.parents


def check_output(out: str | os.PathLike, *, sources: tuple = (), overwrite: bool = False,
                 force: bool = False) -> Path:
    """Refuse an output that is, contains or lies inside one of ``sources`` (local paths; others are
    ignored), or that exists and may not be replaced.  Returns ``out`` as a Path."""
    out = Path(out)
    ro = out.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        rs = Path(src).resolve()
        if _is_within(ro, rs) or _is_within(rs, ro):
            rel = "is" if ro == rs else ("lies inside" if _is_within(ro, rs) else "contains")
            raise UnsafeOutputError(f"output {out} {rel} the input model {src}: choose another output "
                                    "directory (writing there could destroy the input)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
        if not force and not replaceable(out):
            raise UnsafeOutputError(f"output {out} exists and was not written by fasq (no {MANIFEST_NAME}, not "
                                    "empty); --overwrite replaces only fasq outputs: remove it yourself, choose "
                                    "another output, or pass --force (force=True) to replace it anyway")
    return out


def replaceable(out: Path) -> bool:
    """A directory fasq wrote (its manifest is there) or an empty directory."""
    if out.is_symlink() or not out.is_dir():
        return False
    return (out / MANIFEST_NAME).is_file() or not any(out.iterdir())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``.<out.name>.tmp-<pid>-*`` / ``.old-<pid>`` siblings whose process is gone (a run killed
    while saving); returns what was removed."""
    removed = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TMP_RE.match(p.name)
        if m is None or m.group("name") != out.name or _pid_alive(int(m.group("pid"))):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run", p)
        removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_dir(out: Path) -> Path:
    """A new empty directory beside ``out`` to build it in, with the permissions a plain ``mkdir`` gets."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def follow_umask(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open(..., "w")`` would (0666 less the umask);
    directories 0777 less the umask."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


_libc = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError when ``dst`` exists (even an empty directory)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 - glibc >= 2.28
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        at_fdcwd, rename_noreplace = -100, 1
        if _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, f"output {dst} appeared while this run was writing it (another run?); "
                                  "nothing was replaced", str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # no renameat2 on this kernel / file system: fall back
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, f"output {dst} appeared while this run was writing it", str(dst))
    os.rename(src, dst)


def move_into_place(tmp: Path, out: Path, *, overwrite: bool, force: bool = False) -> None:
    """Move the finished directory ``tmp`` to ``out``: a no-replace rename, or with ``overwrite`` (for a
    target :func:`replaceable` or with ``force``) a swap that removes the old directory afterwards."""
    follow_umask(tmp)
    if not (out.exists() or out.is_symlink()):
        _rename_noreplace(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, f"output {out} appeared while this run was writing it; pass --overwrite "
                              "to replace it", str(out))
    if not force and not replaceable(out):
        raise UnsafeOutputError(f"output {out} changed while this run was writing it and is no longer a fasq output; "
                                "nothing was replaced")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    _rename_noreplace(tmp, out)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)
