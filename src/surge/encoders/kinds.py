"""Tell an embedding model from a rerank (cross-encoder) model by the files in its directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

EncoderKind = Literal["embedding", "rerank"]

# Encoder-only families sentence-transformers can mean-pool into embeddings. A bare base model of
# another family (a decoder's `LlamaModel`, say) is not an embedding model by itself.
ENCODER_MODEL_TYPES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "modernbert",
        "mpnet",
        "nomic_bert",
        "roberta",
        "xlm-roberta",
    }
)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def detect_encoder_kind(path: str | Path) -> EncoderKind | None:
    """'embedding', 'rerank', or None when the directory holds neither kind of encoder."""
    root = Path(path)
    if not root.is_dir():
        return None
    # Saved by sentence-transformers >= 4: it names its own class, which settles it (a CrossEncoder
    # saved this way also writes modules.json, so this comes before the modules.json check).
    st_config = _read_json(root / "config_sentence_transformers.json") or {}
    st_type = st_config.get("model_type")
    if st_type == "CrossEncoder":
        return "rerank"
    if st_type == "SentenceTransformer":
        return "embedding"
    if st_type is not None:
        logger.info("%s: unsupported sentence-transformers model type %r", root, st_type)
        return None
    config = _read_json(root / "config.json") or {}
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "rerank"
    if (root / "modules.json").is_file() or (root / "sentence_bert_config.json").is_file():
        return "embedding"
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        return None
    is_base = bool(architectures) and all(a.endswith("Model") for a in architectures)
    if is_base and config.get("model_type") in ENCODER_MODEL_TYPES:
        return "embedding"
    return None
