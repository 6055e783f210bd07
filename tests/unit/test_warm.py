"""runner/warm.py: which warm models a budget keeps pinned so that every served pipeline can
still answer a default-sized request of its default model."""

from __future__ import annotations

import itertools

from runner import warm
from runner.registry import ModelEntry

A, B, C = (ModelEntry(id=f"org/{n}", kind="x") for n in "abc")
CHECKER = ModelEntry(id="org/checker", kind="x")
SIZES = {"org/a": 600, "org/b": 500, "org/c": 400, "org/checker": 100}


def ids(entries) -> list[str]:
    return [e.id for e in entries]


def demands(runs: dict[str, int] | None = None, checked: str = "") -> list[warm.Demand]:
    """One pipeline per model a, b, c; `checked` names those whose images the checker sees."""
    runs = runs or {}
    return [warm.Demand(f"p{e.id[-1]}", e, CHECKER if e.id[-1] in checked else None,
                        runs.get(e.id[-1], 0)) for e in (A, B, C)]


def test_everything_is_pinned_when_it_all_fits_with_each_run():
    plan = warm.plan([A, B, C, CHECKER], demands({"a": 200}, "abc"), SIZES, 1800)
    assert ids(plan.pinned) == ["org/a", "org/b", "org/c", "org/checker"]
    assert plan.on_demand == [] and plan.unservable == []


def test_the_run_s_working_memory_counts_even_when_every_model_fits():
    """The defect of issue 24: 1600 holds the four models, but not a's run beside them."""
    plan = warm.plan([A, B, C, CHECKER], demands({"a": 200}, "abc"), SIZES, 1600)
    assert "org/c" not in ids(plan.pinned) or "org/b" not in ids(plan.pinned)
    for d in demands({"a": 200}, "abc"):
        assert warm.needs(d, plan.pinned, SIZES) <= 1600


def test_pinned_in_order_only_while_every_pipeline_can_still_be_served():
    # a (600) + b (500) for pb = 1100; pinning b too would leave c no room.
    plan = warm.plan([A, B, C], demands(), SIZES, 1100)
    assert ids(plan.pinned) == ["org/a"] and ids(plan.on_demand) == ["org/b", "org/c"]


def test_an_unpinned_checker_is_held_beside_the_model_of_a_checked_pipeline():
    # pinning a leaves 550 for pb: b (500) and the checker (100) do not fit.
    plan = warm.plan([A, CHECKER, B], demands(checked="b")[:2], SIZES, 1150)
    assert ids(plan.pinned) == ["org/checker"] and ids(plan.on_demand) == ["org/a", "org/b"]
    assert ids(warm.plan([A, CHECKER, B], demands(checked="b")[:2], SIZES, 1200).pinned) == [
        "org/a", "org/checker", "org/b"]


def test_a_pipeline_that_cannot_be_served_alone_is_named_with_the_budget_it_needs():
    plan = warm.plan([A, B], demands({"a": 100})[:2], SIZES, 650)
    assert plan.pinned == [] and [(d.pipeline, n) for d, n in plan.unservable] == [("pa", 700)]
    (pipeline, why), = plan.problems(650)
    assert pipeline == "pa" and "org/a" in why and "at least 1 MiB" in why


def test_the_promise_holds_over_a_sweep_of_budgets_and_runs():
    """Whatever is pinned, each pipeline's own models and run fit beside it; and a budget only
    refuses a pipeline whose demand exceeds it alone."""
    for budget, run_a, run_c, checked in itertools.product(
            range(300, 2200, 50), (0, 150, 700), (0, 90), ("", "a", "ac")):
        ds = demands({"a": run_a, "c": run_c}, checked)
        plan = warm.plan([A, B, C, CHECKER] if checked else [A, B, C], ds, SIZES, budget)
        if plan.unservable:
            assert all(warm.needs(d, (), SIZES) > budget for d, _ in plan.unservable)
            continue
        assert all(warm.needs(d, plan.pinned, SIZES) <= budget for d in ds)
