"""SentencePiece BPE tokenizer with Llama 2's settings, and Llama 2's chat template.

Llama 2's tokenizer (its `tokenizer.model` trainer spec): BPE, 32k pieces, every digit its own
piece, byte fallback for anything unknown, identity normalisation, a dummy-prefix space, and the
special ids <unk>=0, <s>=1, </s>=2 with no padding id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"

# Meta's generation.py
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


class ChatFormatError(ValueError):
    """A dialog that the Llama 2 chat template cannot render."""


class Tokenizer:
    """A loaded SentencePiece model: text <-> token ids."""

    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1: Llama 2 has no padding token
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    @property
    def fingerprint(self) -> str:
        """sha256 of the model file: changes whenever the ids would."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir) / TOKENIZER_FILE
        if out.resolve() != self.path.resolve():
            shutil.copyfile(self.path, out)
        return out

    def to_hf_json(self) -> str:
        """This model as a Hugging Face `tokenizer.json` that gives the same ids as SentencePiece.

        Llama 2's layout: BPE with byte fallback, a normaliser that prepends the dummy-prefix
        space and turns spaces into U+2581, no pre-tokeniser, BOS added by the post-processor.
        transformers' own LlamaTokenizer (5.x) swaps in a Metaspace pre-tokeniser that drops the
        dummy prefix before leading spaces, so exports name the generic fast tokenizer class.
        SentencePiece stores no BPE merges: they are recovered from the vocabulary, each merge
        ranked by the id (score order) of the piece it makes.
        """
        from tokenizers import AddedToken, decoders, normalizers, processors
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        sp = self.sp
        vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
        merges = []
        for piece, pid in vocab.items():
            if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
                continue
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    merges.append((pid, vocab[left], vocab[right], left, right))
        merges.sort()
        unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), self.bos_id, self.eos_id))
        hf = HFTokenizer(BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (unk, bos, eos)])
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        return hf.to_str()

    # -- chat --------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a dialog ending with a user turn, ready for the assistant's answer."""
        turns = chat_turns(messages)
        ids: list[int] = []
        for user, answer in turns[:-1]:
            ids += self.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
        return ids + self.encode(f"{B_INST} {turns[-1][0]} {E_INST}", bos=True, eos=False)


def chat_turns(messages: Sequence[dict]) -> list[tuple[str, str | None]]:
    """Validate a dialog and fold it into (user, answer) turns; the last answer is None.

    An optional leading system message is wrapped in <<SYS>> tags and prefixed to the first user
    message, as Meta's `chat_completion` does. Contents are stripped, as Meta does.
    """
    if not messages:
        raise ChatFormatError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"messages[{i}] must be an object with string 'role' and 'content'")
        for tag in SPECIAL_TAGS:
            if tag in m["content"]:
                raise ChatFormatError(f"messages[{i}].content contains the reserved chat tag {tag!r}; remove it")
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    if msgs[0]["role"] == "system":
        if len(msgs) < 2:
            raise ChatFormatError("a system message must be followed by a user message")
        msgs = [{"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ChatFormatError(
                f"message roles must alternate user/assistant after an optional system message; "
                f"turn {i} is {m['role']!r}, expected {expected!r}"
            )
    if msgs[-1]["role"] != "user":
        raise ChatFormatError("the last message must come from the user")
    users, answers = msgs[0::2], msgs[1::2]
    return [(u["content"], a["content"]) for u, a in zip(users, answers)] + [(users[-1]["content"], None)]


def render_chat(messages: Sequence[dict]) -> str:
    """The dialog as text, with <s> and </s> written out where encode_chat puts BOS and EOS."""
    turns = chat_turns(messages)
    text = "".join(f"<s>{B_INST} {user} {E_INST} {answer} </s>" for user, answer in turns[:-1])
    return text + f"<s>{B_INST} {turns[-1][0]} {E_INST}"


def train_tokenizer(files: Iterable[str | os.PathLike] = (), vocab_size: int = 32000,
                    out_dir: str | os.PathLike = ".", max_sentences: int = 2_000_000, num_threads: int | None = None,
                    texts: Iterable[str] | None = None) -> Tokenizer:
    """Train a SentencePiece BPE model with Llama 2's settings; writes `out_dir/tokenizer.model`.

    The corpus is the lines of local text `files`, or of the documents `texts` yields (any corpus
    `corral.data.pretraining.corpus_texts` reads: JSONL, Parquet, object-store URIs).
    """
    if texts is None:
        files = [str(f) for f in files]
        if not files:
            raise ValueError("no input files given to train the tokenizer on")
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"tokenizer input {f} does not exist or is not a file")
        source = {"input": files}  # SentencePiece reads local files itself
    else:
        source = {"sentence_iterator": (line for text in texts for line in text.splitlines() if line)}
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 pieces")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        spm.SentencePieceTrainer.train(
            **source,
            model_prefix=f"{tmp}/tokenizer",
            model_type="bpe",
            vocab_size=vocab_size,
            split_digits=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_by_unicode_script=True,
            split_by_whitespace=True,
            max_sentencepiece_length=16,
            character_coverage=0.99995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(f"{tmp}/tokenizer.model", out / TOKENIZER_FILE)  # atomic
    return Tokenizer(out / TOKENIZER_FILE)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a `tokenizer.model` file or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {p}; train one with `corral tokenizer train`")
    return Tokenizer(p)
