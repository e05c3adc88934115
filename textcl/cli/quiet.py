"""The libraries' own output, off by default on the command line: progress bars and info logs of transformers
("Loading weights", "Writing model shards"), datasets ("Generating train split", Map, Filter) and huggingface_hub
(downloads). textcl's own progress bar, messages and summary stay; `textcl --verbose` brings the rest back.

Each library is switched through its official controls: the functions of a library already imported, the
environment variables it reads at import for one not imported yet (so `textcl train` does not import `datasets`
just to silence it, and processes started by `--num_processes` inherit the setting). A variable the user set
wins over both.
"""

from __future__ import annotations

import os
import sys

# environment variables the libraries read at import time -> their quiet value
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "warning",
    "DATASETS_VERBOSITY": "warning",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# the variables this process set (not the user), removed again by `set_library_output(verbose=True)`
SET_HERE: set[str] = set()


def set_library_output(verbose: bool) -> None:
    """Silence (verbose False) or restore (True) the progress bars and info logs of transformers, datasets and
    huggingface_hub (logs at warning level when quiet, at info level when verbose); their warnings and errors
    always show."""
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

        transformers_logging.set_verbosity_info() if verbose else transformers_logging.set_verbosity_warning()
        (transformers_logging.enable_progress_bar if verbose else transformers_logging.disable_progress_bar)()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_info() if verbose else datasets.utils.logging.set_verbosity_warning()
        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
