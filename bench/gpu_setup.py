"""Random-init models of real shapes and synthetic data for the GPU check (bench/gpu.sh): nothing is downloaded.

Speed does not depend on the weights, so the models are random-init from the configs of all-MiniLM-L6-v2,
bert-base-uncased and Qwen3-0.6B, saved as sentence-transformers folders (mean pooling + normalize for the
encoders, last-token pooling for the decoder) that textcl and the peer both load. The tokenizer is a WordPiece
over a synthetic vocabulary of random lowercase words, so every word is exactly one token and the lengths in
tokens are set by the generator: short sentences of 8-24 words, SciFact-shaped claims of 10-25 words and
abstracts of 180-320 words (cut at 256 tokens, as real abstracts are).

`--tiny` shrinks every shape (hidden 32, 2 layers) for the dry run on a CPU; the real shapes are still built
on the meta device there, so a config that does not build fails the dry run.
"""

from __future__ import annotations

import json
import random
import string
import tempfile
from pathlib import Path

WORDS = 8000
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Real shapes; vocab_size is the real model's (the tokenizer uses the first WORDS + 5 ids only).
SHAPES = {
    "minilm": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
               "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512},
    "bert-base": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
    "qwen3-0.6b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
                   "max_position_embeddings": 40960, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True},
}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": WORDS + len(SPECIALS)}
TINY_DECODER = {"num_key_value_heads": 2, "head_dim": 8}


def vocabulary(n: int = WORDS, seed: int = 0) -> list[str]:
    """`n` distinct random lowercase words of 3-9 letters."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))))
    return sorted(words)


def texts(count: int, min_words: int, max_words: int, seed: int) -> list[str]:
    """`count` texts of `min_words`-`max_words` random vocabulary words (one token each)."""
    rng, words = random.Random(seed), vocabulary()
    return [" ".join(rng.choices(words, k=rng.randint(min_words, max_words))) for _ in range(count)]


def short_sentences(count: int, seed: int = 1) -> list[str]:
    return texts(count, 8, 24, seed)


def documents(count: int, seed: int = 2) -> list[str]:
    """Abstract-like texts, longer than 256 tokens for most of them."""
    return texts(count, 180, 320, seed)


def build_tokenizer(model_max_length: int = 512):
    """A WordPiece tokenizer whose vocabulary is the synthetic words: `[CLS] w1 ... wn [SEP]`, one id a word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + vocabulary())}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def model_config(shape: str, tiny: bool = False):
    """The transformers config of `shape` (SHAPES), shrunk with `tiny`."""
    from transformers import AutoConfig

    settings = dict(SHAPES[shape])
    if tiny:
        settings |= TINY | (TINY_DECODER if settings["model_type"] == "qwen3" else {})
    model_type = settings.pop("model_type")
    return AutoConfig.for_model(model_type, **settings)


def check_real_shapes() -> dict[str, int]:
    """Build every real-shape model on the meta device (no memory): its parameter count, by shape."""
    import torch
    from transformers import AutoModel

    counts = {}
    for shape in SHAPES:
        with torch.device("meta"):
            model = AutoModel.from_config(model_config(shape))
        counts[shape] = sum(p.numel() for p in model.parameters())
    return counts


def build_model(shape: str, folder: Path, tiny: bool = False, max_seq_length: int = 256) -> Path:
    """A random-init sentence-transformers folder of `shape` (seed 0, fp32 weights) at `folder`."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoModel

    torch.manual_seed(0)
    config = model_config(shape, tiny)
    config.pad_token_id = SPECIALS.index("[PAD]")  # the synthetic tokenizer's
    decoder = config.model_type == "qwen3"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as transformer_dir:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a GPU draws 0.6 B weights in ms
            model = AutoModel.from_config(config)
        model.to("cpu").save_pretrained(transformer_dir)
        build_tokenizer().save_pretrained(transformer_dir)
        transformer = Transformer(transformer_dir, max_seq_length=max_seq_length)
        modules = [transformer, Pooling(config.hidden_size, "lasttoken" if decoder else "mean")]
        SentenceTransformer(modules=modules + ([] if decoder else [Normalize()]), device="cpu").save(str(folder))
    return folder


def write_beir(folder: Path, documents_count: int = 5183, queries_count: int = 1109, train_pairs: int = 919,
               test_pairs: int = 300) -> Path:
    """A SciFact-shaped BEIR folder of random texts: corpus.jsonl, queries.jsonl, qrels/train.tsv and test.tsv."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus, claims = documents(documents_count, seed=3), texts(queries_count, 10, 25, seed=4)
    with (folder / "corpus.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(corpus))
    with (folder / "queries.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(claims))
    (folder / "qrels").mkdir(exist_ok=True)
    rng = random.Random(5)
    for split, start, count in (("train", 0, train_pairs), ("test", train_pairs, test_pairs)):
        rows = [f"q{q}\td{rng.randrange(documents_count)}\t1\n" for q in range(start, min(start + count, queries_count))]
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return folder
