# The fix of docs/fidelity.md ("the first-step gap, part 2") checked in one device call (one GPU): golf_jax's
# step-1 weights from the tree before the fix (.old: git archive of HEAD, carried), the fixed forward's
# batch-2 loss at them (the reference's compiled forward gave 8.79024 there, its eager one 8.79083), the
# fixed step's own batch-2 loss (the step-2 train loss; the reference's: 8.79203), and one 60-step run
# (runs/G1 in $OUT/G1.tgz) side by side. Carry .shared .whl .old.
source scripts/device_env.sh >/dev/null 2>&1; export GOLF_JAX_SHARED=.shared; S=scripts/first_step_gpu.py
XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout 138 python3 scripts/fidelity_curve.py train --out /tmp/G1 > $OUT/G1.out 2>&1 &
c=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 GOLF_TREE=.old timeout 110 python3 $S golf --refs --no-train-step --save-p1 /tmp/old_p1.npz > $OUT/old.log 2>&1 &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout 120 python3 $S golf --refs --no-train-step --eval-p1 /tmp/old_p1.npz --wait 100 > $OUT/new.log 2>&1
wait $c
rm -rf /tmp/G1/final_model /tmp/G1/checkpoints; tar czf $OUT/G1.tgz -C /tmp G1
grep -h "^golf_jax\|^batch-2" $OUT/old.log $OUT/new.log; tail -4 $OUT/G1.out; python3 -c "import json;r=[json.loads(l) for l in open('/tmp/G1/train.jsonl')];print([(x['step'],round(x['loss'],4)) for x in r if x['kind']=='train' and x['step']<=6])"
