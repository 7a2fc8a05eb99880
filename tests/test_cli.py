"""The `spa` command line: help for newcomers, streaming output, clean errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli import cli
from personalization.config import (
    FEDERATED_STRATEGIES,
    RECOMMEND_STRATEGIES,
    SERVED_SETTINGS,
    SETTINGS,
    SIDE_SETTINGS,
    SPECULATIVE_STRATEGIES,
    STRATEGIES,
)
from personalization.errors import SpaError
from personalization.latency import PROFILES

# typer's help and error panels wrap at the terminal width: wide enough to keep a line whole
runner = CliRunner(env={"COLUMNS": "250"})


def spa(command: str):
    """`spa …` through typer's runner (the words of `command`; no argument has a space)."""
    return runner.invoke(cli, command.split())


def test_help_lists_commands():
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("prepare", "generate", "train", "eval", "demo"):
        assert command in result.output


SPECULATIVE = SPECULATIVE_STRATEGIES
CHOICES = [
    (["generate"], "--setting", SETTINGS),
    (["generate"], "--strategy", (*STRATEGIES, *SPECULATIVE)),
    (["generate"], "--dtype", ("float32", "bfloat16", "float16")),
    (["train"], "--dtype", ("float32", "bfloat16", "float16")),
    (["cloud"], "--dtype", ("float32", "bfloat16", "float16")),
    (["train"], "--setting", tuple(s for s in SETTINGS if s != "base")),
    (["eval"], "--setting", SETTINGS),
    (["eval"], "--profile", PROFILES),
    (["recommend"], "--strategy", RECOMMEND_STRATEGIES),
    (["federate"], "--strategy", FEDERATED_STRATEGIES),
    (["device", "train"], "--setting", SIDE_SETTINGS),
    (["device", "generate"], "--setting", SERVED_SETTINGS),
    (["device", "generate"], "--strategy", STRATEGIES),
    (["device", "generate"], "--profile", PROFILES),
]


@pytest.mark.parametrize(
    ("command", "option", "names"), CHOICES, ids=[" ".join([*c, o]) for c, o, _ in CHOICES]
)
def test_help_lists_the_choices(command, option, names):
    """Choices come from the project's vocabularies, and `--help` shows every one of them."""
    result = runner.invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.strip("│ ").startswith(option))
    assert f"[{'|'.join(names)}]" in line


def test_a_wrong_choice_is_refused_before_any_work():
    result = runner.invoke(cli, ["generate", "hi", "--strategy", "nucleus", "-b", "none"])
    assert result.exit_code == 2
    assert "unknown strategy 'nucleus'; choose one of greedy, sample, beam" in result.output
    assert "Traceback" not in result.output


