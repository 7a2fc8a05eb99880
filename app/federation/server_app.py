"""The Flower `ServerApp`: the cloud provider's coordinator of a federated run.

It never sees a history — only what each device's strategy shares (`device_agent.federated`) and
metrics. Aggregation is Flower's own `FedAvg` (weighted by examples): over the whole side network
for `fedavg` and `fedavg-ft`, over its body for `fedper`; for `local` only the metrics are
averaged. Each round trains a `fraction-train` sample of the devices and evaluates all of them.
Every node's metrics, every aggregate and every failed node are persisted per round (SQLAlchemy);
at the end the run is summarised as a Markdown table and a PNG plot in the work directory. A
device that errors, dies or does not answer within `round-timeout` does not stop the round: the
run waits for all `num-nodes` devices once, then each round needs only `min-nodes` of them. A
failure is recorded against the node the message was sent to (a dead node's error reply comes
from the SuperLink), and a reply that never came is a failure too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from app.federation.records import Failure, Records, RoundMetric, plot, table
from device_agent.run_config import RunConfig

app = ServerApp()


class RecordedFedAvg(FedAvg):
    """Flower's FedAvg that writes down every reply (and error), and for `local` aggregates
    metrics only."""

    def __init__(self, records: Records, run: str, strategy: str, **kwargs):
        super().__init__(**kwargs)
        self.records, self.run, self.strategy = records, run, strategy
        self.sent: list[Message] = []  # this phase's messages (the grid fills in their IDs)
        self.round_start = time.monotonic()

    def configure_train(self, server_round, arrays, config, grid):
        self.round_start = time.monotonic()
        self.sent = list(super().configure_train(server_round, arrays, config, grid))
        return self.sent

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.sent = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self.sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._record(server_round, "train", replies)
        if self.strategy == "local":  # nothing to average but the metrics
            valid = [m.content for m in replies if not m.has_error()]
            metrics = self.train_metrics_aggr_fn(valid, self.weighted_by_key) if valid else None
            arrays = None
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)
        self._aggregate(server_round, "train", metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._record(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:  # the round's wall time: training, aggregation, evaluation
            metrics["round-seconds"] = time.monotonic() - self.round_start
        self._aggregate(server_round, "evaluate", metrics)
        return metrics

    def _record(self, server_round: int, phase: str, replies: list[Message]) -> None:
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        answered = set()
        for msg in replies:
            node_id = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node_id)
            node = str(node_id)
            if msg.has_error():
                # the end of a (Ray) traceback carries the exception itself
                row = Failure(
                    run=self.run,
                    round=server_round,
                    phase=phase,
                    node=node,
                    reason=msg.error.reason[-2000:],
                )
            else:
                metrics = dict(msg.content["metrics"])
                row = RoundMetric(
                    run=self.run,
                    strategy=self.strategy,
                    round=server_round,
                    phase=phase,
                    node=node,
                    metrics=metrics,
                )
            self.records.add(row)
        for node_id in sorted(set(sent_to.values()) - answered):
            self.records.add(
                Failure(
                    run=self.run,
                    round=server_round,
                    phase=phase,
                    node=str(node_id),
                    reason="no reply within round-timeout",
                )
            )

    def _aggregate(self, server_round: int, phase: str, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            self.records.add(
                RoundMetric(
                    run=self.run,
                    strategy=self.strategy,
                    round=server_round,
                    phase=phase,
                    node="all",
                    metrics=dict(metrics),
                )
            )


def _wait_for_nodes(grid: Grid, nodes: int, timeout_s: float) -> None:
    """Start with every device (they register one by one under the deployment runtime); after
    that a round needs `min-nodes` only — Flower's node sampling waits forever for more."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < nodes and time.monotonic() < deadline:
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = RunConfig.of(context)  # a bad value stops the run here, with one line naming its key
    strategy, nodes, work = c.strategy, c.num_nodes, str(c.work_dir)
    run = c.run_name or f"{strategy}-{context.run_id}"
    records = Records(f"sqlite:///{work}/federated.db")
    min_nodes = min(c.min_nodes, nodes)
    _wait_for_nodes(grid, nodes, c.round_timeout)
    fed = RecordedFedAvg(
        records,
        run,
        strategy,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        fraction_train=c.fraction_train,  # every device is evaluated every round
    )
    fed.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # devices start from the same seeded initialisation
        num_rounds=c.num_rounds,
        timeout=c.round_timeout,
        train_config=ConfigRecord({"strategy": strategy}),
    )
    summary = table(records, run)
    failures = [(f.round, f.phase, f.node, f.reason) for f in records.failures(run)]
    png = plot(records, run, Path(work) / f"{run}.png")
    (Path(work) / f"{run}.md").write_text(summary + "\n")
    print(f"\nfederated run {run} ({strategy}, {nodes} devices):\n{summary}")
    print(f"failures: {json.dumps(failures) if failures else 'none'}\nplot: {png}")
