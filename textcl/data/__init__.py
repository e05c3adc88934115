"""Training data: sources -> rows -> no-duplicate batches -> tokenized batches. Knows nothing of the model."""
