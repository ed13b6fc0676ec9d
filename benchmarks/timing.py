"""Shared by the benchmark scripts: latency of an ONNX Runtime session, and model bytes on disk."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def median_ms(session, feed: dict, warmup: int = 20, runs: int = 200) -> float:
    """Median wall time of session.run over `runs` calls, after `warmup` calls."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def interleaved_ms(sessions: dict, feed: dict, runs: int, warmup: int = 10, rounds: int = 100) -> dict:
    """Median ms per session over `runs` timed runs, taken in `rounds` turns that visit the sessions in
    order, so that a slow spell on the machine hits them all alike. Each turn starts with a pause and an
    untimed run: after a run, ONNX Runtime's idle intra-op threads spin for milliseconds, and a session
    timed while another session's threads spin has lost a core (switching sessions without the pause
    read float at batch 16 three times slower)."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    rounds = min(rounds, runs)
    times = {method: [] for method in sessions}
    for _ in range(rounds):
        for method, session in sessions.items():
            time.sleep(0.05)
            session.run(None, feed)
            for _ in range(runs // rounds):
                start = time.perf_counter()
                session.run(None, feed)
                times[method].append(time.perf_counter() - start)
    return {method: float(np.median(values) * 1e3) for method, values in times.items()}


def model_bytes(model_path: str | Path) -> int:
    """The .onnx file plus its external-data file, if any."""
    path = Path(model_path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
