"""Depth recurrence in training: when the 1.0611 record's layer loop comes on.

The record trains its first steps without the loop (layers loop_start..loop_end
once each) and switches it on, for good, at the first step whose training
fraction (`optim.training_fraction`: of the 599.5 s cap in the record, else of
the iterations) reaches schedule.enable_looping_at (0.35: step 2178 of seed 42's
4945). The looped model is another program (`looping`, static); the warm-up
compiles both. Everything after training loops whenever the model has a loop
(`ModelConfig.looping_after_training`).
"""

from __future__ import annotations

from golf_jax.config import Config, ModelConfig


def warm_up_programs(mcfg: ModelConfig) -> tuple[bool, ...]:
    """The `looping` of each warm-up phase: plain steps, then (with a loop) as
    many looped ones, as the record's warm-up (L3443-L3462)."""
    return (False, True) if mcfg.num_loops > 0 else (False,)


class LoopSwitch:
    """Whether training runs the looped model; recorded in checkpoints
    (`state`, `restore`) so a resumed run continues as it stopped."""

    def __init__(self, cfg: Config):
        self.mcfg, self.at = cfg.model, cfg.schedule.enable_looping_at
        self.on, self.at_step, self.at_frac = False, None, None

    def update(self, step: int, frac: float) -> bool:
        """Before step `step` at training fraction `frac`: True when the loop comes on now."""
        if self.on or self.mcfg.num_loops == 0 or frac < self.at:
            return False
        self.on, self.at_step, self.at_frac = True, step, frac
        return True

    def describe(self) -> str:
        encoder, decoder = self.mcfg.layer_order(looping=True)
        return (f"layer loop on at step {self.at_step}, frac {self.at_frac:.3f}: encoder {list(encoder)} "
                f"decoder {list(decoder)}")

    def state(self) -> dict:
        return {"on": self.on, "at_step": self.at_step, "at_frac": self.at_frac}

    def restore(self, saved: dict | None) -> None:
        """From a checkpoint's meta (None: one from before the loop existed, off)."""
        if saved:
            self.on, self.at_step, self.at_frac = bool(saved["on"]), saved["at_step"], saved["at_frac"]
