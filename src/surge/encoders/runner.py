"""EncoderRunner: a sentence-transformers model, its tokenizer, and one padded forward per batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from surge.encoders.config import EncoderConfig, EncoderInfo
from surge.encoders.kinds import EncoderKind, detect_encoder_kind
from surge.encoders.messages import EncodeRequest, RerankRequest

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

logger = logging.getLogger(__name__)

# One tokenized input: the tokenizer's own keys (input_ids, attention_mask, token_type_ids, ...).
Features = dict[str, list[int]]


class EncoderInputError(ValueError):
    """One request's input cannot run (too long, bad token id); fails that request only."""


def load_st_model(config: EncoderConfig, kind: EncoderKind) -> SentenceTransformer | CrossEncoder:
    """Load the directory with sentence-transformers, from local files only."""
    # Read when huggingface_hub is first imported: set before sentence-transformers comes in.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers.utils import logging as hf_logging

    # A server's log is no place for tqdm bars (and a bar's lock would outlive a killed worker).
    hf_logging.disable_progress_bar()
    path = str(Path(config.model))
    if kind == "embedding":
        model = SentenceTransformer(path, device=config.device, local_files_only=True)
    else:
        model = CrossEncoder(path, device=config.device, local_files_only=True)
    return model.eval()


class EncoderRunner:
    """Tokenizes requests into rows and runs any mix of rows as one padded model batch."""

    def __init__(self, config: EncoderConfig) -> None:
        path = Path(config.model)
        if not path.is_dir():
            raise FileNotFoundError(f"encoder model directory not found: {path}")
        kind = config.kind or detect_encoder_kind(path)
        if kind is None:
            raise ValueError(f"{path} is neither an embedding nor a rerank model")
        self.kind: EncoderKind = kind
        self.device = torch.device(config.device)
        self.model = load_st_model(config, kind)
        transformer = self.model[0]
        self.tokenizer = transformer.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{path}: the model has no tokenizer (only text models are served)")
        hf_config = transformer.auto_model.config
        self.max_seq_length = min(
            self.model.max_seq_length or 1 << 30,
            getattr(hf_config, "max_position_embeddings", None) or 1 << 30,
        )
        self.vocab_size = transformer.auto_model.get_input_embeddings().num_embeddings
        self._activation: Callable[[torch.Tensor], torch.Tensor] | None = None
        dim: int | None = None
        if kind == "embedding":
            dim = self.model.get_embedding_dimension()
        else:
            if self.model.num_labels != 1:
                raise ValueError(f"{path}: a rerank model needs num_labels == 1")
            self._activation = self.model.activation_fn
        self.info = EncoderInfo(
            name=config.model_name,
            kind=kind,
            dim=dim,
            max_seq_length=self.max_seq_length,
            vocab_size=self.vocab_size,
        )
        self._pad_values = {
            "input_ids": self.tokenizer.pad_token_id or 0,
            "token_type_ids": self.tokenizer.pad_token_type_id,
        }
        self._wants_token_types = "token_type_ids" in self.tokenizer.model_input_names

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text with the model's special tokens, never truncated."""
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def tokenize(self, msg: EncodeRequest | RerankRequest) -> list[Features]:
        """The request's rows, truncated or checked against max_seq_length as it asks."""
        if isinstance(msg, RerankRequest):
            rows = self._tokenize(([msg.query] * len(msg.documents), msg.documents), msg.truncate)
            what = "the query and document"
        elif msg.token_ids is not None:
            rows = [self._ids_row(i, ids, msg.truncate) for i, ids in enumerate(msg.token_ids)]
            what = "input"
        else:
            rows = self._tokenize((msg.texts or [],), msg.truncate)
            what = "input"
        for i, row in enumerate(rows):
            if len(row["input_ids"]) > self.max_seq_length:
                raise EncoderInputError(
                    f"{what} {i} has {len(row['input_ids'])} tokens, more than the model's "
                    f"maximum of {self.max_seq_length}; shorten it or allow truncation"
                )
        return rows

    def _tokenize(self, texts: tuple[list[str], ...], truncate: bool) -> list[Features]:
        if not texts[0]:
            return []
        # Truncation as sentence-transformers does it ("longest_first", specials kept), so rows
        # equal what SentenceTransformer.encode / CrossEncoder.predict feed the model.
        encoded = self.tokenizer(
            *texts,
            add_special_tokens=True,
            truncation="longest_first" if truncate else False,
            max_length=self.max_seq_length if truncate else None,
            verbose=False,
        )
        keys = list(encoded.keys())
        return [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]

    def _ids_row(self, index: int, ids: list[int], truncate: bool) -> Features:
        """A row from caller-given token ids (the whole input; truncation keeps the first ones)."""
        if not ids:
            raise EncoderInputError(f"input {index} is an empty list of token ids")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise EncoderInputError(
                f"input {index} has token id {bad}, outside the vocabulary [0, {self.vocab_size})"
            )
        if truncate:
            ids = ids[: self.max_seq_length]
        row: Features = {"input_ids": list(ids), "attention_mask": [1] * len(ids)}
        if self._wants_token_types:
            row["token_type_ids"] = [0] * len(ids)
        return row

    def _pad(self, rows: list[Features]) -> dict[str, torch.Tensor]:
        """Rows padded to the longest on the tokenizer's padding side, as tensors on the device."""
        width = max(len(row["input_ids"]) for row in rows)
        left = self.tokenizer.padding_side == "left"
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            tensor = torch.full((len(rows), width), self._pad_values.get(key, 0), dtype=torch.long)
            for i, row in enumerate(rows):
                values = torch.tensor(row[key], dtype=torch.long)
                if left:
                    tensor[i, width - len(values) :] = values
                else:
                    tensor[i, : len(values)] = values
            batch[key] = tensor.to(self.device)
        return batch

    @torch.inference_mode()
    def run(self, rows: list[Features]) -> np.ndarray:
        """One forward over the rows: float32 [n, dim] embeddings, or [n] rerank scores."""
        out = self.model(self._pad(rows))
        if self.kind == "embedding":
            return out["sentence_embedding"].float().cpu().numpy()
        scores = out["scores"].float()
        if self._activation is not None:
            scores = self._activation(scores)
        return scores.reshape(len(rows)).cpu().numpy()
