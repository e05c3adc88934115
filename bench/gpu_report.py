"""The JSON report of bench/gpu.sh: what every step must write, merging a step's figures in, and the field check.

Every step merges its section into one file ($OUT/gpu.json) as soon as it has a figure, so a step that is
killed at its time limit still leaves what it measured. Standard library only: gpu.sh calls it between steps.

    python bench/gpu_report.py step REPORT NAME RC SECONDS LIMIT     # gpu.sh: a step's exit status and time
    python bench/gpu_report.py junit REPORT NAME FILE.xml            # pytest's results as a section
    python bench/gpu_report.py check REPORT                          # exit 1 naming every missing field
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

TRAIN_SIDE = ["anchors_per_second", "anchors_per_second_whole_run", "peak_allocated_gib", "peak_reserved_gib"]
ENCODE_KEYS = [f"{model}.{data}.{precision}" for model in ("minilm", "bert-base") for data in ("short", "docs")
               for precision in ("bf16", "fp32")]
# section -> the fields it must hold once its step ran (a skipped step holds "status" and "reason" instead).
FIELDS: dict[str, list[str]] = {
    "install": ["wheels", "wheels_mib", "unresolved", "pins_the_image_does_not_meet"],
    "env": ["device", "python", "versions", "onnxruntime_providers", "requirement_problems", "dry_run"],
    "models": ["parameters", "real_shape_parameters", "attn_implementation", "padding"],
    **{f"train_{mode}": ["settings", "padding_fraction", "textcl", "peer", "ratio"]
       for mode in ("fp32_b64", "bf16_b512", "gradcache_b4096", "hardneg")},
    "encode": ENCODE_KEYS,
    "proofs": ["passed", "failed", "skipped", "tests"],  # a dry run: "collected" (the test ids) instead
    "recipe": ["mine_seconds", "train_seconds", "losses", "ndcg_at_10", "settings"],
    "onnx": ["status"],
    "decoder": ["status"],
    "decoder_lora": ["status"],
    "not_run": ["multi_gpu", "deepspeed"],
    "steps": [],
}
SIDE_FIELDS = {"textcl": TRAIN_SIDE, "peer": TRAIN_SIDE}
ENCODE_FIELDS = ["textcl", "peer", "ratio", "texts"]


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def record(path: Path, section: str, values: dict[str, Any]) -> None:
    """Merge `values` into `section` of the report at `path` (written whole each time: a kill leaves it valid)."""
    report = read(path)
    report.setdefault(section, {}).update(values)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)


def missing(report: dict[str, Any]) -> list[str]:
    """The dotted names of every field the report lacks; a section marked skipped needs only its reason."""
    absent = []
    for section, keys in FIELDS.items():
        values = report.get(section)
        if values is None:
            absent.append(section)
            continue
        if values.get("status") == "skipped":
            absent += [f"{section}.reason"] * ("reason" not in values)
            continue
        absent += [f"{section}.{key}" for key in keys if values.get(key) is None]
        for key, fields in ({**SIDE_FIELDS, **dict.fromkeys(ENCODE_KEYS, ENCODE_FIELDS)}).items():
            if isinstance(values.get(key), dict):
                absent += [f"{section}.{key}.{field}" for field in fields if values[key].get(field) is None]
    return absent


def junit_results(path: Path) -> dict[str, Any]:
    """pytest's --junitxml file as {passed, failed, skipped, tests: {id: outcome or message}}."""
    tests, counts = {}, {"passed": 0, "failed": 0, "skipped": 0}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        kind = "passed" if outcome is None else "skipped" if outcome.tag == "skipped" else "failed"
        counts[kind] += 1
        tests[name] = kind if outcome is None else f"{kind}: {(outcome.get('message') or '')[:300]}"
    return {**counts, "tests": tests}


def not_run(report: dict[str, Any]) -> dict[str, str]:
    """What this run could not prove, and why."""
    gpus = report.get("env", {}).get("gpu_count", 0)
    deepspeed = report.get("env", {}).get("versions", {}).get("deepspeed")
    return {
        "multi_gpu": "ran" if gpus >= 2 else
        f"not run: {gpus} GPU(s). tests/test_multiprocess_gpu.py with 2+ processes (DDP, FSDP, DeepSpeed, the "
        "global batch split over GPUs) needs 2+ GPUs; on one GPU it ran DDP and FSDP with one process",
        "deepspeed": "installed" if deepspeed else "not run: deepspeed is not in the image (its configs' tests skip)",
    }


def main(argv: list[str]) -> int:
    command, path = argv[0], Path(argv[1])
    if command == "step":
        name, rc, seconds, limit = argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        outcome = "ok" if rc == 0 else "timed out" if rc in (124, 137) else "skipped" if rc == 75 else "failed"
        record(path, "steps", {name: {"rc": rc, "seconds": seconds, "limit_s": limit, "outcome": outcome}})
    elif command == "skip":
        record(path, argv[2], {"status": "skipped", "reason": argv[3]})
    elif command == "collected":  # pytest --collect-only -q output: one test id a line, then a summary
        ids = [line for line in Path(argv[3]).read_text().splitlines() if "::" in line]
        record(path, argv[2], {"status": "skipped", "reason": f"dry run: {len(ids)} tests collected, none run",
                               "collected": ids})
    elif command == "not-run":
        record(path, "not_run", not_run(read(path)))
    elif command == "junit":
        file = Path(argv[3])
        record(path, argv[2], junit_results(file) if file.exists() else {"status": "failed", "reason": "no junit"})
    elif command == "check":
        absent = missing(read(path))
        if absent:
            print(f"gpu report {path} lacks: {', '.join(absent)}", file=sys.stderr)
            return 1
        print(f"gpu report {path}: every field present")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
