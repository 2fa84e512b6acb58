"""Latency statistics of a load run: percentiles and mean of per-request times, in milliseconds.

One small value object shared by the load client (``load_client.py``) and the serving
benchmark, so both report the same numbers the same way. Percentiles use numpy's default
(linear interpolation between the closest ranks); with one sample every percentile is it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LatencySummary"]


@dataclass(frozen=True)
class LatencySummary:
    """Per-request latency over a run, milliseconds; all zero when ``count`` is 0."""

    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> LatencySummary:
        if not seconds:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(len(ms), float(ms.mean()), float(p50), float(p95), float(p99), float(ms.max()))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "mean_ms": round(self.mean_ms, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
        }
