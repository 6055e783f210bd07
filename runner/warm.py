"""Which warm models a runner keeps in memory for good, such that every served pipeline can
still answer a default-sized request of its default model.

A runner serving several pipelines warms each pipeline's default model (and the safety
checker). The promise behind IDLE: each pipeline's `Demand` (its default model, the safety
checker where its images are checked, and the working memory admission will reserve for its
default-sized request) fits the budget beside every pinned model, one request at a time. Warm
models are pinned in priority order only while every demand still fits (a pinned model never
leaves); the others are loaded on demand and swapped. A demand that does not fit even with
nothing pinned can never be served: a start-up error naming the pipeline and the budget it
would need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from runner.registry import ModelEntry


@dataclass(frozen=True)
class Demand:
    """What one pipeline's default-sized request holds on the device while it runs."""

    pipeline: str
    model: ModelEntry
    companion: ModelEntry | None  # held beside it (the safety checker), or None
    run_bytes: int  # the working memory admission reserves for it

    @property
    def models(self) -> tuple[ModelEntry, ...]:
        return (self.model,) if self.companion is None else (self.model, self.companion)


@dataclass(frozen=True)
class WarmPlan:
    pinned: list[ModelEntry]
    on_demand: list[ModelEntry]
    unservable: list[tuple[Demand, int]]  # demands over the budget alone, with what each needs

    def problems(self, budget: int) -> list[tuple[str, str]]:
        """(pipeline, why) for each demand the budget can never hold."""
        return [(d.pipeline, f"serving {d.pipeline} ({d.model.id}"
                 + (f" with {d.companion.id}" if d.companion is not None else "")
                 + f", and a default-sized request's {d.run_bytes >> 20} MiB of working memory)"
                 f" needs a budget of at least {mib_up(needed)} MiB; this runner's is "
                 f"{budget >> 20} MiB (VRAM_BUDGET, or the device's memory minus VRAM_RESERVE)")
                for d, needed in self.unservable]


def mib_up(nbytes: int) -> int:
    return -(-nbytes // (1 << 20))


def needs(demand: Demand, pinned: Iterable[ModelEntry], sizes: dict[str, int]) -> int:
    """Device bytes `demand` needs while `pinned` stay: every pinned model, its own models
    (each counted once), and its working memory."""
    held = {e.id: sizes[e.id] for e in pinned}
    held.update({e.id: sizes[e.id] for e in demand.models})
    return sum(held.values()) + demand.run_bytes


def plan(entries: list[ModelEntry], demands: list[Demand], sizes: dict[str, int],
         budget: int) -> WarmPlan:
    """`entries`: the warm models in priority order (the first pipeline's default first);
    `sizes` in bytes by model id."""
    unservable = [(d, n) for d in demands if (n := needs(d, (), sizes)) > budget]
    if unservable:
        return WarmPlan([], [], unservable)
    pinned: list[ModelEntry] = []
    for entry in entries:
        if all(needs(d, (*pinned, entry), sizes) <= budget for d in demands):
            pinned.append(entry)
    return WarmPlan(pinned, [e for e in entries if e not in pinned], [])
