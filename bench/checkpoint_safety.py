"""What the safety of issue 18 costs: a checkpoint of all-MiniLM-L6-v2 + AdamW written and read back the old way
(accelerate's save_state/load_state with textcl's state registered as pickles) and the new way (textcl's
`save_checkpoint`: safetensors + JSON, manifest, fsync; `load_checkpoint`: verification, weights-only pre-check),
and the per-step guard (gradient norm without clipping, finiteness checks), in one run.

    python bench/checkpoint_safety.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from common import best_time, minilm_path
from transformers import get_scheduler

from textcl.model.encoder import Encoder
from textcl.training.checkpoint import TrainingPosition, load_checkpoint, save_checkpoint, verify_checkpoint
from textcl.training.guards import gradient_norm, nonfinite_tensors, step_is_finite


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = Encoder.load(minilm_path(), device="cpu")
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(encoder, optimizer)
    batch = encoder.tokenize(["a sentence to embed"] * 8)
    model(**batch).pow(2).sum().backward()
    optimizer.step()  # AdamW state exists
    scheduler = get_scheduler("linear", optimizer, 0, 100)
    objects = {"scheduler": scheduler, "position": TrainingPosition(step=7)}
    root = Path(tempfile.mkdtemp(prefix="textcl-bench-"))
    try:
        old = Accelerator(cpu=True)  # a second one, so the registered objects stay out of the new checkpoints
        old.prepare(model, optimizer)
        for stateful in objects.values():
            old.register_for_checkpointing(stateful)
        old_save = best_time(lambda: old.save_state(str(root / "old")), args.repeats)
        old_load = best_time(lambda: old.load_state(str(root / "old")), args.repeats)
        new_save = best_time(lambda: save_checkpoint(accelerator, root, 7, 1, objects), args.repeats)
        verify = best_time(lambda: verify_checkpoint(root / "checkpoint-7"), args.repeats)
        new_load = best_time(lambda: load_checkpoint(accelerator, root / "checkpoint-7", objects), args.repeats)
        size = sum(p.stat().st_size for p in (root / "checkpoint-7").rglob("*") if p.is_file())
        norm = best_time(lambda: step_is_finite(torch.tensor(1.0), gradient_norm(model.parameters())), 20)
        scan = best_time(lambda: nonfinite_tensors(model), 20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; checkpoint {size / 1e6:.1f} MB")
    print(f"save: old {old_save:.3f} s, new {new_save:.3f} s ({new_save / old_save:.2f}x)")
    print(f"load: old {old_load:.3f} s, new {new_load:.3f} s incl. verification {verify:.3f} s "
          f"({new_load / old_load:.2f}x)")
    print(f"per step without clipping: gradient norm + finiteness {norm * 1e3:.1f} ms; weight scan before a "
          f"save {scan * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
