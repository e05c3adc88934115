"""Measuring an encoder: STS correlations, BEIR retrieval metrics (trec_eval conventions), alignment and
uniformity. Never imports training.

The metrics also ship as Hugging Face `evaluate` modules that load offline:
`evaluate.load(textcl.evaluation.RETRIEVAL_METRIC)` and `evaluate.load(textcl.evaluation.STS_METRIC)`.
"""

from pathlib import Path

RETRIEVAL_METRIC = str(Path(__file__).parent / "metrics" / "textcl_retrieval")
STS_METRIC = str(Path(__file__).parent / "metrics" / "textcl_sts")
