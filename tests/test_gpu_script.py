"""bench/gpu.sh --dry-run, so that the GPU check can only fail on GPU matters when a GPU is lent for a few minutes.

The dry run downloads the carried wheels with bench/gpu_wheels.sh when .gpu-wheels/ lacks them (PyPI, which CI uses
anyway to install textcl: more robust than committing 19 MiB of wheels, and it checks that the pinned
versions still download for the image's Python 3.12 / manylinux x86-64), installs them and textcl offline
into a clean folder with the image's tags, resolves them against the image's package list, runs every step
on the CPU with tiny models and collects the GPU tests; the report must then hold every field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_report import missing
from gpu_requirements import image_packages, resolve


def test_the_dry_run_installs_offline_runs_every_step_and_reports_every_field(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TEXTCL_GPU_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "TEXTCL_GPU_BUDGET": "900"}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], env=env, cwd=tmp_path, check=False,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert missing(report) == [], result.stdout[-3000:]
    assert report["install"]["unresolved"] == []
    assert sorted(report["install"]["wheels"]) == sorted(p.name for p in (ROOT / ".gpu-wheels").glob("*.whl"))
    assert {name: step["outcome"] for name, step in report["steps"].items()} == dict.fromkeys(report["steps"], "ok")
    assert report["models"]["real_shape_parameters"]["minilm"] == 22_713_216  # all-MiniLM-L6-v2's count
    assert report["models"]["real_shape_parameters"]["bert-base"] == 109_482_240
    for mode in ("fp32_b64", "bf16_b512", "gradcache_b4096", "hardneg"):
        assert report[f"train_{mode}"]["textcl"]["anchors_per_second"] > 0
        assert report[f"train_{mode}"]["peer"]["anchors_per_second"] > 0
    collected = "\n".join(report["proofs"]["collected"])
    for test in ("test_accelerate_config_on_gpus_equals_one_process[fsdp.yaml]",
                 "test_gradcache_training_equals_whole_batch_training_on_cuda",
                 "test_bf16_training_keeps_the_fp32_losses_on_cuda",
                 "test_sigkilled_run_resumes_to_the_same_parameters"):
        assert test in collected
    assert len(report["recipe"]["losses"]) == report["recipe"]["settings"]["max_steps"]
    assert report["decoder"]["status"] == "ok" and report["decoder"]["train_bf16_b64.textcl"]["anchors_per_second"] > 0
    assert (tmp_path / "out" / "gpu.log").read_text().count("===") >= 2 * len(report["steps"])


@pytest.mark.parametrize(("requirement", "outcome"), [
    ("pyarrow>=24.0.0", "ok"),  # in the image, version not seen
    ("huggingface-hub<3.0,>=1.31.0", "ok"),  # 1.33.0 there
    ("torch>=2.13", "pin"),  # 2.11.0 there: installed with --no-deps
    ("pytrec-eval-terrier>=0.5", "missing"),  # neither in the image nor carried: an import would fail there
    ("dill<0.4.2,>=0.3.0", "ok"),  # carried
])
def test_requirements_resolve_against_the_image_and_the_carried_wheels(requirement: str, outcome: str) -> None:
    assert resolve(requirement, {"dill": "0.4.1"}, image_packages())[0] == outcome
