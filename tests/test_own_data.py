"""A user's own data is read as written, batched as the config says, and measured on held-out rows of itself;
every list setting can be emptied from the command line; a failed run leaves nothing behind (issue: "Your own
data, trusted")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from textcl.config import LIST_FIELDS, DataArguments, load_config
from textcl.data.holdout import split_held_out
from textcl.data.loader import build_training_data
from textcl.data.rows import load_rows
from textcl.data.sampler import NoDuplicatesBatchSampler, planned_batches, row_index
from textcl.errors import TextclError
from textcl.io.atomic import exclusive_lock
from textcl.io.tables import load_table

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def test_rows_with_more_fields_than_the_header_are_an_error_naming_file_line_and_counts(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"  # the file: a header of 2 names, rows of 3 fields
    pairs.write_text("anchor,positive\n" + "".join(f">>> c = Context(prec={i}),answer {i},extra\n" for i in range(5)))
    with pytest.raises(TextclError, match=r"pairs.csv line 2: 3 fields, header has 2 \(anchor, positive\)"):
        load_table(pairs)


def test_rows_with_fewer_fields_are_an_error_too(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\tnegative\na\tb\tc\n\nd\te\n")
    with pytest.raises(TextclError, match=r"pairs.tsv line 4: 2 fields, header has 3"):
        load_table(pairs)


def test_a_delimiter_unlike_the_extension_is_named_and_the_setting_reads_it(tmp_path: Path) -> None:
    tabs = tmp_path / "pairs.csv"
    tabs.write_text("anchor\tpositive\n" + "".join(f"question {i}, with a comma\tanswer {i}\n" for i in range(4)))
    with pytest.raises(TextclError, match=r"pairs.csv looks tab-separated; rename it .tsv or set delimiter"):
        load_table(tabs)
    commas = tmp_path / "pairs.tsv"
    commas.write_text("anchor,positive\na,b\n")
    with pytest.raises(TextclError, match=r"looks comma-separated; rename it .csv or set delimiter"):
        load_table(commas)
    rows = load_rows(DataArguments(train_data=[str(tabs)], delimiter="\\t"), report=False)
    assert rows[0]["anchor"] == "question 0, with a comma" and rows[3]["positive"] == "answer 3"


def test_quoted_fields_with_newlines_and_delimiters_still_load(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('anchor,positive\n"first, line\nsecond line","say ""hi"", then go"\nplain,text\n')
    table = load_table(pairs)
    assert table["anchor"] == ["first, line\nsecond line", "plain"]
    assert table["positive"] == ['say "hi", then go', "text"]


def duplicate_positives(path: Path, distinct: int = 289, repeats: tuple[int, int] = (6, 5)) -> Path:
    """300 rows holding 289 distinct positives (one positive 7 times, another 6 times), as in the issue."""
    positives = [f"positive sentence number {i}" for i in range(distinct)]
    texts = positives + [positives[0]] * repeats[0] + [positives[1]] * repeats[1]
    path.write_text("anchor\tpositive\n" + "".join(f"anchor question {i}\t{t}\n" for i, t in enumerate(texts)))
    return path


def test_an_epoch_has_its_planned_batches_of_two_rows_or_more_and_counts_what_it_leaves_out(tmp_path: Path) -> None:
    rows = load_rows(DataArguments(train_data=[str(duplicate_positives(tmp_path / "dups.tsv"))]), report=False)
    ids, _, _ = row_index(rows, with_lengths=False)
    sampler = NoDuplicatesBatchSampler(ids, 64, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert len(sampler) == planned_batches(300, 64) == 5  # the old sampler made 7 (two of one row)
        assert min(len(batch) for batch in sampler) >= 2
        used = [i for batch in sampler for i in batch]
        assert len(used) + sampler.left_out == 300 and sampler.left_out == 3  # 7 - 5 and 6 - 5 copies
    assert planned_batches(65, 64) == 1 and planned_batches(66, 64) == 2 and planned_batches(66, 64, True) == 1


def test_the_duplicate_data_trains_the_steps_it_planned_and_warns_naming_the_duplicates(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """The issue's case scaled down for CI: 60 rows, 52 distinct positives; seed 42 holds out one of the repeated
    positives (and its 5 copies), the other one's 6 copies make 3 batches of 16 for 49 rows."""
    data = duplicate_positives(tmp_path / "dups.tsv", 50, (5, 5))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "textcl", "train", "--model_name_or_path", str(tiny_model_dir), "--pooling",
               "mean", "--max_seq_length", "12", "--train_data", str(data), "--per_device_train_batch_size", "16",
               "--num_train_epochs", "2", "--logging_steps", "1", "--eval_split", "0.1", "--output_dir", str(out)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "rows repeat another row's positive (" in result.stderr and "rows fit in no batch" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 7)) and "/6 [" in result.stderr  # 2 epochs of 3 batches; the bar's total
    assert "44 rows repeat another row's positive" not in result.stderr and "3 rows fit in no batch" in result.stderr
    assert max(r.get("epoch", 0) for r in records) < 2
    assert "heldout" in records[0] and records[0]["step"] == 0 and "heldout" in records[-1]
    assert "heldout.ndcg@10:" in result.stdout and "(base model) ->" in result.stdout
    assert "  6 rows left out of their epoch's batches in all" in result.stdout  # 3 copies of the positive an epoch


