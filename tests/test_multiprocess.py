"""Multi-process training that cannot hang or drift: 2 CPU processes (gloo) x batch 8 against 1 process x 16.

One spawn of two processes runs every case below through `Trainer` (one process group, accelerate's state
reset between cases), under a timeout that fails with each rank's collective instead of hanging. Each case
is compared with its 1-process, double-batch counterpart where the semantics say they are equal (dropout
off, so the only difference is how the work is split: losses after step 1 also check the gradients, since
they depend on the updated weights); otherwise the test states the invariant it checks.

The ragged data is built so that the hang of issue 13 happens on the old code: rank 1's first batch has no
hard negatives at all while rank 0's has some, other rows have 0-2, and the last batch is short, so with
`forward_chunk_size` 4 or GradCache chunks of 3 the processes need different numbers of forwards.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from conftest import SENTENCES, build_tiny_bert
from decoder_models import save_tiny_decoder_encoder
from gloo_processes import launch, run_processes
from safetensors.torch import load_file
from transformers import AutoTokenizer

from textcl import Encoder
from textcl.config import load_config
from textcl.data.loader import build_training_data
from textcl.demo.run import demo_rows
from textcl.evaluation.suite import evaluate
from textcl.io.tables import write_table
from textcl.losses import InfoNCELoss
from textcl.retrieval.mining import mine_hard_negatives
from textcl.training.setup import build_encoder
from textcl.training.step import forwards_needed
from textcl.training.trainer import Trainer

pytestmark = pytest.mark.slow

ROWS = 44  # 6 batches of 8 (the last one of 4): 3 steps of 2 x 8, or of 1 x 16 (16, 16, 12)
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
CONSTANT = {"lr_scheduler_type": "constant", "max_steps": 4}
CASES: dict[str, dict] = {
    "ragged": {"forward_chunk_size": 4, "max_steps": 3},
    "gradcache": {"gradcache_chunk_size": 3, "max_steps": 3},
    "accumulation_epochs": {"gradient_accumulation_steps": 2, "num_train_epochs": 3, "forward_chunk_size": 4},
    "queue_accumulation": {"queue_size": 80, "momentum": 0.5, "gradient_accumulation_steps": 2, "num_train_epochs": 1},
    "bf16": {"bf16": "true", "forward_chunk_size": 4, "max_steps": 2, "max_seq_length": 12},
    "batch_per_source": {"data": "sources", "batch_per_source": True, "learning_rate": 0.0, "max_steps": 3},
    "streaming": {"data": "stream", "streaming": True, "learning_rate": 0.0, "max_steps": 4},
    "fsdp": {"env": FSDP, "forward_chunk_size": 4, "save_steps": 2, "evaluate": True, **CONSTANT},
    "fsdp_gradcache": {"env": FSDP, "gradcache_chunk_size": 3, "max_steps": 3, "gradient_checkpointing": True},
    "fsdp_first_half": {"env": FSDP, "forward_chunk_size": 4, "save_steps": 2, "output": "fsdp_resumed",
                        **CONSTANT, "max_steps": 2},
    "fsdp_resumed": {"env": FSDP, "forward_chunk_size": 4, "save_steps": 2, "resume_from_checkpoint": "latest",
                     **CONSTANT},
    "fresh_heads": {"setup_only": True, "queue_size": 16, "pooling": "cls_mlp", "dense_dim": 16, "lora": True},
    "distill_kl": {"data": "scored", "distill_loss": "kl", "distill_temperature": 0.5, "distill_weight": 2.0,
                   "forward_chunk_size": 4, "max_steps": 3},
    "remine": {"data": "mined", "remine_steps": 1, "learning_rate": 0.0, "max_steps": 2},
    "distill_mse": {"teacher": True, "distill_loss": "mse", "distill_weight": 5.0, "gradcache_chunk_size": 3,
                    "max_steps": 3},
    # a tiny Qwen3 embedder (left padding, EOS appended), bidirectional, its instruction left out of mean pooling
    "decoder": {"model": "decoder", "gradcache_chunk_size": 3, "max_steps": 3, "query_instruction": "Find the text",
                "include_prompt": False, "bidirectional": True},
}


def texts() -> list[str]:
    return [row["text"] for row in demo_rows()[:400]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ragged_rows() -> list[dict]:
    """Rows with 0, 1 or 2 hard negatives; the rows of the sampler's batch 1 (rank 1's first) have none.
    Positives are an anchor's first 3-11 words; no text repeats, so batches are the same at any batch size."""
    text = texts()
    order = np.random.default_rng([42, 0]).permutation(ROWS)  # the no-duplicates sampler's epoch-0 order, seed 42
    batch_of = {int(row): index // 8 for index, row in enumerate(order)}
    rows = []
    for i in range(ROWS):
        k = 0 if batch_of[i] == 1 else i % 3
        rows.append({"anchor": text[i], "positive": " ".join(text[i].split()[: 3 + i % 9]),
                     "negative": text[200 + i] if k >= 1 else None, "negative_2": text[300 + i] if k >= 2 else None})
    return rows


def scored_rows() -> list[dict]:
    """The ragged rows with made-up teacher scores for the positive and each present negative."""
    rng = np.random.default_rng(7)
    return [row | {f"{name}_score": float(rng.uniform(-1, 1)) if row.get(name, True) else None
                   for name in ("positive", "negative", "negative_2")} for row in ragged_rows()]


def mined_file(folder: Path, model: Path) -> Path:
    """44 pairs with 2 negatives each mined by the test model (as `textcl mine` writes them, sidecar included)."""
    pairs = write_jsonl(folder / "pairs.jsonl", pair_rows(0, ROWS))
    rows = pair_rows(0, ROWS)
    mined = mine_hard_negatives(Encoder.load(model, pooling="mean"), [r["anchor"] for r in rows],
                                [r["positive"] for r in rows], texts()[200:300], num_negatives=2, min_negatives=0,
                                range_min=0, range_max=10, max_score_ratio=None, margin=None)
    out = folder / "mined.jsonl"
    write_table(mined.columns, out, provenance={"command": "mine", "data": str(pairs), "split": "train",
                                                "corpus": str(write_jsonl(folder / "corpus.jsonl", [
                                                    {"text": t} for t in texts()[200:300]])),
                                                "settings": mined.settings})
    return out


def pair_rows(start: int, count: int) -> list[dict]:
    text = texts()
    return [{"anchor": text[i], "positive": " ".join(text[i].split()[: 3 + i % 9])} for i in range(start, start + count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, list[str]]:
    folder = tmp_path_factory.mktemp("mp-data")
    teacher = folder / "teacher"
    build_tiny_bert(len(AutoTokenizer.from_pretrained(tiny_model_dir)), seed=1).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(teacher)
    sts = folder / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{i % 5}\n" for i, (a, b) in
                                                             enumerate(pairwise(SENTENCES))))
    return {
        "ragged": [str(write_jsonl(folder / "ragged.jsonl", ragged_rows()))],
        # two sources of different lengths: batches of 8, 8, 8, 4 and 8, 4
        "sources": [str(write_jsonl(folder / "a.jsonl", pair_rows(0, 28))),
                    str(write_jsonl(folder / "b.jsonl", pair_rows(100, 12)))],
        # streamed rows alternate between the processes: 18 and 17 rows, so rank 0 has a third batch (of 2; rank 1's
        # last row alone is no batch)
        "stream": [str(write_jsonl(folder / "stream.jsonl", pair_rows(0, 35)))],
        "sts": [str(sts)],
        "scored": [str(write_jsonl(folder / "scored.jsonl", scored_rows()))],
        "teacher": [str(teacher)],
        "mined": [str(mined_file(folder, tiny_model_dir))],
        "decoder": [str(save_tiny_decoder_encoder(folder / "decoder", "qwen3"))],
    }


