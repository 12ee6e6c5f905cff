"""Step: train the SentencePiece tokenizer on the corpus (Llama 2 settings).

outputs: `tokenizer` (the directory holding tokenizer.model).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from corral.tokenizer import train_tokenizer


class TokenizerStepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="text files or directories of *.txt files")
    vocab_size: int = Field(default=32000, ge=300, description="Llama 2: 32000; the tiny preset: 4096")
    max_sentences: int = Field(default=2_000_000, gt=0, description="lines sampled for training")


def corpus_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(p.rglob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"tokenizer input {item} does not exist")
    if not files:
        raise ValueError(f"no .txt files found in {inputs}")
    return files


def run(config: TokenizerStepConfig | dict, inputs: dict) -> dict:
    cfg = TokenizerStepConfig.model_validate(config)
    tok = train_tokenizer(corpus_files(cfg.inputs), cfg.vocab_size, inputs["output_dir"], cfg.max_sentences)
    print(f"trained a {tok.vocab_size}-piece tokenizer -> {tok.path}")
    return {"tokenizer": str(Path(inputs["output_dir"]))}
