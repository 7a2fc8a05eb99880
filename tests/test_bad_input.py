"""Bad input where a user can give it — command-line flags and imported history files — each
case answered by one clear line (exit 2, the message, no traceback), never a crash."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli import cli
from device_agent.errors import DeviceError
from device_agent.history import read_items

runner = CliRunner()

#: (argv, a fragment of the one-line message)
CLI_CASES = [
    (["generate", " ", "-b", "tiny-llama"], "the prompt is empty"),
    (["generate", "hi", "-b", "tiny-llama", "--max-new-tokens", "0"], "0 is not in the range x>=1"),
    (["generate", "hi", "--setting", "magic"], "unknown setting 'magic'"),
    (["generate", "hi", "--strategy", "psychic"], "unknown strategy 'psychic'"),
    (["generate", "hi", "-b", "tiny-llama", "--temperature", "0"], "temperature must be > 0"),
    (["generate", "hi", "-b", "tiny-llama", "--top-p", "1.5"], "top_p in (0, 1]"),
    (
        ["generate", "hi", "-b", "tiny-llama", "--no-repeat-ngram-size", "-1"],
        "-1 is not in the range x>=0",
    ),
    (
        ["generate", "hi", "-b", "tiny-llama", "--repetition-penalty", "0"],
        "0.0 is not in the range x>=0.01",
    ),
    (
        ["generate", "hi", "-b", "tiny-llama", "--num-beams", "zero"],
        "'zero' is not a valid integer",
    ),
    (["cloud", "--port", "70000"], "port: Input should be less than or equal to 65535"),
    (["cloud", "--max-sessions", "0"], "max_sessions: Input should be greater than or equal to 1"),
    (["cloud", "--tap-encoding", "zip"], "tap_encoding: Input should be"),
    (
        ["train", "missing.jsonl", "-b", "tiny-llama", "-o", "x.safetensors"],
        "missing.jsonl: no such data file",
    ),
    (["train", "missing.jsonl", "-b", "tiny-llama"], "Missing option '--out'"),
    (["eval", "missing.jsonl", "-b", "tiny-llama"], "give either --checkpoint or --setting base"),
    (
        ["eval", "missing.jsonl", "-b", "tiny-llama", "--setting", "base"],
        "missing.jsonl: no such data file",
    ),
    (["federate", "--data", "missing.jsonl"], "missing.jsonl: no such data file"),
    (["device", "generate", "hi", "--dir", "/nonexistent/device"], "/nonexistent/device"),
    (["device", "history", "list", "--dir", "/nonexistent/device"], "/nonexistent/device"),
    (["demo", "--port", "0"], "0 is not in the range"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_a_bad_flag_is_one_clear_line(argv, message):
    result = runner.invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


#: (file content, a fragment of the message); the message also names the file (and line)
FILE_CASES = [
    ("", "holds no history items"),
    ("\n\n  \n", "holds no history items"),
    ("not json\n", ":1: not a JSON line"),
    ('{"text": "fine"}\n[1, 2]\n', ":2: expected a JSON object, found list"),
    ('{"text": 5}\n', "'text' must be a string, found int"),
    ('{"prompt": "only half"}\n', ":1:"),
    ('{"response": "only half"}\n', ":1:"),
    ('{"instruction": "x", "output": null}\n', "'output' must be a string, found NoneType"),
    ('{"text": "ok"}\n{"text": "ok"\n', ":2: not a JSON line"),
]


@pytest.mark.parametrize(("content", "message"), FILE_CASES)
def test_a_bad_history_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "history.jsonl"
    path.write_text(content)
    with pytest.raises(DeviceError) as refused:
        read_items(path)
    text = str(refused.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_binary_history_file_is_one_clear_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DeviceError, match="cannot read"):
        read_items(path)


def test_a_good_file_imports_every_format(tmp_path):
    path = tmp_path / "history.jsonl"
    rows = [
        {"text": "a note"},
        {"prompt": "q", "response": "a"},
        {"instruction": "i", "input": None, "output": "o"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_items(path)) == 3


def _run_config() -> dict:
    """The app's own `[tool.flwr.app.config]` (what `flwr run` starts from)."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


#: (keys overridden, or removed with None; a fragment of the message)
RUN_CONFIG_CASES = [
    (
        {"strategy": "fedprox"},
        "strategy: Input should be 'local', 'fedavg', 'fedper' or 'fedavg-ft'",
    ),
    ({"local-epochs": 0}, "local-epochs: Input should be greater than or equal to 1"),
    ({"num-rounds": "three"}, "num-rounds: Input should be a valid integer"),
    ({"round-timeout": -1.0}, "round-timeout: Input should be greater than 0"),
    ({"held-out": 0}, "held-out: Input should be greater than or equal to 1"),
    ({"min-nodes": 0}, "min-nodes: Input should be greater than or equal to 1"),
    ({"data": None}, "data: Field required"),
]


@pytest.mark.parametrize(("change", "message"), RUN_CONFIG_CASES)
def test_a_bad_flower_run_config_is_one_clear_line(change, message):
    from device_agent.run_config import RunConfig
    from personalization.errors import ConfigError

    values = _run_config() | change
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(ConfigError) as refused:
        RunConfig.parse(values)
    text = str(refused.value)
    assert text.startswith("bad federated run config: ") and message in text, text
    assert "\n" not in text


def test_the_app_run_config_parses():
    from device_agent.run_config import RunConfig

    config = RunConfig.parse(_run_config())
    assert (config.strategy, config.local_epochs, config.run_name) == ("fedavg", 2, "")
