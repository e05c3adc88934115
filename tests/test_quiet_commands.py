"""No third-party warning, log line or progress bar reaches the terminal without --verbose: every command, run
on one tiny model in one process (as many imports as one command), writes to stderr only textcl's own lines
(`textcl: ...`) and its own progress bars (train, encode, score, ...)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import SENTENCES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS",
             "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
    ENV.pop(name, None)  # the libraries' defaults, as on a user's machine
# textcl's lines: its messages, and its own tqdm bars (desc: train, encode, score, or a corpus encoding's)
TEXTCL_LINE = re.compile(r"^(textcl[: ]|@@ |(train|encode|score|queries|documents|corpus|embed)\w*: )")


def write_files(folder: Path) -> dict[str, Path]:
    pairs, sts, corpus = folder / "pairs.tsv", folder / "sts.tsv", folder / "corpus.jsonl"
    with pairs.open("w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows([("anchor", "positive"), *((" ".join(s.split()[:3]), s)
                                                                                 for s in SENTENCES)])
    with sts.open("w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows([("sentence1", "sentence2", "score"), *(
            (a, b, str(i % 5)) for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:])))])
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    (folder / "texts.txt").write_text("\n".join(SENTENCES) + "\n")
    return {"pairs": pairs, "sts": sts, "corpus": corpus, "texts": folder / "texts.txt"}


def test_every_command_writes_only_textcl_lines_to_stderr(tmp_path: Path, tiny_model_dir: Path) -> None:
    files, model = write_files(tmp_path), tmp_path / "model"
    commands = {
        "train": ["train", "--model_name_or_path", str(tiny_model_dir), "--pooling", "mean", "--train_data",
                  str(files["pairs"]), "--eval_split", "4", "--eval_sts", str(files["sts"]), "--max_steps", "1",
                  "--per_device_train_batch_size", "4", "--max_seq_length", "16", "--output_dir", str(model)],
        "encode": ["encode", str(model), "--input", str(files["texts"]), "--output", str(tmp_path / "e.npy")],
        "eval": ["eval", str(model), "--sts", str(files["sts"]), "--pairs", str(files["pairs"])],
        "mine": ["mine", str(model), "--data", str(files["pairs"]), "--out", str(tmp_path / "mined.jsonl"),
                 "--num_negatives", "1", "--min_negatives", "0"],
        "score": ["score", str(model), "--data", str(tmp_path / "mined.jsonl"), "--out", str(tmp_path / "s.jsonl")],
        "index": ["index", str(model), "--corpus", str(files["corpus"]), "--out", str(tmp_path / "index")],
        "search": ["search", str(tmp_path / "index"), "a man with a guitar", "-k", "2"],
        "shrink": ["shrink", str(model), "--num_layers", "1", "--out", str(tmp_path / "small")],
        "export": ["export", str(model), "--quantize", "int8", "--out", str(tmp_path / "exported")],
    }
    script = textwrap.dedent(f"""
        import sys
        from textcl.cli import main
        for name, argv in {commands!r}.items():
            print(f"@@ {{name}}", file=sys.stderr, flush=True)
            code = main(argv)
            sys.stderr.flush()
            assert code == 0, (name, code)
        """)
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [part for line in result.stderr.splitlines() for part in line.split("\r") if part.strip()]
    foreign = [line for line in lines if not TEXTCL_LINE.match(line)]
    assert not foreign, "\n".join(foreign[:20])
    assert [line[3:] for line in lines if line.startswith("@@ ")] == list(commands)
    assert "int8 passed" in result.stdout or "int8 FAILED" in result.stdout
    assert f"textcl: {model} on STS {files['sts']}; pairs {files['pairs']}" in result.stdout
