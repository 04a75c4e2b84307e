"""Tokenizers for text: WordPiece (BERT) or byte-level BPE (GPT), trained with `tokenizers`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from orchestrator.data.sources import DataError
from orchestrator.spec import TokenizerSpec

__all__ = [
    "SpecialTokens",
    "special_tokens",
    "tokenizer_facts",
    "tokenizer_hash",
    "train_tokenizer",
]

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GPT_SPECIALS = ["<|endoftext|>", "<|pad|>"]


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the model and the masking need, recorded in the dataset manifest."""

    vocab_size: int
    pad: int
    sep: int  # separates documents when packing (BERT [SEP], GPT <|endoftext|>)
    cls: int | None = None
    mask: int | None = None


def train_tokenizer(spec: TokenizerSpec, texts: Iterator[str]) -> Tokenizer:
    """Train a tokenizer on the corpus, or load the file the spec names."""
    if spec.kind == "file":
        assert spec.path is not None  # the spec guarantees it
        try:
            return Tokenizer.from_file(spec.path)
        except Exception as exc:  # tokenizers raises a bare Exception for missing/invalid files
            raise DataError(f"{spec.path}: cannot load tokenizer: {exc}") from None
    if spec.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer: trainers.Trainer = trainers.WordPieceTrainer(
            vocab_size=spec.vocab_size, special_tokens=BERT_SPECIALS, show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            special_tokens=GPT_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train_from_iterator(texts, trainer=trainer)
    if spec.kind == "wordpiece":
        # The WordPiece trainer finds the same tokens every time but numbers them in hash-map
        # order; renumber so the same corpus and settings always give the same ids.
        ordered = sorted(
            tok.get_vocab().items(),
            key=lambda kv: (
                kv[0] not in BERT_SPECIALS,
                BERT_SPECIALS.index(kv[0]) if kv[0] in BERT_SPECIALS else 0,
                kv[0],
            ),
        )
        tok.model = models.WordPiece({t: i for i, (t, _) in enumerate(ordered)}, unk_token="[UNK]")
    return tok


def special_tokens(tok: Tokenizer) -> SpecialTokens:
    """Find the special tokens of a BERT-style or GPT-style vocabulary."""
    vocab = tok.get_vocab()
    if "[SEP]" in vocab:
        return SpecialTokens(
            vocab_size=tok.get_vocab_size(),
            pad=vocab.get("[PAD]", 0),
            sep=vocab["[SEP]"],
            cls=vocab.get("[CLS]"),
            mask=vocab.get("[MASK]"),
        )
    eos = vocab.get("<|endoftext|>")
    if eos is None:
        raise DataError(
            "tokenizer has neither [SEP] (BERT-style) nor <|endoftext|> (GPT-style) "
            "in its vocabulary"
        )
    return SpecialTokens(vocab_size=tok.get_vocab_size(), pad=vocab.get("<|pad|>", eos), sep=eos)


def tokenizer_facts(tok: Tokenizer, kind: str) -> dict[str, object]:
    """The manifest's record of a prepared tokenizer, saved beside the shards as tokenizer.json."""
    specials = special_tokens(tok)
    return {
        "file": "tokenizer.json",
        "kind": kind,
        "hash": tokenizer_hash(tok),
        "vocab_size": specials.vocab_size,
        "pad_id": specials.pad,
        "sep_id": specials.sep,
        "cls_id": specials.cls,
        "mask_id": specials.mask,
    }


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()
