"""Publishing a model folder on the Hugging Face Hub with huggingface_hub's `create_repo` + `upload_folder`.

The token comes from huggingface_hub's usual places (the HF_TOKEN variable, or the file `hf auth login`
writes). It goes to huggingface_hub only: textcl never prints, logs or writes it, and error messages are
scrubbed of it. Training leftovers (checkpoints, the best-model staging folders) are not uploaded; the
local folder is only read.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HTTPError  # the HTTP client's base error: refusals and connection failures

from textcl.errors import TextclError
from textcl.hub.model_card import model_card
from textcl.model.encoder import Encoder

NOT_UPLOADED = ["checkpoint-*", ".checkpoint-*", "best_model/*", ".best_model.tmp/*", ".*.lock"]  # locks: a PID, not the model
MODEL_FILES = ("modules.json", "config.json", "adapter_config.json")


def require_token() -> str:
    """The Hugging Face token, or a TextclError naming how to provide one (checked before long work)."""
    if constants.HF_HUB_OFFLINE:
        raise TextclError("HF_HUB_OFFLINE is set: unset it (or set it to 0) to push to the Hugging Face Hub")
    token = get_token()
    if not token:
        raise TextclError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN "
                          "(a token with write access)")
    return token


def reason(error: Exception, token: str) -> str:
    """One line on why a Hub call failed: HTTP status and the Hub's message, never the token."""
    response = getattr(error, "response", None)
    message = getattr(error, "server_message", None) or str(error).strip().splitlines()[0]
    status = f"HTTP {response.status_code}: " if response is not None else ""
    return f"{status}{message}".replace(token, "***")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model trained with textcl",
) -> str:
    """Create `repo_id` if needed (private when asked), then upload `folder` to its main branch or `revision`
    (created from main if missing). A folder without a README.md gets a model card describing the model in a
    second commit (the Hub shows it as the model's page; the local folder is not changed). Returns the URL of
    the last commit."""
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / name).is_file() for name in MODEL_FILES):
        raise TextclError(f"{str(folder)!r} is not a model folder (no {', '.join(MODEL_FILES)})")
    token = require_token()
    api = HfApi(token=token)
    step = f"create the repository {repo_id!r}"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            step = f"create the branch {revision!r} of {repo_id!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = f"upload to {repo_id!r}"
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=commit_message, ignore_patterns=list(NOT_UPLOADED))
        if not (folder / "README.md").is_file():
            step = f"upload a model card to {repo_id!r}"
            card = model_card(Encoder.load(folder, device="cpu"), model_id=repo_id).encode("utf-8")
            commit = api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id,
                                     revision=revision, commit_message="Add model card")
    except (HTTPError, OSError, ValueError) as error:
        raise TextclError(
            f"push to the Hugging Face Hub failed: could not {step} ({reason(error, token)}); check the repository "
            f"id, the network and that your token can write to it. The local model in {folder} is unchanged"
        ) from None
    return commit.commit_url
