"""`GET /metrics`: the cloud's load in the Prometheus text format (prometheus_client).

Read from the live state at scrape time (no background work): open sessions, and what the step
scheduler did — backbone passes, sequences stepped (a decoding step of one sequence is one
token; a beam session steps one per beam), prefills, busy seconds and rows per pass — and the
process's memory and CPU. Tokens per second are `rate(spa_scheduler_sequences_total[1m])` on the
Prometheus side.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cloud_api.state import Cloud

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class CloudCollector(Collector):
    def __init__(self, cloud: Cloud):
        self.cloud = cloud

    def collect(self) -> Iterator[Metric]:
        cloud = self.cloud
        yield GaugeMetricFamily("spa_sessions_live", "Sessions open now.", len(cloud.registry))
        yield GaugeMetricFamily(
            "spa_sessions_limit", "The cap on open sessions.", cloud.settings.max_sessions
        )
        s = cloud.scheduler_stats()
        yield CounterMetricFamily("spa_scheduler_passes", "Batched backbone passes.", s.passes)
        yield CounterMetricFamily(
            "spa_scheduler_sequences", "Sequences stepped (tokens; beams count one each).", s.rows
        )
        yield CounterMetricFamily("spa_scheduler_prefills", "Prompt prefills.", s.prefills)
        yield CounterMetricFamily(
            "spa_scheduler_busy_seconds", "Seconds spent in backbone passes.", s.busy_s
        )
        yield GaugeMetricFamily("spa_scheduler_last_batch", "Rows of the last pass.", s.last_batch)
        counts = s.batch_sizes
        cumulative = [
            (str(bound), sum(n for size, n in counts.items() if size <= bound)) for bound in BUCKETS
        ] + [("+Inf", sum(counts.values()))]
        yield HistogramMetricFamily(
            "spa_scheduler_batch_rows",
            "Rows per backbone pass.",
            buckets=cumulative,
            sum_value=float(sum(size * n for size, n in counts.items())),
        )


def registry(cloud: Cloud) -> CollectorRegistry:
    """A registry of this cloud's own (not the process-wide default: tests run several), with
    the process's memory, CPU and open files (`process_*`, where /proc exists)."""
    r = CollectorRegistry(auto_describe=True)
    r.register(CloudCollector(cloud))
    ProcessCollector(registry=r)
    return r


def render(r: CollectorRegistry) -> bytes:
    return generate_latest(r)
