"""Export an Encoder to ONNX as one graph from token ids to the final embedding, optionally with int8 weights.

Layout, following sentence-transformers' convention so that `SentenceTransformer(folder, backend="onnx")` loads
the same folder:
    onnx/model.onnx        fp32. Inputs `input_ids`, `attention_mask` (and `token_type_ids` where the model takes
                           them), int64 `[batch, seq]`. Outputs `last_hidden_state` `[batch, seq, hidden]` (what
                           sentence-transformers pools itself) and `sentence_embedding` `[batch, dim]`: pooling,
                           Dense and normalization are inside the graph, so any onnxruntime can embed text.
    onnx/model_qint8.onnx  the same graph with int8 weights (onnxruntime's dynamic quantization).
Every file's metadata records the pooling, normalization, dimension and a sha256 of the weights it came from
(`weights_digest`); `textcl.model.onnx_backend` refuses a file whose weights changed since.

Why torch.onnx and not optimum: optimum-onnx (what sentence-transformers exports with) requires
transformers < 4.58, which textcl's transformers >= 5 excludes. Why torch.onnx's TorchScript exporter
(`dynamo=False`) rather than its dynamo exporter: the TorchScript graph of eager attention is the pattern
onnxruntime's transformer optimizer fuses into Attention/SkipLayerNormalization/BiasGelu kernels; the dynamo
graph was not fused and ran slower on CPU (bench/RESULTS.md, "ONNX export").
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from textcl.errors import TextclError
from textcl.io.targets import check_model_target, refusal, write_model_folder
from textcl.model.encoder import Encoder
from textcl.model.location import resolve_model_dir
from textcl.model.lora import is_adapter
from textcl.model.onnx_files import INT8_FILE, MODEL_FILE, ONNX_DIR, weights_digest, write_file_digest
from textcl.version import __version__

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
# The TorchScript exporter writes opsets 14 to 20: 14 is the oldest with every op a transformer encoder needs
# (Trilu, the newer Reshape); 20 is the newest the exporter knows.
OPSETS = range(14, 21)
DEFAULT_OPSET = 17  # the first with LayerNormalization as one op
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
# transformers model types onnxruntime's "bert" fusions apply to; other architectures export unfused.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "mpnet", "albert", "ernie"}
# fp32 graphs must give the torch embedding to this cosine (the test of every export).
MIN_COSINE = 0.99999
VERIFY_TEXTS = [
    "A man is playing a guitar.",
    "ok",
    "Two dogs are running through a field of fresh snow while the sun sets behind the hills.",
    "The committee approved next year's budget after a long debate about schools, roads, hospitals and taxes.",
]


@dataclass
class Export:
    """What `export_onnx` wrote: the model folder, each ONNX file, and each file's lowest cosine to torch."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    cosines: dict[str, float] = field(default_factory=dict)


