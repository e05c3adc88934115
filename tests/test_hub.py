"""Model cards and `textcl push` over real HTTP: a loopback server stands in for the Hugging Face Hub.

The server answers the endpoints huggingface_hub's create_repo, create_branch and upload_folder call
(repos/create, branch, preupload, commit), checks the bearer token and records what arrives. Pushes run
in a subprocess with HF_ENDPOINT pointing at it, as a user would run them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import SENTENCES

from textcl import Encoder
from textcl.config import TrainConfig
from textcl.hub.model_card import TrainingRun, model_card, write_model_card

TOKEN = "hf_textclTestToken0123456789abcdef"
ROUTES = {
    "create": re.compile(r"^/api/repos/create$"),
    "validate-yaml": re.compile(r"^/api/validate-yaml$"),
    "branch": re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$"),
    "preupload": re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$"),
    "commit": re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"),
}


class FakeHub:
    """Records every request as (route, path, JSON body or NDJSON lines); `refuse` names a route answered 403."""

    def __init__(self, refuse: str | None = None) -> None:
        self.requests: list[tuple[str, str, object]] = []
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.refuse = refuse
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = hub.answer(urlsplit(self.path).path, self.headers.get("Authorization"), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, authorization: str | None, body: bytes) -> tuple[int, dict]:
        route, match = next(((name, m) for name, pattern in ROUTES.items() if (m := pattern.match(path))), (None, None))
        is_commit = route == "commit"
        payload = [json.loads(line) for line in body.splitlines()] if is_commit else json.loads(body or b"{}")
        self.requests.append((route or "unknown", path, payload))
        if authorization != f"Bearer {TOKEN}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if route is None:
            return 404, {"error": f"no such endpoint {path}"}
        if route == self.refuse:
            return 403, {"error": "You don't have the rights to write to this repository"}
        if route == "create":
            repo = f"{payload['organization'] or 'tester'}/{payload['name']}"
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if route == "validate-yaml":  # the Hub checks README.md's front matter before an upload
            try:
                yaml.safe_load(payload["content"].split("---\n")[1])
            except (IndexError, yaml.YAMLError) as error:
                return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}
            return 200, {"warnings": []}
        if route == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in payload["files"]]}
        if is_commit:
            files = self.files.setdefault((match["repo"], match["rev"]), {})
            for item in payload[1:]:
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            return 200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid}
        return 200, {}

    def routes(self) -> list[str]:
        """Routes called, without huggingface_hub's unauthenticated best-effort fetch of its agent registry."""
        return [route for route, path, _ in self.requests if path != "/api/agent-harnesses"]

    def payload(self, route: str) -> object:
        return next(body for name, _, body in self.requests if name == route)


@pytest.fixture
def hub() -> FakeHub:
    server = FakeHub()
    yield server
    server.server.shutdown()


def folder_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.relative_to(folder).parts[0].startswith(skip)}


def push_env(hub: FakeHub, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "TOKENIZERS_PARALLELISM": "false"}
    return env | ({"HF_TOKEN": token} if token else {})


def textcl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textcl", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def model_folder(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A saved model plus what a training run leaves next to it (a checkpoint) that must not be uploaded."""
    folder = tmp_path / "model"
    Encoder.load(tiny_model_dir, pooling="mean").save(folder, model_card=write_model_card)
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.bin").write_bytes(b"optimizer state")
    return folder


