"""Tiny random encoder model directories (BERT + a WordPiece tokenizer), made locally."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

from tests.tiny_models import CORPUS

# Short on purpose: tests of the length limit need texts that overflow it.
TINY_MAX_SEQ_LENGTH = 64
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert_tokenizer(vocab_size: int = 300) -> BertTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on the tiny corpus (CJK split per character)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=TINY_MAX_SEQ_LENGTH,
    )


def _tiny_bert_config(tokenizer: BertTokenizerFast, **overrides: object) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def _widen(model: torch.nn.Module) -> None:
    """Wider weights than the default init, so different inputs give visibly different outputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)


def make_tiny_embedding_dir(path: Path, seed: int = 0) -> Path:
    """A random BertModel + tokenizer; sentence-transformers adds mean pooling when it loads it."""
    tokenizer = make_bert_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(_tiny_bert_config(tokenizer, architectures=["BertModel"]))
    _widen(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_reranker_dir(path: Path, seed: int = 0) -> Path:
    """A random BertForSequenceClassification (num_labels=1) + tokenizer: a cross-encoder."""
    tokenizer = make_bert_tokenizer()
    torch.manual_seed(seed)
    config = _tiny_bert_config(tokenizer, num_labels=1)
    model = BertForSequenceClassification(config)
    _widen(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
