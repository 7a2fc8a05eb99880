"""`spa device …`: the user's device from the command line — init, history, train, generate,
status. Failures a person can fix (cloud down, empty history, untrained device, bad file) are
`DeviceError`s: `spa` prints them on one line (see app.cli)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from app.cli.options import (
    PROFILE,
    Backbone,
    Choice,
    NoRepeatNgram,
    RepetitionPenalty,
    TapEncodingOption,
)
from personalization.config import (
    DEFAULT_TAP_ENCODING,
    SERVED_SETTINGS,
    SIDE_SETTINGS,
    STRATEGIES,
    TAP_MODES,
)
from personalization.errors import ConfigError

app = typer.Typer(
    help="The private device: local history, side-network training against the remote "
    "backbone, generation through the cloud with live accounting.",
    no_args_is_help=True,
)
history = typer.Typer(help="The local history the side network learns from.", no_args_is_help=True)
app.add_typer(history, name="history")

Dir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        envvar="SPA_DEVICE_DIR",
        help="The device directory. Default: $SPA_DEVICE_DIR, else <cache>/device.",
        show_default=False,
    ),
]
CloudUrl = Annotated[
    str | None,
    typer.Option(
        "--cloud-url", help="Talk to this cloud instead of the one the device registered with."
    ),
]
Profile = Annotated[
    str | None,
    typer.Option(
        "--profile",
        click_type=PROFILE,
        help="Emulate a network (RTT and bandwidth added to every request).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@contextlib.contextmanager
def _agent(root: Path | None, cloud_url: str | None = None, profile: str | None = None) -> Iterator:
    """The device at `root`, open for one command."""
    from device_agent.agent import DeviceAgent, default_dir
    from personalization.latency import profile as named_profile

    net = named_profile(profile) if profile else None
    with DeviceAgent(root or default_dir(), cloud_url=cloud_url, profile=net) as agent:
        yield agent


@app.command()
def init(
    cloud_url: Annotated[
        str, typer.Option("--cloud-url", help="The cloud API, e.g. http://127.0.0.1:8000")
    ],
    name: Annotated[
        str | None, typer.Option(help="A name the cloud records (default: hostname).")
    ] = None,
    dir: Dir = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the device database (default: SQLite in --dir)."),
    ] = None,
) -> None:
    """Register with the cloud and create the device directory."""
    from device_agent.agent import DeviceAgent, default_dir

    root = dir or default_dir()
    with DeviceAgent.init(root, cloud_url, name, database_url=database_url) as agent:
        typer.echo(
            f"device {agent.store.get('device_id')} registered with {cloud_url}; store at {root}"
        )


# ---- history ------------------------------------------------------------------------------------
@history.command("add")
def history_add(
    text: Annotated[
        str | None, typer.Argument(help="Free text (a note in your own words).")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="A prompt you answered...")] = None,
    response: Annotated[str | None, typer.Option(help="...and your answer to it.")] = None,
    dir: Dir = None,
) -> None:
    """Add one item: free text, or --prompt with --response."""
    from device_agent.history import pair_item, text_item

    if (text is None) == (prompt is None and response is None):
        raise ConfigError("give either TEXT or --prompt with --response")
    with _agent(dir) as agent:
        item = text_item(text) if text is not None else pair_item(prompt or "", response or "")
        (item_id,) = agent.store.add_items([item])
        typer.echo(f"added history item {item_id}")


@history.command("import")
def history_import(
    path: Annotated[
        Path,
        typer.Argument(help="JSONL of items, or personachat.jsonl / beauty.jsonl with --user."),
    ],
    user: Annotated[
        str | None, typer.Option(help="Import this user's record (PersonaChat or Beauty).")
    ] = None,
    dir: Dir = None,
) -> None:
    """Import items: JSONL lines {"text"}, {"prompt","response"} or {"instruction","input",
    "output"}; or one user of personachat.jsonl / beauty.jsonl (--user)."""
    from device_agent.history import read_items, user_items

    with _agent(dir) as agent:
        items = user_items(path, user) if user else read_items(path)
        ids = agent.store.add_items(items)
        typer.echo(f"imported {len(ids)} history items from {path}")


@history.command("list")
def history_list(dir: Dir = None, json_out: Json = False) -> None:
    """Show the history."""
    with _agent(dir) as agent:
        items = agent.store.items()
        if json_out:
            rows = [
                {
                    k: getattr(i, k)
                    for k in ("id", "kind", "instruction", "input", "output", "source")
                }
                for i in items
            ]
            typer.echo(json.dumps(rows, indent=2))
            return
        for i in items:
            head = "" if i.kind == "text" else f"{_short(i.instruction)} → "
            typer.echo(f"{i.id:>5}  {i.kind:<4}  {head}{_short(i.output)}")
        typer.echo(f"{len(items)} items")


@history.command("delete")
def history_delete(
    ids: Annotated[list[int], typer.Argument(help="Item ids.")], dir: Dir = None
) -> None:
    """Delete items by id."""
    with _agent(dir) as agent:
        n = agent.store.delete_items(ids)
        typer.echo(f"deleted {n} items")


# ---- train, generate, status ---------------------------------------------------------------
@app.command()
def train(
    setting: Annotated[
        str,
        typer.Option(
            click_type=Choice(
                SIDE_SETTINGS,
                "setting",
                refusal="a device trains a side network: setting one of {choices}, not {value!r}",
            ),
            help="The side network's setting.",
        ),
    ] = "spa",
    target: Annotated[
        str,
        typer.Option(
            click_type=Choice(("text", "codes"), "target"),
            help="What the side network learns: text (the history's replies and notes), or "
            "codes (the purchases, as the cloud's item codes: for `spa device recommend`; "
            "setting lst or full).",
        ),
    ] = "text",
    epochs: int = 15,
    batch_size: int = 8,
    lr: float = 1e-3,
    target_usage: Annotated[
        float, typer.Option(help="Share of tokens the gate may send to the device.")
    ] = 0.5,
    reduction: Annotated[int, typer.Option(help="Side width = H / reduction.")] = 8,
    tap_encoding: TapEncodingOption = DEFAULT_TAP_ENCODING,
    calibration_prompts: Annotated[
        int, typer.Option(help="Held-out prompts generated to calibrate the gate.")
    ] = 8,
    resume: Annotated[
        bool, typer.Option(help="Continue the last unfinished run from its checkpoint.")
    ] = False,
    dir: Dir = None,
    cloud_url: CloudUrl = None,
) -> None:
    """Train the side network on the history against the cloud's frozen backbone."""
    from device_agent.trainer import DeviceTrainConfig
    from personalization.training.train import TrainConfig

    with _agent(dir, cloud_url) as agent:
        cfg = DeviceTrainConfig(
            setting=setting,
            target=target,
            train=TrainConfig(
                epochs=epochs, batch_size=batch_size, lr=lr, target_usage=target_usage
            ),
            reduction=reduction,
            tap_encoding=tap_encoding,
            calibration_prompts=calibration_prompts,
        )
        run = agent.train(cfg, resume=resume, progress=True)
        last = run.epochs[-1] if run.epochs else {}
        typer.echo(
            f"run {run.id} {run.status}: {run.examples} examples (+{run.valid_examples} held out), "
            f"{run.feature_passes} fetched from the cloud, {run.epochs_done} epochs, "
            f"train LM loss {last.get('train', {}).get('lm', float('nan')):.3f}"
        )
        if run.calibration:
            c = run.calibration
            typer.echo(
                f"gate: threshold {c['threshold']:.3f} for usage {c['target_usage']} "
                f"(measured {c['usage']:.2f})"
            )
        typer.echo(f"checkpoint: {agent.store.root / run.checkpoint}")


