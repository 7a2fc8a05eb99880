"""`spa`: the project's one command-line entry point (and `spa-demo`, which the Docker image runs).

Heavy imports (torch, transformers) happen inside the commands, so `spa --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from app.device_cli import device

cli = typer.Typer(
    name="spa",
    help="SPA (Side Plugin Adaption): a frozen cloud backbone + a private on-device side network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

cli.add_typer(device, name="device")

Backbone = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        "-b",
        help="'smollm2' (embedded default), 'tiny-llama'/'tiny-gpt2' (random, for tests), a local "
        "model directory or a Hugging Face hub id. Default: $SPA_BACKBONE, else smollm2.",
        show_default=False,
    ),
]


def _load(spec: str | None):
    """Load a backbone, turning loading failures into a clean CLI error instead of a traceback."""
    from personalization.backbone.embedded import BackboneNotFoundError
    from personalization.backbone.frozen import UnsupportedBackboneError
    from personalization.backbone.loading import load_backbone

    try:
        return load_backbone(spec)
    except (BackboneNotFoundError, UnsupportedBackboneError) as exc:
        _fail(str(exc))


@cli.command()
def prepare(backbone: Backbone = None) -> None:
    """Convert and cache the backbone (first run ~20 s), then print its facts."""
    start = time.perf_counter()
    model = _load(backbone)
    typer.echo(
        f"backbone {model.name}: L={model.num_layers} layers, H={model.hidden_size}, "
        f"vocab={model.vocab_size}, {model.num_parameters / 1e6:.1f} M parameters, "
        f"chat template: {'yes' if model.chat_template else 'no'} "
        f"(ready in {time.perf_counter() - start:.1f} s)"
    )


DraftCheckpoint = Annotated[
    Path | None,
    typer.Option(
        "--draft",
        help="A draft checkpoint (speculative strategies). Default: the backbone's first "
        "--draft-layers layers, untrained.",
        show_default=False,
    ),
]
DraftLayers = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Layers of an untrained draft. Default: 2 (1 on a 2-layer backbone).",
        show_default=False,
    ),
]
Gamma = Annotated[int, typer.Option(min=0, help="Steps drafted per verification.")]
DraftBeams = Annotated[
    int | None, typer.Option(min=1, help="Draft beams N ≥ K. Default: 2·K.", show_default=False)
]


@cli.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    backbone: Backbone = None,
    setting: Annotated[
        str, typer.Option(help="base, lst, full, choice, spa, lora or adapter.")
    ] = "base",
    strategy: Annotated[
        str,
        typer.Option(help="greedy, sample, beam, speculative-strict or speculative-relaxed."),
    ] = "greedy",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Stop after this many tokens.")] = 64,
    num_beams: Annotated[int, typer.Option(min=1, help="Beams (strategy beam).")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    threshold: Annotated[float, typer.Option(help="Gate threshold (choice, spa).")] = 0.5,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the backbone's chat template.")
    ] = True,
    draft: DraftCheckpoint = None,
    draft_layers: DraftLayers = None,
    gamma: Gamma = 3,
    draft_beams: DraftBeams = None,
) -> None:
    """Stream a generation to the terminal, with the communication it cost.

    Without a trained side network every SPA setting but `lst` reproduces `base`. The
    speculative strategies are beam search drafted by a small model (see `spa recommend`).
    """
    from personalization.config import DecodeConfig, SPAConfig
    from personalization.decoding import generate as run
    from personalization.model import SPAModel

    if not prompt.strip():
        _fail("the prompt is empty")
    speculative = strategy in ("speculative-strict", "speculative-relaxed")
    try:
        spa = SPAConfig(setting=setting, threshold=threshold)
        kind = "beam" if speculative else strategy
        decode = DecodeConfig(
            strategy=kind,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            num_beams=num_beams,
        )
    except ValueError as exc:
        _fail(str(exc))
    try:
        model = SPAModel(_load(backbone), spa)
    except ValueError as exc:  # e.g. peft cannot place LoRA in this architecture
        _fail(f"cannot build setting {setting!r} on this backbone: {exc}")
    if setting != "base":
        typer.secho(model.parameter_report(), dim=True, err=True)
    if speculative:
        spec = _speculative(strategy, gamma, draft_beams, seed or 0)
        drafter = _draft(model.backbone, draft, draft_layers)
        _speculative_generate(model, drafter, prompt, chat, decode, spec)
        return
    start = time.perf_counter()
    generation = run(model, model.backbone.encode_prompt(prompt, chat=chat), decode)
    for token in generation:
        sys.stdout.write(token.text)
        sys.stdout.flush()
    elapsed, books = time.perf_counter() - start, generation.books
    typer.secho(
        f"\n[{books.tokens} tokens in {elapsed:.1f} s, {books.tokens / elapsed:.1f} tokens/s; "
        f"device tokens {books.device_tokens}, M={books.m:.2f}, "
        f"{books.bytes_to_device + books.bytes_from_device:,} bytes to/from the device]",
        dim=True,
        err=True,
    )


def _speculative(strategy: str, gamma: int, draft_beams: int | None, seed: int):
    from personalization.atspeed.speculative import SpeculativeConfig

    verify = strategy.removeprefix("speculative-")
    try:
        return SpeculativeConfig(gamma=gamma, draft_beams=draft_beams, verify=verify, seed=seed)
    except ValueError as exc:
        _fail(str(exc))


def _draft(backbone, path: Path | None, layers: int | None):
    """A trained draft from `path`, else the backbone's first `layers` layers, untrained."""
    from personalization.atspeed.draft import Draft, DraftConfig, DraftError

    try:
        if path is not None:
            return Draft.load(path, backbone)[0]
        return Draft(backbone, DraftConfig(layers=layers or min(2, backbone.num_layers - 1)))
    except (DraftError, ValueError) as exc:
        _fail(str(exc))