def test_push_uploads_exactly_the_model_folder(hub: FakeHub, model_folder: Path, tmp_path: Path) -> None:
    before = folder_files(model_folder)
    command = ["push", str(model_folder), "tester/tiny", "--private", "--revision", "dev"]
    result = textcl(command, push_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.routes() == ["create", "branch", "validate-yaml", "preupload", "commit"]
    create = hub.payload("create")
    assert create["name"] == "tiny" and create["organization"] == "tester" and create["visibility"] == "private"
    assert hub.files.keys() == {("tester/tiny", "dev")}
    assert hub.files["tester/tiny", "dev"] == folder_files(model_folder, skip=("checkpoint-",))
    assert "README.md" in hub.files["tester/tiny", "dev"] and "modules.json" in hub.files["tester/tiny", "dev"]
    assert folder_files(model_folder) == before
    assert TOKEN not in result.stdout + result.stderr
    assert f"{hub.url}/tester/tiny/commit/" in result.stdout


def test_push_of_a_folder_without_a_card_uploads_one_and_leaves_the_folder(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`Encoder.save` writes no card unless asked; `textcl push` then adds one on the Hub in a second commit."""
    folder = tmp_path / "bare"
    Encoder.load(tiny_model_dir, pooling="mean").save(folder)
    before = folder_files(folder)
    assert "README.md" not in before
    result = textcl(["push", str(folder), "tester/bare"], push_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.routes().count("commit") == 2 and folder_files(folder) == before
    uploaded = hub.files["tester/bare", "main"]
    assert set(uploaded) == set(before) | {"README.md"}
    assert "# tester/bare" in uploaded["README.md"].decode() and "Encoder.load(\"tester/bare\")" in uploaded["README.md"].decode()


def test_missing_token_stops_before_any_request(hub: FakeHub, model_folder: Path, tmp_path: Path) -> None:
    before = folder_files(model_folder)
    result = textcl(["push", str(model_folder), "tester/tiny"], push_env(hub, tmp_path, token=None))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("textcl: error: no Hugging Face token found")
    assert hub.routes() == [] and folder_files(model_folder) == before


@pytest.mark.parametrize(("refuse", "token", "status"), [(None, "hf_wrong", "401"), ("commit", TOKEN, "403")])
def test_refused_push_is_one_line_and_leaves_the_model_untouched(
    model_folder: Path, tmp_path: Path, refuse: str | None, token: str, status: str
) -> None:
    hub = FakeHub(refuse=refuse)
    before = folder_files(model_folder)
    result = textcl(["push", str(model_folder), "tester/tiny"], push_env(hub, tmp_path, token=token))
    hub.server.shutdown()
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1 and f"HTTP {status}" in errors[0] and "is unchanged" in errors[0], result.stderr[-2000:]
    assert hub.files == {} and folder_files(model_folder) == before
    assert token not in result.stdout + result.stderr


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_training_with_push_to_hub_uploads_the_run_with_its_card(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The recipe route: the final folder (card with the run's evaluation) goes up; checkpoints stay local."""
    data, sts = tmp_path / "pairs.tsv", tmp_path / "sts" / "dev.tsv"
    data.write_text("anchor\tpositive\n" + "".join(f"{t}\t{t.lower()}\n" for t in SENTENCES))
    sts.parent.mkdir()
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{i % 5}\n"
                                                           for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:]))))
    out = tmp_path / "run"
    settings = {"model_name_or_path": str(tiny_model_dir), "train_data": str(data), "output_dir": str(out),
                "eval_sts": [str(sts)], "per_device_train_batch_size": 4, "max_steps": 2, "save_steps": 1,
                "pooling": "mean", "push_to_hub": True, "hub_model_id": "tester/run-model"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings))
    result = textcl(["train", str(recipe)], push_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    uploaded = hub.files["tester/run-model", "main"]
    assert uploaded == folder_files(out, skip=("checkpoint-",)) and (out / "checkpoint-2").is_dir()
    card = uploaded["README.md"].decode()
    meta = front_matter(card)
    run = json.loads((out / "textcl.json").read_text())
    spearman = run["metrics"]["sts"]["spearman"]
    values = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values["spearman_cosine"] == round(spearman, 4) and meta["model-index"][0]["name"] == "tester/run-model"
    assert f"{spearman:.4f}" in card and 'Encoder.load("tester/run-model")' in card
    written = "".join(path.read_text(errors="ignore") for path in out.rglob("*") if path.is_file())
    everything = result.stdout + result.stderr + written
    assert TOKEN not in everything


def run_of(tmp_path: Path, metrics: dict | None = None, **settings) -> TrainingRun:
    config = TrainConfig.from_dict({"model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
                                    "train_data": str(tmp_path / "pairs.tsv"), "output_dir": str(tmp_path), **settings})
    return TrainingRun(config=config, metrics=metrics or {}, steps=10, num_processes=2, train_rows=100)


CITED = re.compile(r"^\*\*(.+?)\*\* \(", re.MULTILINE)


@pytest.mark.parametrize(("settings", "batches", "cited"), [
    ({}, {}, ["InfoNCE"]),
    ({"pooling": "cls_mlp", "gradcache_chunk_size": 8, "queue_size": 64}, {"dropout_positives": True},
     ["InfoNCE", "SimCSE", "GradCache", "MoCo"]),
    ({"tau_plus": 0.1, "matryoshka_dims": [16, 8], "lora": True}, {}, ["InfoNCE", "DCL", "Matryoshka", "LoRA"]),
    ({"train_data": "MINED"}, {"hard_negatives": True}, ["InfoNCE", "NV-Retriever"]),
    ({"train_data": "MINED"}, {}, ["InfoNCE"]),
])
def test_card_cites_only_the_methods_the_run_used(
    tiny_model_dir: Path, tmp_path: Path, settings: dict, batches: dict, cited: list[str]
) -> None:
    mined = tmp_path / "mined.jsonl"  # the columns `textcl mine` writes
    mined.write_text(json.dumps({"anchor": "a", "positive": "b", "negative_1": "c", "positive_score": 0.9,
                                 "negative_1_score": 0.5}) + "\n")
    if settings.get("train_data") == "MINED":
        settings = settings | {"train_data": str(mined)}
    run = run_of(tmp_path, **settings)
    run.dropout_positives = batches.get("dropout_positives", False)
    run.hard_negatives = batches.get("hard_negatives", False)
    card = model_card(Encoder.load(tiny_model_dir, pooling="mean"), run, "tester/m")
    assert CITED.findall(card) == cited
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "sentence-similarity", "textcl"} <= set(meta["tags"])
    assert str(tmp_path) not in card  # local paths are never published


def test_card_model_index_holds_the_evaluation(tiny_model_dir: Path, tmp_path: Path) -> None:
    sts = {"spearman": 0.81234, "pearson": 0.8, "n": 50, "files": {"/data/stsb/dev.tsv": {"spearman": 0.81234,
                                                                                          "pearson": 0.8, "n": 50}}}
    retrieval = {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@10": 0.7, "recall@100": 0.9, "map@100": 0.45,
                 "n_queries": 5, "n_docs": 12}
    run = run_of(tmp_path, {"sts": sts, "retrieval": retrieval}, eval_sts=["/data/stsb/dev.tsv"],
                 eval_beir="/data/scifact", train_data="org/pairs-dataset")
    card = model_card(Encoder.load(tiny_model_dir, pooling="mean"), run, "tester/m")
    meta = front_matter(card)
    assert meta["datasets"] == ["org/pairs-dataset"]
    results = meta["model-index"][0]["results"]
    got = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert got[("stsb/dev.tsv", "spearman_cosine")] == 0.8123 and got[("scifact", "cosine_ndcg@10")] == 0.5
    assert len(got) == 7
    assert "| stsb/dev.tsv | 0.8123 | 0.8000 | 50 |" in card and "0.9000" in card