def test_no_held_out_text_is_trained_on_and_the_split_follows_the_seed(tmp_path: Path) -> None:
    rows = [(f"q{i}", f"p{i % 40}", f"p{(i + 7) % 40}") for i in range(120)]  # positives shared, negatives too
    data = tmp_path / "triplets.tsv"
    data.write_text("anchor\tpositive\tnegative\n" + "".join("\t".join(row) + "\n" for row in rows))
    loaded = load_rows(DataArguments(train_data=[str(data)]), report=False)
    training, held = split_held_out(loaded, 0.1, seed=3)
    held_texts = set(held.anchors) | set(held.positives) | {t for row in held.negatives for t in row}
    assert len(held.anchors) == 12 and held.negatives and held.dropped > 0
    for row in training:
        assert held_texts.isdisjoint([row["anchor"], row["positive"], *row["negatives"]])
    assert len(training) + held.dropped + 12 == 120
    again, other = split_held_out(loaded, 0.1, seed=3)[1], split_held_out(loaded, 0.1, seed=4)[1]
    assert again.anchors == held.anchors and other.anchors != held.anchors
    assert len(split_held_out(loaded, 5, seed=3)[1].anchors) == 5
    with pytest.raises(TextclError, match="eval_split"):
        split_held_out(loaded, 119, seed=3)


@pytest.mark.parametrize("name", sorted(LIST_FIELDS))
def test_every_list_setting_can_be_emptied_and_set_from_the_command_line(name: str) -> None:
    recipe = ROOT / "recipes" / "pairs.yaml"
    value = {"matryoshka_dims": ["16", "8"], "matryoshka_weights": ["1.0", "0.5"],
             "mining_options": ["num_negatives=3", "min_negatives=0"]}.get(name, ["a", "b"])
    # settings read only alongside another, or one per train_data source
    needs = {"mining_options": ["--mining_rounds", "2"], "source_instructions": ["--train_data", "a.tsv", "b.tsv"]
             }.get(name, [])
    for spelling in (["none"], ["NONE"], [""]):
        if name == "train_data":  # emptied, the one required list says so
            with pytest.raises(TextclError, match="missing required setting 'train_data'"):
                load_config(str(recipe), [f"--{name}", *spelling])
            continue
        config = load_config(str(recipe), [f"--{name}", *spelling])
        assert config.to_dict()[name] == [], spelling
    if name != "train_data":
        assert load_config(str(recipe), [f"--{name}=none"]).to_dict()[name] == []
    parsed = load_config(str(recipe), [*needs, f"--{name}", *value]).to_dict()[name]
    assert [str(v) for v in parsed] == [str(type(parsed[0])(v)) for v in value]
    with pytest.raises(TextclError, match=f"--{name} none for an empty list"):
        load_config(str(recipe), [f"--{name}"])


def test_an_unreachable_hub_dataset_names_the_setting_and_how_to_drop_it(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\na\tb\nc\td\n")
    command = [sys.executable, "-m", "textcl", "train", str(ROOT / "recipes" / "pairs.yaml"), "--train_data", str(pairs),
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "eval_sts 'sentence-transformers/stsb'" in result.stderr and "--eval_sts none" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def readme_recipe_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- offline recipes -->"):]
    block = block[block.index("```bash") + 7:block.index("```", block.index("```bash") + 7)]
    return [line for line in block.splitlines() if line.startswith("textcl train recipes/")]


def test_the_readme_runs_every_shipped_recipe_on_local_files(shared_data: Path, tiny_model_dir: Path) -> None:
    """The README's offline commands, with ../shared copies: every recipe is covered, every local file it names is
    there and reads, and the run plans without touching the Hub (the runs themselves are the recipes' tests)."""
    from textcl.io.sources import check_local_sources, data_sources
    from textcl.io.text import check_table_file

    commands = readme_recipe_commands()
    assert sorted(c.split()[2] for c in commands) == sorted(f"recipes/{r.name}" for r in (ROOT / "recipes").glob("*.yaml"))
    for command in commands:
        words = command.replace("$D", str(shared_data)).replace("$M", str(tiny_model_dir)).split()[2:]
        config = load_config(str(ROOT / words[0]), words[1:])
        sources = [(setting, s) for setting, s in data_sources(config.data) if str(shared_data) in s]
        assert sources and all(str(shared_data) in s or s.startswith("outputs/") for _, s in data_sources(config.data))
        check_local_sources(sources)
        for _, source in sources:
            check_table_file(source)


def test_a_run_that_fails_before_its_first_step_leaves_nothing_behind(tmp_path: Path, tiny_model_dir: Path) -> None:
    empty_rows = tmp_path / "bad.tsv"
    empty_rows.write_text("anchor\tpositive\n\tx\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (tmp_path / "absent", kept):
        command = [sys.executable, "-m", "textcl", "train", "--model_name_or_path", str(tiny_model_dir),
                   "--train_data", str(empty_rows), "--output_dir", str(out)]
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "filtered out" in result.stderr
    assert not (tmp_path / "absent").exists() and [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_a_lock_left_by_sigkill_is_taken_over_and_every_lock_is_removed_when_its_holder_leaves(tmp_path: Path) -> None:
    target = tmp_path / "index"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from textcl.io.atomic import exclusive_lock
        with exclusive_lock(Path({str(target)!r})):
            print("locked", flush=True)
            time.sleep(60)
        """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = tmp_path / ".index.lock"
        with pytest.raises(TextclError, match=f"process {holder.pid} holds .index.lock"):
            with exclusive_lock(target):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert lock.read_text().strip() == str(holder.pid)  # left behind by the kill
        with exclusive_lock(target):
            assert lock.read_text().strip() == str(os.getpid())
        assert not lock.exists()
    finally:
        holder.kill()