def overrides(model: Path, data: dict[str, list[str]], output: Path, case: dict, batch: int) -> list[str]:
    model = Path(data[case["model"]][0]) if "model" in case else model
    settings = {"model_name_or_path": str(model), "train_data": data[case.get("data", "ragged")],
                "output_dir": str(output), "per_device_train_batch_size": batch, "learning_rate": 1e-3,
                "logging_steps": 1, "max_seq_length": 24, "dropout": 0.0, "pooling": "mean", "forward_chunk_size": 0}
    if case.get("evaluate"):
        settings["eval_sts"] = data["sts"]
    if case.get("teacher"):  # a frozen teacher for distill_loss mse: the test model with other weights
        settings["teacher_model"] = data["teacher"][0]
    settings |= {key: value for key, value in case.items() if key not in ("data", "env", "output", "setup_only",
                                                                            "evaluate", "teacher", "model")}
    arguments = []
    for key, value in settings.items():
        values = value if isinstance(value, list) else [value]
        arguments += [f"--{key}", *map(str, values)]
    return arguments


@contextmanager
def environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def make_trainer(model: Path, data: dict[str, list[str]], output: Path, case: dict, batch: int) -> Trainer:
    AcceleratorState._reset_state()  # a fresh accelerate state per run (precision, FSDP), same process group
    GradientState._reset_state()
    return Trainer(load_config(None, overrides(model, data, output, case, batch)))


