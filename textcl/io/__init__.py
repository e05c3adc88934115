"""Reading and writing files: the one table reader (`tables`), corpora, BEIR folders, and the line-level
diagnostics behind their one-line errors (`text`)."""
