"""`spa device …` end to end: typer's runner on the real CLI, against a real cloud server
(uvicorn on 127.0.0.1, tiny random Llama) and a real SQLite device store in tmp_path."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from cloud_server import running
from typer.testing import CliRunner

from app.cli import cli
from device_agent.history import TEXT_INSTRUCTION
from personalization.latency import PROFILES

# typer's error panel wraps at the terminal width: wide enough to keep each message whole
runner = CliRunner(env={"COLUMNS": "250"})

SUBCOMMANDS = (
    ["init"],
    ["history"],
    ["history", "add"],
    ["history", "import"],
    ["history", "list"],
    ["history", "delete"],
    ["train"],
    ["generate"],
    ["recommend"],
    ["status"],
    ["serve"],
)
TITLES = ["rose serum", "rose oil soap", "olive cream", "olive oil shampoo", "shampoo", "soap"]


def device(*args: str):
    return runner.invoke(cli, ["device", *map(str, args)])


def assert_clean_error(result, *fragments: str) -> None:
    """Exit code 2, the message, and no traceback."""
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def stdout_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud")
    (root / "items.json").write_text(json.dumps(TITLES))
    with running(root, catalogue=root / "items.json") as server:  # sessions need no target
        yield server


def _init(cloud, root: Path) -> Path:
    result = device("init", "--cloud-url", cloud.url, "--dir", root, "--name", "test-phone")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def fresh(cloud, tmp_path) -> Path:
    """A newly registered device with an empty history."""
    return _init(cloud, tmp_path / "dev")


def _items_file(path: Path, n: int = 12) -> Path:
    rows = [
        {"prompt": f"What do you do on day {i}?", "response": f"On day {i} I walk my two dogs."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(cloud, tmp_path_factory):
    """A device trained for 3 epochs on a dozen items; (dir, the train command's result)."""
    base = tmp_path_factory.mktemp("trained")
    root = _init(cloud, base / "dev")
    imported = device("history", "import", _items_file(base / "items.jsonl"), "--dir", root)
    assert imported.exit_code == 0, imported.output
    result = device(
        "train", "--epochs", "3", "--calibration-prompts", "2", "--batch-size", "4", "--dir", root
    )
    assert result.exit_code == 0, result.output
    return root, result


# ---- help ---------------------------------------------------------------------------------
def test_device_help_lists_subcommands():
    result = device("--help")
    assert result.exit_code == 0, result.output
    for name in ("init", "history", "train", "generate", "status"):
        assert name in result.output


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_each_subcommand_has_help(command):
    result = device(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output
    if command != ["history"]:
        assert "--dir" in result.output


# ---- init ---------------------------------------------------------------------------------
def test_init_registers_with_a_running_cloud(cloud, tmp_path):
    root = tmp_path / "dev"
    result = device("init", "--cloud-url", cloud.url, "--dir", root)
    assert result.exit_code == 0, result.output
    assert f"registered with {cloud.url}" in result.output and str(root) in result.output
    assert (root / "device.db").is_file() and (root / "checkpoints").is_dir()
    facts = stdout_json(device("status", "--json", "--dir", root))
    assert facts["dir"] == str(root)
    assert facts["cloud_url"] == cloud.url
    assert len(facts["device_id"]) > 0 and facts["device_id"] in result.output
    assert (facts["history_items"], facts["runs"], facts["checkpoint"]) == (0, 0, None)
    assert facts["generations"] == 0


def test_init_twice_is_refused(cloud, fresh):
    result = device("init", "--cloud-url", cloud.url, "--dir", fresh)
    assert_clean_error(result, "already holds a device")


def test_init_when_nothing_listens(tmp_path):
    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "dev"
    result = device("init", "--cloud-url", url, "--dir", root)
    assert_clean_error(result, "cannot reach the cloud", url)
    assert not root.exists()  # nothing left behind


def test_commands_on_a_directory_that_is_not_a_device(tmp_path):
    for args in (["status"], ["history", "list"], ["train"], ["generate", "hi"]):
        result = device(*args, "--dir", tmp_path / "none")
        assert_clean_error(result, "not a device directory", "spa device init")


# ---- history ------------------------------------------------------------------------------
def _listed(root: Path) -> list[dict]:
    return stdout_json(device("history", "list", "--json", "--dir", root))


def test_history_add_list_delete(fresh):
    first = device("history", "add", "I keep bees on my roof.", "--dir", fresh)
    assert first.exit_code == 0, first.output
    assert "added history item 1" in first.output
    second = device(
        "history",
        "add",
        "--prompt",
        "Weekend plans?",
        "--response",
        "Honey harvest.",
        "--dir",
        fresh,
    )
    assert second.exit_code == 0, second.output
    assert "added history item 2" in second.output

    assert _listed(fresh) == [
        {
            "id": 1,
            "kind": "text",
            "instruction": TEXT_INSTRUCTION,
            "input": "",
            "output": "I keep bees on my roof.",
            "source": "",
        },
        {
            "id": 2,
            "kind": "pair",
            "instruction": "Weekend plans?",
            "input": "",
            "output": "Honey harvest.",
            "source": "",
        },
    ]
    plain = device("history", "list", "--dir", fresh)
    assert plain.exit_code == 0, plain.output
    assert "I keep bees on my roof." in plain.output
    assert "Weekend plans? → Honey harvest." in plain.output
    assert plain.output.strip().splitlines()[-1] == "2 items"

    deleted = device("history", "delete", "1", "--dir", fresh)
    assert deleted.exit_code == 0, deleted.output
    assert "deleted 1 items" in deleted.output
    assert [i["id"] for i in _listed(fresh)] == [2]

    missing = device("history", "delete", "2", "99", "--dir", fresh)
    assert_clean_error(missing, "no history item 99")
    assert [i["id"] for i in _listed(fresh)] == [2]  # all or nothing


def test_history_add_needs_text_or_a_pair(fresh):
    assert_clean_error(device("history", "add", "--dir", fresh), "give either TEXT")
    both = device("history", "add", "some text", "--prompt", "p", "--response", "r", "--dir", fresh)
    assert_clean_error(both, "give either TEXT")
    assert_clean_error(
        device("history", "add", "--prompt", "p", "--dir", fresh), "both a prompt and a response"
    )
    assert_clean_error(device("history", "add", "   ", "--dir", fresh), "needs some text")
    assert _listed(fresh) == []


def test_history_import_jsonl(fresh, tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"text": "a note"},
        {"prompt": "p", "response": "r"},
        {"instruction": "i", "input": "ctx", "output": "o"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = device("history", "import", path, "--dir", fresh)
    assert result.exit_code == 0, result.output
    assert f"imported 3 history items from {path}" in result.output
    listed = _listed(fresh)
    assert [(i["kind"], i["instruction"], i["input"], i["output"]) for i in listed] == [
        ("text", TEXT_INSTRUCTION, "", "a note"),
        ("pair", "p", "", "r"),
        ("pair", "i", "ctx", "o"),
    ]
    assert [i["source"] for i in listed] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_history_import_one_user(fresh, tmp_path):
    path = tmp_path / "personachat.jsonl"
    rows = [
        {
            "user_id": f"u{u}",
            "persona": ["i like tea."],
            "turns": [{"partner": f"hi {u}-{t}", "reply": f"hello {u}-{t}"} for t in range(3)],
        }
        for u in range(2)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = device("history", "import", path, "--user", "u1", "--dir", fresh)
    assert result.exit_code == 0, result.output
    assert "imported 4 history items" in result.output  # the persona sentence and 3 replies
    outputs = ["i like tea.", "hello 1-0", "hello 1-1", "hello 1-2"]
    assert [i["output"] for i in _listed(fresh)] == outputs
    assert_clean_error(
        device("history", "import", path, "--user", "nobody", "--dir", fresh), "no user 'nobody'"
    )


def test_history_import_bad_files(fresh, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    assert_clean_error(device("history", "import", bad, "--dir", fresh), f"{bad}:2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_clean_error(device("history", "import", empty, "--dir", fresh), "holds no history")
    absent = tmp_path / "absent.jsonl"
    assert_clean_error(device("history", "import", absent, "--dir", fresh), "no such data file")
    assert _listed(fresh) == []  # a file with a bad line imports nothing


# ---- before training ------------------------------------------------------------------------
def test_generate_before_training(fresh):
    result = device("generate", "hello", "--max-new-tokens", "4", "--dir", fresh)
    assert_clean_error(result, "no trained side network", "spa device train")


def test_base_generation_needs_no_training(fresh):
    result = device(
        "generate", "hello", "--setting", "base", "--max-new-tokens", "5", "--json", "--dir", fresh
    )
    out = stdout_json(result)
    assert out["status"] == "finished"
    assert out["accounts"]["tokens"] == len(out["tokens"]) == 5
    assert {t["branch"] for t in out["tokens"]} == {"cloud"}
    assert stdout_json(device("status", "--json", "--dir", fresh))["generations"] == 1


def test_train_on_an_empty_history(fresh):
    result = device("train", "--epochs", "1", "--calibration-prompts", "1", "--dir", fresh)
    assert_clean_error(result, "history is empty")
    facts = stdout_json(device("status", "--json", "--dir", fresh))
    assert (facts["runs"], facts["checkpoint"]) == (0, None)


def test_train_refuses_a_setting_without_a_side_network(fresh):
    device("history", "add", "a note", "--dir", fresh)
    result = device("train", "--setting", "lora", "--epochs", "1", "--dir", fresh)
    assert_clean_error(result, "a device trains a side network", "'lora'")
    assert stdout_json(device("status", "--json", "--dir", fresh))["runs"] == 0


# ---- trained ----------------------------------------------------------------------------------
def test_train_reports_the_run(trained):
    root, result = trained
    assert "run 1 finished: 10 examples (+2 held out)" in result.stdout
    assert "12 fetched from the cloud, 3 epochs" in result.stdout
    assert "gate: threshold" in result.stdout and "for usage 0.5" in result.stdout
    assert f"checkpoint: {root / 'checkpoints' / 'run-1.safetensors'}" in result.stdout


def test_status_after_training(trained):
    root, _ = trained
    facts = stdout_json(device("status", "--json", "--dir", root))
    assert facts["history_items"] == 12
    assert facts["runs"] == 1
    assert facts["last_run"]["status"] == "finished"
    assert facts["last_run"]["epochs_done"] == 3
    assert facts["last_run"]["error"] == ""
    ckpt = facts["checkpoint"]
    assert ckpt["setting"] == "spa"
    assert isinstance(ckpt["parameters"], int) and ckpt["parameters"] > 0
    assert 0 < ckpt["parameters_pct"] < 100
    assert ckpt["target_usage"] == 0.5
    assert 0 < ckpt["threshold"] < 1 and 0 <= ckpt["usage"] <= 1
    assert (root / ckpt["path"]).is_file()
    plain = device("status", "--dir", root)
    assert plain.exit_code == 0, plain.output
    assert "history_items: 12" in plain.output


def _check_accounts(out: dict, max_tokens: int) -> dict:
    a, tokens = out["accounts"], out["tokens"]
    assert out["status"] == "finished"
    assert 1 <= len(tokens) <= max_tokens
    assert a["tokens"] == len(tokens)
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert a["t_total"] == pytest.approx(a["t_cloud"] + a["t_device"] + a["t_net"], abs=1e-9)
    assert a["t_cloud"] == pytest.approx(sum(t["cloud_s"] for t in tokens), abs=1e-9)
    assert a["t_device"] == pytest.approx(sum(t["device_s"] for t in tokens), abs=1e-9)
    assert a["t_net"] == pytest.approx(sum(t["net_s"] for t in tokens), abs=1e-9)
    assert a["contacts"] == sum(t["contacts"] for t in tokens)
    assert a["bytes_to_device"] == sum(t["bytes_to_device"] for t in tokens)
    assert a["bytes_from_device"] == sum(t["bytes_from_device"] for t in tokens)
    assert a["device_tokens"] == sum(t["branch"] == "device" for t in tokens)
    assert a["fallbacks"] == sum(t["branch"] == "fallback" for t in tokens)
    assert a["M"] == pytest.approx(a["contacts"] / a["tokens"])
    assert out["text"] == "".join(t["text"] for t in tokens)
    return a


def test_generate_with_the_side_network(trained):
    root, _ = trained
    before = stdout_json(device("status", "--json", "--dir", root))["generations"]
    out = stdout_json(
        device(
            "generate", "Tell me about your week.", "--max-new-tokens", "8", "--json", "--dir", root
        )
    )
    a = _check_accounts(out, 8)
    assert {t["branch"] for t in out["tokens"]} <= {"cloud", "device", "fallback"}
    assert (
        a["contacts"] >= 1 and a["bytes_from_device"] > 0 and a["tap_positions"] > 0
    )  # the device answered
    assert all(t["gate_prob"] is not None for t in out["tokens"])
    after = stdout_json(device("status", "--json", "--dir", root))["generations"]
    assert after == before + 1


def test_generate_with_streamed_taps_matches_pull(trained):
    root, _ = trained
    runs = {
        mode: stdout_json(
            device(
                "generate",
                "Tell me about your week.",
                "--max-new-tokens",
                "8",
                "--json",
                "--tap-mode",
                mode,
                "--dir",
                root,
            )
        )
        for mode in ("pull", "streamed", "run-ahead")
    }
    pull = [t["id"] for t in runs["pull"]["tokens"]]
    assert [t["id"] for t in runs["streamed"]["tokens"]] == pull
    assert [t["id"] for t in runs["run-ahead"]["tokens"]] == pull  # the device corrects drafts
    assert runs["run-ahead"]["status"] == "finished"
    assert (
        runs["streamed"]["accounts"]["t_device_ahead"]
        > 0
        == runs["pull"]["accounts"]["t_device_ahead"]
    )
    bad = device("generate", "hi", "--tap-mode", "teleport", "--dir", root)
    assert_clean_error(bad, "unknown tap mode 'teleport'; choose one of pull, streamed, run-ahead")


def test_recommend_refuses_a_side_network_trained_on_text(trained):
    root, _ = trained
    result = device("recommend", "rose serum", "shampoo", "-k", "3", "--dir", root)
    assert_clean_error(result, "trained on text", "--target codes")
    assert_clean_error(device("recommend", "soap", "-k", "0", "--dir", root), "-k")


def test_a_device_trains_on_its_purchases_as_item_codes_and_ranks_with_them(fresh, tmp_path):
    """`--target codes`: the purchases become the cloud's item codes on the device (the same ids
    the code target trains on), the cloud computes their features on the backbone reading codes,
    and the side network trained on them ranks the catalogue."""
    from device_agent.agent import DeviceAgent

    purchases = tmp_path / "purchases.jsonl"
    purchases.write_text("".join(json.dumps({"purchase": t}) + "\n" for t in TITLES))
    assert device("history", "import", purchases, "--dir", fresh).exit_code == 0
    assert_clean_error(device("train", "--dir", fresh), "only purchases", "--target codes")
    bad = device("train", "--target", "codes", "--setting", "spa", "--dir", fresh)
    assert_clean_error(bad, "item codes", "lst, full")
    args = ["--target", "codes", "--setting", "lst", "--epochs", "3", "--dir", fresh]
    assert device("train", *args).exit_code == 0
    with DeviceAgent(fresh) as agent:
        run = agent.store.runs()[-1]
        assert run.status == "finished" and run.examples == run.valid_examples == 1
        model, codes = agent.model("lst"), agent.client.codes()
        assert model.backbone.fingerprint == codes.backbone_fingerprint  # the coded head
        assert model.backbone.vocab_size == codes.vocab_size + codes.length * codes.codebook
    result = device("recommend", *TITLES[-2:], "-k", "3", "--setting", "lst", "--dir", fresh)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln[:4].strip().endswith(".")]
    assert len(lines) == 3 and all(ln.split(None, 3)[3] in TITLES for ln in lines)
    assert all(ln.split(None, 3)[2].startswith("<a_") for ln in lines)  # each item's code
    assert "device contacts" in result.output


def test_generate_plain_output(trained):
    root, _ = trained
    result = device("generate", "Hi!", "--max-new-tokens", "3", "--dir", root)
    assert result.exit_code == 0, result.output
    assert "3 tokens (" in result.output and "T_total" in result.output


def test_generate_base_setting_on_a_trained_device(trained):
    root, _ = trained
    out = stdout_json(
        device(
            "generate",
            "Tell me about your week.",
            "--setting",
            "base",
            "--max-new-tokens",
            "8",
            "--json",
            "--dir",
            root,
        )
    )
    a = _check_accounts(out, 8)
    assert {t["branch"] for t in out["tokens"]} == {"cloud"}
    assert (a["contacts"], a["bytes_from_device"], a["device_tokens"], a["t_device"]) == (
        0,
        0,
        0,
        0,
    )


def test_generate_what_if(trained):
    root, _ = trained
    out = stdout_json(
        device("generate", "hello", "--max-new-tokens", "4", "--what-if", "--json", "--dir", root)
    )
    rows = {r["setting"]: r for r in out["what_if"]}
    assert set(rows) == {"base", "lora", "adapter", "lst", "full", "choice", "spa", "spa run-ahead"}
    for r in rows.values():
        assert r["total_ms"] == pytest.approx(r["inference_ms"] + r["network_ms"])
    assert rows["lst"]["m"] == rows["full"]["m"] == 1.0
    assert rows["adapter"]["m"] == 2 * rows["lora"]["m"]


def test_generate_with_an_unknown_profile(trained):
    root, _ = trained
    result = device("generate", "hello", "--profile", "nonsense", "--dir", root)
    assert_clean_error(result, "unknown network profile 'nonsense'", ", ".join(PROFILES))


def test_generate_with_an_unknown_setting(trained):
    root, _ = trained
    result = device(
        "generate", "hello", "--setting", "bogus", "--max-new-tokens", "2", "--dir", root
    )
    assert_clean_error(
        result, "unknown setting 'bogus'; choose one of base, lst, full, choice, spa"
    )


def test_generate_with_options_the_protocol_refuses(trained):
    root, _ = trained
    result = device("generate", "hello", "--strict", "--strategy", "beam", "--dir", root)
    assert_clean_error(result, "strict mode decides σ on the device")
    assert result.stderr.count("\n") == 1  # one line, though pydantic's message has several