COLOURS = {
    "cloud": None,
    "device": typer.colors.GREEN,
    "correction": typer.colors.MAGENTA,  # run-ahead: the device replaced the backbone's draft
    "fallback": typer.colors.YELLOW,
}


@app.command()
def generate(
    prompt: Annotated[
        str, typer.Argument(help="The prompt (wrapped in the backbone's chat template).")
    ],
    setting: Annotated[
        str | None,
        typer.Option(
            click_type=Choice(SERVED_SETTINGS, "setting"),
            help="Default: the checkpoint's.",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: int = 64,
    strategy: Annotated[
        str, typer.Option(click_type=Choice(STRATEGIES, "strategy"), help="Decoding.")
    ] = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    no_repeat_ngram_size: NoRepeatNgram = 0,
    threshold: Annotated[
        float | None, typer.Option(help="Gate threshold (default: the calibrated one).")
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Keep the gate on the device (asked every token).")
    ] = False,
    profile: Profile = None,
    tap_mode: Annotated[
        str | None,
        typer.Option(
            click_type=Choice(TAP_MODES, "tap mode"),
            help="pull: taps ride on each contact; streamed: pushed as they exist; run-ahead: "
            "the backbone drafts without waiting and this device corrects (spa). Streamed and "
            "run-ahead: greedy and sampling. Default: the cloud's.",
            show_default=False,
        ),
    ] = None,
    what_if: Annotated[
        bool, typer.Option("--what-if", help="Also print paper Table 2 for every setting.")
    ] = False,
    dir: Dir = None,
    cloud_url: CloudUrl = None,
    json_out: Json = False,
) -> None:
    """Generate through the cloud; tokens coloured by branch (device green, correction magenta,
    fallback yellow)."""
    from personalization.config import DecodeConfig
    from personalization.latency import profile as named_profile
    from personalization.latency import what_if_table

    with _agent(dir, cloud_url, profile) as agent:
        decode = DecodeConfig(
            strategy=strategy,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        generation = agent.generate(
            prompt,
            setting=setting,
            decode=decode,
            strict=strict,
            threshold=threshold,
            tap_mode=tap_mode,
        )
        try:
            for token in generation:
                if not json_out:
                    typer.secho(token.text, fg=COLOURS.get(token.branch), nl=False)
        except Exception:
            typer.echo("")  # end the streamed line: the error gets its own
            raise
        a = generation.accounts
        rows = agent.what_if(generation, named_profile(profile or "lte")) if what_if else []
        if json_out:
            out = {
                "text": generation.text,
                "status": generation.status,
                "accounts": a.summary(),
                "tokens": [vars(t) for t in generation.tokens],
            }
            if rows:
                out["what_if"] = [vars(r) for r in rows]
            typer.echo(json.dumps(out, indent=2))
            return
        typer.echo(
            f"\n\n{a.tokens} tokens ({a.device_tokens} device, {a.corrections} corrections, "
            f"{a.fallbacks} fallback) · "
            f"{a.tokens_per_s:.1f} tok/s · M {a.m:.2f} · {a.contacts} contacts · "
            f"{a.bytes_to_device:,} B down / {a.bytes_from_device:,} B up\n"
            f"T_cloud {1e3 * a.t_cloud:.1f} ms + T_device {1e3 * a.t_device:.1f} ms + "
            f"T_net {1e3 * a.t_net:.1f} ms = T_total {1e3 * a.t_total:.1f} ms "
            f"(wall {1e3 * a.wall_s:.1f} ms)"
        )
        if rows:
            typer.echo(f"\nwhat if, under profile {profile or 'lte'}:\n{what_if_table(rows)}")


@app.command()
def recommend(
    history: Annotated[
        list[str],
        typer.Argument(help="Purchased product titles, oldest first.", show_default=False),
    ],
    k: Annotated[int, typer.Option("-k", min=1, max=50, help="Items (= beams).")] = 10,
    strategy: Annotated[
        str,
        typer.Option(
            click_type=Choice(("beam", "speculative-strict"), "strategy"),
            help="The cloud's search; either way this device's side network is asked once per "
            "target pass over the token tree.",
        ),
    ] = "beam",
    gamma: Annotated[int, typer.Option(min=1, max=16, help="Steps drafted per pass.")] = 5,
    setting: Annotated[
        str | None,
        typer.Option(
            click_type=Choice(SIDE_SETTINGS, "setting"),
            help="Default: the newest.",
            show_default=False,
        ),
    ] = None,
    dir: Dir = None,
    cloud_url: CloudUrl = None,
) -> None:
    """Top-K items of the cloud's catalogue for a purchase history, ranked by the backbone with
    this device's own side network (the cloud needs --catalogue)."""
    from device_agent.recommend import RemoteRecommendation

    with _agent(dir, cloud_url) as agent:
        run = RemoteRecommendation(
            agent.client, agent.model(setting), history, k=k, strategy=strategy, gamma=gamma
        )
        result = run.run()
    for rank, item in enumerate(result.items, 1):
        typer.echo(f"{rank:>3}. {item.score:8.3f}  {item.code}  {item.title}")
    typer.secho(
        f"[{strategy}, K={k}: {result.seconds:.1f} s on the cloud, {result.target_passes} target "
        f"passes, {run.contacts} device contacts, {run.bytes_to_device:,} B down / "
        f"{run.bytes_from_device:,} B up]",
        dim=True,
        err=True,
    )


@app.command()
def status(dir: Dir = None, json_out: Json = False) -> None:
    """The device: history size, training runs, current checkpoint."""
    with _agent(dir) as agent:
        facts = agent.status()
        if json_out:
            typer.echo(json.dumps(facts, indent=2))
            return
        for key, value in facts.items():
            typer.echo(f"{key:>14}: {value}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    user: Annotated[
        str | None,
        typer.Option(help="Models are spa:<user>[:<setting>]. Default: the device's name."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: int = 8001,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SPA_DEVICE_API_KEY",
            help="Bearer token every request must carry; needed to listen beyond localhost.",
        ),
    ] = None,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Serve the demo's users instead (spa:<user> each), with the demo's own cloud "
            "(started here; its users trained first if they are not yet).",
        ),
    ] = False,
    backbone: Backbone = None,
    dir: Dir = None,
    cloud_url: CloudUrl = None,
) -> None:
    """Serve this device as an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models): any OpenAI client gets the personalised model; the side network stays here."""
    import uvicorn

    from device_agent.agent import DeviceAgent, default_dir
    from device_agent.openai_server import ServeConfig, create_app, device_opener

    if host not in LOOPBACK and not api_key:
        raise ConfigError(
            f"listening on {host} lets other machines use this device: set --api-key (or "
            "SPA_DEVICE_API_KEY) so that every request must carry it"
        )
    with contextlib.ExitStack() as stack:
        if demo:
            from app.demo import DemoSettings, demo_devices

            settings = DemoSettings(
                backbone=backbone or os.environ.get("SPA_BACKBONE", "smollm2"), cloud_url=cloud_url
            )
            devices = stack.enter_context(demo_devices(settings))
            users = {key: functools.partial(devices.agent, key) for key in devices.users()}
            where = f"the demo's users ({', '.join(users)})"
        else:
            root = dir or default_dir()
            with DeviceAgent(root) as agent:  # a directory without a device fails here
                name = user or agent.store.get("name")
            users = {name: device_opener(root, cloud_url=cloud_url)}
            where = f"the device at {root}"
        server = create_app(ServeConfig(users=users, api_key=api_key))
        typer.echo(f"OpenAI-compatible API of {where}: http://{host}:{port}/v1")
        # uvicorn re-raises SIGTERM once it has shut down: exit through the `with` blocks then,
        # so that the demo's cloud started above is stopped too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        uvicorn.run(server, host=host, port=port, log_level="warning", ws="none")


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
