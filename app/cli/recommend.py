"""`spa recommend`: generative next-item recommendation under a catalogue (AtSpeed)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from app.cli.options import Backbone, Choice
from app.cli.speculative import DraftBeams, DraftCheckpoint, DraftLayers, Gamma, load_draft
from personalization.atspeed.code_target import SETTINGS
from personalization.config import RECOMMEND_STRATEGIES
from personalization.errors import ConfigError

app = typer.Typer()


STRATEGY = Choice(RECOMMEND_STRATEGIES, "strategy")


Catalogue = Annotated[
    Path,
    typer.Option(
        help="JSON list of every item title, e.g. ../shared/data/beauty_items.json.",
        show_default=False,
    ),
]


@app.command()
def recommend(
    history: Annotated[
        list[str] | None,
        typer.Argument(help="Purchased product titles, oldest first.", show_default=False),
    ] = None,
    catalogue: Catalogue = ...,
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
            help="A trained code target. Default: the one `spa train-target` trained last for "
            "this backbone and catalogue."
        ),
    ] = None,
    strategy: Annotated[str, typer.Option(click_type=STRATEGY, help="How to search.")] = "beam",
    k: Annotated[int, typer.Option("-k", min=1, help="Items to recommend (= beams).")] = 10,
    draft: DraftCheckpoint = None,
    draft_layers: DraftLayers = None,
    gamma: Gamma = 3,
    draft_beams: DraftBeams = None,
    seed: Annotated[int, typer.Option(help="Seed of speculative-relaxed sampling.")] = 0,
    include_purchased: Annotated[
        bool, typer.Option("--include-purchased", help="Also recommend items of the history.")
    ] = False,
    prior: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Weight of the history prior (a logit bonus per code level shared with the "
            "last purchases; 0: none). Default: the one chosen on validation for the target.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Top-K next items for a purchase history: the code target's beam search over the trie of
    item codes, each item with its code and score."""
    from personalization.atspeed.code_target import default_code_target, load_code_target
    from personalization.atspeed.codes import CodeConfig, cached_codes
    from personalization.atspeed.recommend import RecommendConfig, load_titles, user_history
    from personalization.backbone.loading import load_backbone

    cfg = RecommendConfig(strategy=strategy, k=k, gamma=gamma, draft_beams=draft_beams, seed=seed)
    truth = None
    if user is not None:
        if data is None or history:
            raise ConfigError("--user reads its history from --data; give no titles with it")
        history, truth = user_history(data, user)
    if not history:
        raise ConfigError("give the purchase history (titles) or --user with --data")
    f, titles = load_backbone(backbone), load_titles(catalogue)
    trained = default_code_target(f, titles)
    if checkpoint is None and trained is None:
        raise ConfigError(
            f"no code target is trained for this backbone and {catalogue}: run `spa train-target "
            f"HISTORIES --catalogue {catalogue}` first, or give --checkpoint"
        )
    config = trained[1] if trained is not None else CodeConfig()
    path = checkpoint or trained[0]
    target = load_code_target(path, f, cached_codes(titles, config))
    if prior is not None:
        target.prior = replace(target.prior, weight=prior)
    typer.secho(
        f"target: {path.name} ({target.model.setting}, history prior {target.prior.weight:g} "
        f"over the last {target.prior.recent} purchases)",
        dim=True,
        err=True,
    )
    known = history if truth is None else [t for t in history if t in target.index]
    drafter = None
    if cfg.strategy != "beam" and gamma > 0:
        drafter = load_draft(target.backbone, draft, draft_layers)
    start = time.perf_counter()
    result = target.recommend(known, cfg, drafter, exclude_purchased=not include_purchased)
    elapsed = time.perf_counter() - start
    for rank, item in enumerate(result.items[0], 1):
        mark = "  <- the user's next purchase" if item.title == truth else ""
        typer.echo(f"{rank:>3}. {item.score:8.3f}  {target.label(item.title)}  {item.title}{mark}")
    if truth is not None:
        typer.secho(f"next purchase: {truth}", dim=True, err=True)
    line = f"[{cfg.strategy}, K={k}: {elapsed:.2f} s, {result.target_passes} target passes"
    if result.stats is not None:
        line += f", {result.stats.acceptance:.0%} of drafted steps accepted"
    typer.secho(line + "]", dim=True, err=True)


@app.command("train-target")
def train_target(
    data: Annotated[
        Path, typer.Argument(help="Purchase histories, e.g. ../shared/data/beauty.jsonl.")
    ],
    catalogue: Catalogue = ...,
    backbone: Backbone = None,
    setting: Annotated[
        str, typer.Option(click_type=Choice(SETTINGS, "setting"), help="The plug-in trained.")
    ] = "lst",
    epochs: Annotated[
        int, typer.Option(min=1, help="Epochs at most; the best on validation is kept.")
    ] = 20,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-3,
    levels: Annotated[int, typer.Option(min=1, help="Residual levels of the item codes.")] = 3,
    codebook: Annotated[int, typer.Option(min=2, help="Codes per level.")] = 256,
) -> None:
    """Build the catalogue's item codes and train the code target on every user's purchases
    before the validation period (AtSpeed's time split); cache it and make it the default of
    `spa recommend` and the cloud for this catalogue (a trained one is reused)."""
    from personalization.atspeed.code_target import CodeTargetConfig, train_code_target
    from personalization.atspeed.codes import CodeConfig, cached_codes
    from personalization.atspeed.recommend import load_titles
    from personalization.atspeed.split import load_users
    from personalization.backbone.loading import load_backbone

    codes = cached_codes(load_titles(catalogue), CodeConfig(levels=levels, codebook=codebook))
    s = codes.stats
    typer.secho(
        f"item codes: {s['items']} items × {codes.length} tokens; {s['collision_rate']:.0%} "
        f"shared a code before the last level; codebook usage {s['usage']}",
        dim=True,
        err=True,
    )
    cfg = CodeTargetConfig(setting=setting, epochs=epochs, lr=lr)
    trained = train_code_target(load_backbone(backbone), codes, load_users(data), cfg)
    typer.secho(f"best epoch: {trained.best_epoch} of {len(trained.epochs)}", dim=True, err=True)
    typer.echo(str(trained.path))
