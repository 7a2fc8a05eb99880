"""Per-token overhead of a cloud session over HTTP against in-process decoding, side by side.

    python benchmarks/cloud_overhead.py [--backbone smollm2] [--tokens 32] [--repeats 3]

One process holds the backbone once: in-process decoding (`personalization.decoding.generate`)
and a real uvicorn server on 127.0.0.1 serving the same backbone, called by an httpx device
that runs the same side network. Two settings:

* `base`: no device contact — the cost of the session, the event stream and JSON per token;
* `spa`, strict (the device is asked every token, M = 1): plus one side request (taps as base64
  inside an NDJSON line) and one answer POST per token.

Both produce the same tokens (checked). Each figure is the median of the repeats, interleaved.
Loopback has no network latency: this is the software overhead of the API, not T_net.
In-process decoding runs in a fresh thread, as every server session does: on a busy 2-core
machine torch's intra-op threads behave very differently in the main thread (up to 40× slower
when the cores are contended), which would otherwise swamp the figure being measured.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time

import torch

from benchmarks import harness
from benchmarks.bare_device import CloudClient, SideDevice
from benchmarks.harness import hardware
from cloud_api.server import ThreadedServer
from cloud_api.settings import CloudSettings
from personalization.backbone.loading import load_backbone
from personalization.config import DecodeConfig, SideConfig, SPAConfig
from personalization.decoding import generate
from personalization.model import SPAModel
from personalization.side import SideNetwork

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = harness.parser(__doc__, data=False)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    backbone = load_backbone(args.backbone)
    prompt = backbone.encode_prompt(PROMPT)
    side_config = SideConfig(hidden_size=backbone.hidden_size, num_layers=backbone.num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        side = SideNetwork(side_config).eval()
        torch.nn.init.normal_(side.up.weight, std=0.02)  # a device that changes something
    decode = DecodeConfig(max_new_tokens=args.tokens)
    models = {
        "base": SPAModel(backbone, SPAConfig(setting="base"), side_config),
        "spa": SPAModel(backbone, SPAConfig(setting="spa", threshold=0.0), side_config),  # = strict
    }
    models["spa"].side.load_state_dict(side.state_dict())
    bodies = {
        "base": {"setting": "base"},
        "spa": {"setting": "spa", "strict": True, "deadline_s": 30.0},
    }

    settings = CloudSettings(
        backbone=args.backbone,
        port=0,
        database_url=f"sqlite:///{tempfile.mkdtemp()}/cloud.db",
        max_new_tokens=max(256, args.tokens),
    )
    # per (setting, where): [(seconds to the first token, seconds in all, tokens)] and the ids
    timings: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    outputs: dict[tuple[str, str], list[int]] = {}
    moved: dict[str, tuple[int, int]] = {}
    with ThreadedServer(settings, backbone) as server:
        client = CloudClient.register(server.url, "benchmark")

        def in_process(name: str) -> tuple[list[int], float]:
            ids, first = [], []

            def work() -> None:
                for token in generate(models[name], prompt, decode):
                    first.append(first[0] if first else time.perf_counter())
                    ids.append(token.id)

            worker = threading.Thread(target=work)
            worker.start()
            worker.join()
            return ids, first[0]

        def over_http(name: str) -> tuple[list[int], float]:
            device = SideDevice(side) if name != "base" else None
            body = bodies[name] | {"prompt": prompt, "decoding": {"max_new_tokens": args.tokens}}
            run = client.run(device, **body)
            totals = run.done["totals"]
            moved[name] = totals["bytes_to_device"], totals["bytes_from_device"]
            arrivals = zip(run.events, run.arrivals, strict=True)
            first = next(t for e, t in arrivals if e["event"] == "token")
            return run.ids, first

        for _ in range(args.repeats):  # interleaved, so drift affects every contender alike
            for name in models:
                for where, run in (("in-process", in_process), ("HTTP", over_http)):
                    start = time.perf_counter()
                    ids, first = run(name)
                    total = time.perf_counter() - start
                    timings.setdefault((name, where), []).append((first - start, total, len(ids)))
                    outputs[(name, where)] = ids
        client.close()

    def median(name: str, where: str, i: int) -> float:
        return statistics.median(row[i] for row in timings[(name, where)])

    print(f"hardware: {hardware()}")
    print(f"backbone: {backbone.name} (L={backbone.num_layers}, H={backbone.hidden_size})")
    print(
        f"prompt: {len(prompt)} tokens; up to {args.tokens} new tokens; median of "
        f"{args.repeats} interleaved runs; server and device on 127.0.0.1 in this process\n"
    )
    print(
        f"{'setting':<21}{'tokens':>7}{'tok/s in-proc':>14}{'tok/s HTTP':>11}{'ratio':>7}"
        f"{'1st token ms in-proc|HTTP':>27}{'overhead ms/token':>19}{'bytes/token to|from':>21}"
    )
    for name in models:
        n = len(outputs[(name, "HTTP")])
        local, remote = median(name, "in-process", 1), median(name, "HTTP", 1)
        first_local, first_remote = median(name, "in-process", 0), median(name, "HTTP", 0)
        # after the first token: what each further token costs over HTTP beyond in-process
        steady = ((remote - first_remote) - (local - first_local)) / max(1, n - 1)
        to_device, from_device = moved[name]
        label = name if name == "base" else f"{name} (strict, M = 1)"
        same = outputs[(name, "in-process")] == outputs[(name, "HTTP")]
        print(
            f"{label:<21}{n:>7}{n / local:>14.1f}{n / remote:>11.1f}{local / remote:>7.2f}"
            f"{f'{1e3 * first_local:.0f} | {1e3 * first_remote:.0f}':>27}{1e3 * steady:>19.2f}"
            f"{f'{to_device / n:,.0f} | {from_device / n:,.0f}':>21}"
            + ("" if same else "   (tokens differ!)")
        )
    print(
        "\nratio: HTTP tokens/s ÷ in-process; overhead ms/token: extra time per token after the "
        "first\n(session set-up and the first token are in the '1st token' column)"
    )


if __name__ == "__main__":
    main()