def test_a_project_error_is_one_line_on_stderr(monkeypatch):
    """Whatever command raises a SpaError, `spa` prints its message on one line, exit code 2."""

    def broken(spec):
        raise SpaError("the backbone\nis broken")

    monkeypatch.setattr("personalization.backbone.loading.load_backbone", broken)
    result = runner.invoke(cli, ["prepare"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: the backbone is broken\n"
    assert not isinstance(result.exception, SpaError)


def test_an_error_deep_in_a_command_is_one_line_too(tmp_path):
    result = runner.invoke(cli, ["generate", "hi", "-b", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("backbone", "dtype"),
    [("tiny-llama", "float32"), ("tiny-qwen2", "bfloat16"), ("tiny-gpt2", "float16")],
)
def test_generate_streams_tokens_on_tiny_backbone(backbone, dtype):
    args = ["generate", "hello", "-b", backbone, "--max-new-tokens", "7", "--dtype", dtype]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "[7 tokens in" in result.output


def test_prepare_prints_facts():
    result = runner.invoke(cli, ["prepare", "-b", "tiny-gpt2"])
    assert result.exit_code == 0, result.output
    assert "L=2 layers, H=64, vocab=259" in result.output


def test_empty_prompt_is_a_clean_error():
    result = runner.invoke(cli, ["generate", "   ", "-b", "tiny-llama"])
    assert result.exit_code == 2
    assert "the prompt is empty" in result.output
    assert "Traceback" not in result.output


def test_missing_backbone_is_a_clean_error(tmp_path):
    result = runner.invoke(cli, ["generate", "hi", "-b", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_directory_that_is_not_a_model_is_a_clean_error(tmp_path):
    result = runner.invoke(cli, ["generate", "hi", "-b", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a loadable Hugging Face causal LM directory" in result.output


def test_settings_side_by_side():
    result = runner.invoke(cli, ["settings", "-b", "tiny-llama"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[2:-1]}
    assert set(rows) == {"base", "lst", "full", "choice", "spa", "lora", "adapter"}
    assert rows["base"][0] == "0" and rows["lora"][2] == "2" and rows["adapter"][2] == "4"


def _xsum_file(tmp_path):
    rows = [
        {"id": str(i), "document": f"story number {i} about cats", "summary": "~zq sig~"}
        for i in range(30)
    ]
    path = tmp_path / "xsum.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_then_eval(tmp_path):
    data, ckpt, cache = _xsum_file(tmp_path), tmp_path / "spa.safetensors", tmp_path / "cache"
    args = [
        "train",
        str(data),
        "-o",
        str(ckpt),
        "-b",
        "tiny-llama",
        "--valid-size",
        "4",
        "--test-size",
        "4",
        "--epochs",
        "2",
        "--cache",
        str(cache),
    ]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "backbone passes: 26" in first.output and "gate calibrated to usage 0.50" in first.output
    second = runner.invoke(cli, args)
    assert "backbone passes: 0" in second.output  # the feature cache answered everything
    out = tmp_path / "report.json"
    result = spa(
        f"eval {data} --checkpoint {ckpt} -b tiny-llama --valid-size 4 --test-size 4 "
        f"--profile 3g --json {out} --cache {cache}"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["setting"] == "spa" and report["examples"] == 4 and report["profile"] == "3g"
    assert 0 <= report["usage"] <= 1 and report["t_total_ms"] > 0
    assert report["target_usage"] == 0.5  # the budget the checkpoint's gate was calibrated to
    assert "| spa | xsum | 4 |" in result.output


def test_eval_refuses_a_checkpoint_of_another_backbone(tmp_path):
    data, ckpt = _xsum_file(tmp_path), tmp_path / "full.safetensors"
    trained = spa(
        f"train {data} -o {ckpt} -b tiny-llama --setting full --valid-size 4 --test-size 4 "
        f"--epochs 1 --cache {tmp_path}"
    )
    assert trained.exit_code == 0, trained.output
    result = spa(f"eval {data} --checkpoint {ckpt} -b tiny-gpt2 --test-size 4 --valid-size 4")
    assert result.exit_code == 2
    assert "was trained on backbone 'tiny-llama'" in result.output
    assert "Traceback" not in result.output


def test_base_eval_and_input_errors(tmp_path):
    data = _xsum_file(tmp_path)
    base = spa(
        f"eval {data} --setting base -b tiny-llama --test-size 3 --valid-size 2 --max-new-tokens 4"
    )
    assert base.exit_code == 0, base.output
    assert "| base | xsum | 3 |" in base.output
    for args, message in [
        (["eval", str(data), "-b", "tiny-llama"], "either --checkpoint or --setting base"),
        (
            ["eval", str(tmp_path / "none.jsonl"), "--setting", "base", "-b", "tiny-llama"],
            "no such data file",
        ),
        (
            ["train", str(data), "-o", "x", "--setting", "base", "-b", "tiny-llama"],
            "cannot train setting 'base'",
        ),
        (
            ["eval", str(data), "--setting", "base", "-b", "tiny-llama", "--profile", "moon"],
            "unknown network profile",
        ),
    ]:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
