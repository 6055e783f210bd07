"""runner/warm.py: which warm models a budget that cannot hold them all keeps pinned."""

from __future__ import annotations

from runner import warm
from runner.registry import ModelEntry

A, B, C = (ModelEntry(id=f"org/{n}", kind="x") for n in "abc")
CHECKER = ModelEntry(id="org/checker", kind="x")
SIZES = {"org/a": 600, "org/b": 500, "org/c": 400, "org/checker": 100}


def ids(entries) -> list[str]:
    return [e.id for e in entries]


def test_everything_is_pinned_when_it_all_fits():
    plan = warm.plan([A, B, C, CHECKER], SIZES, 1600, CHECKER)
    assert ids(plan.pinned) == ["org/a", "org/b", "org/c", "org/checker"]
    assert plan.on_demand == [] and plan.too_large == []


def test_pinned_in_order_only_while_the_rest_can_still_be_served():
    # a (600) + the largest other (b, 500) fits 1100; then b would leave no room for c.
    plan = warm.plan([A, B, C], SIZES, 1100)
    assert ids(plan.pinned) == ["org/a"] and ids(plan.on_demand) == ["org/b", "org/c"]


def test_an_unpinned_checker_is_counted_beside_the_largest_model():
    # a: 600 + (b 500 + the checker 100, an image request holds both) = 1200 > 1150.
    plan = warm.plan([A, CHECKER, B], SIZES, 1150, CHECKER)
    assert ids(plan.pinned) == ["org/checker"] and ids(plan.on_demand) == ["org/a", "org/b"]
    assert ids(warm.plan([A, CHECKER, B], SIZES, 1200, CHECKER).pinned) == [
        "org/a", "org/checker", "org/b"]


def test_a_run_s_working_memory_is_left_free_when_not_all_fit():
    assert ids(warm.plan([A, B], SIZES, 1100, run_bytes=10**9).pinned) == ["org/a", "org/b"]
    assert ids(warm.plan([A, B, C], SIZES, 1100).pinned) == ["org/a"]
    # a no longer fits with a run beside the largest other; c (400) still does
    assert ids(warm.plan([A, B, C], SIZES, 1100, run_bytes=1).pinned) == ["org/c"]


def test_a_model_bigger_than_the_budget_is_never_servable():
    plan = warm.plan([A, B], SIZES, 550)
    assert ids(plan.too_large) == ["org/a"] and ids(plan.pinned) == ["org/b"]
