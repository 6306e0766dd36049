#!/usr/bin/env bash
# The two-GPU runs of issue 16, as exact commands: one GPU, FSDP=2, PP=2 (1f1b and interleaved),
# each with the unfused and the fully fused pattern; logs and metrics under $OUT/<name>/.
#
#   bash benchmarks/two_gpu.sh            # on a machine with 2 GPUs: bench-1.3b, 4 × 4096 per GPU, 50 steps
#   bash benchmarks/two_gpu.sh --rehearse # on CPU with gloo: the same commands on the tiny preset, 4 steps
#   VARIANTS=unfused bash benchmarks/two_gpu.sh   # one pattern family only (default: "unfused fused")
#
# The PP = 2 (1f1b, unfused) run also saves a checkpoint half-way; a copy of its run resumes from
# there on one process (pp = 1), and its losses are printed beside the uninterrupted run's.
# Run folders live under $RUNS (default /tmp/two_gpu_runs); each run's weights and checkpoints are
# deleted after it (20 GB each for bench-1.3b), its log and metrics.jsonl are kept and packed into
# $OUT/two_gpu.tgz.
#
# Every run trains the same data in the same order (train.batch_size counts rows over all ranks), so
# the loss curves of all layouts must agree within bf16 noise on the GPU, and within float32
# rounding in the rehearsal.
set -euo pipefail
OUT=${OUT:-/tmp/two_gpu}
RUNS=${RUNS:-/tmp/two_gpu_runs}
VARIANTS=${VARIANTS:-unfused fused}
mkdir -p "$OUT" "$RUNS"

if [[ ${1:-} == --rehearse ]]; then
    unfused='M-M-*-|M-M-M-'               # tiny preset kinds, cut in the middle
    fused='M-M-[*-]|M-M-M-'
    inter_unfused='M-M-|*-M-|M-|M-'       # 4 segments: 2 ranks × 2 virtual stages
    inter_fused='M-M-|[*-]M-|M-|M-'
    steps=4
    common=(--set model.preset=tiny --set model.vocab_size=257 --set train.steps=$steps --set train.batch_size=8 --set data.seq_len=64
        --set train.log_every=1 --set train.eval_every=4 --set train.checkpoint_every=4 --set train.device=cpu)
    one=(python3 -m hybridlm.cli)
else
    unfused='M-M-M-M*-M-M-|M-M*-M-M-M-'   # bench-1.3b's pattern cut in the middle
    fused='[M-][M-][M-]M[*-][M-][M-]|[M-]M[*-][M-][M-][M-]'
    inter_unfused='M-M-M-|M*-M-M-|M-M*-M-|M-M-'
    inter_fused='[M-][M-][M-]|M[*-][M-][M-]|[M-]M[*-][M-]|[M-][M-]'
    steps=50
    common=(--set model.preset=bench-1.3b --set data.seq_len=4096 --set train.steps=$steps --set train.batch_size=8
        --set train.compile=true --set train.log_every=5 --set train.eval_every=50 --set train.checkpoint_every=50)
    one=(python3 -m hybridlm.cli)
fi
two=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m hybridlm.cli)

run() {  # run NAME LAUNCHER... -- ARGS...
    local name=$1
    shift
    echo "=== $name"
    local t0=$SECONDS
    "$@" --run-dir "$RUNS/$name" >"$RUNS/$name.log" 2>&1 || { echo "failed: see $RUNS/$name.log"; tail -5 "$RUNS/$name.log"; }
    grep -E "^step|step +[0-9]+" "$RUNS/$name.log" | tail -2 || true
    echo "    ($((SECONDS - t0)) s)"
    [[ $name == resume-* || $name == pp2-1f1b-unfused ]] || rm -rf "$RUNS/$name/checkpoints" "$RUNS/$name/model"
}

for variant in $VARIANTS; do
    pattern=$([[ $variant == unfused ]] && echo "$unfused" || echo "$fused")
    inter=$([[ $variant == unfused ]] && echo "$inter_unfused" || echo "$inter_fused")
    run "one-$variant" "${one[@]}" train "${common[@]}" --set model.pattern="$pattern" --set train.micro_batch_size=4
    run "fsdp2-$variant" "${two[@]}" train "${common[@]}" --set model.pattern="$pattern"
    every=$([[ $variant == unfused ]] && echo $((steps / 2)) || echo "$steps")
    run "pp2-1f1b-$variant" "${two[@]}" train "${common[@]}" --set model.pattern="$pattern" --set parallel.pp=2 \
        --set parallel.schedule=1f1b --set parallel.microbatches=4 --set train.checkpoint_every="$every"
    if [[ $variant == unfused ]]; then  # resume the PP = 2 run's half-way checkpoint on one process
        cp -r "$RUNS/pp2-1f1b-unfused" "$RUNS/resume-pp2-on-one"
        rm -rf "$RUNS/resume-pp2-on-one/checkpoints/step-$(printf %06d "$steps")" "$RUNS/resume-pp2-on-one/model"
        head -n "$(grep -n "\"step\": $((steps / 2))[,}]" "$RUNS/resume-pp2-on-one/metrics.jsonl" | tail -1 | cut -d: -f1)" \
            "$RUNS/resume-pp2-on-one/metrics.jsonl" >"$RUNS/m.tmp" && mv "$RUNS/m.tmp" "$RUNS/resume-pp2-on-one/metrics.jsonl"
        echo "=== resume-pp2-on-one"
        "${one[@]}" train --resume "$RUNS/resume-pp2-on-one" --set parallel.pp=1 --set train.micro_batch_size=4 \
            >"$RUNS/resume-pp2-on-one.log" 2>&1 || { echo "failed: see $RUNS/resume-pp2-on-one.log"; tail -5 "$RUNS/resume-pp2-on-one.log"; }
        rm -rf "$RUNS/pp2-1f1b-unfused/checkpoints" "$RUNS/pp2-1f1b-unfused/model" "$RUNS/resume-pp2-on-one/checkpoints" \
            "$RUNS/resume-pp2-on-one/model"
    fi
    run "pp2-interleaved-$variant" "${two[@]}" train "${common[@]}" --set model.pattern="$inter" --set parallel.pp=2 \
        --set parallel.schedule=interleaved-1f1b --set parallel.microbatches=4
done

# Loss of each run at each logged step, side by side (metrics.jsonl is written by rank 0).
python3 - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists())
curves = {}
for r in runs:
    rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curves[r.name] = {row["step"]: row["loss"] for row in rows if "loss" in row}
    speed = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row][1:]  # the first window holds compilation
    mem = max((row.get("peak_mem_gb", 0.0) for row in rows), default=0.0)
    mfu = [row["mfu"] for row in rows if "mfu" in row][1:]
    if speed:
        print(f"{r.name:<24} tokens/s (median of logged windows after the first) {sorted(speed)[len(speed) // 2]:>10,.0f}"
              f"   peak GB (rank 0) {mem:6.1f}" + (f"   MFU {sorted(mfu)[len(mfu) // 2]:.1%}" if mfu else ""))
steps = sorted(set().union(*[c.keys() for c in curves.values()])) if curves else []
print("step " + " ".join(f"{n:>24}" for n in curves))
for s in steps:
    print(f"{s:>4} " + " ".join(f"{curves[n].get(s, float('nan')):>24.5f}" for n in curves))
EOF
(cd "$RUNS" && tar czf "$OUT/two_gpu.tgz" ./*.log ./*/metrics.jsonl 2>/dev/null) || true
