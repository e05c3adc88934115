"""textcl's retrieval metrics as a Hugging Face `evaluate` module, loadable offline:
`evaluate.load(textcl.evaluation.RETRIEVAL_METRIC)`.

The computation is `textcl.evaluation.retrieval_metrics.retrieval_metrics` (trec_eval conventions:
graded nDCG, MRR, Recall, MAP and Precision at each k); this file only adapts its inputs to `evaluate`.
"""

import datasets
import evaluate

from textcl.evaluation.retrieval_metrics import retrieval_metrics

DESCRIPTION = "nDCG, MRR, Recall, MAP and Precision at k with trec_eval's conventions (graded qrels)."
INPUTS = """
Args:
    predictions: one per query, {"query_id": str, "doc_ids": [str], "scores": [float]} (the run).
    references: one per query, {"query_id": str, "doc_ids": [str], "relevance": [int]} (the qrels; grade 0 is
        judged not relevant).
    k_values: the cut-offs (default 1, 3, 5, 10, 100).
Returns:
    "ndcg@k", "mrr@k", "recall@k", "map@k", "precision@k" for each k, "n_queries" and "n_skipped_queries".
"""


@evaluate.utils.file_utils.add_start_docstrings(DESCRIPTION, INPUTS)
class TextclRetrieval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=DESCRIPTION,
            citation="",
            inputs_description=INPUTS,
            features=datasets.Features({
                "predictions": {
                    "query_id": datasets.Value("string"),
                    "doc_ids": datasets.Sequence(datasets.Value("string")),
                    "scores": datasets.Sequence(datasets.Value("float64")),
                },
                "references": {
                    "query_id": datasets.Value("string"),
                    "doc_ids": datasets.Sequence(datasets.Value("string")),
                    "relevance": datasets.Sequence(datasets.Value("int64")),
                },
            }),
        )

    def _compute(self, predictions, references, k_values=(1, 3, 5, 10, 100)):
        run = {p["query_id"]: dict(zip(p["doc_ids"], p["scores"])) for p in predictions}
        qrels = {r["query_id"]: dict(zip(r["doc_ids"], r["relevance"])) for r in references}
        return retrieval_metrics(qrels, run, k_values)
