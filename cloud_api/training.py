"""What a device needs from the cloud to train its side network: features and the frozen head.

Features are `personalization.training.features.Features` per example — taps [T, R, H] at the
requested rungs for every input position; and at the Tt positions that predict the target: f(x)
`final` [Tt, H], the backbone's `base_logprob` [Tt] of the target token and the `labels` [Tt] —
so a device's `FeatureCache` can store them as if its own backbone had computed them. The
response is one safetensors payload: tensors `<i>.taps`, `<i>.final`, `<i>.base_logprob`,
`<i>.labels` for example i, and metadata (format, count, rungs, dtype, backbone, fingerprint,
source_id — the key `personalization.training.features.source_id` gives the same features locally).

The head is the backbone's final norm and LM head (`final_norm.*`, `lm_head.*`), so the device
can train g through head(f + σ·g) without ever holding the backbone's layers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from cloud_api.errors import ApiError
from cloud_api.settings import CloudSettings
from personalization.atspeed.coded import CodeHead
from personalization.backbone.frozen import Backbone
from personalization.codecs import basis_for, rank_of
from personalization.config import default_rungs
from personalization.training.data import DataError, Example, Record, encode_target
from personalization.training.data import to_example as record_example
from personalization.training.features import backbone_features, source_id
from protocol import wire
from protocol.messages import ExampleIn, FeaturesIn, TokenizedExample, TokenizeIn, TokenizeOut

FEATURES_FORMAT = "spa-features/1"
HEAD_FORMAT = "spa-head/1"
CODEC_FORMAT = "spa-codec/1"


def check_rungs(rungs: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """The rungs asked for (default about L/4), or a 422 saying what is wrong with them."""
    if not rungs:
        return default_rungs(num_layers)
    if any(not 1 <= k <= num_layers for k in rungs):
        raise ApiError(422, f"rungs {list(rungs)} must lie in 1..{num_layers} (L)")
    if list(rungs) != sorted(set(rungs)):
        raise ApiError(422, f"rungs {list(rungs)} must be strictly increasing")
    return tuple(rungs)


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise ApiError(
            422, f"{what}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
        )


def to_example(backbone: Backbone, item: ExampleIn, index: int) -> Example:
    """Token ids as given, or texts tokenised as `personalization.training.data.to_example` does."""
    if isinstance(item.prompt, list):
        check_ids(item.prompt, backbone.vocab_size, f"examples.{index}.prompt")
        prompt = list(item.prompt)
    else:
        prompt = backbone.encode_prompt(item.prompt, chat=item.chat)
    if isinstance(item.target, list):
        check_ids(item.target, backbone.vocab_size, f"examples.{index}.target")
        target = list(item.target)
    else:
        target = encode_target(backbone, item.target)
    if not prompt:
        raise ApiError(422, f"examples.{index}.prompt: tokenises to no tokens")
    return Example(tuple(prompt), tuple(target))


def tokenize(backbone: Backbone, body: TokenizeIn) -> TokenizeOut:
    """Records → (prompt, target) ids, as `personalization.training.data.to_example` makes them."""
    out = []
    for i, r in enumerate(body.records):
        record = Record(r.instruction, r.input, r.output)
        try:
            example = record_example(
                backbone,
                record,
                max_prompt_tokens=body.max_prompt_tokens,
                max_target_tokens=body.max_target_tokens,
                keep=body.keep,
            )
        except DataError as exc:
            raise ApiError(422, f"records.{i}: {exc}") from None
        out.append(TokenizedExample(prompt=list(example.prompt), target=list(example.target)))
    return TokenizeOut(examples=out)


def features(
    backbone: Backbone, body: FeaturesIn, settings: CloudSettings, compute: threading.Lock
) -> bytes:
    """One backbone pass per example; the encoded payload described in the module docstring."""
    if len(body.examples) > settings.features_max_batch:
        raise ApiError(
            413,
            f"{len(body.examples)} examples in one request; the limit is "
            f"{settings.features_max_batch} (SPA_CLOUD_FEATURES_MAX_BATCH)",
        )
    rungs = check_rungs(body.rungs, backbone.num_layers)
    dtype = body.dtype or settings.tap_dtype
    examples = [to_example(backbone, item, i) for i, item in enumerate(body.examples)]
    for i, example in enumerate(examples):
        if len(example.ids) > settings.features_max_tokens:
            raise ApiError(
                413,
                f"example {i} has {len(example.ids)} tokens (prompt + target); the limit is "
                f"{settings.features_max_tokens} (SPA_CLOUD_FEATURES_MAX_TOKENS)",
            )
    with compute:
        computed = [backbone_features(backbone, e, rungs, wire.DTYPES[dtype]) for e in examples]
    tensors = {f"{i}.{k}": v for i, f in enumerate(computed) for k, v in f.to_dict().items()}
    return wire.pack(
        tensors,
        {
            "format": FEATURES_FORMAT,
            "count": str(len(computed)),
            "rungs": ",".join(map(str, rungs)),
            "dtype": dtype,
            "backbone": backbone.name,
            "fingerprint": backbone.fingerprint,
            "source_id": source_id(backbone.fingerprint, rungs, dtype),
        },
    )


def codec(backbone: Backbone, name: str) -> bytes:
    """The public basis a tap encoding needs (`personalization.codecs.fit_basis`, truncated to
    its rank; fitted on the package's public corpus, never on user data) for every rung 1..L,
    as safetensors: `mean` [L, H], `vectors` [L, H, K]. Encodings without a basis: no tensors."""
    k = rank_of(name)
    tensors = {}
    if k is not None:
        basis = basis_for(backbone).truncate(k)
        tensors = {"mean": basis.mean, "vectors": basis.vectors}
    return wire.pack(
        tensors,
        {
            "format": CODEC_FORMAT,
            "name": name,
            "rank": str(k or 0),
            "rungs": ",".join(map(str, range(1, backbone.num_layers + 1))),
            "backbone": backbone.name,
            "fingerprint": backbone.fingerprint,
        },
    )


def head(backbone: Backbone, dtype: str) -> bytes:
    """The frozen final norm and LM head as safetensors (what head(f + σ·g) needs); a coded
    backbone's head is its code rows, metadata `offset` the text ids before them."""
    norm = backbone.final_norm
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    tensors = {f"final_norm.{k}": v for k, v in norm.state_dict().items()}
    offset = 0
    if isinstance(backbone.lm_head, CodeHead):  # item codes: their rows, after `offset` ids
        tensors["lm_head.weight"], offset = backbone.lm_head.codes, backbone.lm_head.vocab
    else:
        tensors |= {f"lm_head.{k}": v for k, v in backbone.lm_head.state_dict().items()}
    return wire.pack(
        {k: v.detach().to(wire.DTYPES[dtype]) for k, v in tensors.items()},
        {
            "format": HEAD_FORMAT,
            "norm": type(norm).__name__,
            "eps": str(eps),
            "offset": str(offset),
            "dtype": dtype,
            "backbone": backbone.name,
            "fingerprint": backbone.fingerprint,
        },
    )
