"""Compiled functions called from several threads: correct results, no lost updates."""
from __future__ import annotations

import threading

import numpy as np

import graphc as gc


def _run_threads(n, fn):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except Exception as e:  # collected: an assertion in a thread must fail the test
            errors.append(e)
    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


def test_no_lost_updates(backend):
    c = gc.parameter("c", np.zeros((), np.float64))
    x = gc.placeholder("x", ())
    f = gc.function([x], c * 1, updates=[(c, c + 1)], backend=backend)
    _run_threads(8, lambda i: [f(np.float32(0)) for _ in range(200)])
    assert c.value == 1600


def test_concurrent_calls_give_correct_results(backend):
    x = gc.placeholder("x", (None, 64), "float64")
    W = gc.parameter("W", np.random.default_rng(0).standard_normal((64, 32)))
    f = gc.function([x], gc.tanh(x @ W) * gc.sigmoid(x[:, :32]) + gc.exp(-x[:, :32] ** 2), backend=backend)

    def work(i):
        rng = np.random.default_rng(i)
        for _ in range(30):
            a = rng.standard_normal((int(rng.integers(1, 50)), 64))
            want = np.tanh(a @ W.value) / (1 + np.exp(-a[:, :32])) + np.exp(-a[:, :32] ** 2)
            np.testing.assert_allclose(f(a), want, rtol=1e-10, atol=1e-12)
    _run_threads(6, work)