def worker(rank: int, folder: Path, model: Path, data: dict[str, list[str]]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    for name, case in CASES.items():
        output = folder / case.get("output", name)
        if not dist.is_initialized():  # each training ends by destroying the process group (accelerate)
            dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{name}", rank=rank, world_size=2)
        with environment(case.get("env", {})):
            trainer = make_trainer(model, data, output, case, 8)
            if case.get("setup_only"):
                momentum = trainer.steps.momentum.average.module.state_dict()
                set_seed(42, device_specific=True)  # what each process built before DDP's broadcast
                fresh = build_encoder(trainer.config.model).state_dict()
                torch.save({"momentum": momentum, "online": trainer.unwrapped().state_dict(), "fresh": fresh},
                           output.parent / f"{name}-rank{rank}.pt")
                continue
            trainer.train()
            if trainer.remining is not None:
                negatives = trainer.remining.state_dict()["negatives"]
                (folder / f"{name}-negatives-rank{rank}.json").write_text(json.dumps(negatives))
            queue = trainer.steps.queue
            if queue is not None:
                torch.save(queue.negatives.clone(), folder / f"{name}-queue-rank{rank}.pt")
            if name == "fsdp":  # the trained model as the sharded model computes it (a collective forward)
                trainer.model.eval()
                with torch.no_grad():
                    embeddings = trainer.model(**trainer.encoder.tokenizer(SENTENCES, padding=True,
                                                                           return_tensors="pt"))
                torch.save(embeddings, folder / f"fsdp-embeddings-rank{rank}.pt")


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data: dict) -> Path:
    folder = tmp_path_factory.mktemp("two-processes")
    run_processes(worker, 2, folder, tiny_model_dir, data, timeout=1200)
    return folder


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, data: dict):
    """`one(name)`: the 1-process x 16 run of a case (cached), as a Trainer after training."""
    folder, done = tmp_path_factory.mktemp("one-process"), {}

    def run(name: str) -> Trainer:
        if name not in done:
            case = {key: value for key, value in CASES[name].items() if key != "env"}
            done[name] = make_trainer(tiny_model_dir, data, folder / name, case, 16)
            done[name].train()
            AcceleratorState._reset_state()
        return done[name]

    return run


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def losses(output: Path) -> list[float]:
    return [record["loss"] for record in records(output)]


def assert_same_losses(two_processes: list[float], one_process: list[float], atol: float = 1e-5,
                       first_atol: float = 1e-6) -> None:
    """The tolerances of tests/test_training.py: 1e-6 at step 1, 1e-5 after (float noise through Adam steps)."""
    assert len(two_processes) == len(one_process) and two_processes
    assert two_processes[0] == pytest.approx(one_process[0], abs=first_atol)
    assert two_processes == pytest.approx(one_process, abs=atol)


