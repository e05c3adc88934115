#!/usr/bin/env bash
# infinity (infinity-emb on PyPI), the embedding server bench/serve_compare.py measures textcl against, in a venv
# of its own ($INFINITY_VENV, default /tmp/infinity-venv): its `server,torch` extras pin sentence-transformers < 4,
# numpy < 2 and an older uvicorn, which cannot live next to textcl. The bench finds `infinity_emb` in its bin/.
# The ONNX engine (optimum) is tried after the main install; if it does not resolve, the bench skips that row.
set -euo pipefail
venv="${INFINITY_VENV:-/tmp/infinity-venv}"
python -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "torch==2.13.0" "infinity-emb[server,torch]==0.0.78"
"$venv/bin/pip" install --quiet "infinity-emb[server,torch,optimum]==0.0.78" \
    || echo "infinity's optimum (ONNX) extra did not install: the bench reports infinity torch only" >&2
"$venv/bin/infinity_emb" --help > /dev/null
echo "infinity venv ready: $venv"
