"""The learning-rate schedule (utils/training/lr_schedule.py): warm-up and steps as the reference's loop sets them."""
import pytest

from data.config import get_config
from utils.training.lr_schedule import WarmupStepSchedule


def reference_lr_sequence(lr, gamma, steps, warmup_init, warmup_until, num_iters):
    """The learning rate of each iteration, by the reference's loop (train.py, set_lr)."""
    cur_lr, step_index, out = lr, 0, []
    for iteration in range(num_iters):
        if warmup_until > 0 and iteration <= warmup_until:
            cur_lr = (lr - warmup_init) * (iteration / warmup_until) + warmup_init
        while step_index < len(steps) and iteration >= steps[step_index]:
            step_index += 1
            cur_lr = lr * (gamma ** step_index)
        out.append(cur_lr)
    return out


@pytest.mark.parametrize('steps, warmup_until', [
    ((20, 35, 35, 50), 10),     # steps after warm-up, two at once
    ((4, 9, 30), 10),           # steps during warm-up are overwritten by it
    ((10, 40), 10),             # a step on the last warm-up iteration wins
    ((15, 40), 0),              # no warm-up
])
def test_schedule_matches_reference_loop(steps, warmup_until):
    schedule = WarmupStepSchedule(base_lr=1e-3, gamma=0.1, steps=steps, warmup_init=1e-4, warmup_until=warmup_until)
    expected = reference_lr_sequence(1e-3, 0.1, steps, 1e-4, warmup_until, 60)
    assert [schedule.lr_at(i) for i in range(60)] == expected


def test_schedule_of_config():
    cfg = get_config('yolact_base')
    schedule = WarmupStepSchedule.from_config(cfg)
    assert schedule.lr_at(0) == cfg.lr_warmup_init
    assert schedule.lr_at(500) == pytest.approx(cfg.lr)
    assert schedule.lr_at(279999) == cfg.lr
    assert schedule.lr_at(280000) == pytest.approx(cfg.lr * 0.1)
    assert schedule.lr_at(799999) == pytest.approx(cfg.lr * 1e-4)
