"""The `corral` command as a user runs it: real subprocesses, one-line errors, no tracebacks."""

import json
import subprocess
import sys

import corral
from corral.config import ModelConfig
from corral.model import Transformer


def corral_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "corral.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_tokenizer_train_export_and_info(corpus, tmp_path):
    r = corral_cli("tokenizer", "train", "--input", corpus / "hamlet_gut.txt", corpus / "lear_gut.txt",
                   "--vocab-size", 1000, "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.model").is_file()

    corral.save_model(Transformer(ModelConfig.preset("tiny")).init_weights(seed=0), tmp_path / "ckpt",
                      corral.load_tokenizer(tmp_path / "tok"))
    r = corral_cli("export", "hf", tmp_path / "ckpt", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()  # corral's layout is Hugging Face's, plus corral.json
    for path, fmt in [(tmp_path / "ckpt", "corral"), (tmp_path / "hf", "corral")]:
        r = corral_cli("info", path)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["format"] == fmt and info["dtype"] == "F32"
        assert info["parameters"] == ModelConfig.preset("tiny").num_params()


def test_user_mistakes_print_one_line_and_exit_2(tmp_path):
    for args in [("info", tmp_path / "missing"), ("info", tmp_path),
                 ("tokenizer", "train", "--input", tmp_path / "nope.txt", "--out", tmp_path)]:
        r = corral_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("corral: error:") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
