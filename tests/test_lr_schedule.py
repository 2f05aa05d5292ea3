import math

import pytest

from minisft.optim import lr_at


def test_constant_is_the_book_default():
    assert [lr_at(s, 5e-5) for s in (1, 2, 500)] == [5e-5, 5e-5, 5e-5]


def test_warmup_is_linear_to_the_full_rate():
    assert lr_at(1, 1e-3, warmup_steps=10) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(5, 1e-3, warmup_steps=10) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(10, 1e-3, "cosine", warmup_steps=10, total_steps=110) == pytest.approx(1e-3, rel=1e-12)


def test_linear_decay_reaches_min_lr_at_the_last_step():
    kw = dict(schedule="linear", warmup_steps=10, total_steps=110, min_lr=1e-4)
    assert lr_at(60, 1e-3, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-12)
    assert lr_at(110, 1e-3, **kw) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(500, 1e-3, **kw) == pytest.approx(1e-4, rel=1e-12)  # past the end: stays at min_lr


def test_cosine_decay_values():
    kw = dict(schedule="cosine", warmup_steps=0, total_steps=100, min_lr=0.0)
    assert lr_at(50, 2e-3, **kw) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(25, 2e-3, **kw) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert lr_at(100, 2e-3, **kw) == pytest.approx(0.0, abs=1e-18)


def test_unknown_schedule_and_missing_total_are_refused():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_at(1, 1e-3, "step")
    with pytest.raises(ValueError, match="needs the total number of steps"):
        lr_at(5, 1e-3, "cosine")
