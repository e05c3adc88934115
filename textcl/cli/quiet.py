"""The libraries' own output, off by default on the command line: progress bars, info logs and warnings of
transformers ("Loading weights", "Writing model shards"), datasets ("Generating train split", Map, Filter) and
huggingface_hub (downloads), Python warnings (torch's FutureWarnings) and records logged to the root logger
(onnxruntime's "Please consider to run pre-processing before quantization"). textcl's own progress bar, messages
and summary stay, and its logged warnings read `textcl: warning: ...`; `textcl --verbose` brings the rest back.
Errors always show: a library error becomes textcl's one-line error or a traceback.

Each library is switched through its official controls: the functions of a library already imported, the
environment variables it reads at import for one not imported yet (so `textcl train` does not import `datasets`
just to silence it, and processes started by `--num_processes` inherit the setting). A variable the user set
wins over both.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# environment variables the libraries read at import time -> their quiet value
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",  # for processes started by `train --num_processes` (warnings are per process)
}
ROOT_SILENCER = logging.NullHandler()  # on the root logger, so a library's `logging.warning(...)` goes nowhere


class TextclLines(logging.Formatter):
    """A record of textcl's logger as textcl prints its own lines: `textcl: warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        return f"textcl: {record.levelname.lower()}: {record.getMessage()}"


TEXTCL_HANDLER = logging.StreamHandler()  # stderr
TEXTCL_HANDLER.setFormatter(TextclLines())
# the variables this process set (not the user), removed again by `set_library_output(verbose=True)`
SET_HERE: set[str] = set()


def set_library_output(verbose: bool) -> None:
    """Silence (verbose False) or restore (True) the progress bars, logs and warnings of transformers, datasets,
    huggingface_hub and other libraries (logs at error level when quiet, at info level when verbose)."""
    quiet_python(verbose)
    for name, value in QUIET_ENVIRONMENT.items():
        if verbose and name in SET_HERE:
            os.environ.pop(name, None)
            SET_HERE.discard(name)
        elif not verbose and name not in os.environ:
            os.environ[name] = value
            SET_HERE.add(name)
    # Libraries already imported read no environment any more: use their switches. (Deferred imports: only
    # libraries that are already loaded are touched, so a quick command stays quick.)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if verbose else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_info() if verbose else transformers_logging.set_verbosity_error()
        (transformers_logging.enable_progress_bar if verbose else transformers_logging.disable_progress_bar)()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_info() if verbose else datasets.utils.logging.set_verbosity_error()
        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()


def quiet_python(verbose: bool) -> None:
    """Python's own channels: warnings filtered out (quiet) or shown once (verbose), the root logger given a
    handler that drops its records (quiet), and textcl's logger printing `textcl: warning: ...` either way."""
    warnings.simplefilter("default" if verbose else "ignore")
    root, textcl = logging.getLogger(), logging.getLogger("textcl")
    if verbose:
        root.removeHandler(ROOT_SILENCER)
    elif ROOT_SILENCER not in root.handlers:
        root.addHandler(ROOT_SILENCER)
    if TEXTCL_HANDLER not in textcl.handlers:
        textcl.addHandler(TEXTCL_HANDLER)  # records still propagate (to pytest's caplog, say; the root drops them)
