#!/usr/bin/env bash
# The two-GPU runs of issue 16, as exact commands: one GPU, FSDP=2, PP=2 (1f1b and interleaved),
# each with the unfused and the fully fused pattern; logs and metrics under $OUT/<name>/.
#
#   bash benchmarks/two_gpu.sh            # on a machine with 2 GPUs: bench-1.3b, 4 × 4096 per GPU, 50 steps
#   bash benchmarks/two_gpu.sh --rehearse # on CPU with gloo: the same commands on the tiny preset, 4 steps
#
# Every run trains the same data in the same order (train.batch_size counts rows over all ranks), so
# the loss curves of all layouts must agree within bf16 noise on the GPU, and within float32
# rounding in the rehearsal.
set -euo pipefail
OUT=${OUT:-/tmp/two_gpu}
mkdir -p "$OUT"

if [[ ${1:-} == --rehearse ]]; then
    unfused='M-M-*-|M-M-M-'               # tiny preset kinds, cut in the middle
    fused='M-M-[*-]|M-M-M-'
    inter_unfused='M-M-|*-M-|M-|M-'       # 4 segments: 2 ranks × 2 virtual stages
    inter_fused='M-M-|[*-]M-|M-|M-'
    common=(--set model.preset=tiny --set model.vocab_size=257 --set train.steps=4 --set train.batch_size=8 --set data.seq_len=64
        --set train.log_every=1 --set train.eval_every=4 --set train.checkpoint_every=4 --set train.device=cpu)
    one=(python3 -m hybridlm.cli)
else
    unfused='M-M-M-M*-M-M-|M-M*-M-M-M-'   # bench-1.3b's pattern cut in the middle
    fused='[M-][M-][M-][M-]*-[M-][M-]|[M-][M-]*-[M-][M-][M-]'
    inter_unfused='M-M-M-|M*-M-M-|M-M*-M-|M-M-'
    inter_fused='[M-][M-][M-]|[M-]*-[M-][M-]|[M-][M-]*-[M-]|[M-][M-]'
    common=(--set model.preset=bench-1.3b --set data.seq_len=4096 --set train.steps=50 --set train.batch_size=8
        --set train.compile=true --set train.log_every=5 --set train.eval_every=50 --set train.checkpoint_every=50)
    one=(python3 -m hybridlm.cli)
fi
two=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m hybridlm.cli)

run() {  # run NAME LAUNCHER... -- ARGS...
    local name=$1
    shift
    echo "=== $name"
    "$@" --run-dir "$OUT/$name" >"$OUT/$name.log" 2>&1 || { echo "failed: see $OUT/$name.log"; tail -5 "$OUT/$name.log"; }
    grep -E "^step|step +[0-9]+" "$OUT/$name.log" | tail -3 || true
}

for variant in unfused fused; do
    pattern=$([[ $variant == unfused ]] && echo "$unfused" || echo "$fused")
    inter=$([[ $variant == unfused ]] && echo "$inter_unfused" || echo "$inter_fused")
    run "one-$variant" "${one[@]}" train "${common[@]}" --set model.pattern="$pattern" --set train.micro_batch_size=4
    run "fsdp2-$variant" "${two[@]}" train "${common[@]}" --set model.pattern="$pattern"
    run "pp2-1f1b-$variant" "${two[@]}" train "${common[@]}" --set model.pattern="$pattern" --set parallel.pp=2 \
        --set parallel.schedule=1f1b --set parallel.microbatches=4
    run "pp2-interleaved-$variant" "${two[@]}" train "${common[@]}" --set model.pattern="$inter" --set parallel.pp=2 \
        --set parallel.schedule=interleaved-1f1b --set parallel.microbatches=4
done

# Loss of each run at each logged step, side by side (metrics.jsonl is written by rank 0).
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists())
curves = {}
for r in runs:
    rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curves[r.name] = {row["step"]: row["loss"] for row in rows if "loss" in row}
steps = sorted(set().union(*[c.keys() for c in curves.values()])) if curves else []
print("step " + " ".join(f"{n:>24}" for n in curves))
for s in steps:
    print(f"{s:>4} " + " ".join(f"{curves[n].get(s, float('nan')):>24.5f}" for n in curves))
EOF
