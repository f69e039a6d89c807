"""Does golf_jax train the 1.0611 record like its PyTorch reference? Both from the
reference's own initial state, on the same data in the same order, with a
step-based schedule, on the same GPU; then every step's train loss compared.

    python scripts/frontier_throughput_data.py --out /tmp/fdata --tokens 12000000 --val-tokens 524289
    python scripts/frontier_curve.py init --out runs/fc/init [--steps 60 --row-tokens 16384 --warmup 20]
    python scripts/frontier_curve.py check-data --init runs/fc/init --data /tmp/fdata
    python scripts/frontier_curve.py reference --init runs/fc/init --data /tmp/fdata --out runs/fc/ref [-- VAR=value]
    python scripts/frontier_curve.py golf --init runs/fc/init --data /tmp/fdata --out runs/fc/golf [-- --config.x=y]
    python scripts/frontier_curve.py compare runs/fc/golf --reference runs/fc/ref --plot runs/fc/curve.png

`init` fixes the curve's settings (written to DIR/settings.json; `reference`, `golf` and
`check-data` read them from there, so the two runs cannot disagree) and writes the
reference's initial state_dict (DIR/init.npz, float32, the reference's names): its
`train_and_eval` seeds torch with SEED (L3554) and its `train_model` builds `GPT(h)` on the
CPU, casts it to bf16 and restores the banks, CastedLinears and control tensors to float32
(L3332-3333; the token embedding stays bf16), so the state is the bf16-rounded init of
seed 42 (the record's SEED). `reference` runs the reference's own main() (its
Hyperparameters from the environment) with `GPT` patched to load that state, and records
every step's train loss at full precision (its log rounds to 4 decimals), the learning-rate
multiplier it applied, each validation, and the post-EMA diagnostic (PREQUANT_ONLY=1 stops
there), as golf_jax's train.jsonl and summary.json, so `compare` reads both the same way
(scripts/fidelity_curve.py). `golf` runs train.py with configs/frontier.py, the same settings
and --config.run.init_from=DIR/init.npz. `check-data` checks that golf_jax's packed rows
(data_feed.PackedSteps) are the reference's (DocumentPackingLoader): the same tokens and the
same documents (segments) in every micro-batch of the run.

What differs from the record's run (configs/frontier.py; the README's command), and why:
- One GPU, not 8, so the reference runs with WORLD_SIZE=1: grad_accum_steps = 8 // 1 = 8
  micro-batches of one packed row each, the record's 8 rows a step, in the record's order
  (its per-rank spans are consecutive). Checked by `check-data`.
- Rows of --row-tokens (default 16,384), not 98,304 (TRAIN_BATCH_TOKENS = 8 x 16,384 = 131,072
  tokens a step, a sixth of the record's): FlashAttention 3 is not available, and its stand-in
  (the reference folder's flash_attn_interface.py: SDPA with a dense block-diagonal causal mask)
  would need a 98k x 98k mask. main() enables only flash SDPA, which takes no mask: the wrapper
  also enables the memory-efficient kernel, which does.
- --steps iterations (default 60) with MAX_WALLCLOCK_SECONDS=0: the reference's training
  fraction is then step / ITERATIONS (its `training_frac`), as golf_jax's
  (`optim.training_fraction`), so the warmdown (from frac 0.15 on, to MIN_LR 0.1) and the
  layer loop (on at frac 0.35: step 21 of 60) come at the same steps in both; the record's
  fraction is of the 599.5 s wall clock. The Muon momentum warm-up (1,500 steps) barely starts.
- Validation every --val-every steps (the record: at the end only) on the val shard given,
  batches of 8 x row-tokens (VAL_BATCH_TOKENS; golf_jax's eval.document_eval_ranks=1: one
  rank drops its last partial batch), then the post-EMA evaluation (EMA 0.9965: after 60
  steps the EMA weights are still mostly the init). No GPTQ, artifact or TTT.
- The reference runs eagerly (TORCHDYNAMO_DISABLE=1) unless `init --compile-reference`: its
  torch.compile of two model programs would not fit one device call beside golf_jax's.
  Eager PyTorch rounds bf16 after every op, its Newton-Schulz too (`@torch.compile`d in the
  record), so golf_jax then runs with model.scales_in_float32=false and
  optimizer.muon_ns_rounding="eager", its settings for uncompiled PyTorch (docs/frontier.md).
- The reference's fused Triton kernels (LeakyReLU^2 MLP, softcapped CE) run on a Hopper GPU;
  where they fail to launch (or on a CPU) its eager paths run instead (summary.json says which).
- `init --tiny` (the CPU check) shrinks both models alike to configs/frontier_smoke.py's size
  (7 layers of 64, layers 2-3 looped), and `--float32` keeps both in float32: the reference's
  model is not cast to bf16 (autocast is off on a CPU anyway) and golf_jax's embedding is
  float32. Muon's momentum and Newton-Schulz stay bf16 on both sides, as they are in float32 runs.

The data: scripts/frontier_throughput_data.py's CaseOps text (the embedded tinyshakespeare
tiled to FineWeb-like document lengths; a BOS at each document start, the first token of the
shard included, so both loaders start at token 0). It repeats: the curve measures agreement,
not learning. scripts/device_frontier_curve.sh runs all of it in one device call.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT / "tests" / "frontier_reference"))
from fidelity_curve import compare, golf_run, pct, plot, split_overrides, table  # noqa: E402  (a sibling script)
from generate import DEFAULT_REFERENCE, import_reference  # noqa: E402  (the fixtures' import of the reference)

MICRO_BATCHES = 8  # the reference's grad_accum_steps = 8 // WORLD_SIZE, at world size 1
# The README's command for the record's run (train_seed42.log's header), less what the curve
# sets itself (ITERATIONS, MAX_WALLCLOCK_SECONDS, WARMUP_STEPS, VAL_LOSS_EVERY, SEED, the data).
RECORD_ENV = {
    "VOCAB_SIZE": "8192", "CASEOPS_ENABLED": "1", "PHASED_TTT_ENABLED": "1", "PHASED_TTT_PREFIX_DOCS": "2500",
    "PHASED_TTT_NUM_PHASES": "3", "EMBED_BITS": "7", "MATRIX_LR": "0.026", "MIN_LR": "0.1", "MLP_CLIP_SIGMAS": "11.5",
    "ATTN_CLIP_SIGMAS": "13.0", "EMBED_CLIP_SIGMAS": "14.0", "GRAD_CLIP_NORM": "0.3", "TTT_CHUNK_SIZE": "48",
    "MUON_BACKEND_STEPS": "5", "GLOBAL_TTT_MOMENTUM": "0.9", "WARMDOWN_FRAC": "0.85", "BETA2": "0.99",
    "TTT_BETA2": "0.99", "TTT_WEIGHT_DECAY": "0.5", "TTT_LORA_RANK": "80", "SPARSE_ATTN_GATE_SCALE": "0.5",
    "GPTQ_RESERVE_SECONDS": "0.5", "GPTQ_CALIBRATION_BATCHES": "16", "GATED_ATTN_QUANT_GATE": "1",
    "SPARSE_ATTN_GATE_ENABLED": "1", "GATE_WINDOW": "12", "SMEAR_GATE_ENABLED": "1", "LQER_ENABLED": "1",
    "LQER_ASYM_ENABLED": "1", "LQER_RANK": "4", "LQER_FACTOR_BITS": "4", "LQER_ASYM_GROUP": "64", "LQER_TOP_K": "3",
    "FUSED_CE_ENABLED": "1", "COMPRESSOR": "pergroup",
}
# `--tiny`: configs/frontier_smoke.py's model, the reference's variable -> golf_jax's field.
TINY = {"NUM_LAYERS": ("model.num_layers", 7), "MODEL_DIM": ("model.model_dim", 64),
        "NUM_HEADS": ("model.num_heads", 4), "NUM_KV_HEADS": ("model.num_kv_heads", 2),
        "XSA_LAST_N": ("model.xsa_last_n", 7), "ROPE_DIMS": ("model.rope_dims", 8),
        "LOOP_START": ("model.loop_start", 2), "LOOP_END": ("model.loop_end", 3),
        "PARALLEL_START_LAYER": ("model.parallel_start_layer", 5)}
LOG_TRAIN = re.compile(r"^(\d+)/\d+ train_loss: ([\d.]+)")
LOG_LOOP = re.compile(r"^layer_loop:enabled step:(\d+)")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The curve's settings, one source for both runs (DIR/settings.json)."""

    steps: int = 60
    warmup: int = 20  # WARMUP_STEPS: that many plain, then as many looped steps, all undone
    row_tokens: int = 16_384  # one packed row a micro-batch; validation rows the same
    train_seq_len: int = 2048  # documents are split into chunks of this many tokens
    eval_seq_len: int = 2048
    val_every: int = 20
    seed: int = 42
    tiny: bool = False
    float32: bool = False
    compile_reference: bool = False

    def shared(self) -> list[tuple[str, str, object]]:
        """(the reference's variable, golf_jax's field, value) of every setting the curve fixes."""
        rows = [("SEED", "run.seed", self.seed), ("ITERATIONS", "schedule.iterations", self.steps),
                ("WARMUP_STEPS", "schedule.warmup_steps", self.warmup),
                ("MAX_WALLCLOCK_SECONDS", "schedule.max_wallclock_seconds", 0),
                ("TRAIN_BATCH_TOKENS", "data.train_batch_tokens", MICRO_BATCHES * self.row_tokens),
                ("TRAIN_SEQ_LEN", "data.train_seq_len", self.train_seq_len),
                ("EVAL_SEQ_LEN", "eval.eval_seq_len", self.eval_seq_len),
                ("VAL_BATCH_TOKENS", "eval.val_batch_tokens", MICRO_BATCHES * self.row_tokens),
                ("VAL_LOSS_EVERY", "eval.val_loss_every", self.val_every),
                ("TRAIN_LOG_EVERY", "run.train_log_every", 1)]
        return rows + ([(var, field, value) for var, (field, value) in TINY.items()] if self.tiny else [])

    def reference_env(self, data: Path | None = None) -> dict[str, str]:
        env = {**RECORD_ENV, **{var: str(value) for var, _, value in self.shared()}}
        if data is not None:
            env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"))
        if not self.compile_reference:
            env["TORCHDYNAMO_DISABLE"] = "1"
        return env

    def golf_overrides(self, data: Path) -> list[str]:
        def text(v):
            return str(v).lower() if isinstance(v, bool) else str(v)

        out = [f"--config.{field}={text(value)}" for _, field, value in self.shared()]
        out += [f"--config.data.data_dir={data}", f"--config.data.tokenizer_path={data / 'tokenizer.model'}",
                "--config.eval.document_eval_ranks=1",  # the reference's one rank
                "--config.run.checkpoint_every=0"]
        if not self.compile_reference:  # uncompiled PyTorch's rounding (see the docstring)
            out += ["--config.model.scales_in_float32=false", "--config.optimizer.muon_ns_rounding=eager"]
        if self.float32:
            out += ["--config.model.embedding_dtype=float32"]
        return out

    def check(self) -> None:
        if self.row_tokens % self.train_seq_len or self.row_tokens % self.eval_seq_len:
            raise SystemExit(f"--row-tokens {self.row_tokens}: not a multiple of the train and eval sequence lengths")

    @classmethod
    def load(cls, init_dir: Path) -> "Settings":
        path = init_dir / "settings.json"
        if not path.exists():
            raise SystemExit(f"{path}: not found; make it with `frontier_curve.py init --out {init_dir}`")
        return cls(**json.loads(path.read_text())["settings"])


