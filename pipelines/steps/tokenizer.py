"""Step: train the SentencePiece tokenizer on the corpus (Llama 2 settings).

The corpus is whatever `prepare_data` reads (text, JSONL or Parquet files, directories or
object-store URIs), listed by the same `corral.data.pretraining.list_corpus`.
outputs: `tokenizer` (the directory holding tokenizer.model).
"""

from __future__ import annotations

from corral.config import TokenizerConfig
from corral.data.pretraining import corpus_texts, list_corpus
from corral.tokenizer import train_tokenizer
from pipelines.steps.common import output_dir


def run(config: TokenizerConfig | dict, inputs: dict) -> dict:
    cfg = TokenizerConfig.model_validate(config)
    out = output_dir(cfg.output_dir, inputs, "tokenizer")
    texts = corpus_texts(list_corpus(cfg.inputs))  # raises first if a path is missing or all is empty
    tok = train_tokenizer(vocab_size=cfg.vocab_size, out_dir=out, max_sentences=cfg.max_sentences, texts=texts)
    print(f"trained a {tok.vocab_size}-piece tokenizer -> {tok.path}")
    return {"tokenizer": str(out)}
