"""The Flower `ClientApp`: one node = one user's device (`DeviceAgent`).

A node's config names its user and its private store (`user-id`, `store-dir`: the deployment
runtime, `app.federation.deployment`); without them (the simulation) node `partition-id` i is
the i-th user of the run's data file (PersonaChat or Beauty), stored under the run's work dir.
On first contact the device registers with the cloud and imports that user's history into its
own store, keeping the user's last `held-out` items for evaluation. Each round it trains its
side network against the cloud over HTTP (warm: from its own last checkpoint, overridden by what
the strategy shares), and replies with only the shared part plus metrics. Evaluation: on
PersonaChat, Rouge-L of the held-out replies against `base`; on Beauty, Recall / NDCG @ `eval-k`
of the held-out purchases, the device's side network scoring the cloud's catalogue search,
against the cloud's own recommender (its trained target, else the backbone) — every round, the
last only, or never (`search-rounds`: the search is the costly part) — and, every round, the
held-out purchases' loss per code token under the device's model and under the backbone alone (a
continuous measure where a few dozen devices' recalls are mostly 0). A Beauty device trains on
its purchases as the cloud's item codes (`DeviceTrainConfig.target = "codes"`: setting lst or
full), the same ids the cloud's own code target learns from. What the strategy shares:

| strategy  | leaves the device (besides metrics)                               |
|-----------|-------------------------------------------------------------------|
| local     | nothing                                                           |
| fedavg    | the whole side network and gate                                   |
| fedper    | the side network's body; its output layers and gate stay personal |
| fedavg-ft | as fedavg; a device evaluates the average fine-tuned on its history |
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from device_agent.agent import DeviceAgent
from device_agent.history import PURCHASE, purchases_of, user_items
from device_agent.purchases import CodeBook
from device_agent.run_config import RunConfig
from device_agent.trainer import DeviceTrainConfig, remote_cache
from personalization.config import DecodeConfig
from personalization.errors import ConfigError
from personalization.model import SPAModel
from personalization.training.data import read_jsonl
from personalization.training.train import TrainConfig, evaluate_loss
from protocol.messages import RecommendIn

#: the side network's output layers: personal under fedper (with the gate)
PERSONAL_PREFIXES = ("side.up.", "side.out_norm.", "gate.")

app = ClientApp()


def shared(model: SPAModel, strategy: str) -> dict[str, torch.Tensor]:
    """The parameters a strategy sends to the server (by state-dict name)."""
    params = {n: p.detach().clone() for n, p in model.trainable().items()}
    if strategy == "local":
        return {}
    if strategy == "fedper":
        return {n: p for n, p in params.items() if not n.startswith(PERSONAL_PREFIXES)}
    return params


def _digest(params: dict[str, torch.Tensor]) -> int:
    """A 48-bit fingerprint of parameters (exact in a float metric); 0 for none."""
    if not params:
        return 0
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode() + params[name].detach().float().numpy().tobytes())
    return int(h.hexdigest()[:12], 16)


def user_of(data: Path, partition: int) -> str:
    users = [str(r["user_id"]) for r in read_jsonl(data)]
    return users[partition % len(users)]


@dataclass(frozen=True)
class Node:
    """Whose device this node is, and where its private store lives."""

    partition: int
    user: str
    store: Path

    @classmethod
    def of(cls, cfg: RunConfig, context: Context) -> Node:
        config = context.node_config
        partition = int(config["partition-id"])
        user = str(config["user-id"]) if "user-id" in config else user_of(cfg.data, partition)
        store = config.get("store-dir") or cfg.work_dir / "devices" / f"device-{partition}"
        return cls(partition, user, Path(store))


@contextlib.contextmanager
def device(cfg: RunConfig, node: Node) -> Iterator[tuple[DeviceAgent, list[dict]]]:
    """This node's device (created and filled with its user's history on first use) and the
    user's held-out items."""
    user, partition, root = node.user, node.partition, node.store
    items = user_items(cfg.data, user)
    if len(items) <= cfg.held_out:
        raise ConfigError(f"user {user} has {len(items)} items, too few to hold {cfg.held_out} out")
    train_items, held = items[: -cfg.held_out], items[-cfg.held_out :]
    if not (root / "checkpoints").is_dir():
        DeviceAgent.init(root, cfg.cloud_url, f"{user} (node {partition})").close()
        with DeviceAgent(root) as agent:
            agent.store.add_items(train_items)
    with DeviceAgent(root) as agent:
        yield agent, held