# ----------------------------------------------------------------------------- init

def cmd_init(args) -> int:
    s = Settings(steps=args.steps, warmup=args.warmup, row_tokens=args.row_tokens, train_seq_len=args.train_seq_len,
                 eval_seq_len=args.eval_seq_len, val_every=args.val_every, tiny=args.tiny, float32=args.float32,
                 compile_reference=args.compile_reference)
    s.check()
    R = import_reference(args.reference, s.reference_env())
    import torch

    h = R.Hyperparameters()
    # As train_and_eval (L3554-3557), then train_model (L3332-3333) before `.to(device)`.
    random.seed(h.seed)
    np.random.seed(h.seed)
    torch.manual_seed(h.seed)
    model = R.GPT(h).bfloat16()
    R.restore_fp32_params(model)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "init.npz", **state)
    source = (args.reference / "train_gpt.py").read_bytes()
    weights = hashlib.sha256()  # two calls' curves can share one reference run only from the same weights
    for k in sorted(state):
        weights.update(k.encode() + state[k].tobytes())
    meta = {"settings": dataclasses.asdict(s), "reference_sha256": hashlib.sha256(source).hexdigest(),
            "init_sha256": weights.hexdigest(),
            "torch": torch.__version__, "parameters": int(sum(v.size for v in state.values())),
            "dtypes": sorted({f"{k}: {v.dtype}" for k, v in model.state_dict().items() if v.dtype != torch.float32})}
    (args.out / "settings.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}/init.npz ({meta['parameters']:,} parameters, seed {h.seed}; bf16 in the reference's "
          f"model: {', '.join(meta['dtypes']) or 'none'}) and settings.json: {dataclasses.asdict(s)}")
    return 0


