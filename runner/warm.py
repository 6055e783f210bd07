"""Which warm models a runner keeps in memory for good, when its budget cannot hold them all.

A runner serving several pipelines warms each pipeline's default model (and the safety
checker). When the budget holds them all, all are pinned (a request too large to run beside
them is then a 422 naming the size that fits). When it does not, pinning them in
order would leave the later ones unservable (a pinned model never leaves), so they are pinned
in priority order only while the rest can still be served beside them, one at a time: the
models pinned so far, this one, and the largest of the others (with the safety checker, which
an image request holds beside its model) and one run's working memory must fit. Whatever is
not pinned is loaded on demand and swapped; a model that does not fit the budget even alone
can never be served.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.registry import ModelEntry


@dataclass(frozen=True)
class WarmPlan:
    pinned: list[ModelEntry]
    on_demand: list[ModelEntry]
    too_large: list[ModelEntry]  # bigger than the whole budget: never servable


def plan(entries: list[ModelEntry], sizes: dict[str, int], budget: int,
         companion: ModelEntry | None = None, run_bytes: int = 0) -> WarmPlan:
    """`entries` in priority order (the first pipeline's default first), `sizes` in bytes by
    model id; `companion` is held beside any other model at run time (the safety checker);
    `run_bytes`: the working memory of the largest default-sized request."""
    too_large = [e for e in entries if sizes[e.id] > budget]
    servable = [e for e in entries if e not in too_large]
    if sum(sizes[e.id] for e in servable) <= budget:
        return WarmPlan(servable, [], too_large)
    pinned: list[ModelEntry] = []
    for entry in entries:
        if entry in too_large:
            continue
        rest = [e for e in entries if e not in pinned and e != entry and e not in too_large]
        held = sum(sizes[e.id] for e in (*pinned, entry))
        if held + room(rest, sizes, companion) + run_bytes <= budget:
            pinned.append(entry)
    on_demand = [e for e in entries if e not in pinned and e not in too_large]
    return WarmPlan(pinned, on_demand, too_large)


def room(rest: list[ModelEntry], sizes: dict[str, int], companion: ModelEntry | None) -> int:
    """What serving the unpinned models one at a time needs: the largest, plus the companion
    when it is unpinned too and the largest is not the companion itself."""
    if not rest:
        return 0
    largest = max(rest, key=lambda e: sizes[e.id])
    extra = sizes[companion.id] if companion in rest and companion != largest else 0
    return sizes[largest.id] + extra
