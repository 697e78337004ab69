"""The training-loop core shared by every loop: the schedule and the atomic checkpoint folder."""

import os

import pytest

from models.train import load_trainer_state, lr_at, save_trainer_state, write_folder_atomic


def test_schedule_warms_up_then_decays_to_its_floor():
    kw = dict(lr=1e-3, warmup_steps=4, total_steps=20)
    assert [lr_at(s, **kw) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    decay = [lr_at(s, **kw, min_lr=1e-4) for s in range(4, 21)]
    assert decay[0] == pytest.approx(1e-3) and decay[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(20, **kw, min_lr_ratio=0.1) == pytest.approx(1e-4)  # the floor as a fraction of the peak
    # a spent time budget puts the decay at its end, however few steps were taken
    assert lr_at(5, **kw, min_lr=1e-4, time_spent=1.0) == pytest.approx(1e-4)
    assert lr_at(5, **kw, min_lr=1e-4, time_spent=0.5) < lr_at(5, **kw, min_lr=1e-4)


def test_a_failed_checkpoint_write_leaves_the_previous_folder_whole(tmp_path):
    final = str(tmp_path / "ckpt")
    write_folder_atomic(final, lambda tmp: save_trainer_state(tmp, {"step": 1}))

    def crash(tmp):
        save_trainer_state(tmp, {"step": 2})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomic(final, crash)
    assert load_trainer_state(final) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind
    assert load_trainer_state(str(tmp_path)) is None
