"""Knowledge bases: parse uploaded files, split them into chunks, index the chunks (BM25 and
vectors, fused), ingest in the background, and cite retrieved passages in answers.

One module per step: `parse` (bytes → sections; `markup` for HTML and Markdown, `sections`
for what they share), `split` (sections → chunks), `bm25` (tokens and keyword scores),
`index` (hybrid retrieval), `embed` (the service's /v1/embeddings as an embedding function),
`store` (tables and the functions that change them), `cache` (each knowledge base's index in
memory), `blobs` (the uploaded files on disk), `ingest` (background jobs), `cite` (the RAG
prompt and checking an answer's citations). No web routes here: they call these."""
