"""Learning-rate schedules, hand-computed: linear warmup, then inverse-sqrt or cosine decay."""
import math

import pytest

from moeify.training.schedule import lr_at


@pytest.mark.parametrize("schedule", ["inverse-sqrt", "cosine"])
def test_warmup_is_linear_up_to_the_peak(schedule):
    rates = [lr_at(s, lr=1e-3, warmup=4, schedule=schedule, steps=20) for s in (1, 2, 3, 4)]
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=0, abs=1e-15)


def test_inverse_sqrt_decays_as_sqrt_warmup_over_step():
    assert lr_at(16, lr=1e-3, warmup=4, schedule="inverse-sqrt", steps=20) == pytest.approx(1e-3 * 0.5)
    assert lr_at(100, lr=1e-3, warmup=4, schedule="inverse-sqrt", steps=20) == pytest.approx(1e-3 * 0.2)


def test_cosine_halves_at_midway_and_reaches_zero_at_the_last_step():
    # warmup 4, steps 20: decay over steps 4..20, halfway at 12.
    assert lr_at(12, lr=1e-3, warmup=4, schedule="cosine", steps=20) == pytest.approx(5e-4)
    assert lr_at(8, lr=1e-3, warmup=4, schedule="cosine", steps=20) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(20, lr=1e-3, warmup=4, schedule="cosine", steps=20) == pytest.approx(0.0, abs=1e-18)
    assert lr_at(25, lr=1e-3, warmup=4, schedule="cosine", steps=20) == pytest.approx(0.0, abs=1e-18)  # stays 0


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule 'linear': one of inverse-sqrt, cosine"):
        lr_at(10, lr=1e-3, warmup=4, schedule="linear", steps=20)
