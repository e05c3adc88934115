"""The Hugging Face Hub side of a model: its model card (with citations of the methods used) and pushing."""
