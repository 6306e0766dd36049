#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, then run the named stages in order,
# each under its own time limit, each writing its full log to $OUT/<stage>.log and printing its tail.
#
#   bash benchmarks/gpu_session.sh tests kernels mixers step
#   bash benchmarks/gpu_session.sh --lanes "kernels mixers" "step"   # lane i on GPU i, concurrently
#   bash benchmarks/gpu_session.sh --together gputests1 gputests2     # lanes sharing one GPU (tests, never timings)
#
# Logs are also packed into $OUT/logs.tgz (the device tool returns at most 8 files). CLOCKS=1 also
# writes $OUT/<stage>.clocks.csv: the GPU's SM clock, power and temperature every 200 ms of the stage.
#
# Wheels (.whl/, carried, never committed): mamba-ssm and causal-conv1d built Python-only, fla-core
# (see benchmarks/hf_anchor.py and ../shared/reference/gpu_stack.md §1), tomli_w (`pip download tomli_w --no-deps
# -d .whl`: the image lacks it, and the trainer imports it, so its tests need it) and, for train.float8, torchao
# (`pip download torchao==0.18.0 --no-deps -d .whl`).
set -u
if [[ ${1:-} != --no-install ]] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD/src:/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
MTP_ARGS=${MTP_ARGS:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

if [[ ${1:-} == --lanes || ${1:-} == --together ]]; then  # each later argument: the stages of one lane
    mode=$1  # --lanes: lane i on GPU i; --together: every lane on the one GPU (test suites, not timings)
    shift
    nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv,noheader
    lane=0
    for stages in "$@"; do
        gpu=$lane
        [[ $mode == --together ]] && gpu=${CUDA_VISIBLE_DEVICES:-0}
        # shellcheck disable=SC2086  # a lane's stages are space-separated on purpose
        CUDA_VISIBLE_DEVICES=$gpu OUT=$OUT bash "$0" --no-install $stages >"$OUT/lane$lane.txt" 2>&1 &
        lane=$((lane + 1))
    done
    wait
    for ((i = 0; i < lane; i++)); do echo "##### lane $i (GPU $i)"; cat "$OUT/lane$i.txt"; done
    (cd "$OUT" && tar czf logs.tgz ./*.log lane*.txt && rm -f ./*.log lane*.txt)
    exit 0
fi
[[ ${1:-} == --no-install ]] && shift
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader

run() {  # run NAME SECONDS TAIL_LINES COMMAND...   (CLOCKS=1: also log SM clock, power, temperature every 200 ms)
    local name=$1 limit=$2 lines=$3 logger=
    shift 3
    local t0=$SECONDS
    if [[ ${CLOCKS:-0} == 1 ]]; then
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,utilization.gpu --format=csv -lms 200 \
            >"$OUT/$name.clocks.csv" 2>&1 &
        logger=$!
    fi
    # SIGTERM first (a training run saves and stops), SIGKILL 20 s later: a test suite running a Trainer takes
    # the SIGTERM as a run does and goes on to its next test, past any limit.
    timeout -k 20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [[ -n $logger ]] && kill "$logger" 2>/dev/null
    echo "=== $name (rc $rc, $((SECONDS - t0)) s): $*"
    grep -v -E "Warning|warn\(|^\s*$|^  File|^    " "$OUT/$name.log" | tail -n "$lines"
}

tries() {  # tries SETTING...: a --try option of benchmarks/mixers.py for each
    local t
    for t in "$@"; do printf -- "--try %s " "$t"; done
}

for stage in "$@"; do
    case $stage in
    tests) run tests 360 12 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests ;;
    # The GPU suite in four parts, for a cold machine (it compiles the Triton kernels first; 360 s did not finish):
    gputests1) run gputests1 540 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops ;;
    gputests2) run gputests2 540 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore tests/ops --ignore tests/train ;;
    # tests/train in two: cold, its five tests overran 540 s at once; warm they took 321 s, 194 s of it the global
    # balancing test (four trainers, three of them compiled)
    gputests3) run gputests3 540 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train -k "not global_balancing" ;;
    gputests4) run gputests4 540 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train -k global_balancing ;;
    speculative) run speculative 300 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/infer/test_speculative.py \
            tests/infer/test_cache.py -k "speculative" ;;  # sampled and greedy MTP speculation on CUDA
    savedkinds)  # the same for the other mixers at PRESET's sizes: Gated DeltaNet, MLA, DeepSeek sparse attention
        i=0
        read -ra pats <<<"${PATTERNS:-G-*- +- D-}"  # (split, not globbed: '*' is attention)
        for pat in "${pats[@]}"; do
            i=$((i + 1))
            # shellcheck disable=SC2086  # SAVED_ARGS: more options, space-separated on purpose
            run "savedkinds$i${TAG:-}" 240 12 python3 benchmarks/saved_bytes.py --preset "${PRESET:-bench-1.3b}" \
                --pattern "$pat" --shape "${SHAPES:-4x4096}" ${SAVED_ARGS:-}
        done ;;
    mtpcost) run mtpcost 300 90 python3 benchmarks/generate.py --device cuda --preset "${PRESET:-bench-1.3b}" \
            --mtp-cost "${DEPTHS:-2}" --rounds "${ROUNDS:-3}" --mtp-profile ;;  # a speculative round's cost, every draft kept / none
    dsagpu) run dsagpu 240 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_mla.py \
            tests/infer/test_cache_mla.py ;;  # DSA in bf16 at 4096 tokens, its selection whole and in chunks; MLA decoding
    indexer) run indexer 540 90 bash -c "rc=0; python3 -m pytest -q -p no:cacheprovider -m 'gpu or not gpu' \
            tests/ops/test_indexer.py tests/layers/test_mla.py || rc=1; python3 benchmarks/dsa_indexer.py --tune || rc=1; \
            python3 benchmarks/dsa_indexer.py || rc=1; python3 benchmarks/packed_attention.py --pattern D --rounds 5 || rc=1; \
            exit \$rc" ;;  # DSA's indexer kernels: tests (the layer's GPU tests too), tiles, against torch, the layer
    indexertests) run indexertests 300 20 python3 -m pytest -q -p no:cacheprovider -m 'gpu or not gpu' \
            tests/ops/test_indexer.py tests/ops/test_attention.py tests/layers/test_mla.py \
            tests/parallel/test_execution.py::test_gpu_compiled_blocks_have_no_graph_breaks ;;  # kernels, DSA, MLA, compiled
    indexertune) run indexertune 420 90 bash -c "rc=0; python3 benchmarks/dsa_indexer.py --tune || rc=1; \
            python3 benchmarks/dsa_indexer.py || rc=1; python3 benchmarks/packed_attention.py --pattern D --rounds 5 || rc=1; \
            python3 benchmarks/packed_attention.py --pattern D --rounds 3 --set dsa_indexer_loss_coeff=0.01 || rc=1; \
            exit \$rc" ;;  # the indexer's tiles and top-k blocks, then against torch, in the layer, and with its loss
    indexerbwd) run indexerbwd 330 60 bash -c "rc=0; python3 -m pytest -q -p no:cacheprovider tests/ops/test_indexer.py \
            tests/ops/test_attention.py -k 'gradients or loss or selection_block_mask' || rc=1; \
            python3 benchmarks/dsa_indexer.py --tune backward || rc=1; python3 benchmarks/dsa_indexer.py || rc=1; \
            python3 benchmarks/packed_attention.py --pattern D --rounds 3 --set dsa_indexer_loss_coeff=0.01 || rc=1; \
            exit \$rc" ;;  # the indexer loss's backward kernels: tests, tiles, against torch, in the layer
    coarse) run coarse 580 80 bash -c "rc=0; python3 benchmarks/dsa_indexer.py || rc=1; \
            python3 benchmarks/packed_attention.py --pattern D --rounds 5 --set dsa_indexer_loss_coeff=0.01 || rc=1; \
            python3 -m pytest -q -p no:cacheprovider -m 'gpu or not gpu' tests/ops/test_indexer.py tests/layers/test_mla.py \
            -k 'gradients or coarse or loss or 4096' || rc=1; python3 benchmarks/dsa_indexer.py --tune backward || rc=1; \
            exit \$rc" ;;  # a bf16 model's loss products in TF32: error and time, the layer, the tests, the tiles
    packedattn) run packedattn 300 40 bash -c "for p in + D '*'; do python3 benchmarks/packed_attention.py --pattern \"\$p\"; \
            done" ;;  # MLA, DSA and attention by path: flex, dense mask, causal
    target) run target 400 130 bash -c "rc=0; python3 -m pytest -q -p no:cacheprovider -m 'gpu or not gpu' \
            tests/ops/test_indexer.py tests/layers/test_mla.py -k 'target or indexer_loss or dsa' || rc=1; \
            python3 benchmarks/dsa_indexer.py --tune target || rc=1; python3 benchmarks/dsa_indexer.py || rc=1; \
            python3 benchmarks/packed_attention.py --pattern D --rounds 3 --set dsa_indexer_loss_coeff=0.01 --profile \
            --profile-rows 25 || rc=1; exit \$rc" ;;  # the indexer loss's target kernels: tests, tiles, against torch, the layer
    dsaprof) run dsaprof 300 100 bash -c "rc=0; for s in dsa_indexer_loss_coeff=0 dsa_indexer_loss_coeff=0.01; do \
            python3 benchmarks/packed_attention.py --pattern D --rounds 3 --set \$s --profile --profile-rows 30 || rc=1; \
            done; exit \$rc" ;;  # where a DSA layer's step goes, kernel by kernel, without and with its indexer loss
    # shellcheck disable=SC2086  # FROZEN_ARGS: more options (--no-compile, --trainable ...), space-separated on purpose
    frozen) run frozen 480 20 python3 benchmarks/frozen_step.py --preset "${PRESET:-bench-1.3b}" --shape "${SHAPES:-4x4096}" \
            --steps "${STEPS:-3}" ${FROZEN_ARGS:-} ;;  # train.trainable's savings in a step, beside the plan's estimate
    plangpu) run plangpu 300 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/plan ;;  # saved bytes per kind
    all) run all 560 16 python3 -m pytest -q -p no:cacheprovider tests ;;  # CPU and GPU tests under the image's torch
    cpushards)  # the CPU tests under the image's torch, on a machine with CUDA: SHARDS pytest runs at once
        n=${SHARDS:-4}
        mapfile -t files < <(find tests -name 'test_*.py' | sort)
        for ((i = 0; i < n; i++)); do
            mine=()
            for ((j = i; j < ${#files[@]}; j += n)); do mine+=("${files[j]}"); done
            OMP_NUM_THREADS=$((16 / n)) run "cpu$i" "${LIMIT:-500}" 12 python3 -m pytest -q -p no:cacheprovider -m "not gpu and not slow" \
                "${mine[@]}" >"$OUT/cpu$i.txt" 2>&1 &
        done
        wait
        cat "$OUT"/cpu*.txt ;;
    kernels)
        # A failed --check makes the stage's rc 1 (the timings still run): the chain's own status is its last command's.
        # 420 s: on a machine that has not compiled the kernels yet, 200 s ended after the SSD timings.
        run kernels 420 40 bash -c "rc=0; python3 benchmarks/ssd_kernel.py --check || rc=1; python3 benchmarks/ssd_kernel.py; \
            python3 benchmarks/conv_norm_kernels.py --check || rc=1; python3 benchmarks/conv_norm_kernels.py; \
            python3 benchmarks/gdn_kernel.py --check --no-bench || rc=1; python3 benchmarks/gdn_kernel.py; exit \$rc" ;;
    ssdk) run ssdk 240 40 bash -c "rc=0; python3 benchmarks/ssd_kernel.py --check || rc=1; python3 benchmarks/ssd_kernel.py; exit \$rc" ;;
    ssdq) run ssdq 150 40 bash -c "for q in 128 256 128 256; do python3 benchmarks/ssd_kernel.py --paths triton --chunk \$q; done" ;;  # chunk sizes
    ssdsingle) run ssdsingle 200 60 bash -c "for k in FWD_STATE_SINGLE_PRODUCT DB_STATE_SINGLE_PRODUCT DBC_W_SINGLE_PRODUCT; do \
            echo \$k; python3 benchmarks/ssd_kernel.py --check --set \$k=1; done" ;;  # products only one output sees
    ssdsplit) run ssdsplit 120 24 python3 benchmarks/ssd_kernel.py --check --set DX_SINGLE_PRODUCT=0 ;;
    convtune) run convtune 150 20 python3 benchmarks/conv_norm_kernels.py --tune ;;
    convprof) run convprof 200 60 python3 benchmarks/conv_norm_kernels.py --tune --profile ;;
    convk) run convk 120 30 bash -c "rc=0; python3 benchmarks/conv_norm_kernels.py --check || rc=1; python3 benchmarks/conv_norm_kernels.py; exit \$rc" ;;
    mixers)  # TRIES: kernel settings then timed against the defaults (as in mixtry)
        # shellcheck disable=SC2046  # one --try per setting
        run mixers 400 30 python3 benchmarks/mixers.py --rounds 8 --try-rounds "${TRY_ROUNDS:-4}" $(tries ${TRIES:-}) ;;
    mixprof) run mixprof 240 60 python3 benchmarks/mixers.py --profile ;;
    mixtry)  # kernel settings judged by the whole mixer (each against the defaults, taking turns), and its kernels
        # shellcheck disable=SC2046  # one --try per setting
        run mixtry 300 40 python3 benchmarks/mixers.py --no-gdn --profile --profile-rows 40 --rounds 8 --try-rounds "${TRY_ROUNDS:-4}" $(tries ${TRIES:-\
            ssd_triton.W_STAGES=3 ssd_triton.W_STAGES=2}) ;;
    seamcode)  # what inductor's seam kernels read and write, fused blocks against unfused (issue 9)
        run seamcode 240 120 bash -c "TORCH_LOGS=output_code python3 benchmarks/train_step.py --preset bench-1.3b \
            --shapes 1x4096 --steps 1 --warmup 1 --variants fused,unfused >/tmp/seamcode_raw.log 2>&1; \
            python3 benchmarks/inductor_kernels.py /tmp/seamcode_raw.log --match rms_norm" ;;
    mixall) run mixall 240 250 python3 benchmarks/mixers.py --profile --profile-rows 120 ;;  # every kernel
    ssdprof) run ssdprof 150 40 python3 benchmarks/ssd_kernel.py --profile ;;
    tune) run tune 200 16 python3 benchmarks/ssd_kernel.py --tune ;;
    step) run step 560 24 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096,1x4096 --compare-hf ;;
    step4k) run step4k 330 12 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096 --variants unfused --compare-hf ;;
    step4kours) run step4kours 330 14 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096 \
            --variants "${VARIANTS:-fused,unfused}" ;;  # ours only: no Hugging Face wheels needed
    cegpu) run cegpu 200 6 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_cross_entropy.py ;;
    step32k) run step32k 300 10 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x32768 --compare-hf ;;
    moe) run moe 300 12 python3 benchmarks/train_step.py --preset bench-moe-1b --shapes "${SHAPES:-4x4096,1x4096}" ;;
    moeprof) run moeprof 300 120 python3 benchmarks/train_step.py --preset bench-moe-1b --shapes "${SHAPES:-2x4096}" --steps 2 --warmup 2 \
            --variants "${VARIANTS:-unfused}" --profile ;;  # where a MoE step's GPU time goes
    repeat)  # a training step twice from the same weights: the same bits? which gradients differ, by layer kind
        run repeat 400 40 python3 benchmarks/repeatability.py --preset bench-moe-1b --pattern "${PATTERN:-M-*-G-E-[*E]M-}" \
            --batch 2 --seq 4096 ;;
    planvs) run planvs 300 24 python3 benchmarks/plan_vs_measure.py --preset "${PRESET:-nemotron-h-8b}" --pp 4 ;;
    float8)  # train.float8: its GPU tests, then bench-1.3b's step in float8 against bf16, unfused and then fused, each
        # pair interleaved (four 1.3B models with AdamW at once do not fit an H100's 80 GB). RECIPE: --float8's recipe
        # (default tensorwise). Needs torchao's wheel in .whl/ (`pip download torchao==0.18.0 --no-deps -d .whl`).
        run float8gpu 200 12 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/train/test_trainer.py tests/ops/test_float8.py -k float8 -rA
        for v in unfused fused; do
            run "float8-$v" 200 6 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096 --interleave --steps 8 \
                --warmup 3 --variants "$v,$v-float8" --float8 "${RECIPE:-tensorwise}"
        done ;;
    float8filter)  # train.float8_auto_filter: bench-1.3b's float8 step with every layer against the large ones only, per
        # recipe (a pair at a time, as in float8); float8filtermoe: bench-moe-1b's filtered tensorwise step against bf16
        for recipe in rowwise tensorwise; do
            run "float8filter-$recipe" 200 6 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096 --interleave \
                --steps 8 --warmup 3 --variants unfused-float8,unfused-float8-filtered --float8 "$recipe"
        done ;;
    float8filtermoe)
        run float8filter-moe 250 6 python3 benchmarks/train_step.py --preset bench-moe-1b --shapes 1x4096 --steps 6 --warmup 3 \
            --variants unfused,unfused-float8-filtered --float8 tensorwise ;;
    memphases) run memphases 400 40 python3 benchmarks/train_step.py --preset "${PRESET:-bench-1.3b}" --shapes "${SHAPES:-4x4096}" \
            --warmup 2 --variants "${VARIANTS:-unfused,unfused-float8}" --memory-phases ;;  # where a step's memory goes
    savedbytes)  # what each block kind keeps for its backward, compiled on the GPU, beside hybridlm plan's count
        for f8 in none tensorwise; do
            run "savedbytes-$f8" 240 12 python3 benchmarks/saved_bytes.py --preset "${PRESET:-bench-1.3b}" \
                --shape "${SHAPES:-4x4096}" --float8 "$f8"
        done ;;
    float8moe)  # bench-moe-1b (3.9B parameters: one model with AdamW at a time on an H100) with and without float8
        # ROUNDS=N: N builds of each, the order alternating (A B, B A, ...), medians over them
        run float8moe "${LIMIT:-400}" 16 python3 benchmarks/train_step.py --preset bench-moe-1b --shapes "${SHAPES:-1x4096}" \
            --steps 6 --warmup 3 --variants unfused,unfused-float8 --float8 "${RECIPE:-tensorwise}" --rounds "${ROUNDS:-1}" ;;
    moegpu) run moegpu 300 8 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/layers/test_moe.py \
            tests/train/test_trainer.py::test_global_balancing_over_micro_batches_trains_the_same_under_cuda_graphs_and_checkpointing ;;
    profile) run profile 300 80 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096 --steps 2 --warmup 2 --variants unfused --profile ;;
    prof32k) run prof32k 300 210 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x32768 --steps 2 --warmup 2 \
            --variants "${VARIANTS:-fused,unfused}" --profile ;;  # profiled in this order
    syncs) run syncs 240 40 python3 benchmarks/train_step.py --preset bench-1.3b --shapes "${SHAPES:-1x4096}" --steps 1 --warmup 1 \
            --variants "${VARIANTS:-unfused,fused}" --sync-check ;;  # which lines make the host wait for the GPU
    corehost) run corehost 200 120 bash -c "python3 benchmarks/core_host.py; python3 benchmarks/core_host.py --packed --rows 0" ;;  # the core op's host time
    coretrace) run coretrace 200 90 python3 benchmarks/core_host.py --trace --rows 25 ;;  # what the backward op's dispatch adds
    modes)  # PRESET (default bench-1.3b) at SHAPES (default 1x4096, host-bound) with default compiled blocks, then CUDA graphs
        for mode in default reduce-overhead; do
            run "modes-$mode" 300 12 python3 benchmarks/train_step.py --preset "${PRESET:-bench-1.3b}" --shapes "${SHAPES:-1x4096}" \
                --steps "${STEPS:-20}" --compile-mode "$mode"
        done ;;
    fusedprof) run fusedprof 400 80 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x4096 --steps 4 --warmup 3 --variants fused,unfused --profile ;;
    seam) run seam 400 16 env HYBRIDLM_KERNELS=auto,add_rms_norm=torch python3 benchmarks/train_step.py \
            --preset bench-1.3b --shapes 4x4096,1x4096 --rounds 2 ;;  # the fused seam left to inductor
    rounds) run rounds 500 16 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x4096 --rounds "${ROUNDS:-4}" --steps 10 ;;
    roundsgc) run roundsgc 400 16 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x4096 --rounds "${ROUNDS:-6}" --steps 12 --gc-every 1000 ;;
    final9)  # CORE=0 skips the core op's GPU test; LIMIT: seconds for the rows (about 390 + 1.6 per STEPS)
        [[ ${CORE:-1} == 0 ]] || run coregpu 90 6 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_mamba2_core.py
        run final9 "${LIMIT:-430}" 40 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096,1x4096,1x32768 \
            --interleave --compare-hf --steps "${STEPS:-12}" --warmup 2 --gc-every 1000 ;;  # issue 9's rows, steps taking turns
    multik) run multik 420 20 python3 benchmarks/train_step.py --preset bench-1.3b --shapes "${SHAPES:-4x4096,1x4096,1x32768}" --interleave \
            --steps "${STEPS:-12}" --warmup 2 --gc-every 1000 --inductor-config triton.multi_kernel=1 ;;  # the seam's reductions
    mixorder) run mixorder 420 20 python3 benchmarks/train_step.py --preset bench-1.3b --shapes "${SHAPES:-4x4096,1x32768}" --interleave \
            --steps "${STEPS:-12}" --warmup 2 --gc-every 1000 --inductor-config triton.mix_order_reduction_max_reads=0 ;;  # the seam's norm backward in one kernel?
    seamoff) run seamoff 420 20 python3 benchmarks/train_step.py --preset bench-1.3b --shapes "${SHAPES:-4x4096,1x4096,1x32768}" --interleave \
            --steps "${STEPS:-12}" --warmup 2 --gc-every 1000 --no-save-seams ;;  # fused blocks recompute h = x + delta (the old default)
    inter32k) run inter32k 300 14 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x32768 --interleave --steps "${STEPS:-16}" \
            --warmup 2 --gc-every 1000 --variants "${VARIANTS:-unfused,fused}" ;;  # VARIANTS=fused,unfused: built in the other order
    inter)  # fused against unfused, many pairs taking turns, no Hugging Face (LIMIT: about 100 + 0.95 s per STEPS at 1x32768)
        run inter "${LIMIT:-560}" 16 python3 benchmarks/train_step.py --preset bench-1.3b --shapes "${SHAPES:-4x4096,1x32768}" --interleave \
            --steps "${STEPS:-200}" --warmup 2 --gc-every 1000 --variants "${VARIANTS:-unfused,fused}" ;;
    rows32k) run rows32k 250 12 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x32768 --rounds "${ROUNDS:-4}" --steps 4 --warmup 2 --gc-every 1000 ;;
    cegpu) run cegpu 120 6 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_cross_entropy.py ;;
    rows) run rows 400 12 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096,1x32768 --rounds 2 --steps 6 --warmup 2 ;;
    kgpu) run kgpu 200 8 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_ssd_triton.py tests/ops/test_conv_norm_triton.py ;;
    convgpu) run convgpu 120 6 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_conv_norm_triton.py ;;
    graphs) run graphs 400 16 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 4x4096,1x4096 --compile-mode reduce-overhead --compare-hf ;;
    graphprof)  # why the CUDA-graphed 4x4096 step is slower than the default: kernels, host ops, re-recordings
        run graphprof 300 80 env TORCH_LOGS=cudagraphs,perf_hints python3 benchmarks/train_step.py --preset bench-1.3b \
            --shapes 4x4096 --steps 3 --warmup 3 --variants unfused --compile-mode reduce-overhead --profile ;;
    graphtrain)  # the trainer with CUDA-graphed blocks against default compiled blocks: same losses? (GT_SET: more --set)
        run graphtrain 240 30 bash -c "for m in default reduce-overhead; do python3 -m hybridlm.cli train --run-dir /tmp/gt-\$m \
            --set train.compile=true --set train.compile_mode=\$m --set train.steps=40 --set train.log_every=10 ${GT_SET:-} \
            --set train.eval_every=20 --set train.micro_batch_size=8 2>&1 | grep -E 'device|step +(10|20|30|40)|val|tok/s|rror' | tail -12; done" ;;
    curves) run curves 400 12 python3 benchmarks/train_step.py --preset bench-1.3b --shapes 1x4096 --variants unfused --steps 1 --warmup 1 --curves 200 ;;
    genprof) run genprof 240 80 python3 benchmarks/generate.py --device cuda --profile ;;
    against)  # greedy decoding under the default kernels and under AGAINST (one kernel ruled out), taking turns
        run against 300 16 python3 benchmarks/generate.py --device cuda --against "${AGAINST:-auto,mamba2_step=torch}" \
            --batches 1 8 64 --rounds "${ROUNDS:-5}" ;;
    againstgdn)  # the same for Gated DeltaNet: bench-1.3b's sizes with G layers in place of M
        run againstgdn 300 16 python3 benchmarks/generate.py --device cuda --against "${AGAINST:-auto,gdn_step=torch}" \
            --pattern "G-G-G-G*-G-G-G-G*-G-G-G-" --batches 1 8 64 --rounds "${ROUNDS:-5}" ;;
    againstmoe)  # the same for MoE routing: bench-moe-1b against the torch routing
        run againstmoe 300 16 python3 benchmarks/generate.py --device cuda --preset bench-moe-1b \
            --against "${AGAINST:-auto,moe_route=torch}" --batches 1 8 64 --rounds "${ROUNDS:-5}" ;;
    steptune)  # the SSD decode step's tiles (head channels per program x warps) at 1 / 8 / 64 rows
        run steptune 200 30 python3 benchmarks/step_kernel.py --rounds "${ROUNDS:-5}" ;;
    stepgpu) run stepgpu 200 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_step_triton.py tests/infer/test_cache.py \
            tests/ops/test_routing.py tests/ops/test_conv_norm_triton.py ;;
    decodebuf) run decodebuf 200 12 python3 benchmarks/generate.py --device cuda --buffers 1024 8192 65536 ;;  # eager vs static step
    infergpu) run infergpu 300 12 python3 -m pytest -q -p no:cacheprovider -m gpu tests/infer ;;
    mtp) run mtp 300 8 bash -c "python3 -m hybridlm.cli train --run-dir /tmp/mtp --set 'model.pattern=M-[*-]M-M-[*-]/*-/*-' \
            --set train.steps=1000 --set train.log_every=250 --set train.eval_every=1000 \
            && python3 benchmarks/generate.py --device cuda --mtp-checkpoint /tmp/mtp/model --new-tokens 256 $MTP_ARGS" ;;
    generate) run generate 300 20 python3 benchmarks/generate.py --device cuda --compare-hf ;;
    gen) run gen 200 16 python3 benchmarks/generate.py --device cuda --batches 1 64 --prefill-len 0 ;;  # ours only
    serve) run serve 200 20 python3 benchmarks/serve.py --preset bench-1.3b --device cuda --cuda-graph --clients 16 --max-tokens 64 ;;
    contserve)  # continuous against static batching: 16 clients STAGGER s apart, mixed lengths (up to 128 tokens)
        run contserve 400 24 python3 benchmarks/serve.py --preset bench-1.3b --device cuda --cuda-graph --continuous \
            --clients 16 --max-tokens 128 --spread --stream --stagger "${STAGGER:-0.05}" --repeat "${REPEAT:-2}" ;;
    shareserve)  # lm-eval's multiple-choice requests on bench-1.3b: shared prefixes run once against per prompt
        run shareserve 300 16 python3 benchmarks/serve.py --preset bench-1.3b --device cuda --score --continuous \
            --choices 4 --clients 16 --prompt-len 1024 --repeat "${REPEAT:-2}" ;;
    turnserve)  # 8 conversations of 4 turns: each turn from its kept answer (prefix cache) against none
        run turnserve 300 18 python3 benchmarks/serve.py --preset bench-1.3b --device cuda --cuda-graph --continuous \
            --clients 8 --turns 4 --prompt-len 1024 --max-tokens 32 --repeat "${REPEAT:-2}" --stream ;;
    keptgraphs)  # graphed generate calls: each capturing its own graph against replaying a kept one (DecodeGraphs)
        run keptgraphs 200 12 python3 benchmarks/generate.py --device cuda --preset bench-1.3b --kept-graphs 8 \
            --batches 1 --prompt-len 256 --new-tokens 32 ;;
    prefillcost)  # a forward's fixed cost in positions (prefixes.FORWARD_POSITIONS, an estimate until measured)
        run prefillcost 200 20 python3 benchmarks/prefill_cost.py --device cuda --preset bench-1.3b \
            --positions 1 8 64 256 1024 4096 ;;
    samplingcost)  # what each sampling setting adds to a graphed decode of bench-1.3b, 64 rows
        run samplingcost 240 16 python3 benchmarks/generate.py --device cuda --sampling-cost 8 --batches 64 ;;
    samplingone)  # the same for one row (a chat's decode)
        run samplingone 200 16 python3 benchmarks/generate.py --device cuda --sampling-cost 8 --batches 1 ;;
    topp)  # top-p alone: the Triton kernel against sorting, 1 / 8 / 64 rows of a 131k vocabulary, and its GPU test
        run topp 120 12 python3 benchmarks/top_p.py
        run topptest 200 12 python3 -m pytest -q -s -m gpu tests/ops/test_top_p.py -k "gpu or kernel" ;;
    topptune)  # the top-p kernel's cuts a pass, logits a step and programs per SM
        run topptune 300 30 python3 benchmarks/top_p.py --tune ;;
    clidefaults)  # hybridlm generate as a process: its defaults (CUDA graphs on CUDA) against --no-cuda-graph
        run clidefaults 400 16 python3 benchmarks/cli_generate.py --device cuda --preset bench-1.3b --rounds "${ROUNDS:-1}" ;;
    pipeline) run pipeline 300 12 python3 benchmarks/pipeline_overhead.py --preset bench-1.3b --batch 8 --micro 4 --seq 4096 ;;
    *) echo "unknown stage $stage" ;;
    esac
done