def step_batches(tiny_model_dir: Path, data: dict, case: dict) -> list[list[dict]]:
    """The batches each process gets, step by step: accelerate gives process r the sampler's batches r, r+2, ..."""
    config = load_config(None, overrides(tiny_model_dir, data, Path("unused"), case, 8))
    encoder = build_encoder(config.model)
    built = build_training_data(config.data, tokenizer=encoder.tokenizer, max_seq_length=encoder.max_seq_length,
                                prompts=encoder.prompts, batch_size=8, seed=config.training.seed)
    batches = list(built.loader)
    return [batches[i : i + 2] for i in range(0, len(batches) - 1, 2)]


def test_the_ragged_data_makes_the_processes_need_different_forwards(tiny_model_dir: Path, data: dict) -> None:
    """The scenario is what it claims: without agreeing on the forwards, these runs would hang."""
    steps = step_batches(tiny_model_dir, data, CASES["ragged"])
    assert steps[0][1]["negatives"] is None and steps[0][0]["negatives"] is not None
    assert steps[-1][1]["anchor"]["input_ids"].shape[0] < 8
    for case in ("ragged", "gradcache"):
        size = CASES[case].get("gradcache_chunk_size") or CASES[case]["forward_chunk_size"]
        needs = [[forwards_needed(batch, size) for batch in step] for step in steps]
        assert any(a != b for a, b in needs), needs


@pytest.mark.parametrize("name", ["ragged", "gradcache", "fsdp_gradcache"])
def test_ragged_negatives_two_processes_equal_one_process(two: Path, one, name: str) -> None:
    """Ragged and absent negatives, forward chunks of 4 or GradCache chunks of 3 (DDP, and FSDP with gradient
    checkpointing too), an uneven last batch: the losses of one process with the doubled batch (GradCache and
    checkpointing compute plain backprop's gradients)."""
    assert_same_losses(losses(two / name), losses(one("ragged").output_dir))


def test_decoder_two_processes_equal_one_process(two: Path, one) -> None:
    """A decoder embedder under DDP with GradCache chunks of 3 on ragged negatives: one process x 16's losses."""
    assert_same_losses(losses(two / "decoder"), losses(one("decoder").output_dir))
    assert losses(one("decoder").output_dir) != pytest.approx(losses(one("ragged").output_dir), abs=1e-3)


@pytest.mark.parametrize("name", ["distill_kl", "distill_mse"])
def test_distillation_two_processes_equal_one_process(two: Path, one, name: str) -> None:
    """KL against the data's teacher scores (forward chunks of 4) and MSE against a frozen teacher's embeddings
    (GradCache chunks of 3), on ragged negatives: the losses and both logged terms of one process x 16."""
    assert_same_losses(losses(two / name), losses(one(name).output_dir))
    assert all(record["distill_loss"] > 1e-4 for record in records(one(name).output_dir))
    assert losses(one(name).output_dir) != pytest.approx(losses(one("ragged").output_dir), abs=1e-3)  # it counts


def test_remining_two_processes_equal_one_process(two: Path, one) -> None:
    """Re-mining after each step, the corpus encoded half by each process: both processes hold the negatives that
    one process mines alone (the model held still at learning rate 0: mined batches repeat texts, so 2 x 8 rows
    and 1 x 16 would not make the same updates), and log the same counts."""
    ranks = [json.loads((two / f"remine-negatives-rank{rank}.json").read_text()) for rank in (0, 1)]
    alone = one("remine").remining.state_dict()["negatives"]
    assert ranks[0] == ranks[1] == alone and any(alone)
    logged = [[r for r in records_of(output) if "negatives_changed" in r] for output in
              (two / "remine", one("remine").output_dir)]
    assert [r["step"] for r in logged[0]] == [1] and logged[0][0]["remined_negatives"] > 0
    assert [(r["remined_negatives"], r["negatives_changed"]) for r in logged[0]] == [
        (r["remined_negatives"], r["negatives_changed"]) for r in logged[1]]


