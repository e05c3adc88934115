"""Decoder LLMs (Qwen2/3, Llama, Mistral, Gemma 1-3, Phi-3, ...) as embedding models, with no code per family.

What a decoder needs beyond a BERT-like encoder, each read from the model and tokenizer rather than from a
list of families:
- a padding token (most decoder tokenizers have none: the EOS token pads, as sentence-transformers does);
  pooling reads the attention mask, never the token ids, so a pad id inside a text stays a real token;
- no key/value cache while embedding (`use_cache` off: nothing is generated);
- `append_eos_token`: the tokenizer appends its EOS token to every text, as Qwen3-Embedding's and
  e5-mistral's recipes do for last-token pooling. The rule lives in the tokenizer's post-processor
  (tokenizer.json), so the saved folder, sentence-transformers and a bare `tokenizers` load all apply it;
- `bidirectional`: transformers 5 builds a decoder's attention mask with `create_causal_mask`, which gives a
  bidirectional mask when `config.is_causal` is False (LLM2Vec, NV-Embed, GritLM). The flag is saved in
  config.json, so every loader of the folder (textcl, sentence-transformers, transformers) restores it. A
  family whose code ignores the flag is found by probing: its first token must then see the second.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from textcl.errors import TextclError


def is_decoder(model: nn.Module) -> bool:
    """A causal language model's backbone (has a causal-LM head class and no masked-LM one: BERT has both)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def prepare_decoder(model: nn.Module, tokenizer: Any) -> None:
    """Give a decoder's tokenizer a padding token (its EOS, else its UNK) and turn its key/value cache off."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise TextclError("this decoder's tokenizer has no pad, eos or unk token to pad batches with; "
                              "set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = fallback
    model.config.use_cache = False


def appends_eos(tokenizer: Any) -> bool:
    """Whether tokenizing a text ends with the tokenizer's EOS token."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a")["input_ids"][-1] == eos


def append_eos_token(tokenizer: Any) -> None:
    """Make `tokenizer` end every text with its EOS token (in place; a no-op when it already does).

    Uses the fast tokenizer's own `add_eos_token` switch, which rewrites the post-processor in tokenizer.json
    (truncation then keeps room for the EOS); the result is checked on a sample text.
    """
    if appends_eos(tokenizer):
        return
    if tokenizer.eos_token_id is None:
        raise TextclError("append_eos_token: this tokenizer has no eos_token; set one in its tokenizer_config.json "
                          "or set append_eos_token: false")
    before = tokenizer("a b")["input_ids"]
    try:
        tokenizer.add_eos_token = True
    except (AttributeError, ValueError) as error:
        raise TextclError(f"append_eos_token: {type(tokenizer).__name__} cannot append its EOS token ({error}); "
                          "use a fast (tokenizers) tokenizer or set append_eos_token: false") from None
    if tokenizer("a b")["input_ids"] != [*before, tokenizer.eos_token_id]:
        raise TextclError(f"append_eos_token: {type(tokenizer).__name__} did not append only its EOS token; "
                          "set append_eos_token: false and add the EOS to the texts")


def _first_token_sees_second(model: nn.Module) -> bool:
    """Probe: does the first position's output change when only the second token changes? `[1, 2]` ids."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1 % vocab, 2 % vocab], [1 % vocab, 3 % vocab]], device=model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()
    model.train(was_training)
    return not torch.allclose(hidden[0, 0], hidden[1, 0])


def is_bidirectional(model: nn.Module) -> bool:
    """A decoder whose causal mask was removed (`config.is_causal` False)."""
    return is_decoder(model) and getattr(model.config, "is_causal", True) is False


def make_bidirectional(model: nn.Module) -> None:
    """Remove a decoder's causal mask (in place; saved with the config). One-line error for an encoder (already
    bidirectional) and for a family whose transformers code ignores `config.is_causal`."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not is_decoder(model):
        raise TextclError(f"bidirectional: {model_type} is not a decoder (its attention is already bidirectional); "
                          "set bidirectional: false")
    model.config.is_causal = False
    if not _first_token_sees_second(model):
        model.config.is_causal = True
        raise TextclError(f"bidirectional: transformers' {model_type} code ignores config.is_causal, so its "
                          "causal mask cannot be removed; set bidirectional: false")


def decoder_lora_targets(model: nn.Module) -> list[str]:
    """The names of every linear layer of a decoder's blocks (attention and MLP projections: q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj for Llama-like families; qkv_proj, gate_up_proj for Phi-3),
    read from the model, so a new family needs no entry. LoRA on all of them is what LLM embedding recipes
    train (e5-mistral, gte-Qwen2, Qwen3-Embedding)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names)