def _speculative_generate(model, drafter, prompt, chat, decode, spec) -> None:
    """Speculative beam search for `generate`: the best beam, then what the search did."""
    from personalization.atspeed.speculative import speculative_beam_search

    start = time.perf_counter()
    try:
        result = speculative_beam_search(
            model, drafter, [model.backbone.encode_prompt(prompt, chat=chat)], decode, spec
        )
    except ValueError as exc:
        _fail(str(exc))
    best, stats = result.hypotheses[0][0], result.stats
    typer.echo(model.backbone.decode(best.ids))
    elapsed = time.perf_counter() - start
    typer.secho(
        f"[{len(best.ids)} tokens in {elapsed:.1f} s; {stats.target_steps} beam steps in "
        f"{stats.target_passes} target passes, {stats.acceptance:.0%} of drafted steps "
        f"accepted; device contacts {stats.contacts}]",
        dim=True,
        err=True,
    )


@cli.command()
def recommend(
    history: Annotated[
        list[str] | None,
        typer.Argument(help="Purchased product titles, oldest first.", show_default=False),
    ] = None,
    catalogue: Annotated[
        Path,
        typer.Option(
            help="JSON list of every item title, e.g. ../shared/data/beauty_items.json.",
            show_default=False,
        ),
    ] = ...,
    user: Annotated[
        str | None, typer.Option(help="Recommend for this user_id of --data instead.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Purchase histories (beauty.jsonl), for --user.")
    ] = None,
    backbone: Backbone = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A trained SPA checkpoint as the target. Default: the backbone alone."),
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="beam, speculative-strict or speculative-relaxed.")
    ] = "beam",
    k: Annotated[int, typer.Option("-k", min=1, help="Items to recommend (= beams).")] = 10,
    draft: DraftCheckpoint = None,
    draft_layers: DraftLayers = None,
    gamma: Gamma = 3,
    draft_beams: DraftBeams = None,
    seed: Annotated[int, typer.Option(help="Seed of speculative-relaxed sampling.")] = 0,
) -> None:
    """Top-K next items for a purchase history, generated under the catalogue, with scores."""
    from personalization.atspeed.catalogue import Catalogue
    from personalization.atspeed.recommend import (
        RecommendConfig,
        history_prompt,
        load_titles,
        user_history,
    )
    from personalization.atspeed.recommend import recommend as run
    from personalization.config import SPAConfig
    from personalization.model import SPAModel
    from personalization.training.checkpoint import CheckpointError, load_checkpoint
    from personalization.training.data import DataError

    try:
        cfg = RecommendConfig(
            strategy=strategy, k=k, gamma=gamma, draft_beams=draft_beams, seed=seed
        )
    except ValueError as exc:
        _fail(str(exc))
    truth = None
    if user is not None:
        if data is None or history:
            _fail("--user reads its history from --data; give no titles with it")
        try:
            history, truth = user_history(data, user)
        except DataError as exc:
            _fail(str(exc))
    if not history:
        _fail("give the purchase history (titles) or --user with --data")
    f = _load(backbone)
    try:
        items = Catalogue.from_titles(f, load_titles(catalogue))
    except (DataError, ValueError) as exc:
        _fail(str(exc))
    try:
        model = (
            load_checkpoint(checkpoint, f)[0]
            if checkpoint
            else SPAModel(f, SPAConfig(setting="base"))
        )
    except CheckpointError as exc:
        _fail(str(exc))
    drafter = _draft(f, draft, draft_layers) if cfg.strategy != "beam" and gamma > 0 else None
    start = time.perf_counter()
    result = run(model, items, [history_prompt(f, history)], cfg, drafter)
    elapsed = time.perf_counter() - start
    for rank, item in enumerate(result.items[0], 1):
        mark = "  <- the user's next purchase" if item.title == truth else ""
        typer.echo(f"{rank:>3}. {item.score:8.3f}  {item.title}{mark}")
    if truth is not None:
        typer.secho(f"next purchase: {truth}", dim=True, err=True)
    line = f"[{cfg.strategy}, K={k}: {elapsed:.1f} s, {result.target_passes} target passes"
    if result.stats is not None:
        line += f", {result.stats.acceptance:.0%} of drafted steps accepted"
    typer.secho(line + "]", dim=True, err=True)


