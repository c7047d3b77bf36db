"""Collections: a SQLite store (the truth), a FAISS index (derived) and an FTS5 lexical side."""
