#!/usr/bin/env bash
# The one command a lent GPU machine runs: the GPU tests and every benchmark with a GPU mode, from
# the source tree (PYTHONPATH=., no pip install: the GPU machine reaches no package registry).
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json and $OUT/gpu_check.log
#
# Each step runs with its own timeout and the script goes on after a failure; gpu_check.json records
# per step the exit code, the seconds taken, the tail of its output and, if the step wrote one, the
# JSON object it left in "$STEP_JSON". The whole run stays under BUDGET seconds (8 minutes by
# default): a step gets at most the time that is left, and steps beyond the budget are recorded as
# skipped. To add a benchmark, append one line to STEPS.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET=${BUDGET:-470}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PY PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels on CUDA tensors, never the interpreter.
unset TRITON_INTERPRET

# name | timeout in seconds | command (run by bash; $PY is the interpreter, $STEP_JSON a file the
# step may write its results to). The GPU machine lacks the demo/integration extras (lightly,
# torchvision, scikit-learn), hence --continue-on-collection-errors. `vmf-head check` comes first: it
# is what a user runs, it compares every kernel with the reference under
# torch.cuda.set_sync_debug_mode("error") and times the fused loss against torch.compile of DINO's
# loss; its first run compiles the kernels it uses. The GPU tests run the training steps under the
# same sync mode. The benchmarks come right after them so that a slow first compile cuts the
# small-shape CUDA reruns, not them.
STEPS=(
  'environment|30|nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; $PY -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())"'
  'vmf_head_check|150|$PY -m vmf_head check --json "$STEP_JSON"'
  'gpu_tests|150|$PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests'
  'loss_gpu|240|$PY benchmarks/loss_gpu.py --json "$STEP_JSON"'
  'log_normalizer_gpu|120|$PY benchmarks/log_normalizer_gpu.py --json "$STEP_JSON"'
  'ops_tests_cuda|90|$PY -m pytest -q -p no:cacheprovider tests/test_ops_log_normalizer.py'
  'ops_cross_entropy_cuda|90|$PY -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_ops_cross_entropy.py tests/test_training_step.py'
)

start_all=$SECONDS
: >"$LOG"
i=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  i=$((i + 1))
  meta="$WORK/$(printf '%02d' "$i")_$name"
  left=$((BUDGET - (SECONDS - start_all)))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    printf '%s\n%s\n%s\n' "$name" "skipped" "0" >"$meta.status"
    : >"$meta.out"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $cmd" | tee -a "$LOG"
  t0=$SECONDS
  STEP_JSON="$meta.json" timeout --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee "$meta.out" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc after $((SECONDS - t0))s" | tee -a "$LOG"
  printf '%s\n%s\n%s\n' "$name" "$rc" "$((SECONDS - t0))" >"$meta.status"
done

"$PY" - "$WORK" "$OUT/gpu_check.json" "$((SECONDS - start_all))" <<'EOF'
import glob, json, os, sys

work, target, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []
for status in sorted(glob.glob(os.path.join(work, "*.status"))):
    base = status[: -len(".status")]
    name, rc, seconds = open(status).read().split("\n")[:3]
    step = {"name": name, "seconds": int(seconds)}
    if rc == "skipped":
        step.update(rc=None, skipped=True)
    else:
        step.update(rc=int(rc), timed_out=int(rc) in (124, 137))
    lines = open(base + ".out", errors="replace").read().splitlines()
    step["tail"] = lines[-40:]
    if os.path.exists(base + ".json"):
        try:
            step["result"] = json.load(open(base + ".json"))
        except ValueError as exc:
            step["result_error"] = f"unreadable JSON: {exc}"
    steps.append(step)
summary = {
    "seconds": total,
    "all_passed": all(s.get("rc") == 0 for s in steps),
    "steps": steps,
}
with open(target, "w") as fh:
    json.dump(summary, fh, indent=1)
# What benchmarks/RESULTS.md takes: the whole output of `vmf-head check` (versions, every check,
# the timing), and every table line and heading the benchmarks printed.
for step in steps:
    out = open(os.path.join(work, f"{steps.index(step) + 1:02d}_{step['name']}.out"), errors="replace").read()
    if step["name"] == "vmf_head_check":
        print(f"\n## {step['name']} (rc={step.get('rc')})\n" + out.rstrip())
    elif step["name"].endswith("_gpu"):
        rows = [line for line in out.splitlines()
                if line.startswith(("|", "###", "loss fwd+bwd on", "fused:", "targets:")) or " median " in line]
        print(f"\n## {step['name']} (rc={step.get('rc')})\n" + "\n".join(rows))
print(f"gpu_check: {sum(s.get('rc') == 0 for s in steps)}/{len(steps)} steps passed in {total}s -> {target}")
EOF
