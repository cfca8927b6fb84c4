"""The naive embeddings baseline: sentence-transformers behind FastAPI, one encode per request
under a lock.

This is how a typical RAG app serves a local embedding model: every request calls
`SentenceTransformer.encode` on its own texts, one request at a time. It loads the same model
directory surge serves, so only the serving stack differs.
Run: `python -m surge.bench.naive_embed_server [MODEL_DIR] --port 8002`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
from typing import TYPE_CHECKING, Annotated

import numpy as np
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    """The subset of OpenAI's embeddings request the baseline honours (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str]
    model: str = ""
    encoding_format: str = "float"


class NaiveEmbedState:
    """The model and the one lock every request waits on."""

    def __init__(self, model: SentenceTransformer, name: str) -> None:
        self.model, self.name = model, name
        self.lock = asyncio.Lock()

    async def encode(self, texts: list[str]) -> np.ndarray:
        """The texts' embeddings, computed while holding the lock (the model runs off the loop)."""
        async with self.lock:
            return await asyncio.to_thread(
                self.model.encode,
                texts,
                batch_size=max(1, len(texts)),
                show_progress_bar=False,
                convert_to_numpy=True,
            )


def get_state(request: Request) -> NaiveEmbedState:
    return request.app.state.naive


State = Annotated[NaiveEmbedState, Depends(get_state)]


def _encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(row.astype("<f4").tobytes()).decode()
    return row.tolist()


def create_app(state: NaiveEmbedState) -> FastAPI:
    """The baseline's routes: embeddings, models, health."""
    app = FastAPI(title="naive sentence-transformers baseline")
    app.state.naive = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(state: State) -> dict[str, object]:
        return {"object": "list", "data": [{"id": state.name, "object": "model"}]}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, state: State) -> dict[str, object]:
        texts = [req.input] if isinstance(req.input, str) else req.input
        rows = await state.encode(texts)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(row, req.encoding_format)}
            for i, row in enumerate(rows)
        ]
        return {"object": "list", "data": data, "model": state.name}

    return app


def main(argv: list[str] | None = None) -> None:
    """Load the model and serve it with uvicorn."""
    import torch
    import uvicorn

    from surge.encoders import pull_default_embedding_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the bundled MiniLM")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(pull_default_embedding_model())
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory: never ask the hub
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu", local_files_only=True).eval()
    state = NaiveEmbedState(model, os.path.basename(os.path.normpath(path)))
    logger.info("naive embeddings baseline: %s on %s:%d", state.name, args.host, args.port)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
