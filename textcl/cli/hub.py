"""`textcl push` uploads a model folder to the Hugging Face Hub; `textcl merge` folds a LoRA adapter in."""

from __future__ import annotations

import argparse
from pathlib import Path

from textcl.cli.options import add_overwrite_option, defaults_of, save_model
from textcl.errors import TextclError
from textcl.hub.push import push_to_hub
from textcl.io.targets import check_model_target
from textcl.model.encoder import Encoder
from textcl.model.lora import is_adapter_folder


def configure_push(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(push_to_hub)
    parser.description = ("Upload a model folder (checkpoints excluded) to the Hugging Face Hub. "
                          "The token comes from HF_TOKEN or `hf auth login`.")
    parser.add_argument("model", help="model folder (written by textcl train, Encoder.save or textcl merge)")
    parser.add_argument("repo_id", help="repository, e.g. your-name/my-model (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=defaults["revision"],
                        help="branch to push to (created from main if missing)")
    parser.add_argument("--commit_message", default=defaults["commit_message"])


def run_push(args: argparse.Namespace) -> None:
    url = push_to_hub(args.model, args.repo_id, private=args.private or None, revision=args.revision,
                      commit_message=args.commit_message)
    print(f"pushed {args.model} to {url}")


def configure_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (a model trained with lora: true)")
    parser.add_argument("output", help="where to write the merged model")
    add_overwrite_option(parser)


def run_merge(args: argparse.Namespace) -> None:
    if not is_adapter_folder(Path(args.adapter)):
        raise TextclError(f"{args.adapter!r} holds no LoRA adapter (no adapter_config.json); "
                          "it is already a full model")
    check_model_target(args.output, args.overwrite)
    save_model(Encoder.load(args.adapter, device="cpu").merged(), args.output)
    print(f"wrote {args.output}: {args.adapter} merged into its base model")
