"""`spa train`, `spa eval`: a setting trained and scored on a dataset's splits, in-process."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from app.cli.options import PROFILE, SETTING, Backbone, Choice, Dtype, TapEncodingOption
from personalization.config import DEFAULT_TAP_ENCODING, SETTINGS
from personalization.errors import ConfigError

app = typer.Typer()

#: every setting but `base` has parameters to train
TRAINABLE = Choice(
    [s for s in SETTINGS if s != "base"],
    "setting",
    refusal="cannot train setting {value!r}: choose one of {choices}",
)

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
    from personalization.training.experiment import DataConfig, prepare_data

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


@app.command()
def train(
    data: DataPath,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")],
    setting: Annotated[str, typer.Option(click_type=TRAINABLE, help="What to train.")] = "spa",
    backbone: Backbone = None,
    dtype: Dtype = "float32",
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
    tap_encoding: TapEncodingOption = DEFAULT_TAP_ENCODING,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="Continue from --out if it exists.")] = False,
    cache: CacheRoot = None,
) -> None:
    """Train a setting from cached backbone features, calibrate its gate, save a checkpoint."""
    import torch

    from personalization.backbone.loading import load_backbone
    from personalization.config import SideConfig
    from personalization.training.experiment import fit
    from personalization.training.train import TrainConfig

    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, target_usage=target_usage
    )
    model = load_backbone(backbone, dtype=getattr(torch, dtype))
    side = SideConfig(
        hidden_size=model.hidden_size, num_layers=model.num_layers, reduction=reduction
    )
    sizes = (train_size, valid_size, test_size)
    prepared = _data(model, data, dataset, seed, *sizes, max_prompt_tokens)
    typer.echo(
        f"{prepared.splits.dataset}: {len(prepared.train)} train, {len(prepared.valid)} valid, "
        f"{len(prepared.test)} test examples"
    )
    result = fit(
        model,
        prepared,
        setting,
        cfg,
        out,
        side=side,
        tap_encoding=tap_encoding,
        resume=resume,
        cache_root=cache,
    )
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


@app.command("eval")
def evaluate(
    data: DataPath,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A trained checkpoint; omit with --setting base.")
    ] = None,
    setting: Annotated[
        str | None, typer.Option(click_type=SETTING, help="'base' to score the backbone alone.")
    ] = None,
    backbone: Backbone = None,
    dataset: Dataset = None,
    valid_size: ValidSize = 50,
    test_size: TestSize = 100,
    max_prompt_tokens: MaxPrompt = 512,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation budget. Default: the dataset's.")
    ] = None,
    profile: Annotated[
        str, typer.Option(click_type=PROFILE, help="Network profile for the latency model.")
    ] = "lte",
    target_usage: Annotated[
        float | None,
        typer.Option(help="Re-calibrate the gate on the validation split to this usage first."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
    seed: Seed = 0,
    cache: CacheRoot = None,
) -> None:
    """Generate for the test split; report Rouge-L, gate usage, M, bytes and latency per token."""
    from personalization.backbone.loading import load_backbone
    from personalization.latency import profile as network
    from personalization.model import SPAModel
    from personalization.training.checkpoint import load_checkpoint
    from personalization.training.evaluate import table
    from personalization.training.experiment import assess

    if (checkpoint is None) == (setting is None):
        raise ConfigError("give either --checkpoint or --setting base")
    if setting is not None and setting != "base":
        raise ConfigError(
            f"setting {setting!r} needs a trained --checkpoint; only 'base' runs without one"
        )
    model_backbone = load_backbone(backbone)
    sizes = (None, valid_size, test_size)
    prepared = _data(model_backbone, data, dataset, seed, *sizes, max_prompt_tokens)
    target = None
    if checkpoint is not None:
        model, info, _ = load_checkpoint(checkpoint, model_backbone)
        target = info.calibration.get("target_usage")
    else:
        model = SPAModel(model_backbone)
        model.config = type(model.config)(setting="base")
    report, calibration = assess(
        model,
        prepared,
        network(profile),
        target_usage=target_usage,
        cache_root=cache,
        max_new_tokens=max_new_tokens,
    )
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
