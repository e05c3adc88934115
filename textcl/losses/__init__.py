"""Losses on embeddings: small `nn.Module`s whose `forward` takes tensors and returns a scalar, plus the
machinery that makes them exact at scale (cross-process gathering, GradCache, a MoCo queue). They see
tensors only: nothing here imports the model, the data or training (ARCHITECTURE.md)."""

from textcl.losses.gradcache import gradcache_backward
from textcl.losses.infonce import InfoNCELoss
from textcl.losses.matryoshka import MatryoshkaLoss

__all__ = ["InfoNCELoss", "MatryoshkaLoss", "gradcache_backward"]
