"""Training: the host loop around the optimizer step (golf_jax/train_step.py)
and its data feed (golf_jax/data_feed.py).

The loop reproduces the reference's schedule: warm-up steps
that compile and prime and are then undone, validation at step 0, every
`val_loss_every` steps and at the end (not counted in the wall clock), the
warmdown multiplier from the wall clock, late QAT, SWA, and the 600 s cap.
The 1.0611 record's too (configs/frontier.py): packed document rows
(data_feed.PackedSteps), the layer loop switched on at a training fraction
(golf_jax/layer_loop.py) after a warm-up of plain then looped steps, the
fraction schedule, the cap less its GPTQ reserve.

    python train.py --config configs/smoke.py [--resume] [--config.<field>=<value>]

About 530 lines, over the ~450 the project aims for: the run's stages share
one state (`TrainingRun`), which reads best whole; the step, the data feed,
the checkpoints, the run folder, the signals, the budget accounting, the
layer loop's switch and the compilation count are already elsewhere.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from golf_jax import (checkpoint, compat, data, data_feed, datasets, distributed, evaluate, layer_loop, layers,
                      optim, param_tree, quantize, run_dir, train_step)
from golf_jax.runlog import CompileCounter, RunLog, peak_memory_bytes, plot_curves
from golf_jax.stop_signal import StopOnSignal
from golf_jax.config import Config, ConfigError
from golf_jax.param_tree import Params



class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message names the step."""


