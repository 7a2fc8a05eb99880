"""`spa recommend`: generative next-item recommendation under a catalogue (AtSpeed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from app.cli.options import Backbone, Choice
from app.cli.speculative import DraftBeams, DraftCheckpoint, DraftLayers, Gamma, load_draft
from personalization.atspeed.target import TARGET_SETTINGS
from personalization.config import RECOMMEND_STRATEGIES
from personalization.errors import ConfigError

app = typer.Typer()


STRATEGY = Choice(RECOMMEND_STRATEGIES, "strategy")


@app.command()
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
        typer.Option(
            help="A trained SPA checkpoint as the target. Default: the target `spa train-target` "
            "trained last for this backbone, else the backbone alone."
        ),
    ] = None,
    zero_shot: Annotated[
        bool,
        typer.Option("--zero-shot", help="The backbone alone, even where a target is trained."),
    ] = False,
    strategy: Annotated[str, typer.Option(click_type=STRATEGY, help="How to search.")] = "beam",
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
    from personalization.atspeed.target import default_target
    from personalization.backbone.loading import load_backbone
    from personalization.config import SPAConfig
    from personalization.model import SPAModel
    from personalization.training.checkpoint import load_checkpoint

    cfg = RecommendConfig(strategy=strategy, k=k, gamma=gamma, draft_beams=draft_beams, seed=seed)
    truth = None
    if user is not None:
        if data is None or history:
            raise ConfigError("--user reads its history from --data; give no titles with it")
        history, truth = user_history(data, user)
    if not history:
        raise ConfigError("give the purchase history (titles) or --user with --data")
    f = load_backbone(backbone)
    items = Catalogue.from_titles(f, load_titles(catalogue))
    if checkpoint is None and not zero_shot:
        checkpoint = default_target(f)
    if checkpoint is not None and not zero_shot:
        model = load_checkpoint(checkpoint, f)[0].eval()
        typer.secho(f"target: {checkpoint.name} ({model.setting})", dim=True, err=True)
    else:
        model = SPAModel(f, SPAConfig(setting="base"))
        typer.secho("target: the backbone alone (zero-shot)", dim=True, err=True)
    drafter = load_draft(f, draft, draft_layers) if cfg.strategy != "beam" and gamma > 0 else None
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


@app.command("train-target")
def train_target(
    data: Annotated[
        Path, typer.Argument(help="Purchase histories, e.g. ../shared/data/beauty.jsonl.")
    ],
    backbone: Backbone = None,
    setting: Annotated[
        str,
        typer.Option(click_type=Choice(TARGET_SETTINGS, "setting"), help="The plug-in trained."),
    ] = "full",
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    train_users: Annotated[
        int | None, typer.Option(min=1, help="Training users (default: all not held out).")
    ] = None,
    windows: Annotated[
        int, typer.Option(min=1, help="Of each training user, the last N purchases trained on.")
    ] = 3,
    valid_users: Annotated[int, typer.Option(min=1)] = 100,
    test_users: Annotated[int, typer.Option(min=1, help="Users held out for evaluation.")] = 500,
) -> None:
    """Train the recommendation target on the training users' purchase sequences, cache it, and
    make it the default target of `spa recommend` (a trained one is reused)."""
    from personalization.atspeed.target import TargetConfig
    from personalization.atspeed.target import train_target as run
    from personalization.backbone.loading import load_backbone

    cfg = TargetConfig(setting=setting, epochs=epochs, lr=lr, train_users=train_users,
                       windows=windows, valid_users=valid_users, test_users=test_users)  # fmt: skip
    path = run(load_backbone(backbone), data, cfg)
    typer.echo(str(path))
