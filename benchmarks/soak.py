"""Soak: many devices against one real cloud for minutes, well-behaved and not (issue 19).

One `spa cloud` process on the real backbone (loopback only) and N device threads here, each
running sessions back to back until the time is up. Every session draws its setting (`base`,
`spa` with pull / streamed / run-ahead taps), its strategy (greedy, sampling, beam) and how the
device behaves:

- plain      streams to the end, answering every side request at once;
- late       answers every side request after the session's deadline (the cloud falls back);
- silent     listens but never answers (every device position falls back);
- vanish     drops the event stream after a few events and never comes back, nor cancels;
- reconnect  its stream breaks mid-way; it resumes after the events it read (the cloud replays).

At the end, after the cloud's resume window has passed, every session's record is read back:
a session not in an end state (finished / cancelled / expired / failed) is *stuck*. Reported:
sessions by behaviour and status, fallbacks, 4xx by code, responses ≥ 500, stuck sessions,
p50 / p95 time per token of plain sessions, and the cloud's RSS over time (its /metrics).

    python benchmarks/soak.py [--devices 32] [--minutes 10]
    python benchmarks/soak.py table

Writes benchmarks/results/soak.json (figures, config, hardware, date); progress per minute.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import write_results

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/soak.json"
BEHAVIOURS = {"plain": 6, "late": 1, "silent": 1, "vanish": 1, "reconnect": 1}  # weights
END_STATES = {"finished", "cancelled", "expired", "failed"}
DEADLINE_S = 0.5  # short, so that late and silent devices cost the cloud little


def _rss(url: str) -> float | None:
    """The cloud's resident memory (MiB), from prometheus_client's process collector."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    return float(m.group(1)) / 2**20 if m else None


