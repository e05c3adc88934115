"""Checkpoints and model folders that survive kills, full disks and tampering, and never run code when loaded.

A checkpoint folder holds what `accelerator.save_state` writes for the model (`model.safetensors`, or FSDP's
sharded files) and the optimizer (`optimizer.bin`, a torch file read back only through torch's weights-only
unpickler, which rebuilds tensors and plain containers and cannot run code), plus textcl's own state as
safetensors and JSON, never pickles:
    textcl_state.json           the training position, scheduler, step counter, every file's size (the manifest)
    textcl_state.safetensors    the tensors of the loss, the momentum encoder and the negative queue
    textcl_rng_<process>.safetensors/.json  each process's torch, CUDA, numpy and Python RNG states
It is written into `.checkpoint-N.tmp/`, flushed to disk and renamed to `checkpoint-N/` only once complete,
so a kill leaves the previous checkpoints untouched (the temp folder is cleaned later).

Before resuming, `verify_checkpoint` checks that every file of the manifest is there at its recorded size,
that safetensors headers parse, that FSDP's pickled metadata names only checkpoint classes, and that no file
textcl did not write (a `custom_checkpoint_*.pkl` accelerate would unpickle, a planted RNG pickle) sits in
the folder. `resolve_resume("latest")` falls back to the newest checkpoint that verifies, says so and renames
the others `checkpoint-N-damaged`; an explicit path that does not verify is one line.

The rest of the output folder (metrics.jsonl, the best and final model, its card, textcl.json, the Hub) is
`textcl.training.outputs`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from textcl.errors import TextclError
from textcl.io.atomic import fsync_dir, fsync_tree, is_out_of_space, space_error
from textcl.training.parallel import any_process
from textcl.version import __version__

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "textcl_state.json"
STATE_TENSORS = "textcl_state.safetensors"
RNG_FILE = "textcl_rng_{}.safetensors"
RNG_JSON = "textcl_rng_{}.json"
SPACE_FIX = "free some space, then resume with --resume_from_checkpoint latest (the older checkpoints are intact)"
FORMAT = 1
# Files some loader would read if they sat in a checkpoint: only those the manifest lists are accepted.
LOADABLE = {".pkl", ".bin", ".pt", ".pth", ".safetensors", ".distcp", ".metadata"}


@dataclass
class TrainingPosition:
    """Where training stands; saved in every checkpoint so a resume continues mid-epoch exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None  # the step whose model best_model/ holds

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ---- state as JSON + tensors (no pickle) ------------------------------------------------------------------------

def encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A state value as JSON, its tensors and arrays moved to `tensors` under names from `key`.

    Dicts keep their key types (`{"__dict__": [[key, value], ...]}`), tuples stay tuples, NaN and infinities
    survive (`{"__float__": "nan"}`); anything else is a bug in the caller.
    """
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()  # a clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iu" else value.copy())
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {"__dict__": [[name, encode(item, f"{key}.{name}", tensors)] for name, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [encode(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]
    raise TypeError(f"cannot store a {type(value).__name__} ({key}) in a checkpoint")


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`."""
    if isinstance(value, list):
        return [decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(decode(item, tensors) for item in value["__tuple__"])
    return {name: decode(item, tensors) for name, item in value["__dict__"]}


def rng_state() -> dict[str, Any]:
    """This process's random number generator states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_tensors_and_json(path: Path, state: Any) -> Any:
    """Write the tensors of `state` to the safetensors file `path`; returns the JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode(state, "state", tensors)
    save_file(tensors, path)
    return encoded


# ---- saving -----------------------------------------------------------------------------------------------------

def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, keep: int, objects: dict[str, Any], needed: int = 0
) -> Path:
    """Write checkpoint-`step` atomically (temp folder + rename) and keep only the newest `keep`.

    `objects`: textcl's stateful objects by name (`state_dict()` / `load_state_dict()`), stored as safetensors
    and JSON. A full disk becomes one line naming the folder and about `needed` bytes; the older checkpoints
    stay as they were.
    """
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    failure: Exception | None = None
    try:
        accelerator.save_state(str(temporary))
        # accelerate's RNG pickle is replaced by textcl's own safetensors + JSON
        (temporary / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
        rng = write_tensors_and_json(temporary / RNG_FILE.format(accelerator.process_index), rng_state())
        (temporary / RNG_JSON.format(accelerator.process_index)).write_text(json.dumps(rng))
    except Exception as error:  # noqa: BLE001  (every process must learn of any failure, or the others wait forever)
        failure = error
    if any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()
        if failure is None:
            raise TextclError(f"writing {final.name} failed on another process; see its error above")
        if not is_out_of_space(failure):
            raise failure
        raise space_error("checkpoint", final, needed, SPACE_FIX) from failure
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            write_state(temporary, objects, step, accelerator)
            fsync_tree(temporary)
        except Exception as error:
            shutil.rmtree(temporary, ignore_errors=True)
            if is_out_of_space(error):
                raise space_error("checkpoint", final, needed, SPACE_FIX) from error
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_dir(output_dir)
        for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_state(folder: Path, objects: dict[str, Any], step: int, accelerator: Accelerator) -> None:
    """textcl_state.safetensors, then textcl_state.json with the manifest of every file: the last file written."""
    state = write_tensors_and_json(folder / STATE_TENSORS, {name: obj.state_dict() for name, obj in objects.items()})
    files = {path.relative_to(folder).as_posix(): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file()}
    record = {"format": FORMAT, "textcl_version": __version__, "step": step, "accelerator_step": accelerator.step,
              "num_processes": accelerator.num_processes, "files": files, "state": state}
    (folder / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")


# ---- verifying and loading --------------------------------------------------------------------------------------

def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint folder `path` (one phrase), or None when it is whole and holds only files
    textcl wrote. Reads headers and sizes, not the tensors."""
    if not path.is_dir():
        return "it does not exist"
    state_file = path / STATE_FILE
    if not state_file.is_file():
        legacy = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if legacy:
            return (f"it keeps textcl's state in {legacy[0]}, a pickle, which textcl no longer loads (written by an "
                    "older textcl, or planted); not loaded")
        return f"it has no {STATE_FILE} (an incomplete save, or not a textcl checkpoint)"
    try:
        record = json.loads(state_file.read_text())
        files = {str(name): int(size) for name, size in record["files"].items()}
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is damaged (not the JSON textcl writes)"
    if record.get("format") != FORMAT:
        return f"{STATE_FILE} has format {record.get('format')!r}; this textcl reads format {FORMAT}"
    for name, size in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{STATE_FILE} names {name!r}, outside the checkpoint"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is truncated or changed ({file.stat().st_size:,} bytes; {size:,} were written)"
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError, ValueError) as error:
                return f"{name} is damaged ({first_line(error)})"
        if file.name == ".metadata":
            problem = check_dcp_metadata(file)
            if problem:
                return f"{name} {problem}; not loaded"
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and name not in files and name != STATE_FILE and file.suffix in LOADABLE:
            return f"it holds {name}, a file textcl did not write; not loaded"
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class DcpMetadataUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's `.metadata` (a pickle FSDP's sharded checkpoints hold, which torch
    loads with plain `pickle.load`), allowing only the plain classes such metadata is made of."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner")
    NAMES = frozenset({("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
             ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")})

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in self.NAMES or (module in self.MODULES and isinstance(
            getattr(sys.modules.get(module), name, None), type))
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"names {module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(file: Path) -> str | None:
    """What is wrong with a torch.distributed.checkpoint metadata file, or None; its byte items (read by torch
    with weights_only=False) must also load weights-only."""
    # FSDP checkpoints only: the modules whose classes the unpickler accepts
    import torch.distributed.checkpoint.filesystem
    import torch.distributed.checkpoint.metadata
    import torch.distributed.checkpoint.planner

    try:
        metadata = DcpMetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except Exception as error:  # noqa: BLE001  (a tampered pickle can fail in any way)
        return f"is not plain checkpoint metadata ({first_line(error)})"
    for index, info in getattr(metadata, "storage_data", {}).items():
        kind = metadata.state_dict_metadata.get(index.fqn)
        if type(kind).__name__ != "BytesStorageMetadata":
            continue
        if getattr(info, "transform_descriptors", None):
            return f"stores {index.fqn} transformed, which textcl cannot check"
        if Path(info.relative_path).name != str(info.relative_path):
            return f"points outside its folder ({info.relative_path})"
        with (file.parent / info.relative_path).open("rb") as handle:
            handle.seek(info.offset)
            item = handle.read(info.length)
        try:
            torch.load(io.BytesIO(item), weights_only=True)
        except Exception as error:  # noqa: BLE001  (a tampered pickle can fail in any way)
            return f"stores {index.fqn} as a pickle that is not plain data ({first_line(error)})"
    return None


def check_pickles(path: Path) -> None:
    """Load each torch file of a verified checkpoint through the weights-only unpickler (memory-mapped) before
    accelerate does, so a refusal names the file."""
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".bin", ".pt", ".pth", ".pkl"):
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except Exception as error:  # noqa: BLE001  (a tampered pickle can fail in any way)
                raise TextclError(
                    f"cannot resume from {str(path)!r}: {file.relative_to(path)} is not plain tensor data (torch's "
                    f"weights-only loader refused it: {first_line(error)}); not loaded"
                ) from None


def load_checkpoint(accelerator: Accelerator, path: Path, objects: dict[str, Any]) -> None:
    """Restore model, optimizer, RNG states and `objects` from a checkpoint written by `save_checkpoint`."""
    problem = verify_checkpoint(path)
    if problem:
        raise TextclError(f"cannot resume from {str(path)!r}: {problem}")
    check_pickles(path)
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except (RuntimeError, ValueError, KeyError) as error:
        raise TextclError(
            f"checkpoint {str(path)!r} does not fit this run's model or optimizer ({first_line(error)}); resume "
            "with the settings that wrote it"
        ) from None
    record = json.loads((path / STATE_FILE).read_text())
    state = decode(record["state"], load_file(path / STATE_TENSORS))
    missing = sorted(set(objects) - set(state))
    if missing:
        raise TextclError(f"checkpoint {str(path)!r} holds no state for {missing[0]} (written with other loss "
                          "settings); resume with the settings that wrote it")
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    accelerator.step = record["accelerator_step"]
    rng_file = path / RNG_FILE.format(accelerator.process_index)
    rng_json = path / RNG_JSON.format(accelerator.process_index)
    if rng_file.is_file() and rng_json.is_file():
        set_rng_state(decode(json.loads(rng_json.read_text()), load_file(rng_file)))
    elif accelerator.is_main_process:
        print(f"textcl: warning: {path.name} was written by {record['num_processes']} processes; random states "
              "not restored for this one, so dropout and augmentation draws differ from an uninterrupted run",
              file=sys.stderr)


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None, main_process: bool = True) -> Path | None:
    """`latest` -> the newest checkpoint that verifies (None if there is none yet); an explicit path must verify.

    With `latest`, checkpoints that do not verify are renamed `checkpoint-N-damaged` (by the main process) and
    the fallback is announced on stderr; when checkpoints exist but none verifies, a TextclError says why.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise TextclError(f"resume_from_checkpoint {str(path)!r} does not exist")
        problem = verify_checkpoint(path)
        if problem:
            raise TextclError(f"cannot resume from {str(path)!r}: {problem}")
        return path
    found = checkpoints(output_dir)
    problems = []
    for candidate in reversed(found):
        problem = verify_checkpoint(candidate)
        if problem is None:
            if problems and main_process:
                print(f"textcl: resuming from {candidate.name}", file=sys.stderr)
            return candidate
        problems.append(f"{candidate.name}: {problem}")
        if main_process:
            damaged = candidate.with_name(f"{candidate.name}-damaged")
            if candidate.exists():
                shutil.rmtree(damaged, ignore_errors=True)
                os.replace(candidate, damaged)
            print(f"textcl: warning: {candidate.name} is not usable ({problem}); renamed {damaged.name}",
                  file=sys.stderr)
    if problems:
        raise TextclError(f"no checkpoint in {str(output_dir)!r} is usable ({problems[0]}); pass "
                          "--overwrite_output_dir true to start over")
    return None
