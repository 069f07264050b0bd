"""The retention search: the smallest derived student whose validation retention reaches a target.

A job with `target_retention` asks for a quality, not a size. The runner's `search` phase calls
`run_search` with a `probe(trial, ratio)` that trains one student of that size and measures it; this module
decides which sizes to try and when to stop, and knows nothing of torch:

1. Geometric bracket: start at `SearchSettings.start` and multiply (target missed) or divide (target met)
   the size by `factor` until one size meets the target and a smaller one misses it, or a limit is hit
   (the largest size misses: impossible; the smallest buildable size meets it: done).
2. Bisection on the size, at the geometric mean of the bracket, until the smallest size meeting the target
   and the largest missing it below it are within `1 + tolerance` of each other (or build the same
   number of parameters: no finer size exists).
3. The budget (`max_trials`, `max_search_seconds`) ends the search early; no new trial starts once the
   elapsed time, or the elapsed time plus the mean trial's, passes `max_search_seconds`, and the probe cuts
   a trial still running at that time short (recorded, not counted: it says nothing about its size).

Decisions use validation figures only (the test split stays untouched by the choice). Accuracy is not
strictly monotone in size (training noise), so the bracket is the smallest size meeting the target and the
largest size below it that misses. The state is the list of trials: `next_ratio` derives the next size from
it alone, so a resumed search replays the same decisions from the stored trials.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

SearchStatus = Literal["bracketed", "smallest_size", "impossible", "budget_trials", "budget_seconds"]


@dataclass(frozen=True)
class SearchSettings:
    """The search's knobs: the job gives the target and the budget, the rest are the engine's defaults."""

    target: float  # retention to reach, on validation
    max_trials: int
    max_seconds: float
    tolerance: float = 0.25  # stop when hi / lo <= 1 + tolerance
    start: float = 0.02  # the first size tried (student / teacher parameters)
    factor: float = 4.0  # the bracket's geometric step
    min_ratio: float = 1e-4  # sizes below this are not tried
    max_ratio: float = 0.9  # nor above this (a student the teacher's size is no compression)


@dataclass
class Trial:
    """One probe's outcome, as the search sees it (the runner keeps the full record in `record`)."""

    ratio: float
    parameters: int
    retention: float | None  # validation retention; None when no student could be built at this size
    record: dict[str, Any] = field(default_factory=dict)  # the `TrialResult` fields
    counted: bool = True  # False: cut short by max_search_seconds, says nothing about its size


@dataclass
class SearchOutcome:
    trials: list[Trial]
    status: SearchStatus
    chosen: Trial | None  # the smallest meeting the target, else the best retention found
    bracket: tuple[float | None, float | None]  # (largest missing below chosen, smallest meeting)
    seconds: float


def bracket(trials: list[Trial], target: float) -> tuple[Trial | None, Trial | None]:
    """(largest size missing the target below the smallest meeting it, smallest size meeting it)."""
    trials = [t for t in trials if t.counted]
    meeting = [t for t in trials if t.retention is not None and t.retention >= target]
    high = min(meeting, key=lambda t: t.ratio) if meeting else None
    below = [
        t
        for t in trials
        if not (t.retention is not None and t.retention >= target) and (high is None or t.ratio < high.ratio)
    ]
    low = max(below, key=lambda t: t.ratio) if below else None
    return low, high


def next_ratio(
    trials: list[Trial], settings: SearchSettings, parameters_at: Callable[[float], int]
) -> tuple[float | None, SearchStatus | None]:
    """The next size to try, or (None, why the search is done). `parameters_at(ratio)` counts a student."""
    if not [t for t in trials if t.counted]:
        return min(max(settings.start, settings.min_ratio), settings.max_ratio), None
    low, high = bracket(trials, settings.target)
    if high is None:  # nothing meets the target yet: grow
        assert low is not None
        if low.ratio >= settings.max_ratio * (1 - 1e-9):
            return None, "impossible"
        return min(low.ratio * settings.factor, settings.max_ratio), None
    if low is None:  # everything tried meets it: shrink
        if high.ratio <= settings.min_ratio * (1 + 1e-9):
            return None, "smallest_size"
        candidate = max(high.ratio / settings.factor, settings.min_ratio)
        if parameters_at(candidate) >= high.parameters:
            return None, "smallest_size"  # no smaller student exists
        return candidate, None
    if high.ratio / low.ratio <= 1 + settings.tolerance:
        return None, "bracketed"
    candidate = math.sqrt(low.ratio * high.ratio)
    if parameters_at(candidate) in (low.parameters, high.parameters):
        return None, "bracketed"  # no size between them
    return candidate, None


def choose(trials: list[Trial], target: float) -> Trial | None:
    """The smallest size meeting the target, else the trial with the best validation retention."""
    _, high = bracket(trials, target)
    if high is not None:
        return high
    built = [t for t in trials if t.retention is not None and t.counted]
    return max(built, key=lambda t: (t.retention, -t.ratio)) if built else None


def run_search(
    settings: SearchSettings,
    *,
    probe: Callable[[int, float], Trial],
    parameters_at: Callable[[float], int],
    done: list[Trial] | None = None,
    on_trial: Callable[[Trial, list[Trial]], None] | None = None,
    check_stop: Callable[[], None] | None = None,
    seconds_before: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> SearchOutcome:
    """Try sizes until bracketed, limited, or out of budget; `done` are trials of an interrupted search.

    `probe(trial_number, ratio)` trains and measures one size; `on_trial` is told after each (to record an
    event and save the state); `check_stop` raises to cancel between trials (probes check inside).
    `seconds_before` is the search time spent before a resume.
    """
    trials = list(done or [])
    started = clock() - seconds_before
    status: SearchStatus
    while True:
        if check_stop is not None:
            check_stop()
        ratio, finished = next_ratio(trials, settings, parameters_at)
        if ratio is None:
            assert finished is not None
            status = finished
            break
        if len(trials) >= settings.max_trials:
            status = "budget_trials"
            break
        elapsed = clock() - started
        mean_trial = elapsed / len(trials) if trials else 0.0
        if elapsed >= settings.max_seconds or (trials and elapsed + mean_trial > settings.max_seconds):
            status = "budget_seconds"
            break
        trial = probe(len(trials) + 1, ratio)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial, trials)
    chosen = choose(trials, settings.target)
    low, high = bracket(trials, settings.target)
    return SearchOutcome(
        trials=trials,
        status=status,
        chosen=chosen,
        bracket=(low.ratio if low and high else None, high.ratio if high else None),
        seconds=clock() - started,
    )
