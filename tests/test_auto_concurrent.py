"""The planner's side-by-side solves: results in the order asked, whatever finishes first; the
first error raised; a call from inside a worker runs in place (no pool waiting on itself)."""
import threading
import time

import numpy as np
import pytest
import scipy.optimize

from parallel.auto._concurrent import in_order


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
