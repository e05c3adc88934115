"""Tiny random-init decoder LLMs of each family transformers 5 builds offline, with a byte-level BPE tokenizer
trained in-process the way decoder tokenizers come (no BOS, no EOS appended, `<|endoftext|>` as EOS and pad)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from conftest import SENTENCES
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
# model_type -> config class; each is built at hidden 32, 2 layers (Gemma's head_dim is given: its default is 256)
FAMILIES = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
}


def build_decoder_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 300) trained on the test sentences, padding on the right."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(SENTENCES * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, model_max_length=64)


def build_tiny_decoder(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A random-init `family` backbone (AutoModel) of hidden 32, 2 layers, 4 heads (2 key/value heads)."""
    torch.manual_seed(seed)
    config = FAMILIES[family](
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, eos_token_id=0,
        bos_token_id=0, attention_dropout=0.0,
    )
    return AutoModel.from_config(config).eval()


def save_tiny_decoder(path: Path, family: str, seed: int = 0) -> Path:
    """A plain transformers folder (config, weights, tokenizer) of a tiny `family` decoder."""
    tokenizer = build_decoder_tokenizer()
    build_tiny_decoder(family, len(tokenizer), seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_decoder_encoder(path: Path, family: str = "qwen3", seed: int = 0, dropout: float = 0.0) -> Path:
    """A sentence-transformers folder of a tiny `family` decoder as decoder embedders ship: the tokenizer pads on
    the left and appends its EOS, last-token pooling, normalized; `dropout` on the attention probabilities."""
    from textcl import Encoder
    from textcl.model.decoder import append_eos_token, prepare_decoder

    tokenizer = build_decoder_tokenizer()
    tokenizer.padding_side = "left"
    model = build_tiny_decoder(family, len(tokenizer), seed)
    model.config.attention_dropout = dropout
    prepare_decoder(model, tokenizer)
    append_eos_token(tokenizer)
    Encoder(model, tokenizer, pooling="last_token", normalize=True, max_seq_length=64).save(path)
    return path
