"""The planner's side-by-side solves: results in the order asked, whatever finishes first; the
first error raised; items made while earlier calls run; a call from inside a worker runs in
place (no pool waiting on itself); the same plans side by side as one after the other, also at
the solver's time limit."""
import threading
import time
import warnings

import numpy as np
import pytest
import scipy.optimize

from parallel import auto
from parallel.auto import _concurrent
from parallel.auto._concurrent import in_order
from tests.test_auto_plans import mlp_step


def test_results_come_back_in_the_order_asked():
    def slow_first(x):
        time.sleep(0.05 if x == 0 else 0.0)
        return x * 10

    assert in_order(slow_first, range(5)) == [0, 10, 20, 30, 40]


def test_the_first_error_is_raised():
    def fail_on_odd(x):
        if x % 2:
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 1"):
        in_order(fail_on_odd, range(4))


def test_items_are_made_while_earlier_calls_run():
    started = threading.Event()
    made_during_the_first_call = []

    def items():
        yield 0
        made_during_the_first_call.append(started.wait(timeout=10))
        yield 1

    def call(x):
        started.set()
        return x + 1

    assert in_order(call, items()) == [1, 2]
    assert made_during_the_first_call == [True]


def test_an_error_making_the_items_is_raised_after_the_calls_handed_out():
    ended = []

    def items():
        yield 0
        raise ValueError("item 1 cannot be made")

    def call(x):
        time.sleep(0.05)
        ended.append(x)

    with pytest.raises(ValueError, match="item 1 cannot be made"):
        in_order(call, items())
    assert ended == [0]


def test_a_call_inside_a_worker_runs_in_place():
    def outer(x):
        inner_threads = in_order(lambda _: threading.current_thread().name, range(3))
        assert set(inner_threads) == {threading.current_thread().name}
        return x

    assert in_order(outer, range(4)) == [0, 1, 2, 3]


def test_highs_solves_side_by_side_equal_one_after_the_other():
    def solve(seed):
        rng = np.random.default_rng(seed)
        cost = rng.random(60)
        rows = (rng.random((30, 60)) < 0.1) * rng.integers(1, 4, (30, 60))
        rows[np.arange(30), rng.integers(0, 60, 30)] = 1  # every row coverable
        found = scipy.optimize.milp(cost, integrality=np.ones(60),
                                    bounds=scipy.optimize.Bounds(0, 1),
                                    constraints=scipy.optimize.LinearConstraint(rows, 1, np.inf))
        return found.status, found.fun, tuple(np.round(found.x, 6))

    seeds = list(range(16))
    assert in_order(solve, seeds) == [solve(s) for s in seeds]


def test_solves_at_the_time_limit_side_by_side_equal_one_after_the_other(monkeypatch):
    """At a 0 s limit HiGHS stops before any incumbent and every mesh falls back to each group's
    cheapest strategy: the same plans, with the time-out status, threads or not."""
    step, args = mlp_step(batch_size=32, width=512)

    def plans():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = auto.solve(step, args, num_devices=8, profile="h100", time_limit_s=0.0)
        return [(r.status, r.mesh_shape, r.variant, r.step_time_s, r.memory_bytes,
                 str(r.input_specs)) for r in found.tried]

    side_by_side = plans()
    monkeypatch.setattr(_concurrent, "_WORKERS", 1)
    assert plans() == side_by_side
    assert len(side_by_side) == 6
    assert {status for status, *_ in side_by_side} == {"time_limit"}
    assert side_by_side[0][1:3] == ({"data": 1, "model": 8}, "")
    assert side_by_side[0][3] == pytest.approx(4.6802222487562184e-05, rel=1e-9)
