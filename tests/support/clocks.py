"""A clock for code that takes ``clock`` and ``sleep`` callables (the embedders' token bucket):
time moves only when the code sleeps, and every sleep is recorded."""

from __future__ import annotations


class SleepRecordingClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