# ----------------------------------------------------------------------------- the reference

class Recorder:
    """The reference's training as golf_jax's train.jsonl and summary.json (written once the
    post-EMA evaluation is known, as golf_jax writes it at its end); what else is known of the
    run in reference.json (the device, the kernels, the loop's step, the log check).

    Each micro-batch's loss is taken as GPT.forward returns it and summed per optimizer
    step as its step_fn sums them (a float32 tensor, then / grad_accum_steps), so the value is
    the one it logs, at full precision (its log rounds to 4 decimals; checked against it).
    The first 2 x WARMUP_STEPS optimizer steps are its warm-up (undone); the cu-bucket
    warm-up's losses, which reach no optimizer step, are dropped at its zero_grad_all.
    Under torch.compile the forward cannot record (nothing runs in Python): the log's values
    are taken instead.
    """

    def __init__(self, out: Path, torch, warmup_steps: int):
        self.torch, self.out = torch, out
        self.pending: list = []
        self.warmup_left = 2 * warmup_steps  # plain, then looped (NUM_LOOPS > 0)
        self.step, self.losses, self.records, self.after_training = 0, {}, {}, False
        self.summary: dict = {"layer_loop_on_at_step": None, "log_mismatches": []}
        self.jsonl = open(out / "train.jsonl", "w", buffering=1)

    def micro_batch(self, loss) -> None:
        self.pending.append(loss.detach())

    def optimizer_step(self, optimizers, grad_accum_steps: int) -> None:
        losses, self.pending = self.pending, []
        if self.warmup_left:
            self.warmup_left -= 1
            return
        self.step += 1
        # step_fn set every group's lr to base_lr x lr_scale: read the scale off a group that has a rate.
        group = next((g for opt in optimizers for g in opt.param_groups if g["base_lr"]), None)
        record = {"kind": "train", "step": self.step, "lr_mult": group and group["lr"] / group["base_lr"],
                  "muon_momentum": optimizers.optimizer_muon.param_groups[0]["momentum"]}
        if losses:
            total = self.torch.zeros((), device=losses[0].device)
            for loss in losses:
                total += loss
            total /= grad_accum_steps
            record["loss"] = self.losses[self.step] = total.item()
            self.jsonl.write(json.dumps(record) + "\n")
        self.records[self.step] = record

    def log_line(self, msg: str) -> None:
        """The reference's log: its train losses checked against ours (or taken, compiled), the loop's step."""
        if m := LOG_TRAIN.match(msg):
            step, logged = int(m[1]), float(m[2])
            if step in self.losses:
                if abs(round(self.losses[step], 4) - logged) > 1.5e-4:  # its .4f of the same float32
                    self.summary["log_mismatches"].append((step, self.losses[step], logged))
            elif step in self.records:
                self.jsonl.write(json.dumps({**self.records[step], "loss": logged, "from_log": True}) + "\n")
        elif m := LOG_LOOP.match(msg):
            self.summary["layer_loop_on_at_step"] = int(m[1])

    def validation(self, loss: float, bpb: float) -> None:
        if self.after_training:  # the post-EMA diagnostic (train_and_eval's timed_eval)
            self.summary.update(final_weights="EMA", final_val_loss=loss, final_val_bpb=bpb, steps=self.step)
            self.write_summary()
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        else:
            self.jsonl.write(json.dumps({"kind": "val", "step": self.step, "loss": loss, "bpb": bpb}) + "\n")

    def write_summary(self) -> None:
        (self.out / "reference.json").write_text(json.dumps(self.summary, indent=1) + "\n")


