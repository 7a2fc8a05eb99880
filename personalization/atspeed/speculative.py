"""Speculative beam search (AtSpeed, Lin et al. ICLR 2025): draft γ steps, verify them in one pass.

One iteration, for every prompt of a batch at once:

1. **Draft**: the draft model runs γ steps of beam search with N ≥ K beams from the target's
   live beams (strict: the top N; relaxed: N sampled). All drafted nodes of a prompt live in one
   token tree (`tree.TreeCache`): each attends to its prompt and ancestors only.
2. **Target**: one forward pass scores every drafted node (plus any live beam it has not seen),
   with the same tree mask. An `spa` target runs its side network over the same tree in the same
   call: one device contact per verification instead of one per step.
3. **Verify** step by step, feeding the target's log-probabilities to the prompt's `BeamSearch`:
   - *strict*: take the target's own beam search step; go on while every live beam it keeps is a
     drafted node (so its next-step logits are already computed). The output is the target's
     own beam search — the same sequences and scores, up to float rounding of a different
     matmul shape;
   - *relaxed*: accept each drafted candidate with probability min(1, p/q), p and q the target's
     and the draft's beam-sampling probabilities of that extension (softmax over every
     candidate's summed score); with ≥ K accepted keep the K best, else fill up with samples from
     norm(max(p − q, 0)) and stop. Faster, not identical.
   Every iteration makes at least one target step: the step after the last accepted one comes
   from logits the pass already computed.
4. **Roll back**: both KV caches are cut back to the prompt and the live beams' ancestors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from personalization.atspeed.beams import Beam, BeamSearch, Candidate, Ranked
from personalization.atspeed.catalogue import Catalogue, constrained_logprobs
from personalization.atspeed.draft import Draft
from personalization.atspeed.tree import Path, TreeCache, gather_slots
from personalization.backbone.frozen import BackboneOutput
from personalization.config import GATED_SETTINGS, SIDE_SETTINGS, DecodeConfig, Verify
from personalization.errors import ConfigError
from personalization.model import SPAModel


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    gamma: int = 3  # steps drafted per verification (0: the target alone, on the token tree)
    draft_beams: int | None = None  # N ≥ K; None: 2·K
    verify: Verify = "strict"
    seed: int = 0  # relaxed verification samples

    def __post_init__(self):
        if self.gamma < 0:
            raise ConfigError("gamma must be ≥ 0")
        if self.verify not in ("strict", "relaxed"):
            raise ConfigError(f"unknown verification {self.verify!r}: strict or relaxed")

    def beams(self, num_beams: int) -> int:
        n = 2 * num_beams if self.draft_beams is None else self.draft_beams
        if n < num_beams:
            raise ConfigError(f"the draft needs N ≥ K beams (N = {n}, K = {num_beams})")
        return n


@dataclass
class SpeculativeStats:
    """What a speculative search did, summed over its prompts."""

    target_passes: int = 0  # sequential target forward passes, the prompt's included
    draft_passes: int = 0
    verifications: int = 0  # (prompt, iteration) pairs
    drafted_steps: int = 0
    accepted_steps: int = 0
    target_steps: int = 0  # beam search steps taken (accepted + one per verification)
    contacts: int = 0  # device round trips of an `spa` target
    # relaxed: (min(1, p/q), accepted) for every drafted candidate
    trials: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """Share of drafted steps the target accepted."""
        return self.accepted_steps / self.drafted_steps if self.drafted_steps else 0.0


@dataclass
class SpeculativeResult:
    hypotheses: list[list[Ranked]]  # per prompt, best first, at most K
    stats: SpeculativeStats


# ---- the two models over token trees -------------------------------------------------------------
class _TreeModel:
    """A model over a `TreeCache`: root outputs after the prompts, node outputs by path."""

    def __init__(self, tree: TreeCache, prompts: Sequence[Sequence[int]]):
        self.tree = tree
        self.passes = 0
        out, mask = tree.prefill(prompts)
        real = torch.zeros(mask.shape[0], mask.shape[2], dtype=torch.bool)
        for row, P in enumerate(tree.prompt_lengths):
            real[row, P - 1] = True  # only the last prompt position's output is used
        self.roots = list(self._outputs(out, mask, real))

    def missing(self, row: int, paths: Sequence[Path]) -> list[Path]:
        return self.tree.layout.missing(row, paths)

    def extend(self, nodes: Sequence[Sequence[Path]]) -> list[dict[Path, Tensor]]:
        """Outputs of new nodes (one forward pass for every row), by path."""
        out, mask = self.tree.grow(nodes)
        real = torch.zeros(mask.shape[0], mask.shape[2], dtype=torch.bool)
        for row, paths in enumerate(nodes):
            real[row, : len(paths)] = True
        outputs = iter(self._outputs(out, mask, real))  # row by row, as `real` lists them
        return [{p: next(outputs) for p in paths} for paths in nodes]

    def keep(self, paths: Sequence[Sequence[Path]]) -> Tensor:
        return self.tree.keep(paths)

    def _outputs(self, out: BackboneOutput, mask: Tensor, real: Tensor) -> Tensor:
        """Outputs [n, ...] of the `real` positions [B, T] only (padding and prompt positions
        whose output nobody reads cost no head)."""
        raise NotImplementedError


class TreeSide(Protocol):
    """The side network over token trees, wherever it runs: here (`LocalTreeSide`) or on the
    device, asked over the wire once per target pass (`cloud_api.recommend`)."""

    def __call__(self, taps: Tensor, mask: Tensor, real: Tensor) -> Tensor | None:
        """g(x) [n, H], wire-rounded, of the `real` positions [B, T] of a pass whose taps are
        [B, T, R, H] and whose mask is [B, T, S]; None: not answered (the backbone goes alone)."""

    def keep(self, index: Tensor) -> None:
        """Keep only these cache slots [B, S'] (the target's cache was cut to the kept beams)."""


class LocalTreeSide:
    """The model's own side network, in this process, with its cache over the tree."""

    def __init__(self, model: SPAModel):
        self.model = model
        self.cache = model.side.new_cache()

    def __call__(self, taps: Tensor, mask: Tensor, real: Tensor) -> Tensor:
        m = self.model  # the side network sees the wire-rounded taps of the whole tree
        return m.wire(m.side(m.wire_taps(taps, m.side_dtype), self.cache, mask))[real]

    def keep(self, index: Tensor) -> None:
        self.cache.kv = [(gather_slots(k, index), gather_slots(v, index)) for k, v in self.cache.kv]


