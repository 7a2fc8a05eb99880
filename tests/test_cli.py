"""The `spa` command line: help for newcomers, streaming output, clean errors."""

from __future__ import annotations

from typer.testing import CliRunner

from app.cli import cli

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("prepare", "generate", "demo"):
        assert command in result.output


def test_generate_streams_tokens_on_tiny_backbone():
    result = runner.invoke(cli, ["generate", "hello", "-b", "tiny-llama", "--max-new-tokens", "7"])
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
