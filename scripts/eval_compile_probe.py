"""The evaluation programs of a config on one GPU, compiled and run on fresh weights: the
document-masked (or standard) validation before and after the layer loop, each call timed
(the first one compiles). For finding which setting makes an evaluation program slow to
compile or fail, one process per variant:

    source scripts/device_env.sh
    for v in "" "--config.model.mlp_impl=auto"; do
      timeout 150 python3 scripts/eval_compile_probe.py --config configs/frontier.py \
        --config.data.data_dir=/tmp/fdata --config.data.tokenizer_path=/tmp/fdata/tokenizer.model $v
    done
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf_jax import cli, datasets, evaluate, train  # noqa: E402


def main(argv: list[str]) -> None:
    overrides, rest = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args(rest)
    cfg = cli.apply_overrides(cli.load_config_file(args.config), overrides).validate()
    d = cfg.data
    ds = datasets.resolve_dataset(d.data_dir, d.tokenizer_path, d.train_pattern, d.val_pattern,
                                  cfg.model.vocab_size, d.text_transform)
    tokens, tables = evaluate.load_validation(cfg, ds)
    params = jax.device_put(train.initial_params(cfg))
    print(f"{' '.join(f'{k}={v}' for k, v in overrides) or 'as configured'}: {len(tokens):,} val tokens", flush=True)
    for looping in sorted({False, cfg.model.looping_after_training}):
        for call in ("first", "second"):
            t0 = time.perf_counter()
            r = evaluate.run_standard(params, cfg, tokens, tables, progress=False, looping=looping)
            print(f"  looping={looping} {call} call: {time.perf_counter() - t0:.1f} s (val_loss {r.loss:.4f})",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
