"""textcl's STS correlations as a Hugging Face `evaluate` module, loadable offline:
`evaluate.load(textcl.evaluation.STS_METRIC)`.

The computation is `textcl.evaluation.sts.correlations` (Spearman and Pearson of predicted similarities
against gold scores); this file only adapts its inputs to `evaluate`.
"""

import datasets
import evaluate

from textcl.evaluation.sts import correlations

DESCRIPTION = "Spearman and Pearson correlation of predicted similarities with gold similarity scores."
INPUTS = """
Args:
    predictions: predicted similarity per pair (e.g. cosine), float.
    references: gold similarity score per pair, float.
Returns:
    "spearman" and "pearson".
"""


@evaluate.utils.file_utils.add_start_docstrings(DESCRIPTION, INPUTS)
class TextclSts(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=DESCRIPTION,
            citation="",
            inputs_description=INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        return correlations(references, predictions)