def records_of(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_over_epochs(two: Path, one) -> None:
    """3 epochs of 3 batches, accumulation 2: accelerate also steps at each epoch's end, so 2 steps an epoch, 6 in
    all, as the config implies; the linear schedule reaches 0 exactly at the last one."""
    got, expected = records(two / "accumulation_epochs"), records(one("accumulation_epochs").output_dir)
    assert [r["step"] for r in got] == list(range(1, 7)) and [r["epoch"] for r in got] == [0, 0, 1, 1, 2, 2]
    assert got[-1]["learning_rate"] == 0 and got[-2]["learning_rate"] > 0
    assert_same_losses([r["loss"] for r in got], [r["loss"] for r in expected])


def test_queue_receives_every_micro_batch_and_matches_one_process(two: Path, one) -> None:
    """Invariant: after the run, every process holds the same queue, and it is the queue of 1 process x 16: the
    keys of all 44 rows (3 micro-batches; 2 optimizer steps), each micro-batch's in rank order."""
    queues = [torch.load(two / f"queue_accumulation-queue-rank{rank}.pt") for rank in range(2)]
    trainer = one("queue_accumulation")
    assert torch.equal(queues[0], queues[1])
    assert queues[0].shape[0] == ROWS
    torch.testing.assert_close(queues[0], trainer.steps.queue.negatives, atol=1e-5, rtol=0)
    assert_same_losses(losses(two / "queue_accumulation"), losses(trainer.output_dir))


def test_bf16_two_processes_equal_one_process(two: Path, one) -> None:
    """bf16 autocast changes the arithmetic, not the split: the chunks differ between the runs, so equality is
    to bf16's resolution."""
    assert_same_losses(losses(two / "bf16"), losses(one("bf16").output_dir), atol=2e-2, first_atol=2e-2)


def embed_batch(encoder: Encoder, batch: dict) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return encoder(**batch["anchor"]), encoder(**batch["positive"]), batch["positive_ids"]


def union_loss(encoder: Encoder, batches: list[dict]) -> float:
    """The InfoNCE loss of the rows of all `batches` together, in one process: what the processes compute as one."""
    anchor, positive, ids = (torch.cat(parts) for parts in zip(*(embed_batch(encoder, b) for b in batches)))
    return InfoNCELoss(temperature=0.05)(anchor, positive, positive_ids=ids).item()


def test_batch_per_source_with_sources_of_different_lengths(two: Path, tiny_model_dir: Path, data: dict) -> None:
    """Invariant (1 x 16 draws other batches, so it is no reference): each step's loss is the loss of the two
    processes' batches as one batch, whose sizes differ between the processes (learning rate 0)."""
    case = CASES["batch_per_source"]
    steps = step_batches(tiny_model_dir, data, case)
    assert any(a["anchor"]["input_ids"].shape[0] != b["anchor"]["input_ids"].shape[0] for a, b in steps)
    encoder = build_encoder(load_config(None, overrides(tiny_model_dir, data, Path("x"), case, 8)).model).train()
    assert losses(two / "batch_per_source") == pytest.approx([union_loss(encoder, step) for step in steps], abs=1e-5)


def test_streaming_ends_each_epoch_together(two: Path, tiny_model_dir: Path, data: dict) -> None:
    """A stream splits 18/17 rows: rank 0 has a third batch in every epoch, rank 1 does not. Invariant: both end
    the epoch after 2 steps (rank 0's extra batch is left), and each step's loss is that of the two
    processes' batches as one (learning rate 0)."""
    case = CASES["streaming"]
    config = load_config(None, overrides(tiny_model_dir, data, Path("x"), case, 8))
    encoder = build_encoder(config.model).train()
    per_rank = [build_training_data(config.data, tokenizer=encoder.tokenizer, max_seq_length=encoder.max_seq_length,
                                    prompts=encoder.prompts, batch_size=8, seed=config.training.seed,
                                    num_processes=2, process_index=rank) for rank in range(2)]
    expected = []
    for epoch in range(2):
        batches = []
        for built in per_rank:
            built.set_epoch(epoch)
            batches.append(list(built.loader))
        assert [len(b) for b in batches] == [3, 2]
        expected += [union_loss(encoder, [batches[0][s], batches[1][s]]) for s in range(2)]
    got = records(two / "streaming")
    assert [r["epoch"] for r in got] == [0, 0, 1, 1]
    assert [r["loss"] for r in got] == pytest.approx(expected, abs=1e-5)


def test_fsdp_trains_evaluates_saves_and_resumes(two: Path, one, data: dict) -> None:
    """FSDP (torch's FSDP2 through accelerate, 2 CPU processes): the losses of 1 process x 16; the saved folder is
    a full sentence-transformers model that computes what the sharded model computed; the run's final STS
    evaluation is that of the saved model; a run stopped after its step-2 checkpoint and resumed ends with the
    weights of the uninterrupted run."""
    assert_same_losses(losses(two / "fsdp"), losses(one("fsdp").output_dir))
    st = pytest.importorskip("sentence_transformers")
    sharded = torch.load(two / "fsdp-embeddings-rank0.pt")
    saved = st.SentenceTransformer(str(two / "fsdp"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(saved, sharded, atol=1e-5, rtol=0)
    evaluated = json.loads((two / "fsdp" / "textcl.json").read_text())["metrics"]["sts"]["spearman"]
    assert evaluated == pytest.approx(evaluate(Encoder.load(two / "fsdp"), sts=data["sts"])["sts"]["spearman"], abs=1e-6)
    assert losses(two / "fsdp_resumed") == pytest.approx(losses(two / "fsdp"), abs=1e-6)
    full, resumed = load_file(two / "fsdp" / "model.safetensors"), load_file(two / "fsdp_resumed" / "model.safetensors")
    assert full.keys() == resumed.keys() and len(full) > 10
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


def test_momentum_encoder_starts_identical_on_every_process(two: Path) -> None:
    """Fresh heads (cls_mlp's MLP, a Dense layer, LoRA's A) start different on each process (each seeds its own
    RNG); the momentum encoder starts from the weights DDP broadcast, identical everywhere."""
    ranks = [torch.load(two / f"fresh_heads-rank{rank}.pt") for rank in range(2)]
    heads = [key for key in ranks[0]["fresh"] if key.startswith(("mlp_head.", "dense.")) or "lora_A" in key]
    assert len(heads) >= 4 and all(not torch.equal(ranks[0]["fresh"][k], ranks[1]["fresh"][k]) for k in heads)
    for key, value in ranks[0]["momentum"].items():
        assert torch.equal(ranks[1]["momentum"][key], value), key
        assert torch.equal(ranks[0]["online"][key], value), key


def test_the_issues_reproduction_finishes(tiny_model_dir: Path, data: dict, tmp_path: Path) -> None:
    """Issue 13's command, `accelerate launch --multi_gpu --num_processes 2 -m textcl train` on CPU with ragged
    negatives and forward_chunk_size 4 for 8 steps (over epochs of 3), hung at its first uneven step; now it
    finishes. (`launch` fails the test with each rank's collective if it hangs.)"""
    recipe = tmp_path / "ragged.yaml"
    settings = {"model_name_or_path": str(tiny_model_dir), "train_data": data["ragged"][0], "max_seq_length": 24,
                "per_device_train_batch_size": 8, "forward_chunk_size": 4, "max_steps": 8, "logging_steps": 1,
                "output_dir": str(tmp_path / "out-ragged"), "pooling": "mean"}
    recipe.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--tee", "3",
               "--log_dir", str(tmp_path / "logs"), "-m", "textcl", "train", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = launch(command, timeout=600, env=env, log_dir=tmp_path / "logs")
    assert result.returncode == 0, result.stdout[-3000:]
    assert [record["step"] for record in records(tmp_path / "out-ragged")] == list(range(1, 9))