class TargetTree(_TreeModel):
    """The target — an `SPAModel` in any setting — scoring token trees: logits per node, as its
    `Stepper` computes them (side network, gate, wire rounding), the whole tree at once. Its
    side network answers once per pass, here or (`side`) on a device."""

    def __init__(
        self,
        model: SPAModel,
        prompts: Sequence[Sequence[int]],
        catalogue: Catalogue | None,
        side: TreeSide | None = None,
    ):
        self.model = model
        self.catalogue = catalogue
        self.contacts = 0
        uses_side = model.setting in SIDE_SETTINGS
        self.side = (side or LocalTreeSide(model)) if uses_side else None
        backbone = model.adapted or model.backbone
        super().__init__(TreeCache(backbone, prompts, model.rungs if uses_side else ()), prompts)

    def logprobs(self, outputs: Tensor, nodes: Sequence[int]) -> Tensor:
        return constrained_logprobs(outputs, nodes, self.catalogue)

    def keep(self, paths: Sequence[Sequence[Path]]) -> Tensor:
        index = super().keep(paths)
        if self.side is not None:
            self.side.keep(index)
        return index

    def _outputs(self, out: BackboneOutput, mask: Tensor, real: Tensor) -> Tensor:
        self.passes += 1
        model, f = self.model, out.hidden
        if self.side is None:
            return self.tree.backbone.head(f[real])
        g = self.side(out.taps, mask, real)
        self.contacts += 1
        f = f[real]
        if g is None:  # the device did not answer: the backbone's own outputs
            return model.combine(f, None, torch.zeros(f.shape[:-1], dtype=torch.bool))
        p = model.gate_prob(f) if model.setting in GATED_SETTINGS else None
        return model.combine(f, g.to(f.dtype), model.sigma(p, f))