def _train_config(cfg: RunConfig, held: list[dict]) -> DeviceTrainConfig:
    """Purchases (Beauty) train on the cloud's item codes, everything else on text."""
    train = TrainConfig(epochs=cfg.local_epochs, seed=cfg.seed)
    return DeviceTrainConfig(
        setting=cfg.setting,
        target="codes" if held[0]["kind"] == PURCHASE else "text",
        train=train,
        calibration_prompts=cfg.calibration_prompts,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.of(context)
    node = Node.of(cfg, context)
    if node.partition == cfg.fail_partition:  # the run must survive a device that fails
        raise RuntimeError(f"injected failure on partition {node.partition}")
    arrays = msg.content["arrays"]
    initial = arrays.to_torch_state_dict() if len(arrays) else {}
    with device(cfg, node) as (agent, held):
        up = agent.client.link.bytes_up
        run = agent.train(_train_config(cfg, held), warm=True, initial=initial)
        out = shared(agent.model(cfg.setting), cfg.strategy)
        metrics = {
            "train-loss": float(run.epochs[-1]["train"]["lm"]),
            "calibrated-usage": float(run.calibration.get("usage", 1.0)),
            "num-examples": int(run.examples),
            "bytes-to-cloud": int(agent.client.link.bytes_up - up),
            "bytes-to-server": int(sum(p.numel() * p.element_size() for p in out.values())),
            "partition-id": node.partition,
        }
    content = RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The held-out items, scored with the weights the round ends with (`_rouge`, `_recall`)."""
    cfg = RunConfig.of(context)
    node = Node.of(cfg, context)
    if node.partition == cfg.fail_partition:
        raise RuntimeError(f"injected failure on partition {node.partition}")
    arrays = msg.content["arrays"]
    with device(cfg, node) as (agent, held):
        received = arrays.to_torch_state_dict() if len(arrays) else {}
        # its newest weights (or, not yet sampled to train, the shared initialisation), with
        # the round's global weights in
        train_cfg = _train_config(cfg, held)
        model = agent.starting_model(train_cfg, received)
        params = model.trainable()
        mine = shared(model, cfg.strategy)
        personal = {n: p for n, p in params.items() if n not in mine}
        if cfg.strategy == "fedavg-ft" and received:  # the average, fine-tuned on this device
            agent.train(train_cfg, warm=True, initial=received)
            model = agent.model(cfg.setting)
        purchases = purchases_of(cfg.data, node.user)
        if purchases is None:
            metrics = _rouge(cfg, agent, model, held)
        else:
            metrics = _item_loss(cfg, agent, model, purchases, train_cfg.train)
            rnd = int(msg.content["config"].get("server-round", cfg.num_rounds))
            last = cfg.search_rounds == "last" and rnd >= cfg.num_rounds
            if cfg.search_rounds == "every" or last:
                metrics |= _recall(cfg, agent, model, purchases)
    metrics |= {"num-examples": len(held), "partition-id": node.partition}
    # which weights this device evaluated with (tests check fedavg's are equal everywhere)
    metrics |= {"shared-hash": _digest(mine), "personal-hash": _digest(personal)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _rouge(
    cfg: RunConfig, agent: DeviceAgent, model: SPAModel, held: list[dict]
) -> dict[str, float]:
    """Held-out replies: Rouge-L of the device (its setting) and of `base`, and gate usage."""
    from personalization.training.evaluate import rouge_l  # PersonaChat only (nltk: seconds)

    decode = DecodeConfig(max_new_tokens=cfg.eval_tokens)
    scores = {"rouge-l": 0.0, "rouge-l-base": 0.0}
    tokens = device_tokens = 0
    for item in held:
        prompt = item["instruction"]
        if item["input"]:
            prompt += f"\n\n{item['input']}"
        for key, setting in (("rouge-l", cfg.setting), ("rouge-l-base", "base")):
            generation = agent.generate(prompt, setting=setting, decode=decode, model=model)
            list(generation)
            scores[key] += rouge_l(item["output"], generation.text)
            if setting != "base":
                tokens += generation.accounts.tokens
                device_tokens += generation.accounts.device_tokens
    return {k: v / len(held) for k, v in scores.items()} | {"usage": device_tokens / max(tokens, 1)}


def _item_loss(
    cfg: RunConfig, agent: DeviceAgent, model: SPAModel, purchases: list[str], train: TrainConfig
) -> dict[str, float]:
    """The held-out purchases' codes, teacher-forced after the ones before them: loss per code
    token under the device's model and under the backbone alone (features fetched once and kept
    in the device's feature cache, as training's are, so later rounds ask the cloud for
    nothing)."""
    book = CodeBook.fetch(agent.client)
    n = cfg.held_out
    example = book.prompts.later_example(purchases[:-n], purchases[-n:])
    if example is None:  # no held-out purchase is in the cloud's catalogue
        return {}
    cache = remote_cache(agent.client, model.rungs, model.config.wire_dtype, agent.store.root, book)
    cache.ensure([example], progress=False)
    features = cache.lazy([example])
    backbone = -float(torch.cat([f.base_logprob for f in features]).mean())
    return {"item-nll": evaluate_loss(model, features, train).lm, "item-nll-backbone": backbone}


def _recall(
    cfg: RunConfig, agent: DeviceAgent, model: SPAModel, purchases: list[str]
) -> dict[str, float]:
    """Held-out purchases: the device's ranking (its side network on the cloud's search) and the
    cloud's own, each purchase predicted from the ones before it."""
    # Beauty only: the tree search loads transformers' model stack (seconds per Flower process)
    from device_agent.recommend import RemoteRecommendation
    from personalization.atspeed.recommend import metrics as ranking_metrics

    k, held = cfg.eval_k, range(len(purchases) - cfg.held_out, len(purchases))
    scores: dict[str, float] = {}
    for i in held:
        history, truth = purchases[:i], purchases[i]
        mine = RemoteRecommendation(agent.client, model, history, k=k).run().items
        cloud = agent.client.recommend(RecommendIn(history=history, k=k)).items
        for suffix, items in (("", mine), ("-cloud", cloud)):
            for name, value in ranking_metrics([[x.title for x in items]], [truth], k).items():
                scores[name + suffix] = scores.get(name + suffix, 0.0) + value / len(held)
    return scores
