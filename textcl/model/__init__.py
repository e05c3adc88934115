"""The model: a `transformers` encoder + pooling (+ Dense) (+ normalize), its folder format, LoRA, device
and precision. It knows nothing of training, losses, the Hub or the run config (ARCHITECTURE.md)."""