class DraftTree(_TreeModel):
    """The draft over token trees: pre-norm hidden states per node; logits only where needed."""

    def __init__(self, draft: Draft, prompts: Sequence[Sequence[int]], catalogue: Catalogue | None):
        self.draft = draft
        self.catalogue = catalogue
        super().__init__(TreeCache(draft.net, prompts), prompts)

    def logprobs(self, outputs: Tensor, nodes: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.draft.logprobs(outputs, nodes, self.catalogue)

    def _outputs(self, out: BackboneOutput, mask: Tensor, real: Tensor) -> Tensor:
        self.passes += 1
        return out.hidden[real]


# ---- drafting -----------------------------------------------------------------------------------
@dataclass
class Level:
    """One drafted step of one prompt: the beams it extends, the candidates drafted (scores are
    the draft's), the beams that carry on, and (relaxed) the draft's beam-sampling distribution
    over the parents' extensions, [len(parents), U] over token columns `cols`."""

    parents: list[Beam]
    drafted: list[Candidate]
    beams: list[Beam]  # drafted candidates that do not end the item: the next level's parents
    cols: Tensor
    q: Tensor | None = None


def _draft(
    search: BeamSearch,
    draft: DraftTree,
    outputs: list[Tensor],
    parents: list[Beam],
    width: int,
    verify: Verify,
    rng: torch.Generator,
) -> Level:
    """One draft step from `parents` (whose draft outputs are `outputs`)."""
    cols, logprobs = draft.logprobs(torch.stack(outputs), [b.node for b in parents])
    totals = logprobs + torch.tensor([b.score for b in parents])[:, None]
    U = totals.shape[-1]
    flat = totals.flatten()
    q = None
    if verify == "strict":  # the best N extensions that continue (an item's end needs no node)
        ends = torch.isin(cols, torch.tensor(sorted(search.eos)))
        flat = totals.masked_fill(ends, float("-inf")).flatten()
        n = min(width, int(torch.isfinite(flat).sum()))
        values, index = torch.topk(flat, n)
    else:  # N extensions sampled from the draft's beam-sampling distribution, ends included
        q = torch.softmax(flat, dim=-1)
        n = min(width, int((q > 0).sum()))
        index = torch.multinomial(q, n, replacement=False, generator=rng)
        values = flat[index]
        q = q.view_as(totals)
    tokens = cols[index % U].tolist()
    drafted = [
        Candidate(v, i // U, t)
        for v, i, t in zip(values.tolist(), index.tolist(), tokens, strict=True)
    ]
    catalogue = search.catalogue
    beams = [
        Beam(
            parents[c.parent].ids + (c.token,),
            c.score,
            0 if catalogue is None else catalogue.child(parents[c.parent].node, c.token),
        )
        for c in drafted
        if c.token not in search.eos
    ]
    return Level(parents, drafted, beams, cols, q)


# ---- verification -------------------------------------------------------------------------------
def _verify_strict(search: BeamSearch, target: TargetTree, known: dict[Path, Tensor]) -> int:
    """Take the target's own beam search steps while their logits are known; returns steps."""
    steps = 0
    while not search.done:
        outputs = [known.get(b.ids) for b in search.live]
        if any(o is None for o in outputs):
            break
        search.step(target.logprobs(torch.stack(outputs), search.nodes))
        steps += 1
    return steps


def _verify_relaxed(
    search: BeamSearch,
    target: TargetTree,
    known: dict[Path, Tensor],
    levels: list[Level],
    rng: torch.Generator,
    trials: list[tuple[float, bool]],
) -> int:
    """AtSpeed-R's sampling verification level by level; returns the target steps taken."""
    K = search.config.num_beams
    steps = 0
    while not search.done:
        outputs = [known.get(b.ids) for b in search.live]
        if any(o is None for o in outputs):
            break
        totals = search.totals(target.logprobs(torch.stack(outputs), search.nodes))
        p = torch.softmax(totals.flatten(), dim=-1).view_as(totals)
        steps += 1
        if steps > len(levels):  # beyond the draft: the target's own beam-sampling step
            search.commit(_sample(totals, p, [], K, rng))
            break
        level = levels[steps - 1]
        row = {b.ids: i for i, b in enumerate(search.live)}
        column = {t: j for j, t in enumerate(level.cols.tolist())}
        accepted = []
        for c in level.drafted:
            parent = row.get(level.parents[c.parent].ids)
            p_x = 0.0 if parent is None else float(p[parent, c.token])
            q_x = float(level.q[c.parent, column[c.token]])
            ratio = min(1.0, p_x / q_x)
            ok = bool(torch.rand((), generator=rng) < ratio)
            trials.append((ratio, ok))
            if ok:
                accepted.append(Candidate(float(totals[parent, c.token]), parent, c.token))
        if len(accepted) >= min(K, int((p > 0).sum())):  # as many as beam sampling would take
            search.commit(sorted(accepted, key=lambda c: -c.score)[:K])
            continue
        # rejected: the missing beams come from the residual norm(max(p − q, 0)); then stop
        q = torch.zeros_like(p)
        for i, b in enumerate(search.live):
            j = next((j for j, a in enumerate(level.parents) if a.ids == b.ids), None)
            if j is not None:
                q[i, level.cols] = level.q[j]
        residual = (p - q).clamp(min=0)
        search.commit(_sample(totals, residual, accepted, K, rng, fallback=p))
        break
    return steps


def _sample(
    totals: Tensor,
    weights: Tensor,
    chosen: list[Candidate],
    K: int,
    rng: torch.Generator,
    fallback: Tensor | None = None,
) -> list[Candidate]:
    """`chosen` filled up to K with extensions sampled without replacement ∝ `weights` (or
    ∝ `fallback` where the weights leave none), best first."""
    V = totals.shape[-1]
    taken = torch.zeros(weights.numel(), dtype=torch.bool)
    taken[[c.parent * V + c.token for c in chosen]] = True
    w = weights.flatten().masked_fill(taken, 0.0)
    if fallback is not None and float(w.sum()) <= 0:
        w = fallback.flatten().masked_fill(taken, 0.0)
    n = min(K - len(chosen), int((w > 0).sum()))
    if n > 0:
        index = torch.multinomial(w, n, replacement=False, generator=rng).tolist()
        flat = totals.flatten()
        chosen = chosen + [Candidate(float(flat[i]), i // V, i % V) for i in index]
    return sorted(chosen, key=lambda c: -c.score)


# ---- the search ---------------------------------------------------------------------------------
@torch.no_grad()
def speculative_beam_search(
    target: SPAModel,
    draft: Draft | None,
    prompts: Sequence[Sequence[int]],
    decode: DecodeConfig,
    spec: SpeculativeConfig | None = None,
    catalogue: Catalogue | None = None,
    side: TreeSide | None = None,
) -> SpeculativeResult:
    """Top-K beam search of `target` for every prompt (a batch), drafted by `draft`; `side`: its
    side network elsewhere (a device), asked once per target pass."""
    spec = spec or SpeculativeConfig()
    if not prompts or any(not p for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if draft is None and spec.gamma > 0:
        raise ConfigError("drafting (gamma > 0) needs a draft model")
    width = spec.beams(decode.num_beams)
    rng = torch.Generator().manual_seed(spec.seed)
    eos = target.backbone.eos_token_ids
    searches = [BeamSearch(decode, eos, catalogue) for _ in prompts]
    t_tree = TargetTree(target, prompts, catalogue, side)
    d_tree = DraftTree(draft, prompts, catalogue) if spec.gamma > 0 else None
    t_known = [{(): root} for root in t_tree.roots]
    d_known = [{(): root} for root in d_tree.roots] if d_tree else []
    stats = SpeculativeStats()
    rows = range(len(prompts))
    while not all(s.done for s in searches):
        active = [r for r in rows if not searches[r].done]
        levels: list[list[Level]] = [[] for _ in rows]
        if d_tree is not None:
            _draft_levels(searches, d_tree, d_known, levels, active, width, spec, rng)
        # one target pass: the live beams it has not seen and every drafted node
        wanted = [[] for _ in rows]
        for r in active:
            paths = [b.ids for b in searches[r].live]
            paths += [b.ids for level in levels[r] for b in level.beams]
            wanted[r] = t_tree.missing(r, paths)
        if any(wanted):
            for r, new in enumerate(t_tree.extend(wanted)):
                t_known[r].update(new)
        for r in active:
            search = searches[r]
            if spec.verify == "strict":
                steps = _verify_strict(search, t_tree, t_known[r])
            else:
                steps = _verify_relaxed(search, t_tree, t_known[r], levels[r], rng, stats.trials)
            stats.verifications += 1
            stats.target_steps += steps
            # a search that ends mid-draft had no use for the levels after its last step
            drafted = min(len(levels[r]), steps - 1) if search.done else len(levels[r])
            stats.drafted_steps += drafted
            stats.accepted_steps += min(steps - 1, drafted)
        # roll back: keep each prompt's live beams (and their ancestors) only
        live = [[b.ids for b in s.live] if not s.done else [] for s in searches]
        t_tree.keep(live)
        t_known = [
            {p: k[p].clone() for p in paths if p in k}
            for k, paths in zip(t_known, live, strict=True)
        ]
        if d_tree is not None:
            d_tree.keep(live)
            d_known = [
                {p: k[p].clone() for p in paths if p in k}
                for k, paths in zip(d_known, live, strict=True)
            ]
    stats.target_passes = t_tree.passes
    stats.draft_passes = d_tree.passes if d_tree else 0
    stats.contacts = t_tree.contacts
    return SpeculativeResult([s.finished for s in searches], stats)


def _draft_levels(
    searches: list[BeamSearch],
    d_tree: DraftTree,
    d_known: list[dict[Path, Tensor]],
    levels: list[list[Level]],
    active: list[int],
    width: int,
    spec: SpeculativeConfig,
    rng: torch.Generator,
) -> None:
    """Draft up to γ levels for every active prompt, one draft pass per level (all prompts)."""
    rows = range(len(searches))
    catch_up = [[] for _ in rows]  # live beams the draft has not seen (after a rejection)
    for r in active:
        catch_up[r] = d_tree.missing(r, [b.ids for b in searches[r].live])
    if any(catch_up):
        for r, new in enumerate(d_tree.extend(catch_up)):
            d_known[r].update(new)
    frontier = {r: searches[r].live for r in active}
    depth = {r: spec.gamma for r in active}
    for r in active:  # nodes at the last step need no drafting: every candidate finishes there
        depth[r] = min(depth[r], searches[r].config.max_new_tokens - searches[r].t - 1)
    for j in range(spec.gamma):
        for r in [r for r in frontier if j < depth[r] and frontier[r]]:
            outputs = [d_known[r][b.ids] for b in frontier[r]]
            level = _draft(searches[r], d_tree, outputs, frontier[r], width, spec.verify, rng)
            levels[r].append(level)
            frontier[r] = level.beams
        grow = [[] for _ in rows]
        for r in frontier:
            if j + 1 < depth[r]:
                grow[r] = [b.ids for b in frontier[r]]
        if not any(grow):
            break
        for r, new in enumerate(d_tree.extend(grow)):
            d_known[r].update(new)