@cli.command()
def settings(backbone: Backbone = None) -> None:
    """Every setting side by side: trainable parameters and device contacts per token."""
    from personalization.baselines import CONTACTS_PER_LAYER
    from personalization.config import SETTINGS, SPAConfig
    from personalization.model import SPAModel

    model = _load(backbone)
    contacts = {"base": "0", "lst": "1", "full": "1", "choice": "σ", "spa": "σ"}
    contacts |= {k: str(v * model.num_layers) for k, v in CONTACTS_PER_LAYER.items()}
    typer.echo(f"backbone {model.name}: {model.num_parameters:,} parameters, L={model.num_layers}")
    typer.echo(f"{'setting':<8} {'trainable':>12} {'% backbone':>11} {'contacts/token':>15}")
    for setting in SETTINGS:
        n = SPAModel(model, SPAConfig(setting=setting)).trainable_parameters()
        share = 100 * n / model.num_parameters
        typer.echo(f"{setting:<8} {n:>12,} {share:>10.3f}% {contacts[setting]:>15}")
    typer.echo("σ: only where the gate asks (the calibrated usage; at most 1)")


DataPath = Annotated[
    Path,
    typer.Argument(
        help="A data file in ../shared/data/ (xsum.jsonl, personachat.jsonl, ...); the dataset "
        "is named by the file's stem unless --dataset says otherwise.",
        show_default=False,
    ),
]
Dataset = Annotated[str | None, typer.Option(help="Dataset kind, if not the file's stem.")]
Seed = Annotated[int, typer.Option(help="Seed of the data split and of training.")]
TrainSize = Annotated[
    int | None, typer.Option(help="Training records (users for personachat, beauty). Default all.")
]
ValidSize = Annotated[int, typer.Option(help="Validation records / users (calibration).")]
TestSize = Annotated[int, typer.Option(help="Test records / users.")]
MaxPrompt = Annotated[int, typer.Option(help="Prompts are cut to this many tokens.")]
CacheRoot = Annotated[
    Path | None,
    typer.Option(help="Feature cache root. Default: $SPA_CACHE_DIR.", show_default=False),
]


def _data(backbone, path, dataset, seed, train_size, valid_size, test_size, max_prompt_tokens):
    from personalization.training.data import DataError
    from personalization.training.experiment import DataConfig, prepare_data

    try:
        cfg = DataConfig(
            path=str(path),
            dataset=dataset,
            seed=seed,
            train_size=train_size,
            valid_size=valid_size,
            test_size=test_size,
            max_prompt_tokens=max_prompt_tokens,
        )
        return prepare_data(backbone, cfg)
    except DataError as exc:
        _fail(str(exc))