class Soak:
    """The devices' shared tally (under one lock) and the session mix."""

    def __init__(self, url: str, token: str, model, prompts: list, stop_at: float):
        self.url, self.token, self.model, self.prompts = url, token, model, prompts
        self.stop_at = stop_at
        self.lock = threading.Lock()
        self.sessions: dict[str, str] = {}  # session id → behaviour
        self.outcomes: Counter = Counter()  # (behaviour, device-side outcome)
        self.statuses: Counter = Counter()  # HTTP error statuses the devices got
        self.errors: list[str] = []
        self.gaps: list[float] = []  # seconds between tokens, plain sessions

    def draw(self, rng: random.Random):
        """One session's setting, tap mode, decoding and behaviour."""
        from personalization.config import DecodeConfig

        behaviour = rng.choices(list(BEHAVIOURS), weights=list(BEHAVIOURS.values()))[0]
        setting = "base" if behaviour == "plain" and rng.random() < 0.3 else "spa"
        strategy = rng.choice(("greedy", "greedy", "sample", "beam"))
        mode = rng.choice(("pull", "streamed", "run-ahead"))
        if strategy == "beam" or behaviour in ("late", "silent"):
            mode = "pull"  # beam search asks per step; late / silent are about side requests
        decode = DecodeConfig(
            strategy=strategy,
            max_new_tokens=rng.randint(8, 32),
            num_beams=2,
            seed=rng.randrange(1 << 30),
            top_p=0.9,
        )
        return behaviour, setting, (mode if setting == "spa" else None), decode

    def device(self, i: int) -> None:
        from device_agent.client import CloudClient
        from device_agent.errors import CloudError

        rng = random.Random(i)
        with CloudClient(self.url, self.token) as client:
            while time.monotonic() < self.stop_at:
                behaviour, setting, mode, decode = self.draw(rng)
                prompt = rng.choice(self.prompts)
                try:
                    outcome = getattr(self, behaviour)(client, prompt, setting, mode, decode, rng)
                except CloudError as exc:
                    outcome = f"http {exc.status}"
                    with self.lock:
                        self.statuses[exc.status] += 1
                    time.sleep(0.5)
                except Exception as exc:  # any other failure is an error too
                    outcome = "error"
                    with self.lock:
                        self.errors.append(f"{behaviour}: {type(exc).__name__}: {exc}"[:300])
                with self.lock:
                    self.outcomes[(behaviour, outcome)] += 1

    def _record(self, generation, behaviour: str) -> None:
        if generation.session is not None:
            with self.lock:
                self.sessions[generation.session.session_id] = behaviour

    def _generation(self, client, prompt, setting, mode, decode, deadline_s=None):
        from device_agent.generation import RemoteGeneration

        model = self.model if setting != "base" else None
        return RemoteGeneration(
            client, model, prompt, setting, decode, tap_mode=mode, deadline_s=deadline_s
        )

    def plain(self, client, prompt, setting, mode, decode, rng) -> str:
        gen = self._generation(client, prompt, setting, mode, decode)
        times = []
        try:
            for _ in gen:
                times.append(time.perf_counter())
        finally:
            self._record(gen, "plain")
        with self.lock:
            self.gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
        return gen.status

    def late(self, client, prompt, setting, mode, decode, rng) -> str:
        gen = self._generation(client, prompt, setting, mode, decode, deadline_s=DEADLINE_S)
        side = gen._side

        def slow(*args):  # answer after the deadline: the cloud has already fallen back
            time.sleep(DEADLINE_S + 0.1)
            return side(*args)

        gen._side = slow
        try:
            for _ in gen:
                pass
        finally:
            self._record(gen, "late")
        return gen.status

    def _open(self, behaviour, client, prompt, setting, mode, decode) -> str:
        gen = self._generation(client, prompt, setting, mode, decode, deadline_s=DEADLINE_S)
        session = client.open_session(gen.body())
        with self.lock:
            self.sessions[session.session_id] = behaviour
        return session.session_id

    def silent(self, client, prompt, setting, mode, decode, rng) -> str:
        from protocol.events import DoneEvent

        sid = self._open("silent", client, prompt, setting, mode, decode)
        status = "no done"
        for event, _ in client.events(sid):
            if isinstance(event, DoneEvent):
                status = event.status
        return status

    def vanish(self, client, prompt, setting, mode, decode, rng) -> str:
        sid = self._open("vanish", client, prompt, setting, mode, decode)
        stream = client.events(sid)
        for _ in range(rng.randint(1, 6)):
            if next(stream, None) is None:
                break
        stream.close()  # the connection drops; no cancel, no resume
        return "vanished"

    def reconnect(self, client, prompt, setting, mode, decode, rng) -> str:
        from device_agent.errors import CloudUnreachable

        breaks_after = rng.randint(1, 8)
        events = client.events

        def flaky(sid, after=None):  # the first stream breaks after a few events
            stream = events(sid, after)
            for n, item in enumerate(stream):
                if after is None and n == breaks_after:
                    stream.close()
                    raise CloudUnreachable("the link dropped (soak)")
                yield item

        client.events = flaky
        try:
            gen = self._generation(client, prompt, setting, mode, decode)
            try:
                for _ in gen:
                    pass
            finally:
                self._record(gen, "reconnect")
            return (
                f"{gen.status} ({gen.accounts.resumes} resumes)"
                if gen.accounts.resumes
                else (gen.status)
            )
        finally:
            del client.events


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def run(args) -> None:
    import httpx
    import torch

    from app.cloud_process import cloud
    from device_agent.client import CloudClient
    from personalization.backbone.loading import load_backbone
    from personalization.training.checkpoint import load_checkpoint

    torch.set_num_threads(1)  # the devices' side networks; the cloud has its own process
    backbone = load_backbone(args.backbone)
    data = harness.splits(
        backbone,
        args.data,
        "personachat",
        train=40,
        valid=20,
        test=40,
        tokens=args.max_prompt_tokens,
    )
    prompts = [list(e.prompt) for e in data.test]
    model = load_checkpoint(Path(args.checkpoint), backbone)[0].eval()
    _ = model.codec
    config = {
        "backbone": backbone.name,
        "devices": args.devices,
        "minutes": args.minutes,
        "checkpoint": Path(args.checkpoint).name,
        "behaviour_weights": BEHAVIOURS,
        "deadline_s": DEADLINE_S,
        "max_sessions": args.max_sessions,
        "max_prompt_tokens": args.max_prompt_tokens,
    }
    os.environ["SPA_CLOUD_MAX_SESSIONS"] = str(args.max_sessions)
    os.environ["SPA_CLOUD_RESUME_S"] = str(args.resume_s)
    rss: list[tuple[float, float]] = []  # (minutes since the devices started, MiB)
    with cloud(args.backbone, Path(args.work)) as url:
        token = httpx.post(f"{url}/v1/devices", json={"name": "soak"}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        httpx.get(f"{url}/v1/codec/{model.config.tap_encoding}", headers=headers, timeout=600)
        started = time.monotonic()
        soak = Soak(url, token, model, prompts, started + 60 * args.minutes)
        threads = [threading.Thread(target=soak.device, args=(i,)) for i in range(args.devices)]
        for t in threads:
            t.start()
        minute = 0
        while any(t.is_alive() for t in threads):
            time.sleep(10)
            now = (time.monotonic() - started) / 60
            if (m := _rss(url)) is not None:
                rss.append((now, m))
            if int(now) > minute:
                minute = int(now)
                with soak.lock:
                    done = sum(soak.outcomes.values())
                    p95 = 1e3 * _p(soak.gaps, 95) if soak.gaps else float("nan")
                print(
                    f"minute {minute}: {done} sessions, {dict(soak.statuses) or 'no'} HTTP "
                    f"errors, {len(soak.errors)} other errors, p95 {p95:.0f} ms/token, "
                    f"RSS {rss[-1][1]:.0f} MiB",
                    flush=True,
                )
        ended = time.monotonic()
        # the cloud's resume window, then its sweep, for the vanished devices' sessions
        time.sleep(args.resume_s + 10)
        states: Counter = Counter()
        by_behaviour: dict[str, Counter] = defaultdict(Counter)
        fallbacks, stuck = 0, []
        with CloudClient(url, token) as client:
            for sid, behaviour in soak.sessions.items():
                record = client.session_record(sid)
                states[record.status] += 1
                by_behaviour[behaviour][record.status] += 1
                fallbacks += record.fallbacks
                if record.status not in END_STATES:
                    stuck.append(sid)
        live = re.search(r"^spa_sessions_live (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
        ready = httpx.get(f"{url}/readyz").status_code
        log = (Path(args.work) / "cloud.log").read_text(errors="replace")
    at = lambda t: min(rss, key=lambda r: abs(r[0] - t))[1]  # noqa: E731
    results = {
        "config": config,
        "wall_min": (ended - started) / 60,
        "sessions": len(soak.sessions),
        "device_outcomes": {f"{b}: {o}": n for (b, o), n in sorted(soak.outcomes.items())},
        "records_by_status": dict(states),
        "records_by_behaviour": {b: dict(c) for b, c in by_behaviour.items()},
        "fallback_tokens": fallbacks,
        "http_4xx": {str(k): v for k, v in sorted(soak.statuses.items()) if 400 <= k < 500},
        "responses_5xx": sum(v for k, v in soak.statuses.items() if k >= 500),
        "tracebacks_in_cloud_log": log.count("Traceback"),
        "other_errors": soak.errors[:20],
        "other_error_count": len(soak.errors),
        "stuck_sessions": len(stuck),
        "stuck_examples": stuck[:10],
        "sessions_live_after": float(live.group(1)) if live else None,
        "ready_after": ready,
        "p50_ms_per_token": 1e3 * _p(soak.gaps, 50),
        "p95_ms_per_token": 1e3 * _p(soak.gaps, 95),
        "rss_mib": rss,
        "rss_min2_mib": at(2.0),
        "rss_end_mib": at(args.minutes),
        "rss_growth_2_to_end": at(args.minutes) / at(2.0) - 1,
    }
    write_results(results, args.out)
    harness.show(render, args.out)


def render(r: dict) -> str:
    """The results as Markdown (the docs' results page)."""
    lines: list[str] = []
    out = lines.append
    c = r["config"]
    weights = ", ".join(f"{b} {w}" for b, w in c["behaviour_weights"].items())
    out(
        f"{c['devices']} devices × {c['minutes']:g} min on {c['backbone']} "
        f"(behaviours weighted {weights}; deadline {c['deadline_s']} s)\n"
    )
    out("| figure | value |\n|---|---|")
    rows = {
        "sessions": r["sessions"],
        "sessions by end state": r["records_by_status"],
        "fallback tokens": r["fallback_tokens"],
        "4xx by code": r["http_4xx"] or "none",
        "responses ≥ 500": r["responses_5xx"],
        "tracebacks in the cloud's log": r["tracebacks_in_cloud_log"],
        "other device errors": r["other_error_count"],
        "stuck sessions": r["stuck_sessions"],
        "end states by behaviour": "; ".join(
            f"{b}: " + ", ".join(f"{s} {n}" for s, n in c.items())
            for b, c in r["records_by_behaviour"].items()
        ),
        "p50 / p95 ms per token (plain)": f"{r['p50_ms_per_token']:.0f} / "
        f"{r['p95_ms_per_token']:.0f}",
        "cloud RSS at minute 2 → end": f"{r['rss_min2_mib']:.0f} → {r['rss_end_mib']:.0f} MiB "
        f"({100 * r['rss_growth_2_to_end']:+.1f} %)",
    }
    for k, v in rows.items():
        v = ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v
        out(f"| {k} | {v} |")
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__, work=".bench/soak", phases=("run",), results=RESULTS)
    parser.add_argument(
        "--checkpoint",
        default=str(ROOT / "benchmarks/results/settings/personachat-spa.safetensors"),
        help="the devices' spa checkpoint (benchmarks/results.sh trains it)",
    )
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--resume-s", type=float, default=15.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    harness.run(parser, render, run=run)


if __name__ == "__main__":
    main()
