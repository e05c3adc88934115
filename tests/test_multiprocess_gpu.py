"""The shipped accelerate configs on GPUs (NCCL): skipped without CUDA; DeepSpeed also needs `pip install deepspeed`.

Each runs `accelerate launch --config_file recipes/accelerate/<config>` with one process per GPU on the ragged
data of test_multiprocess (forward_chunk_size 4, dropout off), and compares its losses with one CPU process
with the same global batch; the saved folder must load in sentence-transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from gloo_processes import launch
from test_multiprocess import data, overrides, records  # noqa: F401 (data is a fixture)

from textcl.cli import main

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(GPUS == 0, reason="needs CUDA GPUs")]


@pytest.mark.parametrize("config", CONFIGS)
def test_accelerate_config_on_gpus_equals_one_process(config: str, tiny_model_dir: Path, data: dict,  # noqa: F811
                                                       tmp_path: Path) -> None:
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    case = {"forward_chunk_size": 4, "max_steps": 3}
    if 16 % GPUS:
        pytest.skip(f"a global batch of 16 rows does not split over {GPUS} GPUs")
    batch = 16 // GPUS
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" /
               config), "--num_processes", str(GPUS), "--tee", "3", "--log_dir", str(tmp_path / "logs"), "-m", "textcl",
               "train", *overrides(tiny_model_dir, data, tmp_path / "gpus", case, batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = launch(command, timeout=900, env=env, log_dir=tmp_path / "logs")
    assert result.returncode == 0, result.stdout[-3000:]
    assert main(["train", *overrides(tiny_model_dir, data, tmp_path / "cpu", case, 16), "--use_cpu", "true"]) == 0
    gpu_losses = [r["loss"] for r in records(tmp_path / "gpus")]
    cpu_losses = [r["loss"] for r in records(tmp_path / "cpu")]
    assert gpu_losses == pytest.approx(cpu_losses, abs=1e-3)  # GPU and CPU kernels round differently (TF32 off)
    st = pytest.importorskip("sentence_transformers")
    assert st.SentenceTransformer(str(tmp_path / "gpus"), device="cpu").encode(["a test"]).shape[0] == 1
    assert json.loads((tmp_path / "gpus" / "textcl.json").read_text())["config"]["max_steps"] == 3
