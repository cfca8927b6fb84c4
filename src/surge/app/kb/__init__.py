"""Knowledge bases: parse uploaded files, split them into chunks, index the chunks (BM25 and
vectors, fused), ingest in the background, and cite retrieved passages in answers.

One module per step: `parse` (bytes → sections), `split` (sections → chunks), `index` (hybrid
retrieval), `store` (tables and the index cache), `blobs` (the uploaded files on disk),
`ingest` (background jobs), `cite` (the RAG prompt and checking an answer's citations)."""
