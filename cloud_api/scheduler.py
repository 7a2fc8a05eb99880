"""The step scheduler: every session's backbone passes, batched (continuous batching).

Each session still decodes in its own thread with `personalization.decoding` (so every strategy,
tap mode and device behaviour stays exactly as in-process), but its backbone is a
`BatchedBackbone`: a pass is queued here and the session waits for its result. One scheduler
thread runs the passes. Each round it takes the queued decoding steps of every ready session —
first come, first served, at most `max_batch` rows — and runs them as one batched pass
(`personalization.backbone.batched.forward_many`: each session's own cache and position); a
session waiting for its device queues nothing, so it drops out of the batch until it is
answered. A prompt's prefill runs in chunks of `prefill_chunk` tokens, each a round of its own
alternating with decoding rounds, so a new prompt — however long — delays running sessions by at
most one chunk. Every pass holds the cloud's
compute lock (the backbone's capture hooks allow one pass at a time; the features endpoint
takes it too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from personalization.backbone.batched import Request, forward_many
from personalization.backbone.frozen import Backbone, BackboneOutput

log = logging.getLogger("cloud_api.scheduler")


@dataclass(eq=False)  # one job is one object: never compared by value (tensors)
class _Job:
    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    out: BackboneOutput | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return self.request.input_ids.shape[0]

    @property
    def prefill(self) -> bool:
        return self.request.input_ids.shape[1] > 1 or not self.request.cache.get_seq_length()


@dataclass
class Stats:
    """What the scheduler did, for /metrics: passes, rows and tokens, and the last batch."""

    passes: int = 0
    rows: int = 0  # sequences stepped (a beam session's beams count one each)
    prefills: int = 0
    last_batch: int = 0
    busy_s: float = 0.0  # time spent in backbone passes
    batch_sizes: Counter = field(default_factory=Counter)  # rows per pass → passes


class StepScheduler:
    """One thread, one backbone pass at a time, as many sessions per pass as are ready."""

    def __init__(
        self,
        backbone: Backbone,
        compute: threading.Lock,
        max_batch: int = 16,
        wait_s: float = 0.02,
        prefill_chunk: int = 128,
    ):
        self.backbone, self.compute, self.max_batch = backbone, compute, max_batch
        self.prefill_chunk = prefill_chunk  # tokens of a prompt per pass
        self.wait_s = wait_s  # how long a decoding round waits for the active rows to return
        self._active: dict[int, tuple[int, float]] = {}  # cache id → (rows, last stepped)
        self.stats = Stats()
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._prefill_next = True  # alternate prefill and decoding rounds
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="step-scheduler", daemon=True)
        self._thread.start()

    def forward(self, request: Request) -> BackboneOutput:
        """Queue one pass and wait for it (called from a session's thread)."""
        job = _Job(request)
        with self._ready:
            if self._closed:
                raise RuntimeError("the step scheduler is closed")
            self._queue.append(job)
            self._ready.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.out

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    self._fail(list(self._queue), RuntimeError("the server is shutting down"))
                    return
                self._gather()
                try:
                    jobs = self._take()
                except Exception as exc:  # a bug: fail what is queued, keep serving
                    log.exception("the step scheduler could not form a batch")
                    self._fail(list(self._queue), exc)
                    self._queue.clear()
                    continue
            self._run(jobs)

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            job.error = exc
            job.done.set()

    def _gather(self) -> None:
        """Before a decoding round, give the sessions stepped lately a moment (`wait_s`) to
        queue their next step: each takes a little time with its token (gate, head, event), and
        a round started at the first arrival would split them — for good, as each part would
        then keep its own pace. A session silent for a while (waiting for its device, ended)
        is not waited for."""
        now = time.monotonic()
        recent = now - max(0.25, 4 * self.wait_s)
        self._active = {k: v for k, v in self._active.items() if v[1] >= recent}
        expected = min(sum(rows for rows, _ in self._active.values()), self.max_batch)
        deadline = now + self.wait_s
        while not self._closed:
            steps = sum(j.rows for j in self._queue if not j.prefill)
            prefill_due = self._prefill_next and any(j.prefill for j in self._queue)
            left = deadline - time.monotonic()
            if prefill_due or steps >= expected or left <= 0:
                return
            self._ready.wait(left)

    def _take(self) -> list[_Job]:
        """This round's jobs: one prefill, or the decoding steps in arrival order up to the
        batch cap (the ones left over are first in line next round)."""
        prefills = [j for j in self._queue if j.prefill]
        steps = [j for j in self._queue if not j.prefill]
        if prefills and (self._prefill_next or not steps):
            self._prefill_next = False
            chosen = [prefills[0]]
        else:
            self._prefill_next = True
            chosen, rows = [], 0
            for job in steps:
                if chosen and rows + job.rows > self.max_batch:
                    break
                chosen.append(job)
                rows += job.rows
        for job in chosen:
            self._queue.remove(job)
        return chosen

    def _run(self, jobs: list[_Job]) -> None:
        started, prefill = time.perf_counter(), jobs[0].prefill  # (before the pass fills the cache)
        try:
            with self.compute:
                outs = forward_many(self.backbone, [j.request for j in jobs])
        except Exception as exc:  # handed to each waiting session, which fails cleanly
            log.exception("a batched backbone pass failed")
            self._fail(jobs, exc)
            return
        s = self.stats
        s.passes += 1
        s.rows += sum(j.rows for j in jobs)
        s.prefills += prefill
        s.last_batch = sum(j.rows for j in jobs)
        s.batch_sizes[s.last_batch] += 1
        now = time.monotonic()
        for job in jobs:
            self._active[id(job.request.cache)] = (job.rows, now)
        s.busy_s += time.perf_counter() - started
        for job, out in zip(jobs, outs, strict=True):
            job.out = out
            job.done.set()


class BatchedBackbone:
    """A `Backbone` whose passes go through the step scheduler; everything else (head, final
    norm, tokenizer, facts) is the backbone's own."""

    def __init__(self, backbone: Backbone, scheduler: StepScheduler):
        self.__dict__["_backbone"], self.__dict__["_scheduler"] = backbone, scheduler

    @property
    def scheduler(self) -> StepScheduler:
        return self.__dict__["_scheduler"]

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_backbone"], name)

    def __call__(
        self,
        input_ids: Tensor,
        *,
        cache=None,
        rungs=(),
        logits: str | None = "last",
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> BackboneOutput:
        backbone = self.__dict__["_backbone"]
        if cache is None or attention_mask is not None or position_ids is not None:
            raise ValueError("a batched backbone steps sequences with their own caches only")
        scheduler, T = self.__dict__["_scheduler"], input_ids.shape[1]
        step, last = scheduler.prefill_chunk, logits == "last"
        outs = [  # a long prompt in chunks, each its own round (the cache grows chunk by chunk)
            scheduler.forward(
                Request(
                    input_ids[:, i : i + step], cache, tuple(rungs), logits=last and i + step >= T
                )
            )
            for i in range(0, T, step)
        ]
        out = outs[-1]
        if len(outs) > 1:
            out.hidden = torch.cat([o.hidden for o in outs], dim=1)
            out.taps = torch.cat([o.taps for o in outs], dim=1) if rungs else out.taps
        if logits == "all":
            out.logits = backbone.head(out.hidden)
        return out

    forward = __call__
