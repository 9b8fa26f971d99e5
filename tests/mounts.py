"""Real filesystems mounted for a test: tmpfs, ramfs, loop-mounted ext4 / xfs / btrfs
images, an overlay, and a FUSE passthrough (``tests/fusefs.py``).

``mounted(kind, where)`` mounts one under ``where`` and unmounts it afterwards. Mounting
needs root (the tests run as root in CI) and, per kind, ``mkfs.<kind>`` or libfuse with
``mfusepy``; a test whose filesystem cannot be had here is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).parent
#: Image sizes: the smallest each mkfs accepts (sparse files: no disk is used up front).
_IMAGE_MB = {"ext4": 16, "xfs": 320, "btrfs": 128}


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{' '.join(cmd[:3])} failed here: {done.stderr.strip()[:200]}")


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount (Debian: apt-get install fuse3)"
    probe = subprocess.run([sys.executable, "-c", "import mfusepy"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"mfusepy cannot load libfuse: {probe.stderr.strip()[-200:]}"
    return None


@contextlib.contextmanager
def mounted(kind: str, where: Path, name: str = "mnt") -> Iterator[Path]:
    """Mount a filesystem of ``kind`` at ``where/name``; yields the mount point. FUSE
    mounts pass ``where/fuse-source`` through: mounted twice, two views of one
    directory."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting needs root on Linux")
    mnt = where / name
    mnt.mkdir(parents=True)
    proc = None
    if kind in ("tmpfs", "ramfs"):
        _run("mount", "-t", kind, "-o", "size=64m" if kind == "tmpfs" else "mode=0755",
             kind, str(mnt))
    elif kind in _IMAGE_MB:
        mkfs = shutil.which(f"mkfs.{kind}")
        if mkfs is None:
            pytest.skip(f"no mkfs.{kind} here")
        image = where / f"{kind}.img"
        with open(image, "wb") as f:
            f.truncate(_IMAGE_MB[kind] * 1024 * 1024)
        _run(mkfs, *{"ext4": ["-q", "-F"], "xfs": ["-q", "-f"], "btrfs": ["-q", "-f"]}[kind],
             str(image))
        _run("mount", "-o", "loop", str(image), str(mnt))
    elif kind.startswith("overlay"):  # "overlay": its layers on the tmp filesystem
        layers = where / "layers"
        for name in ("lower", "upper", "work"):
            (layers / name).mkdir(parents=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={layers / 'lower'},upperdir={layers / 'upper'},"
             f"workdir={layers / 'work'}", str(mnt))
    elif kind == "fuse":
        missing = _fuse_missing()
        if missing:
            pytest.skip(f"no FUSE here: {missing}")
        source = where / "fuse-source"
        source.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, str(HERE / "fusefs.py"), str(source),
                                 str(mnt)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.communicate()[1].decode(errors="replace")
                pytest.skip(f"the FUSE passthrough did not mount: {err.strip()[-300:]}")
            time.sleep(0.05)
    else:
        raise ValueError(kind)
    try:
        yield mnt
    finally:
        _unmount(mnt, proc)


def _unmount(mnt: Path, proc: subprocess.Popen | None) -> None:
    if proc is not None:
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
        subprocess.run([tool, "-u", str(mnt)] if "fusermount" in tool else [tool, str(mnt)],
                       capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if os.path.ismount(mnt):
        done = subprocess.run(["umount", str(mnt)], capture_output=True)
        if done.returncode != 0:  # still busy (a process of the test): detach it
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
