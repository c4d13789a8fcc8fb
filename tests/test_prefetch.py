"""The background producer keeps order, bounds its look-ahead and hands errors to the consumer."""

import time

import pytest

from prismatic.training.prefetch import prefetch


def test_order_and_bounded_lookahead():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(produced) <= 4  # one handed out, two queued, one waiting to be put
    assert list(it) == list(range(1, 10))


def test_producer_errors_reach_the_consumer():
    def items():
        yield 1
        raise KeyError("frame 2 is corrupt")

    it = prefetch(items())
    assert next(it) == 1
    with pytest.raises(KeyError, match="frame 2"):
        next(it)
