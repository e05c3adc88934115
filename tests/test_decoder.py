"""Decoder LLMs as embedders, on tiny random decoders of every family transformers builds offline (Qwen2, Qwen3,
Llama, Mistral, Gemma, Gemma2, Gemma3, Phi-3): padding side, batching, a pad token inside a text, EOS
appending, instructions (sentence-transformers loads the same query embeddings), pooling without the prompt,
bidirectional attention, LoRA targets per family, training end to end, ONNX export, the search index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES, build_tokenizer
from decoder_models import (
    EOS,
    FAMILIES,
    build_decoder_tokenizer,
    build_tiny_decoder,
    save_tiny_decoder,
    save_tiny_decoder_encoder,
)

from textcl import Encoder
from textcl.config import ModelArguments, load_config
from textcl.data.collator import ContrastiveCollator
from textcl.errors import TextclError
from textcl.model.decoder import append_eos_token, is_decoder, make_bidirectional, prepare_decoder
from textcl.model.lora import default_target_modules
from textcl.model.pooling import exclude_prompt, mean_pooling
from textcl.training.plan import plan_run
from textcl.training.setup import build_encoder

TEXTS = ["A man is playing a guitar.", "The cat sits.", "Two dogs are running through a field of snow."]
INSTRUCTION = "Given a sentence, find its paraphrase"
QUERY_PROMPT = f"Instruct: {INSTRUCTION}\nQuery: "


def tiny_encoder(family: str, pooling: str = "last_token", **options) -> Encoder:
    tokenizer = build_decoder_tokenizer()
    model = build_tiny_decoder(family, len(tokenizer))
    prepare_decoder(model, tokenizer)
    return Encoder(model, tokenizer, pooling=pooling, max_seq_length=64, **options)


def encode_with_side(encoder: Encoder, texts: list[str], side: str, **options) -> np.ndarray:
    encoder.tokenizer.padding_side = side
    return encoder.encode(texts, **options)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_side_batching_and_pad_tokens_inside_a_text(family: str) -> None:
    """Left- and right-padded batches and one text at a time give the same vectors, for last-token and mean
    pooling; a text holding the pad token (here the EOS, as in most decoders) keeps it as a real token."""
    with_pad = f"The cat{EOS} sits."
    texts = [*TEXTS, with_pad]
    for pooling in ("last_token", "mean"):
        encoder = tiny_encoder(family, pooling)
        assert is_decoder(encoder.model) and encoder.tokenizer.pad_token == EOS
        right = encode_with_side(encoder, texts, "right")
        left = encode_with_side(encoder, texts, "left")
        alone = np.concatenate([encode_with_side(encoder, [text], "left") for text in texts])
        np.testing.assert_allclose(left, right, atol=1e-5)
        np.testing.assert_allclose(alone, right, atol=1e-5)
        assert not np.allclose(right[3], right[1], atol=1e-3)  # the in-text pad token was read


def test_last_token_pooling_reads_the_last_real_token_under_both_padding_sides() -> None:
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    from textcl.model.pooling import last_token_pooling

    assert last_token_pooling(tokens, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pooling(tokens, left).flatten().tolist() == [3.0, 7.0]


def test_append_eos_token_survives_saving_and_truncation(tmp_path: Path) -> None:
    encoder = tiny_encoder("qwen3")
    plain = encoder.tokenizer("a b")["input_ids"]
    append_eos_token(encoder.tokenizer)
    eos = encoder.tokenizer.eos_token_id
    assert encoder.tokenizer("a b")["input_ids"] == [*plain, eos]
    assert encoder.tokenizer(SENTENCES[3], truncation=True, max_length=4)["input_ids"][-1] == eos
    append_eos_token(encoder.tokenizer)  # a no-op the second time
    assert encoder.tokenizer("a b")["input_ids"] == [*plain, eos]
    encoder.save(tmp_path / "model")
    loaded = Encoder.load(tmp_path / "model", device="cpu")
    assert loaded.tokenizer("a b")["input_ids"] == [*plain, eos]


def test_exclude_prompt_matches_sentence_transformers_rule_for_both_padding_sides() -> None:
    right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert exclude_prompt(right, 2).tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert exclude_prompt(left, torch.tensor([2, 3])).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    tokens = torch.randn(2, 5, 3)
    expected = mean_pooling(tokens[:, 2:], right[:, 2:])
    torch.testing.assert_close(mean_pooling(tokens, exclude_prompt(right, 2)), expected)


@pytest.mark.parametrize("include_prompt", [True, False])
def test_instruction_prompt_round_trips_through_sentence_transformers(
    qwen3_dir: Path, tmp_path: Path, include_prompt: bool
) -> None:
    """A model trained-configured with query_instruction, EOS appending, last-token or mean pooling saves the
    instruction as its "query" prompt: SentenceTransformer(path).encode(q, prompt_name="query") equals textcl."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    pooling = "last_token" if include_prompt else "mean"
    args = ModelArguments(model_name_or_path=str(qwen3_dir), pooling=pooling, normalize=True,
                          query_instruction=INSTRUCTION, append_eos_token=True, include_prompt=include_prompt)
    encoder = build_encoder(args)
    assert encoder.prompts == {"query": QUERY_PROMPT} and args.lora is False
    encoder.save(tmp_path / "model")
    ours = Encoder.load(tmp_path / "model", device="cpu")
    assert ours.include_prompt is include_prompt
    theirs = sentence_transformers.SentenceTransformer(str(tmp_path / "model"), device="cpu")
    queries = ours.encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(theirs.encode(TEXTS, prompt_name="query"), queries, atol=1e-5)
    np.testing.assert_allclose(theirs.encode(TEXTS), ours.encode(TEXTS), atol=1e-5)  # documents: no prompt
    collator = ContrastiveCollator(ours.tokenizer, 64, 64, query_prompt=QUERY_PROMPT,
                                   prompt_length=None if include_prompt else ours.prompt_length)
    batch = collator([{"anchor": text, "positive": text, "negatives": []} for text in TEXTS])
    with torch.no_grad():  # training pools the anchors as encoding (and sentence-transformers) does
        np.testing.assert_allclose(ours.eval()(**batch["anchor"]).numpy(), queries, atol=1e-5)
    with_prompt_pooled = Encoder.load(tmp_path / "model", device="cpu")
    with_prompt_pooled.include_prompt = True
    assert np.allclose(with_prompt_pooled.encode(TEXTS, prompt_name="query"), queries, atol=1e-4) is include_prompt


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bidirectional_attention_changes_early_tokens_and_keeps_padding_invariance(family: str) -> None:
    causal = tiny_encoder(family, "mean")
    before = encode_with_side(causal, TEXTS, "right")
    make_bidirectional(causal.model)
    right = encode_with_side(causal, TEXTS, "right")
    left = encode_with_side(causal, TEXTS, "left")
    assert not np.allclose(before, right, atol=1e-3)
    np.testing.assert_allclose(left, right, atol=1e-5)
    ids = causal.tokenize(["A man"])
    with torch.no_grad():  # the first token now sees the ones after it
        first = causal.model(**ids).last_hidden_state[0, 0]
        ids["input_ids"][0, -1] = ids["input_ids"][0, -1] + 1
        assert not torch.allclose(first, causal.model(**ids).last_hidden_state[0, 0])


