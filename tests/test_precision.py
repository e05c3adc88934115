"""`bf16: auto` picks bf16 only where the hardware computes it natively; an explicit bf16 on a CPU without it warns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from textcl.config import bf16_setting, load_config
from textcl.errors import TextclError
from textcl.model import precision
from textcl.model.precision import resolve_precision

CPU = torch.device("cpu")


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere): an independent view of what torch probes."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return set()
    return {flag for line in path.read_text().splitlines() if line.startswith("flags") for flag in line.split()[2:]}


@pytest.mark.parametrize(("value", "expected"), [(True, "true"), (False, "false"), (None, "false"), ("auto", "auto"),
                                                 ("True", "true"), ("no", "false"), ("AUTO", "auto")])
def test_bf16_settings_read_as_auto_true_or_false(value: object, expected: str) -> None:
    assert bf16_setting(value) == expected


def test_an_unknown_bf16_setting_is_one_line() -> None:
    with pytest.raises(TextclError, match="bf16 must be auto, true or false; got 'maybe'"):
        bf16_setting("maybe")


def test_auto_follows_the_cpu_flags() -> None:
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to compare with")
    native = "amx_tile" in flags or "avx512_bf16" in flags
    chosen, why = resolve_precision("auto", CPU)
    assert chosen == ("bf16" if native else "fp32"), why
    assert torch.backends.cpu.get_cpu_capability() in why


def test_auto_takes_bf16_on_an_amx_cpu_and_fp32_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", CPU) == ("bf16", f"bf16: auto; CPU {torch.backends.cpu.get_cpu_capability()}+AMX "
                                                      "with native bf16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", CPU)[0] == "fp32"
    assert resolve_precision("false", CPU)[0] == "fp32"


def test_explicit_bf16_without_native_support_warns_once(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(precision, "warned", set())
    with caplog.at_level(logging.WARNING, logger="textcl.model.precision"):
        assert resolve_precision("true", CPU)[0] == "bf16"
        assert resolve_precision(True, CPU)[0] == "bf16"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "many times slower than fp32" in warnings[0] and "bf16: auto" in warnings[0]


def test_recipes_and_the_command_line_set_bf16(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ntrain_data: d.txt\noutput_dir: o\nbf16: auto\n")
    assert load_config(str(recipe), []).training.bf16 == "auto"
    assert load_config(str(recipe), ["--bf16"]).training.bf16 == "true"
    assert load_config(str(recipe), ["--bf16", "false"]).training.bf16 == "false"
    recipe.write_text("model_name_or_path: m\ntrain_data: d.txt\noutput_dir: o\nbf16: true\nfp16: true\n")
    with pytest.raises(TextclError, match="bf16 and fp16 are both set"):
        load_config(str(recipe), [])
    recipe.write_text("model_name_or_path: m\ntrain_data: d.txt\noutput_dir: o\nbf16: false\nfp16: true\n")
    assert load_config(str(recipe), []).training.fp16


def test_training_says_which_precision_auto_chose_and_the_card_records_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from conftest import SENTENCES

    from textcl.cli import main

    (tmp_path / "s.txt").write_text("\n".join(SENTENCES * 2) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_model_dir}\ntrain_data: {tmp_path / 's.txt'}\n"
                      f"output_dir: {tmp_path / 'out'}\nper_device_train_batch_size: 4\nmax_steps: 1\nbf16: auto\n")
    assert main(["train", str(recipe)]) == 0
    chosen, why = resolve_precision("auto", CPU)
    assert f"textcl: training in {chosen} ({why})" in capsys.readouterr().out
    assert f"| Precision | {chosen} |" in (tmp_path / "out" / "README.md").read_text()


def test_a_second_run_in_the_same_process_may_change_precision(tiny_model_dir: Path, tmp_path: Path) -> None:
    """accelerate keeps one process-wide state: a notebook's fp32 run then bf16 run must both train."""
    from conftest import SENTENCES

    from textcl.cli import main

    (tmp_path / "s.txt").write_text("\n".join(SENTENCES * 2) + "\n")
    for bf16 in ("false", "true"):
        flags = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(tmp_path / "s.txt"),
                 "--output_dir", str(tmp_path / bf16), "--per_device_train_batch_size", "4", "--max_steps", "1"]
        assert main(["train", *flags, "--bf16", bf16]) == 0
        assert (tmp_path / bf16 / "model.safetensors").exists()
