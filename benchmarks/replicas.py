"""Two `spa cloud` replicas on one PostgreSQL behind nginx (docs/how-to/cloud.md), one SIGKILLed
mid-stream: what its devices see, what the other replica's devices see, what the records keep.

    python benchmarks/replicas.py [--devices 8] [--tokens 96] [--backbone tiny-llama]
    python benchmarks/replicas.py table

PostgreSQL, nginx (running the docs' routing snippet) and both replicas are processes of their own
on 127.0.0.1, started and stopped here (`benchmarks.services`). Devices (`device_agent`, each its
own registered device, its link emulating `lte` so a session lasts seconds) open `lst` sessions
through nginx; once every session has streamed a few tokens, replica r1 is SIGKILLed. Results go
to benchmarks/results/replicas.json; `tests/test_replicas.py` runs the same scenario.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from benchmarks import harness
from benchmarks.servers import free_port, spawn, stop, wait_ready
from benchmarks.services import nginx, postgres

RESULTS = harness.ROOT / "benchmarks/results/replicas.json"
PROMPT = "Tell me a long story."


@contextlib.contextmanager
def replica_stack(work: Path, backbone: str = "tiny-llama") -> Iterator[tuple[str, str, dict]]:
    """(database URL, nginx URL, replica processes by name): PostgreSQL, replicas r1 and r2 on
    it, nginx in front; all stopped when the block ends."""
    with postgres() as url:
        ports = {"r1": free_port(), "r2": free_port()}
        replicas = {
            name: spawn(work, port, backbone, database_url=url, SPA_CLOUD_REPLICA=name)
            for name, port in ports.items()
        }
        try:
            for name, process in replicas.items():
                wait_ready(process, f"http://127.0.0.1:{ports[name]}")
            with nginx(ports, work / "nginx") as front:
                yield url, front, replicas
        finally:
            for process in replicas.values():
                stop(process)


def kill_mid_stream(
    url: str, front: str, replicas: dict, work: Path, *, devices: int, tokens: int
) -> dict:
    """Open one session per device through `front`, SIGKILL r1 once all are streaming, and
    report each device's outcome, the proxy's log of each replica's session calls and the
    database's session rows."""
    import sqlalchemy as sa

    from device_agent.agent import DeviceAgent
    from device_agent.errors import DeviceError
    from device_agent.trainer import DeviceTrainConfig, frozen_head, start_model
    from personalization.config import DecodeConfig
    from personalization.latency import profile

    roots = [work / f"device-{i}" for i in range(devices)]
    for i, root in enumerate(roots):
        DeviceAgent.init(root, front, f"device-{i}").close()
    streamed, sessions, outcome = defaultdict(int), {}, {}

    def generate(i: int) -> None:
        with DeviceAgent(roots[i], profile=profile("lte")) as agent:
            head = frozen_head(agent.client, agent.store)
            model = start_model(agent.store, head, DeviceTrainConfig(setting="lst"), False, {})
            run = agent.generate(PROMPT, model=model, decode=DecodeConfig(max_new_tokens=tokens))
            try:
                for _token in run:
                    sessions[i] = run.session.session_id
                    streamed[i] += 1
                outcome[i] = {"status": run.status, "error": ""}
            except DeviceError as exc:
                outcome[i] = {"status": "error", "error": str(exc)}
            outcome[i]["ended"] = time.monotonic()

    threads = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(devices)]
    for t in threads:
        t.start()
    wait = time.monotonic() + 120
    while time.monotonic() < wait and not (
        len(sessions) == devices and min(streamed[i] for i in range(devices)) >= 3
    ):
        time.sleep(0.05)
    before = dict(streamed)
    replicas["r1"].kill()
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=300)

    log = (work / "nginx" / "access.log").read_text().splitlines()
    engine = sa.create_engine(url)
    with engine.connect() as db:
        registered = db.execute(sa.text("select count(*) from devices")).scalar()
        rows = {r.id: r._asdict() for r in db.execute(sa.text("select * from sessions"))}
    engine.dispose()
    out = []
    for i in range(devices):
        sid = sessions.get(i, "")
        row = rows.get(sid)
        calls = [ln for ln in log if f"/v1/sessions/{sid}" in ln] if sid else []
        out.append(
            {
                "device": i,
                "replica": sid.split("-", 1)[0],
                "session": sid,
                "tokens_before_kill": before.get(i, 0),
                "tokens": streamed[i],
                "status": outcome.get(i, {}).get("status", "hung"),
                "error": outcome.get(i, {}).get("error", ""),
                "seconds_after_kill": round(outcome[i]["ended"] - killed, 3)
                if i in outcome
                else None,
                "proxy_5xx": sum(bool(re.search(r'" 5\d\d ', ln)) for ln in calls),
                "record": None
                if row is None
                else {
                    k: row[k]
                    for k in (
                        "status",
                        "setting",
                        "tokens",
                        "device_contacts",
                        "max_new_tokens",
                        "prompt_tokens",
                    )
                }
                | {"finished": row["finished_at"] is not None},
            }
        )
    return {"devices": out, "registered_devices": registered, "tokens": tokens}


