"""Side-by-side timing: candidate and baseline alternate in rounds, so machine noise hits both."""
from __future__ import annotations

import statistics
import time


def rate(fn, items: int, seconds: float = 3.0) -> float:
    """Items per second of repeated `fn()` calls (each handles `items`) over about `seconds`."""
    fn()  # warm-up: first call pays for allocation and kernel selection
    done, start = 0, time.perf_counter()
    while True:
        fn()
        done += items
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def compare(candidates: dict, rounds: int = 3, seconds: float = 3.0) -> dict:
    """candidates: name -> (fn, items per call). Returns name -> median items/s over rounds."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, (fn, items) in candidates.items():
            samples[name].append(rate(fn, items, seconds))
    return {name: round(statistics.median(values), 2) for name, values in samples.items()}
