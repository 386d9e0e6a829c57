"""benchmarks/long_run.py: the training loop runs and samples RSS/step time; the verdict flags a
leak and a slowdown (checked on synthetic samples so the thresholds are known to bite)."""
from __future__ import annotations

from benchmarks import long_run


def test_long_run_samples_a_short_training_loop():
    samples = long_run.run(steps=300, every=100, backend="numpy", seconds=None, log=None)
    assert [s[0] for s in samples] == [100, 200, 300]
    assert all(s[1] > 10 and s[2] > 0 for s in samples)


def test_verdict_flags_growth_and_slowdown():
    steady = [(k * 5000, 250.0, 2.0) for k in range(1, 11)]
    assert long_run.verdict(steady)[:2] == (True, True)
    leaking = [(k * 5000, 250.0 + 3 * k, 2.0) for k in range(1, 11)]
    assert long_run.verdict(leaking)[:2] == (False, True)
    slowing = [(k * 5000, 250.0, 2.0 + 0.3 * k) for k in range(1, 11)]
    assert long_run.verdict(slowing)[:2] == (True, False)