def summarise(report: dict) -> dict:
    """The figures issue 37 names: 5xx from the surviving replica, records lost, and how soon
    the killed replica's devices were told."""
    survivors = [d for d in report["devices"] if d["replica"] == "r2"]
    killed = [d for d in report["devices"] if d["replica"] == "r1"]
    lost = sum(d["record"] is None for d in report["devices"])
    lost += sum(
        d["record"]["status"] != "finished" or d["record"]["tokens"] != d["tokens"]
        for d in survivors
    )
    return {
        "sessions_r1": len(killed),
        "sessions_r2": len(survivors),
        "surviving_finished": sum(
            d["status"] == "finished" and d["tokens"] == report["tokens"] for d in survivors
        ),
        "surviving_5xx": sum(d["proxy_5xx"] for d in survivors),
        "killed_clear_errors": sum(
            d["status"] == "error" and "<html" not in d["error"].lower() for d in killed
        ),
        "killed_error_s_max": max((d["seconds_after_kill"] for d in killed), default=None),
        "lost_records": lost,
    }


COLUMNS = (
    "device",
    "replica",
    "tokens at kill",
    "tokens",
    "outcome",
    "s after kill",
    "5xx via proxy",
)


def render(r: dict) -> str:
    s, c = r["summary"], r["config"]
    rows = [
        [d["device"], d["replica"], d["tokens_before_kill"], d["tokens"], d["status"]]
        + [d["seconds_after_kill"], d["proxy_5xx"], (d["record"] or {}).get("status")]
        for d in r["devices"]
    ]
    return "\n".join(
        [
            f"{c['devices']} devices, {c['tokens']} tokens each, backbone {c['backbone']}; "
            "replica r1 SIGKILLed once every session was streaming.\n",
            harness.table(["figure", "value"], [[k, v] for k, v in s.items()]),
            "",
            harness.table([*COLUMNS, "record"], rows),
        ]
    )


def main() -> None:
    parser = harness.parser(__doc__, data=False, results=RESULTS, work=".bench/replicas")
    parser.add_argument("phase", nargs="?", default="run", choices=("run", "table"))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    if args.phase == "table":
        harness.show(render, args.out)
        return
    backbone = args.backbone or "tiny-llama"
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    with replica_stack(work, backbone) as (url, front, replicas):
        report = kill_mid_stream(
            url, front, replicas, work, devices=args.devices, tokens=args.tokens
        )
    results = {
        "summary": summarise(report),
        **report,
        "config": {"devices": args.devices, "tokens": args.tokens, "backbone": backbone},
    }
    harness.write_results(results, args.out)
    harness.show(render, args.out)


if __name__ == "__main__":
    main()
