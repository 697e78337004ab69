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


def test_a_module_given_an_lr_scale_trains_at_that_multiple_through_the_schedule():
    import torch

    from models.train import adamw, fit
    from schemas.diffusion_configs import TrainingBudget

    model = torch.nn.ModuleDict({"old": torch.nn.Linear(3, 3), "new": torch.nn.Linear(3, 3)})
    plain = adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    assert [len(g["params"]) for g in plain.param_groups] == [2, 2]  # no scales: matrices, then vectors
    seen = []
    budget = TrainingBudget(steps=3, batch_size=1, lr=1e-3, warmup_steps=2, log_every=100, checkpoint_every=100)
    x = torch.randn(4, 3)

    def loss(step):
        return (model["new"](model["old"](x)) ** 2).mean()

    def after(step):
        seen.append({id(p): g["lr"] for g in optimizer_of[0].param_groups for p in g["params"]})

    optimizer_of = []
    original = adamw

    import models.train as train

    def spy(*a, **kw):
        optimizer_of.append(original(*a, **kw))
        return optimizer_of[0]

    train.adamw = spy
    try:
        fit(model, loss, budget, save=lambda *_: None, log=lambda _: None, after_step=after, lr_scales={"new": 10.0})
    finally:
        train.adamw = original
    for step, lrs in enumerate(seen):
        base = lr_at(step, lr=1e-3, warmup_steps=2, total_steps=3, min_lr_ratio=0.1)
        assert lrs[id(model["old"].weight)] == pytest.approx(base)
        assert lrs[id(model["new"].weight)] == pytest.approx(10 * base) and lrs[id(model["new"].bias)] == pytest.approx(10 * base)
