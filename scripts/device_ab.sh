#!/usr/bin/env bash
# Before and after a refactor on one GPU, back to back on one machine.
#   numbers: the GPU tests of this tree, then scripts/ab_snapshot.py on both
#            trees (loss, every gradient, KV-cached generation, Hessians) and
#            their bitwise comparison;
#   bench:   the bench sections (default grad,train,eval) of the earlier tree,
#            then of this one, then the grad section of each again (A B A B),
#            so drift of the machine shows.
# The earlier tree is a directory, carried with the working tree, e.g.
#   mkdir -p .before && git archive <commit> golf_jax kernels configs | tar -x -C .before
# and carry [".shared", ".whl", ".before"].
#   compile: trace, lower and compile seconds of the loss+grad, fresh processes, alternating.
# Usage (device): OUT=/some/dir BEFORE=.before [SKIP_TESTS=1] [CONTROL=1] bash scripts/device_ab.sh numbers|bench|compile [sections]
# (CONTROL=1: numbers also compares this tree with itself, for run-to-run nondeterminism.)
set -uo pipefail
ROOT=$PWD
DATA=$ROOT/.shared/data
source "$(dirname "$0")/device_env.sh"
SITE=${PYTHONPATH%%:*}
BEFORE=$(cd "${BEFORE:-.before}" && pwd)
INIT=$ROOT/.shared/fixtures/reference/record_init_seed314_bf16bits.npz
in_tree() { local tree=$1; shift; (cd "$tree" && PYTHONPATH="$SITE:." "$@"); }

case "${1:-}" in
numbers)
  [ -z "${SKIP_TESTS:-}" ] && timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -3
  for side in before after; do
    tree=$([ $side = before ] && echo "$BEFORE" || echo "$ROOT")
    in_tree "$tree" timeout 150 python3 "$ROOT/scripts/ab_snapshot.py" snap --out "/tmp/$side.npz" --init "$INIT" \
      2>&1 | grep -v "^WARNING\|^I0000" | tail -2
  done
  python3 scripts/ab_snapshot.py compare /tmp/before.npz /tmp/after.npz | tee "$OUT/ab_compare.txt" | tail -45
  if [ -n "${CONTROL:-}" ]; then  # this tree against itself: what run-to-run nondeterminism alone gives
    in_tree "$ROOT" timeout 150 python3 "$ROOT/scripts/ab_snapshot.py" snap --out /tmp/after2.npz --init "$INIT" \
      2>&1 | grep -v "^WARNING\|^I0000" | tail -1
    python3 scripts/ab_snapshot.py compare /tmp/after.npz /tmp/after2.npz | tee "$OUT/ab_control.txt" | tail -45
  fi
  ;;
compile)  # fresh processes, alternating: trace, lower and compile seconds of the loss+grad
  for i in 1 2 3; do
    for side in before after; do
      tree=$([ $side = before ] && echo "$BEFORE" || echo "$ROOT")
      echo -n "$side $i: "
      in_tree "$tree" timeout 120 python3 "$ROOT/scripts/ab_snapshot.py" compile 2>&1 | grep "^compile"
    done
  done
  ;;
bench)
  sections=${2:-grad,train,eval}
  run() {  # side sections
    local tree=$([ "$1" = before ] && echo "$BEFORE" || echo "$ROOT")
    echo "=== $1: $2"
    in_tree "$tree" timeout 200 python3 -m golf_jax.tools.bench --config configs/record.py --sections "$2" $D \
      --out "$OUT/bench_$1_$3" 2>&1 | grep -v "^WARNING\|^I0000" | tail -25
  }
  run before "$sections" 1; run after "$sections" 1; run before grad 2; run after grad 2
  ;;
*) echo "usage: device_ab.sh numbers|bench|compile [sections]" >&2; exit 2 ;;
esac
