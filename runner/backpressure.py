"""Busy answers are backpressure, normal operation rather than errors: every one is counted in
`runner_rejected_total{model, reason}`, and each model's are logged at WARNING at most once per
interval (BUSY_LOG_SECONDS), the line saying how many were refused since the model's last one.
A flood of refusals thus costs the log a line per model per interval, and the metric keeps the
exact count."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from runner import metrics
from runner.errors import Busy, BusyReason

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    """One model's refusals not yet logged."""

    logged_at: float = float("-inf")  # when its last line was written
    since: float = 0.0  # when the first refusal not yet logged came
    reasons: Counter[BusyReason] = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    """What one log line reports: `count` refusals of `model` over `seconds`, by reason."""

    model: str
    reasons: dict[BusyReason, int]
    seconds: float
    latest: str

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def line(self) -> str:
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
        if self.count == 1:
            return f"{self.model}: 1 request answered busy ({by_reason}): {self.latest}"
        return (f"{self.model}: {self.count} requests answered busy over {self.seconds:.0f} s "
                f"({by_reason}); the latest: {self.latest}")


class BusyLog:
    """Counts each busy answer and logs each model's at most once per `interval` seconds.
    Thread-safe: error handlers may run in worker threads."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()

    def refused(self, exc: Busy) -> None:
        metrics.REJECTED.labels(exc.model, exc.reason).inc()
        if (summary := self._note(exc)) is not None:
            log.warning("%s", summary.line())

    def _note(self, exc: Busy) -> Summary | None:
        """Tally `exc`; the summary to log now, or None within the model's interval."""
        now = self._clock()
        with self._lock:
            tally = self._tallies.setdefault(exc.model, _Tally())
            if not tally.reasons:
                tally.since = now
            tally.reasons[exc.reason] += 1
            if now - tally.logged_at < self.interval:
                return None
            summary = Summary(exc.model, dict(tally.reasons), now - tally.since, exc.msg)
            tally.reasons.clear()
            tally.logged_at = now
            return summary