class TrainingInterrupted(TrainingError):
    """A signal (SIGTERM, or SIGINT: Ctrl-C) stopped the run at a step
    boundary, after a complete checkpoint of that step was saved; `--resume`
    continues it exactly. `exit_status` is what the process should end with."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


# ----------------------------------------------------------------------------- the run

def initial_params(cfg: Config) -> Params:
    return compat.initial_params(cfg.model, cfg.run.init_from, cfg.run.seed)


def check_runnable(cfg: Config, n_devices: int) -> int:
    """Accumulation steps per device; raises ConfigError naming the field."""
    micro = cfg.data.micro_batches_per_step
    if micro % n_devices:
        raise ConfigError(f"data.micro_batches_per_step: {micro} is not divisible by the {n_devices} devices")
    local = cfg.data.train_batch_tokens // micro
    if local % cfg.data.train_seq_len:
        raise ConfigError(f"data.train_batch_tokens: {cfg.data.train_batch_tokens} / {micro} micro-batches is not "
                          f"a whole number of {cfg.data.train_seq_len}-token sequences")
    return micro // n_devices


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          max_steps: int | None = None) -> dict:
    """Run training as configured; returns the summary (also written as JSON).

    `resume` continues the run in `run.output_dir`; of a run whose training
    finished it returns that run's summary with "already_finished" and does
    nothing. `overwrite` replaces another run's outputs there (a fresh run is
    refused otherwise: golf_jax.run_dir). `max_steps` stops after that many
    optimizer steps in this call without the end-of-run work (a test hook that
    stands in for a pre-emption). SIGTERM or Ctrl-C (a real pre-emption) stops
    at the next step boundary, saves a checkpoint of that step and raises
    `TrainingInterrupted`.
    """
    run_dir.check_mode(resume, overwrite)
    if resume and (done := run_dir.finished_summary(cfg.run.output_dir)) is not None:
        return {**done, "already_finished": True}
    with StopOnSignal() as stop:
        run = TrainingRun(cfg, resume, progress, stop, overwrite)
        try:
            run.warm_up()
        except BaseException:  # still the launch: nothing is left behind
            run.close_outputs()
            run_dir.discard(run.new_folder)
            raise
        stopped = run.loop(max_steps)
        return stopped if stopped is not None else run.finish()


class TrainingRun:
    """One run in named stages: setup (inputs checked, state built or
    restored), `warm_up`, the step `loop`, and `finish` (final weights, their
    evaluation, the reports). The host reads each step's loss one step behind
    (`pending`), so the device stays busy."""

    def __init__(self, cfg: Config, resume: bool, progress: bool, stop: StopOnSignal, overwrite: bool = False):
        self.t_launch = time.perf_counter()
        cfg.validate()
        self.cfg, self.stop, self.primary = cfg, stop, distributed.is_primary()
        self.mesh = train_step.make_mesh(cfg.run.num_devices)
        self.accum = check_runnable(cfg, self.mesh.size)
        self.sched, self.out_dir = optim.training_schedule(cfg.schedule), Path(cfg.run.output_dir)
        self.ckpts = checkpoint.TrainCheckpoints(self.out_dir / "checkpoints", keep=2)  # creates nothing yet
        saved = self.ckpts.read_meta() if resume else None
        self._load_inputs(saved)
        params = initial_params(cfg)
        self.tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
        self.state = train_step.init_state(params, self.tx, self.mesh, self.sched.swa_enabled)
        # Every input is checked: now the folder is claimed (golf_jax.run_dir). With
        # several processes each reads it before any writes, and process 0 alone removes.
        replaced = run_dir.check(self.out_dir, resume=resume, overwrite=overwrite)
        distributed.wait_for_all("golf_jax/run_dir_checked", timeout_s=600)
        self.new_folder = run_dir.claim(self.out_dir, replaced if self.primary else ())
        distributed.wait_for_all("golf_jax/run_dir_claimed", timeout_s=600)
        if "checkpoints" in replaced:  # orbax's manager listed the old run's steps: it would refuse to save them again
            self.ckpts.close()
            self.ckpts = checkpoint.TrainCheckpoints(self.out_dir / "checkpoints", keep=2)
        try:
            self._prepare_outputs(params, resume, saved, progress)
        except BaseException:
            run_dir.discard(self.new_folder)
            raise
        self._log_launch(params)
        self.closed, self.pending, self.t_first_step = False, None, None

    def _prepare_outputs(self, params: Params, resume: bool, saved: dict | None, progress: bool) -> None:
        checkpoint.check_writable(self.out_dir)  # a read-only mount fails now, not at the first save
        # Room for the checkpoints kept, one being written and the final model, so
        # a full disk is reported before training rather than after it.
        checkpoint.check_free_space(self.out_dir, (self.ckpts.keep + 1) * checkpoint.tree_bytes(self.state)
                                    + param_tree.param_count(params) * 4)
        self.step, self.training_s, self.qat_on, self.stop_after_step = 0, 0.0, False, None
        self.loop_switch = layer_loop.LoopSwitch(self.cfg)
        self.history: dict = {"train": [], "val": []}
        self.saved_at = None  # the step of the last checkpoint this run holds
        self.budget = None  # budget mode: the time reserved for the stages after training
        if resume:
            self._restore(saved)
        self.step_fn = train_step.make_train_step(self.cfg, self.mesh, self.tx, self.state)
        self.batch_sharding = NamedSharding(self.mesh, P(None, train_step.AXIS))
        self.progress = progress and self.primary
        self.bar = tqdm(total=self.sched.iterations, initial=self.step, unit="step", disable=not self.progress,
                        dynamic_ncols=True)
        self.log = RunLog(self.out_dir, self.bar if self.progress else None, active=self.primary)

    def _load_inputs(self, saved: dict | None) -> None:
        """Every input is checked before anything compiles. On --resume the
        data must be the run's own (its tokenizer's sha256 as recorded)."""
        cfg = self.cfg
        if saved is None:
            ds = datasets.resolve_dataset(cfg.data.data_dir, cfg.data.tokenizer_path, cfg.data.train_pattern,
                                          cfg.data.val_pattern, cfg.model.vocab_size, cfg.data.text_transform)
        else:
            checkpoint.check_resume_config(saved.get("config", {}), cfg, self.ckpts.directory)
            ds = datasets.dataset_for_model(cfg.data, cfg.model.vocab_size, saved.get("data"),
                                            where=f"the run in {self.out_dir}",
                                            hint="put that tokenizer back, or start a new run")
        self.val_tokens, self.tables = evaluate.load_validation(cfg, ds)
        if cfg.data.packed_documents:
            self.batches = data_feed.PackedSteps(ds.train_pattern, cfg, self.mesh.size, self.accum,
                                                 train_step.local_ranks(self.mesh))
        else:
            self.batches = data.TrainBatches(ds.train_pattern, cfg.model.vocab_size, cfg.data.train_batch_tokens,
                                             cfg.data.train_seq_len, world_size=self.mesh.size,
                                             accum_steps=self.accum, ranks=train_step.local_ranks(self.mesh))
        self.dataset, self.dataset_record = ds, ds.record()

    def _restore(self, saved: dict) -> None:
        self.state, meta = self.ckpts.restore(self.state, saved["step"])
        self.saved_at = meta["step"]
        self.step, self.training_s, self.qat_on = meta["step"], meta["training_s"], meta["qat_on"]
        self.stop_after_step, self.history = meta["stop_after_step"], meta["history"]
        self.budget = meta.get("budget")
        self.loop_switch.restore(meta.get("looping"))
        self.batches.restore(meta["cursor"])

    def _log_launch(self, params: Params) -> None:
        cfg, n = self.cfg, self.mesh.size
        processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        self.log.line(f"devices: {n} x {jax.devices()[0].device_kind}{processes}; {self.accum} micro-batches of "
                      f"{cfg.data.train_batch_tokens // cfg.data.micro_batches_per_step:,} tokens per device per "
                      f"step; {param_tree.param_count(params):,} parameters; "
                      f"compute {jnp.dtype(layers.compute_dtype(cfg.model)).name}, "
                      f"attention {layers.attention_impl(cfg.model)}")
        self.log.line(self.dataset.describe(self.dataset_record))
        self.log.line(param_tree.summary(params))
        if self.sched is not self.cfg.schedule:
            # (the record's own line, "gptq:reserving 0s", prints its 0.5 s without decimals)
            self.log.line(f"wall-clock cap {self.cfg.schedule.max_wallclock_seconds:g} s less "
                          f"schedule.gptq_reserve_seconds {self.cfg.schedule.gptq_reserve_seconds:g} s: training "
                          f"stops at {self.sched.max_wallclock_seconds:g} s")
        if self.step > 0:
            self.log.line(f"resuming at step {self.step} from {self.ckpts.directory}")

    # ------------------------------------------------------------------------- warm-up

    def warm_up(self) -> None:
        """Real steps compile and prime, then state and stream are restored;
        budget mode measures (or recompiles) the stages after training here."""
        sched = self.sched
        if sched.warmup_steps > 0:
            initial, cursor0 = jax.tree.map(lambda x: x.copy(), self.state), self.batches.state()
            state = self.state
            # As the 1.0611 record: warmup_steps plain steps, then as many looped
            # ones, so both programs are compiled before the clock starts; with
            # data.segments_per_fold_fast, each mode's first step takes the full
            # slots and each fewer-slot layout's program is compiled in a thread
            # beside it: XLA's compilations overlap where there are cores to spare
            # (two more programs cost 3.3 s of launch on a 16-core GPU host; on two
            # cores the threads only contend, so one at a time there).
            fast = self.cfg.data.fast_segment_slots if self.cfg.data.packed_documents else ()
            modes = layer_loop.warm_up_programs(self.cfg.model)
            threads = max(1, len(fast) * len(modes)) if (os.cpu_count() or 1) >= 8 else 1
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                compiling = []
                for looping in modes:
                    for i in range(sched.warmup_steps):
                        batch = data_feed.next_step_batch(self.batches, self.accum, self.batch_sharding,
                                                          capacity=i == 0)
                        programs = [pool.submit(self.step_fn.lower(
                            state, batch.xs, batch.ys, 1.0, False, False, data_feed.with_slots(batch.segments, m),
                            looping).compile) for m in (fast if i == 0 else ())]
                        if threads == 1:  # few cores: done before this step compiles its own
                            concurrent.futures.wait(programs)
                        compiling += programs
                        state, loss = self.step_fn(state, batch.xs, batch.ys, 1.0, False, False, batch.segments,
                                                   looping)
                        if i == 0 and not looping:
                            loss.block_until_ready()
                            self.t_first_step = time.perf_counter() - self.t_launch
                for program in compiling:
                    program.result()
            jax.block_until_ready(state)
            looped = f", then {sched.warmup_steps} looped" if self.cfg.model.num_loops > 0 else ""
            self.log.line(f"warmup: {sched.warmup_steps} steps{looped}; launch to first step "
                          f"{self.t_first_step:.1f} s")
            if sched.quant_in_budget and self.primary:  # on the warm-up's live weights
                self.budget = quantize.reserve_budget(self.cfg, state.params, self.log, self.budget)
            self.state = initial
            self.batches.restore(cursor0)
        elif sched.quant_in_budget and self.primary:
            self.budget = quantize.reserve_budget(self.cfg, self.state.params, self.log, self.budget)
        if self.budget is not None:
            # Training gets the cap minus the reserve: the stop and the warmdown
            # (which follows the wall clock) both aim at the earlier end.
            self.sched = dataclasses.replace(sched, max_wallclock_seconds=self.budget["training_cap_s"])

    # ------------------------------------------------------------------------- the loop

    def training_s_now(self) -> float:
        return self.training_s + (time.perf_counter() - self.t0)

    def decide(self, sigterm: bool) -> dict:
        """This process's decisions for the coming step, from its clock."""
        elapsed = self.training_s_now()
        return {"sigterm": sigterm, "stop_after_step": self.stop_after_step,
                "mult": optim.lr_multiplier(self.step, elapsed, self.sched),
                "frac": optim.training_fraction(self.step, elapsed, self.sched)}

    def loop(self, max_steps: int | None) -> dict | None:
        """Steps until the iterations or the wall-clock cap; None, or the
        summary of a run stopped by `max_steps`."""
        self.prefetch = data_feed.Prefetcher(self.batches, self.accum, self.batch_sharding)
        self.cursor = self.batches.state()
        self.steps0, self.start_s = self.step, self.training_s
        self.steps_by_slots: collections.Counter = collections.Counter()  # packed rows' layouts this run
        self.agreement = distributed.StepAgreement()  # process 0's clock decides, with several processes
        self.t0 = time.perf_counter()
        self.compiles = CompileCounter().__enter__()
        try:
            while True:
                # With several processes, process 0's decision (its wall clock, a
                # SIGTERM any process got); with one, this process's own.
                agreed = self.agreement.decide(self.step, self.decide, self.stop.requested)
                self.stop_after_step = agreed["stop_after_step"]
                if agreed["sigterm"]:  # a step boundary: the state is whole and its loss known
                    self._save_and_close(f"{self.stop.name} at step {self.step}/{self.sched.iterations}: "
                                         f"saving its checkpoint and stopping")
                    raise self.interrupted(f"at step {self.step}")
                last = self.step >= self.sched.iterations or (self.stop_after_step is not None
                                                              and self.step >= self.stop_after_step)
                if last or (self.cfg.eval.val_loss_every > 0 and self.step % self.cfg.eval.val_loss_every == 0):
                    self._validate_now()
                if last:
                    if self.stop_after_step is not None and self.step < self.sched.iterations:
                        self.log.line(f"stopping early: wall-clock cap at step {self.step}/{self.sched.iterations}")
                    return None
                if max_steps is not None and self.step - self.steps0 >= max_steps:
                    self._save_and_close()
                    return {"step": self.step, "interrupted": True}
                if self.loop_switch.update(self.step, agreed["frac"]):
                    self.log.line(self.loop_switch.describe())
                self._one_step(agreed["mult"])
        except BaseException as failure:
            # A save in flight completes; nothing after the failure is saved. A
            # failing save is reported as what went wrong, not in place of it.
            try:
                self.close_outputs()
            except checkpoint.CheckpointError as e:
                if e is not failure:
                    failure.add_note(str(e))
            raise
        finally:
            self.compiles.__exit__()
            self.prefetch.close()
            self.bar.close()

    def _save_and_close(self, line: str | None = None) -> None:
        """Checkpoint the step reached (its loss read first), log `line`, close the outputs."""
        self.drain()
        self.training_s = self.training_s_now()
        self.save(self.step, self.training_s)
        if line:
            self.log.line(line)
        self.close_outputs()  # the checkpoint is complete on disk before the process ends

    def _validate_now(self) -> None:
        self.drain()
        self.training_s = self.training_s_now()
        # As the record's eval_val during training: the model as it trains now.
        with self.compiles.first_use(("validation", self.loop_switch.on)):
            val = self.validate(self.state.params, looping=self.loop_switch.on)
        if val is not None:
            self.history["val"].append((self.step, val.loss))
            self.log.line(f"step {self.step}/{self.sched.iterations} val_loss {val.loss:.4f} val_bpb {val.bpb:.4f} "
                          f"train_time {self.training_s:.1f}s eval_time {val.seconds:.1f}s")
            self.log.record(kind="val", step=self.step, loss=val.loss, bpb=val.bpb, training_s=self.training_s,
                            eval_s=val.seconds)
        self.t0 = time.perf_counter()

    def _one_step(self, mult: float) -> None:
        sched = self.sched
        if not self.qat_on and sched.late_qat_threshold > 0 and mult < sched.late_qat_threshold:
            self.qat_on = True
            self.log.line(f"late QAT on at step {self.step} (lr_mult {mult:.3f}, scope {sched.qat_scope})")
        swa_collect = sched.swa_enabled and mult < sched.swa_lr_threshold and (self.step + 1) % sched.swa_every == 0
        batch = self.prefetch.next()
        self.cursor = batch.cursor
        flags = train_step.finite_flags(self.state.params)  # dispatched before the step donates these buffers
        looping = self.loop_switch.on
        with self.compiles.first_use(("step", looping)):
            self.state, loss = self.step_fn(self.state, batch.xs, batch.ys, mult, self.qat_on, swa_collect,
                                            batch.segments, looping)
        self.step += 1
        if batch.segments is not None:
            self.steps_by_slots[batch.segments.lengths_BxRxM.shape[-1]] += 1
        if self.compiles.at_first_step is None:
            loss.block_until_ready()
            self.compiles.first_step_done()
        self.drain()
        self.pending = (self.step, loss, mult, flags)
        self.bar.update(1)
        cap = sched.max_wallclock_seconds
        if cap > 0 and self.stop_after_step is None:
            now = self.training_s_now()
            # reference quirk: the cap is checked after a step, so the run
            # ends past it by up to a step. Budget mode must end within it:
            # the step in flight (the device runs one behind the host) ends
            # about one mean step time from now.
            ahead = (now - self.start_s) / max(self.step - self.steps0, 1) if self.budget is not None else 0.0
            if now + ahead >= cap:
                self.stop_after_step = self.step
        if self.cfg.run.checkpoint_every > 0 and self.step % self.cfg.run.checkpoint_every == 0:
            self.drain()  # never save a step whose loss is not known to be finite
            paused = time.perf_counter()
            self.save(self.step, self.training_s_now(), required=self.step >= sched.iterations)
            self.t0 += time.perf_counter() - paused  # checkpointing is not training time

    def drain(self) -> None:
        """Read the pending step's loss: log it, or stop on a non-finite one."""
        if self.pending is None:
            return
        s, loss_arr, mult, flags = self.pending
        self.pending = None
        value = float(loss_arr)
        self.agreement.done(s - 1)  # every process has run step s, so each read its decision
        if not math.isfinite(value):
            # Which tensors were already bad when the step began is the lead to
            # the cause (an exploding learning rate, a bad init_from, an overflow).
            bad = train_step.non_finite_names(self.state.params, flags)
            named = (f"non-finite parameters entering it: {', '.join(bad[:8])}"
                     + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")) if bad else \
                "every parameter entering it was finite (the step's own arithmetic overflowed)"
            raise TrainingError(f"loss is {value} at step {s}; {named}; stopping (the last good checkpoint, "
                                f"{self._last_good()}, is kept)")
        self.history["train"].append((s, value))
        spent = self.training_s_now()
        if s % self.cfg.run.train_log_every == 0 or s <= 10:
            self.log.line(f"step {s}/{self.sched.iterations} train_loss {value:.4f} lr_mult {mult:.3f} "
                          f"train_time {spent:.1f}s step_avg {1000 * spent / max(s, 1):.1f}ms")
            self.log.record(kind="train", step=s, loss=value, lr_mult=mult, training_s=spent)
        step_s = (spent - self.start_s) / max(s - self.steps0, 1)
        cap = self.sched.max_wallclock_seconds
        left = (cap - spent) if cap > 0 else (self.sched.iterations - s) * step_s
        self.bar.set_postfix_str(f"loss {value:.3f} {self.cfg.data.train_batch_tokens / max(step_s, 1e-9) / 1e6:.3f}M "
                                 f"tok/s lr {mult:.2f} left {max(left, 0):.0f}s")

    def _last_good(self) -> str:
        return "step " + str(self.saved_at) if self.saved_at is not None else "none yet"

    def save(self, at_step: int, at_training_s: float, required: bool = True) -> None:
        """Checkpoint the state. A step's loss judges the parameters entering
        it, not those it leaves: these are checked here, so no checkpoint ever
        holds a NaN. Non-finite: a required save (final, SIGTERM) raises; a
        periodic one is skipped, and the next step's loss error names them."""
        if self.saved_at == at_step:
            return
        bad = train_step.non_finite_names(self.state.params, train_step.finite_flags(self.state.params))
        if bad:
            listed = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            if not required:
                self.log.line(f"step {at_step}: non-finite parameters ({listed}); checkpoint not saved")
                return
            raise TrainingError(f"non-finite parameters after step {at_step}: {listed}; not saved (the last good "
                                f"checkpoint, {self._last_good()}, is kept)")
        # orbax compiles a slice program per array shape at the first save;
        # that is checkpointing, not the training loop, so it is counted apart.
        with self.compiles.aside():
            self.ckpts.save(at_step, self.state, checkpoint.run_meta(at_step, at_training_s, self.cursor, self.qat_on,
                                                       self.stop_after_step, self.cfg, self.history, self.budget,
                                                       self.dataset_record, self.loop_switch.state()))
        self.saved_at = at_step

    def validate(self, params, looping: bool | None = None) -> evaluate.EvalResult | None:
        """Process 0 evaluates its own copy of the replicated weights; the
        others go on to the next step, which waits for it in its collectives.
        looping: None, as after training (ModelConfig.looping_after_training)."""
        if not self.primary:
            return None
        return evaluate.run_standard(distributed.local_copy(params), self.cfg, self.val_tokens, self.tables,
                                     progress=False, looping=looping)

    def close_outputs(self) -> None:
        """Wait for the save in flight (raising if it failed), close the logs; once."""
        if self.closed:
            return
        self.closed = True
        try:
            self.ckpts.close()
        finally:
            self.log.close()

    def interrupted(self, where: str) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped by {self.stop.name} {where}; checkpoint of step {self.saved_at} saved in "
                                   f"{self.ckpts.directory}; continue with --resume", self.stop.exit_status)

    # ------------------------------------------------------------------------- the end

    def finish(self) -> dict:
        """EMA (or SWA) weights, their evaluation, the final model and the reports."""
        self.save(self.step, self.training_s)
        if self.stop.requested:
            self.close_outputs()
            raise self.interrupted(f"at the end of training (step {self.step}), before the final evaluation")
        if not self.primary:  # the final weights, their evaluation and the reports are process 0's
            self.close_outputs()
            return {"step": self.step, "process_index": jax.process_index()}
        mine = distributed.local_copy(self.state)
        if self.sched.swa_enabled and int(mine.swa_count) > 0:
            final_f32 = jax.tree.map(lambda s: s / mine.swa_count, mine.swa)
            source = f"SWA of {int(mine.swa_count)} snapshots"
        else:
            final_f32, source = mine.ema, "EMA"
        final = jax.tree.map(lambda f, p: f.astype(p.dtype), final_f32, mine.params)
        final_val = self.validate(final)
        self.log.line(f"final ({source}) val_loss {final_val.loss:.4f} val_bpb {final_val.bpb:.4f} "
                      f"eval_time {final_val.seconds:.1f}s")
        checkpoint.save_params(self.out_dir / run_dir.FINAL_MODEL, jax.device_get(final), self.cfg, self.dataset_record)
        summary = self._summary(source, final_val)
        plot_curves(self.history["train"], self.history["val"], self.out_dir / "loss.png")
        checkpoint.write_json(self.out_dir / run_dir.SUMMARY, summary)
        self.log.line(f"{self.step} steps in {self.training_s:.1f} s of training "
                      f"({summary['tokens_per_s'] / 1e6:.3f} M tokens/s); final val_bpb {final_val.bpb:.4f}; "
                      f"wrote {self.out_dir / 'summary.json'}, loss.png, final_model/")
        self.close_outputs()
        return summary

    def _summary(self, source: str, final_val: evaluate.EvalResult) -> dict:
        step, training_s = self.step, self.training_s
        return {
            "steps": step, "training_s": training_s,
            "tokens_per_s": self.cfg.data.train_batch_tokens * step / max(training_s, 1e-9),
            "step_avg_ms": 1000 * training_s / max(step, 1), "devices": self.mesh.size,
            "device_kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
            "final_weights": source, "final_val_loss": final_val.loss, "final_val_bpb": final_val.bpb,
            "last_val": self.history["val"][-1] if self.history["val"] else None,
            "launch_to_first_step_s": self.t_first_step, "peak_memory_bytes": peak_memory_bytes(),
            # Every XLA compilation after the first optimizer step, in the whole loop
            # (validation and the QAT switch included): 0 is the promise.
            # (the first call of a program first used later, the looped step's, excepted: CompileCounter).
            "recompilations_after_first_step": self.compiles.recompilations,
            "layer_loop_on_at_step": self.loop_switch.at_step,
            "checkpoint_compilations": self.compiles.aside_count,
            "steps_this_run": step - self.steps0,
            "wall_s": time.perf_counter() - self.t_launch, "stopped_by_wallclock": self.stop_after_step is not None,
            "budget": self.budget,
            # of steps_this_run, by segment slots per fold (data.segments_per_fold[_fast])
            "packed_steps_by_slots": {str(m): n for m, n in sorted(self.steps_by_slots.items())},
        }


def main(argv: Sequence[str] | None = None) -> None:
    from golf_jax import cli

    parser = argparse.ArgumentParser(prog="python train.py", description="Train the record model.")
    parser.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its last "
                                                                  "checkpoint (of a finished run: nothing to do)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another run's outputs in run.output_dir (a fresh run is refused there otherwise)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-quantize", action="store_true",
                        help="stop after training (replay later with python -m golf_jax.quantize)")
    distributed.add_arguments(parser)
    cfg, args = cli.parse(parser, argv)

    try:
        distributed.initialize(args)  # before anything touches a device
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    if not args.no_quantize and (missing := cfg.quant.missing_tools()) is not None:  # not after training
        parser.exit(2, f"{parser.prog}: {missing}; or train with --no-quantize\n")
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        out_dir = Path(cfg.run.output_dir)
        if summary.get("already_finished") and (args.no_quantize or (out_dir / run_dir.ARTIFACT_NAME).exists()):
            print(f"{out_dir}: this run finished ({summary['steps']} steps, final val_bpb "
                  f"{summary['final_val_bpb']:.4f}); nothing to do. To redo its quantisation: "
                  f"python -m golf_jax.quantize --checkpoint {out_dir} --overwrite")
        elif not args.no_quantize and distributed.is_primary():
            # From the saved weights, as a replay reads them: the same artifact either way.
            final = checkpoint.load_model(checkpoint_path=out_dir / run_dir.FINAL_MODEL)
            pre = {"loss": summary["final_val_loss"], "bpb": summary["final_val_bpb"]}
            report = quantize.quantize_and_evaluate(final.params, cfg, out_dir, progress=not args.no_progress,
                                                    pre_quant=pre, train_summary=summary, dataset=final.dataset)
            if "budget" in report:  # budget mode: the summary gets each stage's share of the cap too
                summary["budget"] = {**(summary.get("budget") or {}), "spent": report["budget"]}
                checkpoint.write_json(out_dir / run_dir.SUMMARY, summary)
    except TrainingInterrupted as e:
        status, message = e.exit_status, f"{e}\n"
    except (TrainingError, run_dir.RunDirError, *checkpoint.LOAD_ERRORS) as e:
        status, message = 2, f"error: {e}\n"
    else:
        status = None
    distributed.wait_for_all()  # every process ends here, after process 0's stages after training
    if status is not None:
        parser.exit(status, message)


if __name__ == "__main__":
    main()
