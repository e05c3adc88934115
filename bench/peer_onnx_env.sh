#!/usr/bin/env bash
# The peer's ONNX backend for bench/onnx_deploy.py, in a folder of its own ($PEER_ONNX, default /tmp/peer-onnx).
# sentence-transformers' `onnx` extra is optimum-onnx, whose only release (0.1.0) requires transformers < 4.58,
# while sentence-transformers 6 requires transformers >= 5: the extra cannot be installed next to the peer.
# So the bench runs sentence-transformers 5.1.2 (same ONNX code path) with transformers 4.57 from this folder,
# placed before the main environment on PYTHONPATH; torch, onnx and onnxruntime come from the main environment
# (--no-deps: pip never touches torch).
set -euo pipefail
target="${PEER_ONNX:-/tmp/peer-onnx}"
pip install --no-deps --target "$target" \
    "sentence-transformers==5.1.2" "transformers==4.57.6" "tokenizers==0.22.2" "huggingface_hub==0.36.2" \
    "optimum==2.1.0" "optimum-onnx==0.1.0" "datasets==4.4.1" httpx httpcore anyio h11 sniffio