class EmbeddingGraph(nn.Module):
    """The traced module: token ids `[batch, seq]` -> (token embeddings `[batch, seq, hidden]`, embeddings
    `[batch, dim]`), the second through `Encoder.head` (pooling, Dense, normalize), exactly as torch encodes."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return hidden, self.encoder.head(hidden, attention_mask)


def uses_token_type_ids(encoder: Encoder) -> bool:
    """Whether the tokenizer produces token_type_ids (BERT does, RoBERTa does not) and the model's forward names
    them (a decoder such as Llama takes none, even under a BERT tokenizer), so the graph takes them."""
    model = encoder.model.get_base_model() if is_adapter(encoder.model) else encoder.model
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    return takes and "token_type_ids" in getattr(encoder.tokenizer, "model_input_names", ())


def export_onnx(
    model_name_or_path: str | Path,
    out: str | Path | None = None,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    overwrite: bool = False,
) -> Export:
    """Write `onnx/model.onnx` (and `onnx/model_qint8.onnx` for `quantize="int8"`) into the model folder, or
    into `out`, which then becomes a full copy of the model folder. Returns what was written.

    A LoRA adapter folder is merged into its base model first, and that merged model is written to `out`.
    `optimize` fuses attention and layer norms with onnxruntime's transformer optimizer (faster on CPU; the
    graph then holds onnxruntime's contrib ops); False keeps standard ONNX ops only, for other runtimes.
    Every fp32 graph is checked against the torch encoder (cosine >= 0.99999 on sample texts). An existing
    export in the folder, or an existing model in `out`, is replaced only with `overwrite`; `out` is written
    in a temporary sibling and swapped in whole.
    """
    if opset not in OPSETS:
        raise TextclError(f"opset {opset} is not supported; use {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise TextclError(f"unknown quantization {quantize!r}; use {', '.join(QUANTIZATIONS)}")
    local = Path(model_name_or_path).expanduser().exists()
    if not local and out is None:
        raise TextclError(f"{model_name_or_path} is not a local folder; pass --out DIR to write the exported model there")
    same = out is not None and local and Path(out).resolve() == Path(model_name_or_path).expanduser().resolve()
    if out is not None and not same:
        check_model_target(out, overwrite)  # before the slow part
    encoder = Encoder.load(model_name_or_path, device="cpu")
    if not encoder.include_prompt:
        raise TextclError("this model leaves its prompts' tokens out of pooling (include_prompt: false), which a "
                          "graph fed only token ids cannot do; encode it with the torch backend")
    root = resolve_model_dir(model_name_or_path)
    adapter = is_adapter(encoder.model)
    if adapter:
        if out is None or same:
            raise TextclError(
                f"{root} is a LoRA adapter: pass --out DIR to write the merged model and its ONNX export there "
                f"(or run `textcl merge {root} MERGED` and export MERGED)"
            )
        encoder = encoder.merged()
    if out is None or same:
        if (root / ONNX_DIR / MODEL_FILE).exists() and not overwrite:
            raise refusal(root / ONNX_DIR, "an ONNX export")
        return write_graphs(encoder, root, quantize, opset, optimize)
    result = Export(Path(out))

    def write(folder: Path) -> None:
        if adapter:
            encoder.save(folder)
        else:
            shutil.copytree(root, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ONNX_DIR, ".git", ".*"))
        written = write_graphs(encoder, folder, quantize, opset, optimize)
        result.files = [Path(out) / path.relative_to(folder) for path in written.files]
        result.cosines = written.cosines

    write_model_folder(out, write)
    return result


def write_graphs(encoder: Encoder, root: Path, quantize: str | None, opset: int, optimize: bool) -> Export:
    """Trace, check and write the graphs of `encoder` into `root`/onnx/, each with its metadata and its hash."""
    encoder.eval()
    result = Export(root)
    (root / ONNX_DIR).mkdir(exist_ok=True)
    metadata = {
        "textcl_version": __version__,
        "textcl_weights_sha256": weights_digest(root) or "",
        "textcl_pooling": encoder.pooling,
        "textcl_normalize": json.dumps(encoder.normalize),
        "textcl_dim": str(encoder.dim),
        "textcl_opset": str(opset),
    }
    with tempfile.TemporaryDirectory(dir=root / ONNX_DIR) as work:
        fp32 = Path(work) / MODEL_FILE
        trace(encoder, fp32, opset)
        if optimize:
            fuse(fp32, encoder.model.config)
        result.cosines[MODEL_FILE] = check_graph(encoder, fp32)
        write_metadata(fp32, metadata | {"textcl_quantization": "none"})
        files = [fp32]
        if quantize == "int8":
            int8 = Path(work) / INT8_FILE
            quantize_int8(fp32, int8)
            write_metadata(int8, metadata | {"textcl_quantization": "int8"})
            result.cosines[INT8_FILE] = min_cosine(encoder, int8)
            files.append(int8)
        for path in files:
            write_file_digest(path, root / ONNX_DIR)
            os.replace(path, root / ONNX_DIR / path.name)
            result.files.append(root / ONNX_DIR / path.name)
    return result


def sample_batch(encoder: Encoder, texts: list[str]) -> dict[str, torch.Tensor]:
    """A padded batch of `texts` with the inputs the graph takes."""
    batch = encoder.tokenize(texts)
    names = INPUT_NAMES if uses_token_type_ids(encoder) else INPUT_NAMES[:2]
    return {name: batch[name] for name in names if name in batch}


def trace(encoder: Encoder, path: Path, opset: int) -> None:
    """torch.onnx (TorchScript exporter) of `EmbeddingGraph(encoder)` with dynamic batch and sequence axes.

    The model runs eager attention while it is traced: that graph is the one onnxruntime fuses."""
    batch = sample_batch(encoder, VERIFY_TEXTS)
    graph = EmbeddingGraph(encoder).eval()
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in batch}
    dynamic_axes |= {"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}
    model = encoder.model
    attention = getattr(model.config, "_attn_implementation", None)
    try:
        if attention not in (None, "eager"):
            model.set_attn_implementation("eager")
        # the exporter prints the whole graph to stdout when an op has no ONNX form; the one-line error says it
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, tuple(batch.values()), str(path), input_names=list(batch), output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    except Exception as error:  # noqa: BLE001 -- the exporter raises many types (RuntimeError, SymbolicValueError)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        architecture = getattr(model.config, "model_type", type(model).__name__)
        raise TextclError(f"cannot export the {architecture} architecture to ONNX opset {opset}: {reason}") from None
    finally:
        if attention not in (None, "eager"):
            model.set_attn_implementation(attention)


def fuse(path: Path, config: Any) -> None:
    """Fuse attention, layer norms and GELU in place with onnxruntime's transformer optimizer (BERT-like models;
    others stay as exported). Offline optimization level 0 keeps the file portable across CPUs: onnxruntime
    applies its hardware-specific rewrites when it loads the file."""
    model_type = getattr(config, "model_type", "")
    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    if model_type not in BERT_LIKE or not heads or not hidden:
        logger.info("no onnxruntime fusions for model type %r; the graph stays unfused", model_type)
        return
    from onnxruntime.transformers.optimizer import optimize_model  # onnxruntime: only when exporting or running

    quiet = logging.getLogger("onnxruntime.transformers")
    previous = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs each fusion pass and a shape-inference notice at WARNING
    try:
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    finally:
        quiet.setLevel(previous)
    optimized.save_model_to_file(str(path))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization (onnxruntime): int8 weights with one scale per output channel, activations
    quantized per batch at run time. Per-channel scales kept MiniLM's int8 embeddings at cosine 0.993 to fp32
    on STS-B sentences, against 0.968 with one scale per tensor, at the same speed."""
    import onnx  # onnx/onnxruntime: only when exporting or running
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
        # the fused Attention/SkipLayerNormalization ops are onnxruntime contrib ops that ONNX shape inference
        # does not know; their outputs are float32
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set the model's metadata_props (read back with `InferenceSession.get_modelmeta().custom_metadata_map`)."""
    import onnx  # see quantize_int8

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def min_cosine(encoder: Encoder, path: Path) -> float:
    """The lowest cosine between the graph's and the torch encoder's embeddings of the sample texts, padded
    together in one batch and each alone (the graph must not depend on the batch shape it was traced with)."""
    import onnxruntime  # see quantize_int8

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {node.name for node in session.get_inputs()}  # the exporter drops inputs the graph never reads
    cosines = []
    for texts in [VERIFY_TEXTS, *([text] for text in VERIFY_TEXTS)]:
        batch = sample_batch(encoder, texts)
        with torch.inference_mode():
            expected = encoder.embed(**batch).float().numpy()
        feeds = {name: tensor.numpy() for name, tensor in batch.items() if name in inputs}
        got = session.run(["sentence_embedding"], feeds)[0]
        norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
        cosines.extend((expected * got).sum(axis=1) / np.maximum(norms, 1e-12))
    return float(min(cosines))


def check_graph(encoder: Encoder, path: Path) -> float:
    """`min_cosine` of an fp32 graph, which must reach MIN_COSINE; otherwise the export is refused in one line."""
    cosine = min_cosine(encoder, path)
    if cosine < MIN_COSINE:
        architecture = getattr(encoder.model.config, "model_type", type(encoder.model).__name__)
        raise TextclError(
            f"the ONNX graph of this {architecture} model does not reproduce it (cosine {cosine:.6f} < {MIN_COSINE} "
            "on sample texts); this architecture is not supported by textcl export (try --no_optimize)"
        )
    return cosine