@cli.command()
def train(
    data: DataPath,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")],
    setting: Annotated[str, typer.Option(help="lst, full, choice, spa, lora or adapter.")] = "spa",
    backbone: Backbone = None,
    dataset: Dataset = None,
    train_size: TrainSize = None,
    valid_size: ValidSize = 50,
    test_size: TestSize = 100,
    max_prompt_tokens: MaxPrompt = 512,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 15,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    target_usage: Annotated[
        float, typer.Option(help="Calibrate the gate to send this share of tokens to the device.")
    ] = 0.5,
    reduction: Annotated[int, typer.Option(min=1, help="Side width = H / reduction.")] = 8,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="Continue from --out if it exists.")] = False,
    cache: CacheRoot = None,
) -> None:
    """Train a setting from cached backbone features, calibrate its gate, save a checkpoint."""
    from personalization.config import SETTINGS, SideConfig
    from personalization.training.checkpoint import CheckpointError
    from personalization.training.experiment import fit
    from personalization.training.train import TrainConfig

    if setting not in SETTINGS or setting == "base":
        _fail(f"cannot train setting {setting!r}: choose lst, full, choice, spa, lora or adapter")
    try:
        cfg = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, target_usage=target_usage
        )
    except ValueError as exc:
        _fail(str(exc))
    model = _load(backbone)
    try:
        side = SideConfig(
            hidden_size=model.hidden_size, num_layers=model.num_layers, reduction=reduction
        )
    except ValueError as exc:
        _fail(str(exc))
    sizes = (train_size, valid_size, test_size)
    prepared = _data(model, data, dataset, seed, *sizes, max_prompt_tokens)
    typer.echo(
        f"{prepared.splits.dataset}: {len(prepared.train)} train, {len(prepared.valid)} valid, "
        f"{len(prepared.test)} test examples"
    )
    try:
        result = fit(model, prepared, setting, cfg, out, side=side, resume=resume, cache_root=cache)
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(result.model.parameter_report())
    for row in result.epochs:
        valid = row.get("valid", {})
        typer.echo(
            f"epoch {row['epoch']}: train lm {row['train']['lm']:.4f} "
            f"gate {row['train']['gate']:.4f}"
            f" | valid lm {valid.get('lm', float('nan')):.4f}"
        )
    if result.calibration:
        c = result.calibration
        typer.echo(
            f"gate calibrated to usage {c.target_usage:.2f}: threshold {c.threshold:.4f}, "
            f"measured on validation generations {c.usage:.3f}"
        )
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    typer.echo(f"backbone passes: {result.backbone_passes} ({timing})")
    typer.echo(f"checkpoint: {out}")


