"""When training switches the layer loop on (golf_jax.layer_loop); through training in train_test.py."""

from __future__ import annotations

import dataclasses

from golf_jax import layer_loop
from golf_jax.config import Config, ModelConfig, ScheduleConfig

LOOPED = Config(model=ModelConfig(num_loops=2, loop_start=3, loop_end=5), schedule=ScheduleConfig(enable_looping_at=0.35))


def test_the_loop_comes_on_at_the_fraction_and_stays_on():
    switch = layer_loop.LoopSwitch(LOOPED)
    assert [switch.update(s, f) for s, f in [(0, 0.0), (2177, 0.3499)]] == [False, False] and not switch.on
    assert switch.update(2178, 0.35) and switch.on  # the record's seed 42: step 2178, frac 0.350
    assert not switch.update(2179, 0.2) and switch.on  # for good
    assert switch.state() == {"on": True, "at_step": 2178, "at_frac": 0.35}
    assert switch.describe() == ("layer loop on at step 2178, frac 0.350: encoder [0, 1, 2, 3, 4, 5, 3, 4] "
                                 "decoder [5, 3, 4, 5, 6, 7, 8, 9, 10]")


def test_the_switch_is_restored_from_a_checkpoint():
    resumed = layer_loop.LoopSwitch(dataclasses.replace(LOOPED, schedule=ScheduleConfig(enable_looping_at=0.9)))
    resumed.restore({"on": True, "at_step": 7, "at_frac": 0.4})
    assert resumed.on and not resumed.update(8, 0.5) and resumed.at_step == 7
    before = layer_loop.LoopSwitch(LOOPED)
    before.restore(None)  # a checkpoint from before the loop existed
    assert not before.on


def test_no_loop_without_num_loops():
    switch = layer_loop.LoopSwitch(Config())
    assert not switch.update(10, 1.0) and not switch.on
    assert layer_loop.warm_up_programs(Config().model) == (False,)
    assert layer_loop.warm_up_programs(LOOPED.model) == (False, True)
    assert not Config().model.looping_after_training and LOOPED.model.looping_after_training
