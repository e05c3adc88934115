"""Retrieval: corpus encoding with an embedding cache, exact and FAISS search, the search index, and
hard-negative mining. Never imports training (ARCHITECTURE.md)."""