@cli.command("eval")
def evaluate(
    data: DataPath,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A trained checkpoint; omit with --setting base.")
    ] = None,
    setting: Annotated[str | None, typer.Option(help="'base' to score the backbone alone.")] = None,
    backbone: Backbone = None,
    dataset: Dataset = None,
    valid_size: ValidSize = 50,
    test_size: TestSize = 100,
    max_prompt_tokens: MaxPrompt = 512,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation budget. Default: the dataset's.")
    ] = None,
    profile: Annotated[str, typer.Option(help="Network profile for the latency model.")] = "lte",
    target_usage: Annotated[
        float | None,
        typer.Option(help="Re-calibrate the gate on the validation split to this usage first."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
    seed: Seed = 0,
    cache: CacheRoot = None,
) -> None:
    """Generate for the test split; report Rouge-L, gate usage, M, bytes and latency per token."""
    from personalization.latency import profile as network
    from personalization.model import SPAModel
    from personalization.training.checkpoint import CheckpointError, load_checkpoint
    from personalization.training.evaluate import table
    from personalization.training.experiment import assess

    if (checkpoint is None) == (setting is None):
        _fail("give either --checkpoint or --setting base")
    if setting is not None and setting != "base":
        _fail(f"setting {setting!r} needs a trained --checkpoint; only 'base' runs without one")
    try:
        net = network(profile)
    except ValueError as exc:
        _fail(str(exc))
    model_backbone = _load(backbone)
    sizes = (None, valid_size, test_size)
    prepared = _data(model_backbone, data, dataset, seed, *sizes, max_prompt_tokens)
    target = None
    if checkpoint is not None:
        try:
            model, info, _ = load_checkpoint(checkpoint, model_backbone)
            target = info.calibration.get("target_usage")
        except CheckpointError as exc:
            _fail(str(exc))
    else:
        model = SPAModel(model_backbone)
        model.config = type(model.config)(setting="base")
    try:
        report, calibration = assess(
            model, prepared, net, target_usage=target_usage, cache_root=cache,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    if calibration:
        target = calibration.target_usage
        typer.echo(
            f"re-calibrated to usage {calibration.target_usage:.2f}: threshold "
            f"{calibration.threshold:.4f} (validation generations: {calibration.usage:.3f})"
        )
    report = dataclasses.replace(report, target_usage=target)
    typer.echo(table([report]))
    if json_out:
        json_out.write_text(report.to_json() + "\n")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@cli.command()
def demo(
    backbone: Backbone = None,
    host: Annotated[
        str, typer.Option(help="Interface the UI listens on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the UI.")] = 7860,
    cloud_url: Annotated[
        str | None,
        typer.Option(
            help="Use this (remote) cloud API instead of starting one.", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Devices, cloud records, federated runs. Default: $SPA_CACHE_DIR/demo.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="Epochs the demo users are trained for on first start.")
    ] = 24,
    prepare_only: Annotated[
        bool, typer.Option(help="Train the demo users (if needed), then exit: a build step.")
    ] = False,
) -> None:
    """The Gradio demo: cloud API + demo users' devices + UI on http://HOST:PORT."""
    import os

    from app.demo import DemoSettings, serve
    from app.devices import DemoConfig, default_root
    from device_agent.errors import DeviceError

    settings = DemoSettings(
        backbone=backbone or os.environ.get("SPA_BACKBONE", "smollm2"), host=host, port=port,
        cloud_url=cloud_url, root=data_dir or default_root(), config=DemoConfig(epochs=epochs),
    )  # fmt: skip
    try:
        serve(settings, prepare_only=prepare_only)
    except (DeviceError, RuntimeError, OSError) as exc:
        _fail(str(exc))


def main() -> None:
    cli()


def demo_main() -> None:
    """The `spa-demo` script: `spa demo` with its options."""
    typer.run(demo)


@cli.command()
def cloud(
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on. Default: 127.0.0.1.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port. Default: 8000.")] = None,
    backbone: Backbone = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the records. Default: SQLite in $SPA_CACHE_DIR."),
    ] = None,
    max_sessions: Annotated[
        int | None, typer.Option(help="Sessions open at once (more get 429). Default: 16.")
    ] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Default: 1024.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: 256.")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Default: 1 MiB.")] = None,
    session_ttl_s: Annotated[
        float | None, typer.Option(help="Idle sessions expire after this. Default: 300.")
    ] = None,
    tap_dtype: Annotated[
        str | None, typer.Option(help="float16 (default), bfloat16 or float32.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="uvicorn log level.")] = None,
) -> None:
    """Serve the frozen backbone as the SPA cloud API (FastAPI + uvicorn).

    Every flag can also be set as SPA_CLOUD_<FLAG> in the environment; flags win.
    """
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url

    from cloud_api.server import serve
    from cloud_api.settings import CloudSettings

    given = {
        "host": host, "port": port, "backbone": backbone, "database_url": database_url,
        "max_sessions": max_sessions, "max_prompt_tokens": max_prompt_tokens,
        "max_new_tokens": max_new_tokens, "max_body_bytes": max_body_bytes,
        "session_ttl_s": session_ttl_s, "tap_dtype": tap_dtype, "log_level": log_level,
    }  # fmt: skip
    try:
        settings = CloudSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    records = make_url(settings.database_url).render_as_string(hide_password=True)
    typer.echo(
        f"spa cloud: backbone {settings.backbone or '(default)'} on "
        f"http://{settings.host}:{settings.port} (records: {records})"
    )
    serve(settings)


@cli.command()
def federate(
    strategy: Annotated[str, typer.Option(help="local, fedavg or fedper.")] = "fedavg",
    users: Annotated[int, typer.Option(min=1, help="Simulated devices (one user each).")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 2,
    data: Annotated[
        Path, typer.Option(help="Users' histories: personachat.jsonl or beauty.jsonl.")
    ] = Path("../shared/data/personachat.jsonl"),
    work_dir: Annotated[
        Path, typer.Option(help="Device stores, federated.db, the summary table and plot.")
    ] = Path(".spa-federated"),
    backbone: Backbone = None,
    cloud_url: Annotated[
        str | None, typer.Option(help="Use this cloud instead of starting one.")
    ] = None,
    local_epochs: Annotated[int, typer.Option(min=1)] = 2,
    run_name: Annotated[str, typer.Option(help="Name of the run in the records.")] = "",
) -> None:
    """A Flower simulation: each device personalises against one cloud backbone."""
    import os

    from app.federation.launch import federate as run

    if strategy not in ("local", "fedavg", "fedper"):
        _fail(f"unknown strategy {strategy!r}: local, fedavg or fedper")
    if not data.is_file():
        _fail(f"{data}: no such data file")
    code = run(
        strategy=strategy, nodes=users, rounds=rounds, data=data, work=work_dir,
        backbone=backbone or os.environ.get("SPA_BACKBONE", "smollm2"), cloud_url=cloud_url,
        extra={"local-epochs": local_epochs, "run-name": run_name},
    )  # fmt: skip
    raise typer.Exit(code)


def cloud_main() -> None:
    """The `spa-cloud` script: `spa cloud` with its options."""
    typer.run(cloud)
