"""`textcl serve`: semantic search over HTTP (FastAPI on uvicorn) with a web page, micro-batched encoding
and durable writes. Needs the `serve` extra: `pip install "textcl[serve]"`."""
