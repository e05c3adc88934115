"""Training: the accelerate loop, its setup, one step (plain or GradCache), checkpoints and statistics."""
