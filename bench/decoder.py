"""A Qwen3-0.6B-shaped decoder embedder (random init, no download): LoRA training and encoding tokens/s, peak memory.

    python bench/decoder.py                                  # on a GPU: Qwen3-Embedding-0.6B's shape, batch 32 x 512
    python bench/decoder.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv_heads 2 --head_dim 16 \
        --vocab 1000 --batch 4 --seq 16 --steps 2               # a CPU smoke test (seconds)

Training: one textcl step as `recipes/llm-lora.yaml` runs it: LoRA r 16 on every projection (the decoder
defaults, `textcl.model.lora`), last-token pooling, normalized, InfoNCE over `--batch` queries and `--batch`
documents of `--seq` random tokens each (no padding), GradCache chunks of `--chunk` rows, gradient
checkpointing, bf16 autocast where native, fp32 weights, AdamW. Encoding: `--batch` x `--seq` token forwards
under bf16 autocast (inference mode). Tokens/s counts every query and document token; peak memory is
torch.cuda.max_memory_allocated (GPU) or the process's peak RSS (CPU). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import transformers

from textcl import Encoder
from textcl.config import TrainingArguments
from textcl.losses import InfoNCELoss
from textcl.losses.gradcache import gradcache_backward
from textcl.model.decoder import prepare_decoder
from textcl.model.precision import autocast
from textcl.training.setup import apply_training_options


class RandomTokenizer:
    """Stands in for the tokenizer: the bench feeds token ids directly."""

    pad_token, eos_token, pad_token_id, eos_token_id = "<pad>", "<eos>", 0, 0


def build(args: argparse.Namespace, device: torch.device) -> Encoder:
    config = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(args.seq, 512), tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    prepare_decoder(model, RandomTokenizer())
    return Encoder(model, RandomTokenizer(), pooling="last_token", normalize=True).to(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    encoder = build(args, device)
    encoder.add_lora("random-qwen3", r=16, alpha=32, dropout=0.05)
    apply_training_options(encoder, TrainingArguments(gradient_checkpointing=True))
    encoder.train()
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loss = InfoNCELoss(temperature=0.02, symmetric=True)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (allocations, kernels)
        groups = [batch(args, device), batch(args, device)]
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
            gradcache_backward(encoder, groups, lambda e: loss(e[0], e[1]), args.chunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    return {"measure": "train_lora", "tokens_per_s": round(2 * args.batch * args.seq / seconds, 1),
            "step_s": round(seconds, 4), "trainable_parameters": sum(p.numel() for p in trainable),
            "peak_memory_gib": round(peak_memory_gib(device), 3)}


def encode(args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    encoder = build(args, device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(args.steps + 1):
            inputs = batch(args, device)
            synchronize(device)
            start = time.perf_counter()
            encoder.embed(**inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    return {"measure": "encode", "tokens_per_s": round(args.batch * args.seq / seconds, 1),
            "forward_s": round(seconds, 4), "peak_memory_gib": round(peak_memory_gib(device), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = {"layers": 28, "hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8, "head_dim": 128,
             "vocab": 151669}  # Qwen3-Embedding-0.6B
    for name, value in shape.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=16, help="GradCache chunk (rows per forward)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "precision": precision,
            "shape": {key: getattr(args, key) for key in shape}, "batch": args.batch, "seq": args.seq}
    print(json.dumps(info))
    print(json.dumps(train(args, device, precision)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps(encode(args, device, precision)))


if __name__ == "__main__":
    main()
