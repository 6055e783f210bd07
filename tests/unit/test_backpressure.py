"""BusyLog: every busy answer counted, each model's logged at most once per interval, the line
saying how many were refused since the model's last one (a fake clock: no waiting)."""

import logging

from prometheus_client import REGISTRY

from runner.backpressure import BusyLog
from runner.errors import Busy, BusyReason


def busy(model: str, reason: BusyReason = BusyReason.QUEUE_FULL) -> Busy:
    return Busy(model, reason, f"{model} is full; retry later")


def counted(model: str, reason: BusyReason) -> float:
    return REGISTRY.get_sample_value("runner_rejected_total",
                                     {"model": model, "reason": reason}) or 0.0


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "runner.backpressure"
            and r.levelno == logging.WARNING]


def test_each_model_logs_once_per_interval_with_the_count_since(caplog):
    caplog.set_level(logging.WARNING, logger="runner.backpressure")
    now = [100.0]
    log = BusyLog(10.0, clock=lambda: now[0])
    before = counted("unit:a", BusyReason.QUEUE_FULL), counted("unit:a", BusyReason.DEADLINE)

    log.refused(busy("unit:a"))  # the first refusal is logged at once
    assert lines(caplog) == ["unit:a: 1 request answered busy (queue_full 1): unit:a is full; "
                             "retry later"]
    for t in (101.0, 103.0, 109.9):  # within the interval: tallied only
        now[0] = t
        log.refused(busy("unit:a"))
    log.refused(busy("unit:a", BusyReason.DEADLINE))
    log.refused(busy("unit:b"))  # another model has its own interval
    assert len(lines(caplog)) == 2 and lines(caplog)[1].startswith("unit:b: 1 request")

    now[0] = 111.0  # past the interval: one line for the 5 since the last (the first at 101)
    log.refused(busy("unit:a"))
    assert lines(caplog)[2] == ("unit:a: 5 requests answered busy over 10 s (deadline 1, "
                                "queue_full 4); the latest: unit:a is full; retry later")
    assert len(lines(caplog)) == 3
    assert counted("unit:a", BusyReason.QUEUE_FULL) == before[0] + 5
    assert counted("unit:a", BusyReason.DEADLINE) == before[1] + 1


def test_an_interval_of_zero_logs_every_refusal(caplog):
    caplog.set_level(logging.WARNING, logger="runner.backpressure")
    log = BusyLog(0.0, clock=lambda: 5.0)
    for _ in range(3):
        log.refused(busy("unit:c"))
    assert len(lines(caplog)) == 3