def test_bidirectional_is_saved_and_restored_by_textcl_and_sentence_transformers(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    encoder = build_encoder(ModelArguments(model_name_or_path=str(qwen3_dir), pooling="mean", bidirectional=True))
    expected = encoder.encode(TEXTS)
    encoder.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["is_causal"] is False
    np.testing.assert_allclose(Encoder.load(tmp_path / "model", device="cpu").encode(TEXTS), expected, atol=1e-5)
    theirs = sentence_transformers.SentenceTransformer(str(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(theirs.encode(TEXTS), expected, atol=1e-5)
    causal = Encoder.load(qwen3_dir, pooling="mean", device="cpu").encode(TEXTS)
    assert not np.allclose(causal, expected, atol=1e-3)


def test_bidirectional_refuses_an_encoder(tiny_model_dir: Path) -> None:
    with pytest.raises(TextclError, match="not a decoder"):
        build_encoder(ModelArguments(model_name_or_path=str(tiny_model_dir), pooling="mean", bidirectional=True))


EXPECTED_TARGETS = {
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
}
LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_targets_every_projection_of_each_family(family: str) -> None:
    encoder = tiny_encoder(family)
    targets, exclude = default_target_modules(encoder.model)
    assert targets == EXPECTED_TARGETS.get(family, LLAMA_LIKE) and exclude is None
    before = encoder.encode(TEXTS)
    encoder.add_lora("tiny", r=2, alpha=4, dropout=0.0)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in encoder.model.named_parameters()
               if "lora_A" in name}
    assert sorted(adapted) == targets
    np.testing.assert_allclose(encoder.encode(TEXTS), before, atol=1e-6)  # B = 0: the base model exactly


def test_shrink_refuses_a_decoder(qwen3_dir: Path) -> None:
    from textcl.model.shrink import shrink

    with pytest.raises(TextclError, match="not decoder LLMs"):
        shrink(Encoder.load(qwen3_dir, pooling="mean", device="cpu"), [0])


def test_instruction_settings_are_checked() -> None:
    base = ["--model_name_or_path", "m", "--train_data", "a.tsv", "--output_dir", "o"]
    with pytest.raises(TextclError, match="must hold"):
        plan_run(load_config(None, [*base, "--query_instruction", "x", "--instruction_template", "{text} {task}"]))
    with pytest.raises(TextclError, match="keep one"):
        plan_run(load_config(None, [*base, "--query_instruction", "x", "--query_prompt", "q: "]))
    with pytest.raises(TextclError, match="one per source"):
        plan_run(load_config(None, [*base, "--source_instructions", "x", "y"]))


def test_train_a_decoder_with_per_source_instructions_and_lora(qwen3_dir: Path, tmp_path: Path) -> None:
    """Two steps of a Qwen3-shaped recipe (instruction, EOS, last-token pooling, bidirectional, LoRA): each
    source's anchors carry its instruction; the saved folder loads in sentence-transformers with the same query
    embeddings; the search index and the ONNX-free CLI path work on it."""
    from textcl.retrieval.search_index import SearchIndex
    from textcl.training.trainer import Trainer

    rows = [{"anchor": SENTENCES[i], "positive": SENTENCES[(i + 1) % len(SENTENCES)]} for i in range(8)]
    files = []
    for index in range(2):
        files.append(tmp_path / f"source{index}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows[index * 4 : index * 4 + 4]))
    config = load_config(None, [
        "--model_name_or_path", str(qwen3_dir), "--train_data", *map(str, files), "--output_dir", str(tmp_path / "out"),
        "--pooling", "last_token", "--normalize", "true", "--append_eos_token", "true", "--bidirectional", "true",
        "--query_instruction", INSTRUCTION, "--source_instructions", "", "Find the next sentence",
        "--lora", "true", "--lora_merge", "true", "--lora_r", "2", "--per_device_train_batch_size", "4",
        "--max_steps", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1",
    ])
    trainer = Trainer(config)
    batch = next(iter(trainer.data.loader))
    decoded = trainer.encoder.tokenizer.batch_decode(batch["anchor"]["input_ids"], skip_special_tokens=True)
    expected = {QUERY_PROMPT + row["anchor"] for row in rows[:4]}
    expected |= {"Instruct: Find the next sentence\nQuery: " + row["anchor"] for row in rows[4:]}
    assert len(decoded) == 4 and all(any(full.startswith(text) for full in expected) for text in decoded)  # truncated
    trainer.train()
    folder = tmp_path / "out"
    encoder = Encoder.load(folder, device="cpu")
    assert encoder.prompts == {"query": QUERY_PROMPT} and encoder.model.config.is_causal is False
    sentence_transformers = pytest.importorskip("sentence_transformers")
    theirs = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(theirs.encode(TEXTS, prompt_name="query"), encoder.encode(TEXTS, prompt_name="query"),
                               atol=1e-5)
    SearchIndex.build(encoder, SENTENCES).save(tmp_path / "index")  # what `textcl index` and `textcl serve` use
    index = SearchIndex.load(tmp_path / "index")
    queries = encoder.encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(index.encode(TEXTS, "query"), queries, atol=1e-5)  # the index applies the instruction
    pytest.importorskip("fastapi")
    from textcl.serving.service import EncodeJob, SearchService
    from textcl.serving.store import DurableIndex

    service = SearchService(DurableIndex.open(tmp_path / "index"), 8, 1.0)
    vectors, hits = service.run_batch([EncodeJob(TEXTS, "query"), EncodeJob(TEXTS, "query", 3)])
    np.testing.assert_allclose(vectors, queries, atol=1e-5)
    assert hits.ids.tolist() == index.search(TEXTS, k=3).ids.tolist()


@pytest.mark.parametrize("family,tokenizer", [("llama", "bert"), ("qwen3", "bpe")])
def test_onnx_export_of_a_decoder_matches_torch(tmp_path: Path, family: str, tokenizer: str) -> None:
    """The Llama + BERT-tokenizer case crashed on token_type_ids (the graph takes none); Qwen3 pads on the left
    with EOS appended and last-token pooling + normalisation inside the graph."""
    pytest.importorskip("onnxruntime")
    from textcl.model.onnx_export import export_onnx

    tok = build_tokenizer(SENTENCES) if tokenizer == "bert" else build_decoder_tokenizer()
    model = build_tiny_decoder(family, len(tok))
    prepare_decoder(model, tok)
    if tokenizer == "bpe":
        append_eos_token(tok)
        tok.padding_side = "left"
    prompts = {"query": QUERY_PROMPT}
    encoder = Encoder(model, tok, pooling="last_token", normalize=True, max_seq_length=64, prompts=prompts)
    encoder.save(tmp_path / "model")
    result = export_onnx(tmp_path / "model", optimize=False)
    assert min(result.cosines.values()) >= 0.9999
    torch_encoder = Encoder.load(tmp_path / "model", device="cpu")
    onnx_encoder = Encoder.load(tmp_path / "model", backend="onnx", device="cpu")
    for prompt_name in (None, "query"):  # the ONNX backend applies the saved instruction to queries too
        ours = torch_encoder.encode(TEXTS, prompt_name=prompt_name)
        assert (ours * onnx_encoder.encode(TEXTS, prompt_name=prompt_name)).sum(axis=1).min() >= 0.9999


def test_lora_is_chosen_above_the_size_threshold(qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import textcl.training.setup as setup
    from textcl.model.lora import is_adapter

    monkeypatch.setattr(setup, "LORA_AUTO_PARAMETERS", 10_000)  # the tiny model counts as large
    args = ModelArguments(model_name_or_path=str(qwen3_dir), pooling="last_token")
    assert is_adapter(build_encoder(args).model) and args.lora is True
    explicit = ModelArguments(model_name_or_path=str(qwen3_dir), pooling="last_token", lora=False)
    assert not is_adapter(build_encoder(explicit).model)


def test_gradient_checkpointing_and_bf16_on_a_lora_decoder(tmp_path: Path) -> None:
    """Checkpointing (attention dropout on) gives plain backprop's LoRA gradients; bf16 encodes close to fp32."""
    from textcl.config import TrainingArguments
    from textcl.losses import InfoNCELoss
    from textcl.training.setup import apply_training_options

    folder = save_tiny_decoder_encoder(tmp_path / "model", "llama", dropout=0.1)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        encoder = build_encoder(ModelArguments(model_name_or_path=str(folder), lora=True, lora_r=2)).train()
        apply_training_options(encoder, TrainingArguments(gradient_checkpointing=checkpointing))
        torch.manual_seed(1)
        anchors, positives = encoder(**encoder.tokenize(TEXTS)), encoder(**encoder.tokenize(SENTENCES[:3]))
        InfoNCELoss(temperature=0.05)(anchors, positives).backward()
        return {name: p.grad for name, p in encoder.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28 and all("lora_" in name for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)
    encoder = Encoder.load(folder, device="cpu")
    cosines = (encoder.encode(TEXTS) * encoder.encode(TEXTS, precision="bf16")).sum(axis=1)
    assert cosines.min() > 0.99