def fused_kernels_run(R, torch) -> str | None:
    """None if the reference's Triton MLP and CE kernels launch here, else why not."""
    def bf16(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    try:  # forward and backward of each (the MLP's backward is another kernel variant)
        R.FusedLeakyReLUSquareMLP(bf16(256, 512), bf16(2048, 512), bf16(512, 2048)).float().sum().backward()
        targets = torch.zeros(64, dtype=torch.int64, device="cuda")
        R.softcapped_cross_entropy(bf16(64, 8192), targets, 30.0, reduction="mean").backward()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # Triton's failures come in many types
        return f"{type(e).__name__}: {str(e)[:300]}"


def cpu_stand_ins(torch) -> None:
    """What the reference's training needs of CUDA, on a CPU (its main() refuses to run
    without CUDA): no-op syncs and streams, unpinned memory, no memory statistics."""
    class Stream:
        def wait_stream(self, other):
            pass

    empty = torch.empty
    torch.empty = lambda *a, pin_memory=False, **k: empty(*a, **k)
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = Stream
    torch.cuda.current_stream = lambda *a, **k: Stream()
    torch.cuda.stream = lambda s: __import__("contextlib").nullcontext()
    torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *a, **k: 0


def cmd_reference(args, extra: list[str]) -> int:
    s = Settings.load(args.init)
    cpu = args.device == "cpu"
    if s.float32 and not cpu:
        raise SystemExit("--float32 is the CPU check; on a GPU the reference trains under bf16 autocast")
    env = {**s.reference_env(args.data.resolve()), "ARTIFACT_DIR": str(args.out.resolve()), "RUN_ID": "reference",
           "PREQUANT_ONLY": "1"}
    env.update(word.split("=", 1) for word in extra)  # VAR=value words after --: a probe's own changes
    if cpu:
        env["FUSED_CE_ENABLED"] = "0"  # a Triton kernel
    args.out.mkdir(parents=True, exist_ok=True)
    R = import_reference(args.reference, env)
    import torch

    init = {k: torch.from_numpy(v) for k, v in np.load(args.init / "init.npz").items()}
    rec = Recorder(args.out, torch, s.warmup)
    fused_failure = None if cpu else fused_kernels_run(R, torch)
    if fused_failure or cpu:
        R.Hyperparameters.fused_ce_enabled = False
    rec.summary.update(device=args.device, torch=torch.__version__, compiled=s.compile_reference,
                       fused_kernels=not (cpu or fused_failure), fused_kernels_failure=fused_failure,
                       settings=dataclasses.asdict(s))
    rec.write_summary()

    class GPTFromInit(R.GPT):
        """The reference's GPT, its parameters then set to the shared initial state."""

        def __init__(self, h):
            super().__init__(h)
            self.load_state_dict(init, strict=True)
            for block in self.blocks:
                block.mlp.use_fused = rec.summary["fused_kernels"]

        def bfloat16(self):
            return self if s.float32 else super().bfloat16()  # the float32 check: no bf16 cast

        def forward(self, input_ids, target_ids, cu_seqlens=None, max_seqlen=0):
            loss = super().forward(input_ids, target_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            if not torch.compiler.is_compiling():
                rec.micro_batch(loss)
            return loss

    R.GPT = GPTFromInit
    step, zero_grad_all = R.Optimizers.step, R.Optimizers.zero_grad_all
    R.Optimizers.step = lambda self, distributed=False: (rec.optimizer_step(self, R.Hyperparameters.grad_accum_steps),
                                                         step(self, distributed))[1]
    R.Optimizers.zero_grad_all = lambda self: (rec.pending.clear(), zero_grad_all(self))[1]
    log, eval_val, train_model, train_and_eval = R.log, R.eval_val, R.train_model, R.train_and_eval
    R.log = lambda msg, console=True: (rec.log_line(msg), log(msg, console))[1]

    def recorded_eval(*a, **k):
        result = eval_val(*a, **k)
        rec.validation(*result)
        return result

    def recorded_training(*a, **k):
        result = train_model(*a, **k)
        rec.after_training = True
        return result

    def with_masked_sdpa(h, device):
        # main() leaves only flash SDPA on; the FA3 stand-in's varlen path passes a mask.
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        return train_and_eval(h, device)

    R.eval_val, R.train_model, R.train_and_eval = recorded_eval, recorded_training, with_masked_sdpa
    if cpu:
        cpu_stand_ins(torch)
        h = R.Hyperparameters()  # main() without its CUDA checks and backends
        R.set_logging_hparams(h)
        for k, v in sorted(vars(type(h)).items()):
            if not k.startswith("_"):
                R.log(f"  {k}: {v}")
        train_and_eval(h, torch.device("cpu"))
    else:
        R.main()
    rec.write_summary()
    if rec.summary["log_mismatches"]:
        print(f"recorded losses differ from the reference's log: {rec.summary['log_mismatches'][:5]}")
        return 1
    return 0


# ----------------------------------------------------------------------------- golf_jax

def cmd_golf(args, extra: list[str]) -> int:
    s = Settings.load(args.init)
    cmd = [sys.executable, "train.py", "--config", "configs/frontier.py", *s.golf_overrides(args.data.resolve()),
           f"--config.run.init_from={(args.init / 'init.npz').resolve()}",
           f"--config.run.output_dir={args.out.resolve()}", *extra, "--no-quantize", "--no-progress"]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


# ----------------------------------------------------------------------------- the data

def cmd_check_data(args) -> int:
    """Every micro-batch of the run, golf_jax's against the reference's loader."""
    s = Settings.load(args.init)
    R = import_reference(args.reference, s.reference_env(args.data.resolve()))
    import torch

    if not torch.cuda.is_available():
        cpu_stand_ins(torch)
    from golf_jax import cli, data_feed, packing

    cfg = cli.apply_overrides(cli.load_config_file(ROOT / "configs/frontier.py"),
                              cli.split_overrides(s.golf_overrides(args.data.resolve()))[0])
    h = R.Hyperparameters()
    ref = R.DocumentPackingLoader(h, torch.device("cpu"))
    golf = data_feed.PackedSteps(str(args.data / cfg.data.train_pattern), cfg, 1, h.grad_accum_steps, [0])
    steps = args.steps or s.steps
    for step in range(1, steps + 1):
        xs, ys, segs = golf.next_step()
        slots = segs.lengths_BxRxM.shape[-1]  # the step's layout: data.segments_per_fold_fast where every row fits it
        for m in range(h.grad_accum_steps):
            x, y, cu, _ = ref.next_batch(h.train_batch_tokens, h.grad_accum_steps)
            want = packing.make_segments(cu.numpy(), x.shape[1], cfg.data.train_seq_len, slots)
            got = packing.Segments(*(a[m] for a in segs))  # [1, ...]: this device's row
            where = f"step {step}, micro-batch {m + 1}"
            if not (np.array_equal(xs[m, 0], x[0].numpy()) and np.array_equal(ys[m, 0], y[0].numpy())):
                print(f"{where}: the tokens differ")
                return 1
            if not all(np.array_equal(a, b) for a, b in zip(got, want)):
                print(f"{where}: the documents differ (segments from the reference's cu_seqlens {cu.tolist()[:12]}...)")
                return 1
    docs = int((ref.bos_idx < ref.cursor).sum())
    print(f"data: {steps} steps x {h.grad_accum_steps} rows of {h.train_batch_tokens // h.grad_accum_steps:,} "
          f"tokens: golf_jax's tokens and documents equal the reference's in every row ({ref.cursor:,} tokens, "
          f"{docs:,} documents read)")
    return 0


# ----------------------------------------------------------------------------- compare

def per_step_table(ref, golfs) -> str:
    head = "| step | reference | " + " | ".join(f"{g.label} | rel" for g in golfs) + " |"
    out = [head, "|" + "---|" * (2 + 2 * len(golfs))]
    for s in sorted(ref.train):
        cells = [f"{g.train[s]:.6f} | {(g.train[s] - ref.train[s]) / ref.train[s]:+.2e}" if s in g.train else "- | -"
                 for g in golfs]
        out.append(f"| {s} | {ref.train[s]:.6f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def val_table(ref, golfs) -> str:
    out = ["| step | reference loss / bpb | " + " | ".join(g.label for g in golfs) + " |",
           "|" + "---|" * (2 + len(golfs))]
    points = [(f"{s}", ref.val[s], [g.val.get(s) for g in golfs]) for s in sorted(ref.val)]
    if ref.post_ema:
        points.append(("post-EMA", ref.post_ema, [g.post_ema for g in golfs]))
    for name, (loss, bpb), theirs in points:
        cells = [f"{t[0]:.6f} / {t[1]:.6f} ({pct((t[1] - bpb) / bpb)})" if t else "-" for t in theirs]
        out.append(f"| {name} | {loss:.6f} / {bpb:.6f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def schedule_checks(ref_dir: Path, runs: list[Path]) -> list[str]:
    """The learning-rate multiplier each side applied per step, and the step the loop came on."""
    def records(d):
        return {r["step"]: r for r in map(json.loads, (d / "train.jsonl").read_text().splitlines())
                if r.get("kind") == "train"}

    ref, lines = records(ref_dir), []
    ref_loop = json.loads((ref_dir / "reference.json").read_text()).get("layer_loop_on_at_step")
    for d in runs:
        golf = records(d)
        steps = sorted(set(ref) & set(golf))
        off = [s for s in steps
               if ref[s]["lr_mult"] is not None and abs(golf[s]["lr_mult"] - ref[s]["lr_mult"]) > 1e-12]
        golf_loop = json.loads((d / "summary.json").read_text()).get("layer_loop_on_at_step") \
            if (d / "summary.json").exists() else None
        lines.append(f"{d.name}: lr multiplier {'equal at all' if not off else f'different at {off[:8]} of the'} "
                     f"{len(steps)} steps; layer loop on at step {golf_loop} (the reference: {ref_loop})")
    return lines


def cmd_compare(args) -> int:
    ref = golf_run(args.reference)
    ref.label = "reference"
    golfs = [golf_run(d) for d in args.runs]
    for g, label in zip(golfs, args.labels or []):
        g.label = label
    meta = json.loads((args.reference / "reference.json").read_text())
    loop_at = meta.get("layer_loop_on_at_step") or 10 ** 9
    steps = max(ref.train, default=0)
    if not ref.train:
        print(f"{args.reference}: no step recorded")
        return 1
    for g in [g for g in golfs if not set(g.train) & set(ref.train) & set(range(1, loop_at + 1))]:
        print(f"{g.label}: no step before the loop in common with the reference: left out")
        golfs.remove(g)
    phases = (f"steps 1-{loop_at}", f"steps {loop_at + 1}-{steps} (looped)")
    # compare()'s "late" phase starts at the step after the loop comes on (the first looped step).
    print(per_step_table(ref, golfs), "\n")
    print(table([(f"{g.label} vs reference", compare(g, ref, split=loop_at + 1)) for g in golfs]
                + [(f"{a.label} vs {b.label}", compare(a, b, split=loop_at + 1))
                   for i, a in enumerate(golfs) for b in golfs[i + 1:]], *phases), "\n")
    print(val_table(ref, golfs), "\n")
    print("\n".join(schedule_checks(args.reference, args.runs)))
    print(f"reference: {meta.get('device')}, torch {meta.get('torch')}, compiled {meta.get('compiled')}, "
          f"fused kernels {meta.get('fused_kernels')} {meta.get('fused_kernels_failure') or ''}")
    print(f"settings: {meta.get('settings')}")
    if args.plot:
        plot(golfs, [ref], ref, args.plot, shade_from=loop_at + 1, shade_label="the layer loop on")
        print(f"wrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({g.label: compare(g, ref, split=loop_at + 1) for g in golfs}, indent=1))
    return 0


def main() -> int:
    argv, extra = split_overrides(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    defaults = Settings()
    i = sub.add_parser("init", help="the settings and the reference's initial state")
    i.add_argument("--out", type=Path, required=True)
    for name in ("steps", "warmup", "row_tokens", "train_seq_len", "eval_seq_len", "val_every"):
        i.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    i.add_argument("--tiny", action="store_true", help="configs/frontier_smoke.py's model (the CPU check)")
    i.add_argument("--float32", action="store_true", help="both models in float32 (the CPU check)")
    i.add_argument("--compile-reference", action="store_true", help="torch.compile the reference (default: eager)")
    for name, helptext in (("reference", "the reference run (its main())"), ("golf", "the golf_jax run (train.py)"),
                           ("check-data", "golf_jax's rows against the reference loader's")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--init", type=Path, required=True)
        p.add_argument("--data", type=Path, required=True)
        if name != "check-data":
            p.add_argument("--out", type=Path, required=True)
        if name == "reference":
            p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        if name == "check-data":
            p.add_argument("--steps", type=int, default=0, help="default: the run's")
    c = sub.add_parser("compare", help="the per-step table and a plot")
    c.add_argument("runs", nargs="+", type=Path, help="golf_jax run directories")
    c.add_argument("--reference", type=Path, required=True, help="the reference run's directory")
    c.add_argument("--labels", nargs="+")
    c.add_argument("--plot", type=Path)
    c.add_argument("--json", type=Path)
    for p in (i, *(sub.choices[n] for n in ("reference", "check-data"))):
        p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="the reference's folder")
    args = parser.parse_args(argv)
    if args.cmd in ("golf", "reference"):
        return {"golf": cmd_golf, "reference": cmd_reference}[args.cmd](args, extra)
    return {"init": cmd_init, "check-data": cmd_check_data, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
