#!/usr/bin/env bash
# The GPU tier and the GPU benchmarks of mmtrain, in parts that each fit a 10-minute command.
#
#   bash benchmarks/gpu_suite.sh env tier              # the GPU test tier (tests/gpu)
#   bash benchmarks/gpu_suite.sh env bench mmca        # from the repository root
#   bash benchmarks/gpu_suite.sh memory:0-7
#   bash benchmarks/gpu_suite.sh memory:8-15
#
# Parts (run in the order given):
#   env            versions, nvidia-smi, DeepSpeed's view of the machine
#   tier           pytest tests/gpu on this machine's GPUs: the one-GPU rows on a machine with
#                  one, the two-GPU rows where there are two or more (TIER_ROWS=all runs both);
#                  rows run TIER_JOBS at a time (pytest-xdist); TIER_K=EXPR selects rows (pytest -k);
#                  TIER_TIMEOUT=S stops the rest after S seconds, keeping what finished; the results JSON goes to
#                  $OUT/gpu_tier_<N>gpu.json (copy it to benchmarks/results/)
#   bench          python benchmarks/bench.py: ref-7b, ZeRO-2, micro-batch 4, beside the plain loop
#   bench-mb       the same at micro-batches 2 and 8, and ZeRO-0 / no DeepSpeed at 4 (no plain loop)
#   speed          the speed flags that exist in mmtrain/args.py: packing vs padding on the same
#                  samples, the vision-feature cache over two epochs, torch.compile, all together
#   budget         micro-batches by token budget (--max_tokens_per_batch, BUDGET_TOKENS, default
#                  16384) beside the plain loop's batch search; with MMCA; and the same budget
#                  with the packed rows under SDPA's materialised mask instead of flex attention
#   budget-seq2048 the same budget with every sample 2048 tokens, beside the plain loop's batch search
#   anyres         budget's mix with AnyRes tiles (--anyres_max_tiles 4: each image 672x672 px, the whole image and
#                  2x2 tiles, 2,928 image tokens) beside the plain loop on the same token sequences, then budget's
#                  first run (one 336 px image) for the tiled run's ratio to it, all on this machine
#   mmca           benchmarks/mmca_step_time.py with its ref-7b options
#   dpo            benchmarks/dpo_bench.py: ref-7b LoRA DPO on 2048-token image pairs, mmtrain's --objective dpo
#                  beside trl.DPOTrainer on transformers' LLaVA with the same weights, LoRA and pairs, each at the
#                  largest batch of pairs that fits (a search from DPO_MMTRAIN_BATCH, default 4, and DPO_TRL_BATCH,
#                  default 16; DPO_ARGS adds options); one JSON, about 8 minutes on one H200
#   dpo-halves     mmtrain's side of dpo alone with --dpo_share_prompt false (each pair's halves as rows)
#   dpo-gc         mmtrain's side of dpo alone with --gradient_checkpointing true (the search from DPO_MMTRAIN_GC_BATCH,
#                  default 16): beside the dpo JSON's TRL row, at checkpointing on both sides
#   attention      benchmarks/attention_kernels.py: packed-row attention kernels (flex and its options,
#                  FlashAttention-2 varlen, cuDNN dense) on one 16,384-token row, 2048-token samples and the mix
#   varlen[:W]     fp8's budget runs (W: seq2048, mix, or both) with packed rows through flex attention and
#                  FlashAttention-2's varlen kernel (--packed_attention flex_attention, flash_varlen)
#   fp8[:W]        the frozen base in float8 (--fp8_base) on one GPU of compute capability >= 8.9:
#                  budget-seq2048's and budget's first runs (BUDGET_TOKENS; W: seq2048, mix, or both)
#                  with --fp8_base, profiled; each JSON also holds the plain loop's batch search and
#                  mmtrain in bfloat16 on the same samples
#   equal-segments budget-seq2048's float8 run (BUDGET_TOKENS) three ways, each row of equal samples through:
#                  cuDNN's dense causal kernel (the default), SDPA's own choice (--equal_segments_attention sdpa),
#                  and flex attention's document mask (--packed_attention flex_attention);
#                  EQUAL_ORDER reorders them (default "cudnn sdpa flex"), EQUAL_PROFILE=NAME profiles that one
#   fp8-zero       budget-seq2048's float8 run (BUDGET_TOKENS) at each of FP8_STAGES (default "2 0 none":
#                  ZeRO-2, ZeRO-0, no DeepSpeed): what ZeRO-2's per-tensor gradient copies cost on one GPU;
#                  FP8_VISION=1 adds the ZeRO-2 run with --fp8_vision (the vision tower's Linears in float8)
#   default-fp8    benchmarks/default_run.py twice side by side: the embedded default, and with --fp8_base
#   fp8-quality    benchmarks/fp8_quality.py: ref-7b's LM trained 100 steps bf16 beside float8 on the
#                  same fresh batches of one Markov chain, the per-step relative loss difference
#                  (target <= 1%); FP8_LAYERS=N keeps N decoder layers (default: all 32)
#   nf4-quality    benchmarks/fp8_quality.py --base nf4: the same 100 steps bf16 beside a 4-bit NF4 base
#                  (--quantize_base nf4), with 6 outlier channels planted (NF4_OUTLIERS=N; FP8_LAYERS=N to cut)
#   small-gpu      benchmarks/small_gpu.py: ref-7b with mmtrain.memory's recommended setting under caps of
#                  12, 16, 24 and 48 GiB (torch.cuda.set_per_process_memory_fraction), peaks and tokens/s, ~8 min
#                  (SMALL_GPU_CAPS="12 16" for some caps)
#   seq2048        every sample 2048 tokens: the defaults beside the plain loop (profiled), then
#                  eager (no compile) with and without fused LoRA, and eager with MMCA on
#   variants       2048 tokens at micro-batch 6 beside the plain loop (profiled), at ZeRO-0, MMCA
#                  compiled; the mix over 2 epochs
#   scaling:S:W    ZeRO stage S on one and on two GPUs (SCALE_COUNTS, default "1 2"), workload W: mix (one image +
#                  64-1024 text tokens, micro-batch 8), seq2048 (micro-batch 6), ref13b (llama-2-13b + ViT-bigG, perceiver)
#   zero3-prefetch ZeRO-3, 2048-token samples, micro-batch 6, on SCALE_COUNTS GPUs (default 2) at each
#                  of PREFETCH_SIZES (DeepSpeed's stage3_prefetch_bucket_size; default "5e7 2.2e8 4.5e8":
#                  DeepSpeed's default, one and two of ref-7b's decoder layers)
#   sp[:R]         benchmarks/sequence_parallel.py on two GPUs (needs 2; H200s: the split run needs ~100 GiB each): ref-7b,
#                  samples of 32k tokens with 8 images, --sequence_parallel_size 2 against one GPU. R: memory (no checkpointing:
#                  one GPU runs out of memory, two train; tokens/s per GPU), loss (checkpointing on both: the losses agree
#                  within 1e-3), or all (both, ~10 min); SP_TOKENS=N changes the sample length
#   memory[:ROWS]  benchmarks/memory_validation.py (ROWS: all, 0-7, 8-15, 0,3,...)
#   memory-full[:ROWS]  the same for 7B with the whole LM trained (LLaVA's stage 2), ZeRO-3 on
#                  two GPUs through torchrun (rows 0-2; needs a machine with two GPUs)
#
# When DeepSpeed or its needs are missing (einops: its Ulysses attention, for the sp part and the
# sequence-parallel tier rows), the wheels in .whl/ are installed into /tmp/site,
# put first on PYTHONPATH. Results go to $OUT (default outputs/gpu_suite,
# which git ignores); copy the ones to keep into benchmarks/results/.
#
# SMOKE=1 runs every part on the tiny presets (a CPU dry run of the suite itself).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_suite}
mkdir -p "$OUT"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    BENCH=(--lm tiny-llama --vision tiny-clip --steps 2 --warmup 1 --text_tokens 16 48 --plain_batches 2)
    FULL=(--text_tokens 48 48)
    MMCA=(--preset tiny-llama --seq 256 --image_tokens 64 --dtype fp32 --device cpu --warmup 1 --repeats 2)
    MEM=(--smoke)
    DPO=(--smoke)
else
    BENCH=(--num_workers "${BENCH_WORKERS:-4}")  # loader workers for mmtrain and the plain loop alike
    FULL=(--text_tokens 1470 1470)
    MMCA=(--preset llama-2-7b --layers 4 --seq 2048 --image_tokens 576 --dtype bf16 --device cuda)
    MEM=()
    DPO=(--num_workers "${BENCH_WORKERS:-4}" --mmtrain_batch "${DPO_MMTRAIN_BATCH:-4}" --trl_batch "${DPO_TRL_BATCH:-16}")
fi
# DPO_ARGS: more options of benchmarks/dpo_bench.py (e.g. "--max_batch 32 --mmtrain_max_batch 8 --steps 3")
read -r -a _dpo_args <<< "${DPO_ARGS:-}"
DPO+=("${_dpo_args[@]}")

missing() {  # the needed packages Python cannot import with PYTHONPATH=$1
    PYTHONPATH=$1 python3 -c "import importlib.util as u; print(' '.join(m for m in ('deepspeed', 'hjson', 'pydantic', 'einops', 'datasets', 'trl', 'bitsandbytes') if u.find_spec(m) is None))"
}
if [ -n "$(missing "${PYTHONPATH:-}")" ] && [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    # Several suite invocations may start side by side (one per GPU): one installs, under a
    # lock, and the others find the packages there and only put /tmp/site on the path.
    (
        flock 9
        absent=$(missing /tmp/site)
        if [ -n "$absent" ]; then
            echo "installing the carried wheels (missing: $absent)"
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        fi
    ) 9>/tmp/mmtrain-wheels.lock || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# DeepSpeed's op builder cannot parse arch lists such as "9.0a"; it compiles CPU Adam on first use.
export TORCH_CUDA_ARCH_LIST=${MMTRAIN_CUDA_ARCH:-9.0}
export DS_BUILD_OPS=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# NVLink multicast stays off, also in processes that set up their own environment.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=python3

TAG=$($PY -c "
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
for short in ('h100', 'h200', 'a100'):
    if short in name.lower():
        print(short); break
else:
    print(re.sub('[^a-z0-9]+', '_', name.lower()).strip('_'))
")

has_flag() { grep -q "^    $1: " mmtrain/args.py; }

run() {  # run a command, say how long it took and how it ended
    echo "+ $*"
    local start=$SECONDS
    "$@"
    local rc=$?
    echo "= rc $rc in $((SECONDS - start)) s: $*"
    return $rc
}

part_env() {
    $PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("transformers", "peft", "accelerate", "deepspeed", "pydantic", "datasets"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
EOF
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv || true
    echo "flags in mmtrain/args.py:"; for f in packing cache_vision_features torch_compile gradient_checkpointing_layers; do has_flag $f && echo "  --$f"; done
}

part_tier() {
    local gpus rows jobs select
    gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    if [ "$gpus" = 0 ]; then
        echo "no CUDA device on this machine: every GPU-tier row is skipped (nothing was tested on a GPU)"
        $PY -m pytest -q -rs tests/gpu
        return $?
    fi
    rows=${TIER_ROWS:-auto}
    select=()
    if [ "$rows" = auto ]; then
        if [ "$gpus" -ge 2 ]; then select=(-k "not test_one_gpu and not 1gpu"); else select=(-k "test_one_gpu or 1gpu"); fi
    fi
    [ -n "${TIER_K:-}" ] && select=(-k "$TIER_K")
    jobs=${TIER_JOBS:-6}
    local n=$gpus; [ "$n" -gt 2 ] && n=2
    # TIER_TIMEOUT: stop the rows still running after that many seconds with SIGINT, so that
    # pytest still writes the results of the rows that finished.
    local limit=()
    [ -n "${TIER_TIMEOUT:-}" ] && limit=(timeout -s INT "$TIER_TIMEOUT")
    MMTRAIN_GPU_RESULTS="$OUT/gpu_tier_${n}gpu.json" MMTRAIN_GPU_COMMAND="bash benchmarks/gpu_suite.sh tier" \
        run "${limit[@]}" $PY -m pytest -q -rs -p xdist -n "$jobs" --dist load "${select[@]}" tests/gpu
}

part_bench() {
    run $PY benchmarks/bench.py "${BENCH[@]}" --out "$OUT/bench_${TAG}.json"
}

part_bench_mb() {
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --micro_batch 8 --profile off --out "$OUT/bench_${TAG}_mb8.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --micro_batch 2 --profile off --out "$OUT/bench_${TAG}_mb2.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --zero_stage 0 --profile off --out "$OUT/bench_${TAG}_zero0.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --zero_stage none --profile off --out "$OUT/bench_${TAG}_nods.json"
}

part_speed() {
    local any=0
    if has_flag packing; then
        any=1
        # Packed on the same samples as the padded `bench` part (same seed), at its micro-batch of 4 samples and at 6.
        run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --packing --out "$OUT/speed_${TAG}_packed_mb4.json"
        run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --micro_batch 6 --packing --out "$OUT/speed_${TAG}_packed_mb6.json"
    fi
    if has_flag cache_vision_features; then
        any=1
        run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --epochs 2 --out "$OUT/speed_${TAG}_nocache_2ep.json"
        run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --epochs 2 --cache_vision_features --out "$OUT/speed_${TAG}_cache_2ep.json"
    fi
    if has_flag torch_compile; then
        any=1
        run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --warmup 6 --torch_compile true --out "$OUT/speed_${TAG}_compile.json"
        has_flag packing && has_flag cache_vision_features && run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --warmup 6 \
            --torch_compile true --packing --cache_vision_features --epochs 2 --out "$OUT/speed_${TAG}_all_2ep.json"
    fi
    [ $any = 1 ] || echo "no speed flags in mmtrain/args.py yet"
}

part_budget() {
    has_flag max_tokens_per_batch || { echo "no --max_tokens_per_batch in mmtrain/args.py"; return 0; }
    local t=${BUDGET_TOKENS:-16384}
    [ "$SMOKE" = 1 ] && t=512
    run $PY benchmarks/bench.py "${BENCH[@]}" --max_tokens_per_batch "$t" --out "$OUT/budget_${TAG}_${t}.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --max_tokens_per_batch "$t" --enable_mmca_attention \
        --out "$OUT/budget_${TAG}_${t}_mmca.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile on --max_tokens_per_batch "$t" --packed_attention sdpa \
        --out "$OUT/budget_${TAG}_${t}_sdpa.json"
}

part_anyres() {
    local t=${BUDGET_TOKENS:-16384}
    [ "$SMOKE" = 1 ] && t=512
    run $PY benchmarks/bench.py "${BENCH[@]}" --max_tokens_per_batch "$t" --anyres_max_tiles 4 --out "$OUT/budget_${TAG}_${t}_anyres4.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --max_tokens_per_batch "$t" --out "$OUT/budget_${TAG}_${t}_untiled.json"
}

part_budget_seq2048() {
    has_flag max_tokens_per_batch || { echo "no --max_tokens_per_batch in mmtrain/args.py"; return 0; }
    local t=${BUDGET_TOKENS:-16384}
    [ "$SMOKE" = 1 ] && t=512
    run $PY benchmarks/bench.py "${BENCH[@]}" "${FULL[@]}" --max_tokens_per_batch "$t" --out "$OUT/budget_${TAG}_${t}_seq2048.json"
}

part_seq2048() {
    local b=("${BENCH[@]}" "${FULL[@]}")
    run $PY benchmarks/bench.py "${b[@]}" --profile on --out "$OUT/bench_${TAG}_seq2048.json"
    run $PY benchmarks/bench.py "${b[@]}" --plain skip --profile off --torch_compile false --out "$OUT/speed_${TAG}_seq2048_eager.json"
    run $PY benchmarks/bench.py "${b[@]}" --plain skip --profile off --torch_compile false --fused_lora false --out "$OUT/speed_${TAG}_seq2048_eager_unfused.json"
    run $PY benchmarks/bench.py "${b[@]}" --plain skip --profile off --torch_compile false --enable_mmca_attention --out "$OUT/speed_${TAG}_seq2048_eager_mmca.json"
}

part_variants() {
    local b=("${BENCH[@]}" "${FULL[@]}")
    run $PY benchmarks/bench.py "${b[@]}" --micro_batch 6 --profile on --out "$OUT/bench_${TAG}_seq2048_mb6.json"
    run $PY benchmarks/bench.py "${b[@]}" --plain skip --profile off --zero_stage 0 --out "$OUT/speed_${TAG}_seq2048_zero0.json"
    run $PY benchmarks/bench.py "${b[@]}" --plain skip --profile off --enable_mmca_attention --torch_compile true --out "$OUT/speed_${TAG}_seq2048_mmca_compiled.json"
    run $PY benchmarks/bench.py "${BENCH[@]}" --plain skip --profile off --epochs 2 --out "$OUT/speed_${TAG}_2ep.json"
}

part_scaling() {  # scaling:STAGE:WORKLOAD, e.g. scaling:2:mix — mmtrain on one and on two processes (one GPU each)
    local stage=$1 workload=$2 b=("${BENCH[@]}")
    case $workload in
        mix) b+=(--micro_batch 8) ;;
        seq2048) b+=("${FULL[@]}" --micro_batch 6) ;;
        ref13b) b+=(--lm llama-2-13b --vision clip-vit-bigG-14 --projector perceiver --micro_batch 4) ;;
        *) echo "unknown workload: $workload"; return 2 ;;
    esac
    run $PY benchmarks/bench.py "${b[@]}" --plain skip --profile off --zero_stage "$stage" --num_processes ${SCALE_COUNTS:-1 2} \
        --out "$OUT/scaling_${TAG}_zero${stage}_${workload}.json"
}

part_zero3_prefetch() {  # ZeRO-3 at 2048 tokens on two GPUs, DeepSpeed's prefetch bucket from its default up
    local sizes=${PREFETCH_SIZES:-"5e7 2.2e8 4.5e8"} n
    for n in $sizes; do
        run $PY benchmarks/bench.py "${BENCH[@]}" "${FULL[@]}" --micro_batch 6 --plain skip --profile off --zero_stage 3 \
            --num_processes ${SCALE_COUNTS:-2} --deepspeed_set "zero_optimization.stage3_prefetch_bucket_size=$n" \
            --out "$OUT/scaling_${TAG}_zero3_seq2048_prefetch_${n}.json"
    done
}

fp8_problem() {  # why float8 cannot run here (empty: it can)
    $PY -c "from mmtrain.model import fp8; import torch; print(fp8.float8_matmul_problem('cuda' if torch.cuda.is_available() else 'cpu') or '')"
}

fp8_flag() {  # --fp8_base where float8 can run, nothing elsewhere (the parts that run either way)
    [ -z "$(fp8_problem)" ] && echo --fp8_base
}

fp8_runs_here() {  # fp8_runs_here PART: whether float8 can run here; if not, says why PART is skipped
    local why; why=$(fp8_problem)
    [ -z "$why" ] && return 0
    echo "$1 skipped: float8 tensor cores are needed, but $why"
    return 1
}

part_fp8() {  # fp8[:seq2048|:mix]
    has_flag fp8_base || { echo "no --fp8_base in mmtrain/args.py"; return 0; }
    fp8_runs_here fp8 || return 0
    local t=${BUDGET_TOKENS:-16384} which=${1:-all} plain=()
    # PLAIN_BATCHES="6": the plain loop's batch search from 6 (where an earlier search on this GPU found 8 out of memory)
    [ -n "${PLAIN_BATCHES:-}" ] && plain=(--plain_batches $PLAIN_BATCHES)
    # The budget parts' samples, batches and workers with the float8 base; each JSON also holds
    # the plain loop's batch search and mmtrain in bfloat16 on the same samples (bench.py).
    if [ "$which" = all ] || [ "$which" = seq2048 ]; then
        run $PY benchmarks/bench.py "${BENCH[@]}" "${FULL[@]}" --max_tokens_per_batch "$t" --fp8_base --profile on "${plain[@]}" \
            --out "$OUT/budget_${TAG}_${t}_seq2048_fp8.json"
    fi
    if [ "$which" = all ] || [ "$which" = mix ]; then
        run $PY benchmarks/bench.py "${BENCH[@]}" --max_tokens_per_batch "$t" --fp8_base --profile on "${plain[@]}" \
            --out "$OUT/budget_${TAG}_${t}_fp8.json"
    fi
}

part_fp8_zero() {  # fp8-zero: the float8 2048-token budget run at ZeRO-2 (the default), ZeRO-0 and without DeepSpeed
    fp8_runs_here fp8-zero || return 0
    local t=${BUDGET_TOKENS:-16384} stage
    for stage in ${FP8_STAGES:-2 0 none}; do
        run $PY benchmarks/bench.py "${BENCH[@]}" "${FULL[@]}" --max_tokens_per_batch "$t" --fp8_base --zero_stage "$stage" \
            --plain skip --bf16_baseline skip --profile off --out "$OUT/budget_${TAG}_${t}_seq2048_fp8_zero${stage}.json"
    done
    # The vision tower's frozen Linears in float8 too (--fp8_vision), at ZeRO-2: beside the first run above.
    [ -n "${FP8_VISION:-}" ] && run $PY benchmarks/bench.py "${BENCH[@]}" "${FULL[@]}" --max_tokens_per_batch "$t" --fp8_base --fp8_vision \
        --plain skip --bf16_baseline skip --profile off --out "$OUT/budget_${TAG}_${t}_seq2048_fp8_vision.json"
    return 0
}

part_equal_segments() {  # equal-segments: the attention of rows of equal samples, three ways, one after another
    local t=${BUDGET_TOKENS:-16384} way extra profile choice
    [ "$SMOKE" = 1 ] && t=512
    extra=($(fp8_flag))
    for way in ${EQUAL_ORDER:-cudnn sdpa flex}; do
        profile=off; [ "${EQUAL_PROFILE:-}" = "$way" ] && profile=on
        case $way in
            cudnn) choice=() ;;
            sdpa) choice=(--equal_segments_attention sdpa) ;;
            flex) choice=(--packed_attention flex_attention) ;;
            *) echo "equal-segments: unknown way $way"; return 2 ;;
        esac
        run $PY benchmarks/bench.py "${BENCH[@]}" "${FULL[@]}" --max_tokens_per_batch "$t" "${extra[@]}" "${choice[@]}" \
            --plain skip --bf16_baseline skip --profile $profile --out "$OUT/budget_${TAG}_${t}_seq2048_equal_${way}.json"
    done
}

part_varlen() {  # varlen[:seq2048|:mix]: the float8 budget runs with flex attention and each variable-length kernel
    local t=${BUDGET_TOKENS:-16384} which=${1:-all} kernel workload extra samples
    [ "$SMOKE" = 1 ] && t=512
    extra=($(fp8_flag))
    for workload in seq2048 mix; do
        [ "$which" = all ] || [ "$which" = "$workload" ] || continue
        samples=(); [ "$workload" = seq2048 ] && samples=("${FULL[@]}")
        for kernel in flex_attention flash_varlen; do
            run $PY benchmarks/bench.py "${BENCH[@]}" "${samples[@]}" --max_tokens_per_batch "$t" --packed_attention "$kernel" "${extra[@]}" \
                --plain skip --bf16_baseline skip --profile off --out "$OUT/budget_${TAG}_${t}_${workload}_${kernel}.json"
        done
    done
}

part_fp8_quality() {
    fp8_runs_here fp8-quality || return 0
    local layers=()
    [ -n "${FP8_LAYERS:-}" ] && layers=(--layers "$FP8_LAYERS")
    run $PY benchmarks/fp8_quality.py "${layers[@]}" --out "$OUT/fp8_quality_${TAG}.json"
}

part_nf4_quality() {
    local layers=()
    [ -n "${FP8_LAYERS:-}" ] && layers=(--layers "$FP8_LAYERS")
    run $PY benchmarks/fp8_quality.py --base nf4 --outlier_channels "${NF4_OUTLIERS:-6}" "${layers[@]}" --out "$OUT/nf4_quality_${TAG}.json"
}

part_small_gpu() {  # SMALL_GPU_CAPS="12 16" runs those caps only (each cap its own process, ~2 min on an H200)
    local opts=(--caps ${SMALL_GPU_CAPS:-12 16 24 48})
    [ "$SMOKE" = 1 ] && opts=(--caps 12 --steps 2 --warmup 1)
    local name=small_gpu_${TAG}
    [ -n "${SMALL_GPU_CAPS:-}" ] && name+="_${SMALL_GPU_CAPS// /_}"
    run $PY benchmarks/small_gpu.py "${opts[@]}" --out "$OUT/$name.json"
}

part_default_fp8() {  # the embedded default, bfloat16 and with --fp8_base, side by side on this GPU
    fp8_runs_here default-fp8 || return 0
    run $PY benchmarks/default_run.py --out "$OUT/default_run_${TAG}.json" &
    run $PY benchmarks/default_run.py --out "$OUT/default_run_${TAG}_fp8.json" -- --fp8_base &
    wait
}

part_attention() {
    local docs
    for docs in 2048 mix; do
        run $PY benchmarks/attention_kernels.py --docs $docs --out "$OUT/attention_kernels_${TAG}_${docs}.json"
    done
}

part_mmca() {
    run $PY benchmarks/mmca_step_time.py "${MMCA[@]}" --output "$OUT/mmca_step_time_${TAG}.json"
}

part_dpo() {
    run $PY benchmarks/dpo_bench.py "${DPO[@]}" --out "$OUT/dpo_bench_${TAG}.json"
}

part_dpo_halves() {  # mmtrain's side alone with each pair's two halves as rows (--dpo_share_prompt false): what sharing gains
    run $PY benchmarks/dpo_bench.py "${DPO[@]}" --systems mmtrain --dpo_share_prompt false --out "$OUT/dpo_bench_${TAG}_mmtrain_halves.json"
}

part_dpo_gc() {
    local first=${DPO_MMTRAIN_GC_BATCH:-16}
    [ "$SMOKE" = 1 ] && first=2
    run $PY benchmarks/dpo_bench.py "${DPO[@]}" --systems mmtrain --mmtrain_batch "$first" --gradient_checkpointing true \
        --out "$OUT/dpo_bench_${TAG}_mmtrain_gc.json"
}

part_sp() {  # sp[:memory|:loss|:all]
    local runs=${1:-all} extra=()
    [ "$SMOKE" = 1 ] && extra=(--smoke)
    run $PY benchmarks/sequence_parallel.py "${extra[@]}" --runs "$runs" --tokens "${SP_TOKENS:-32768}" \
        --out "$OUT/sequence_parallel_${TAG}_${runs}.json"
}

part_memory() {
    local rows=${1:-all}
    run $PY benchmarks/memory_validation.py "${MEM[@]}" --rows "$rows" --out "$OUT/memory_${TAG}_rows_${rows//,/_}.json"
}

part_memory_full() {
    local rows=${1:-all}
    run $PY benchmarks/memory_validation.py "${MEM[@]}" --workload full-7b --rows "$rows" --out "$OUT/memory_full_7b_${TAG}_2gpu_rows_${rows//,/_}.json"
}

[ $# -gt 0 ] || set -- env bench mmca
status=0
for part in "$@"; do
    echo "=== $part ($(date -u +%H:%M:%S))"
    case $part in
        env) part_env ;;
        tier) part_tier ;;
        bench) part_bench ;;
        bench-mb) part_bench_mb ;;
        speed) part_speed ;;
        mmca) part_mmca ;;
        dpo) part_dpo ;;
        dpo-gc) part_dpo_gc ;;
        dpo-halves) part_dpo_halves ;;
        attention) part_attention ;;
        fp8) part_fp8 all ;;
        fp8:*) part_fp8 "${part#fp8:}" ;;
        fp8-quality) part_fp8_quality ;;
        fp8-zero) part_fp8_zero ;;
        nf4-quality) part_nf4_quality ;;
        small-gpu) part_small_gpu ;;
        equal-segments) part_equal_segments ;;
        varlen) part_varlen all ;;
        varlen:*) part_varlen "${part#varlen:}" ;;
        zero3-prefetch) part_zero3_prefetch ;;
        default-fp8) part_default_fp8 ;;
        budget) part_budget ;;
        budget-seq2048) part_budget_seq2048 ;;
        anyres) part_anyres ;;
        seq2048) part_seq2048 ;;
        variants) part_variants ;;
        scaling:*:*) IFS=: read -r _ stage workload <<< "$part"; part_scaling "$stage" "$workload" ;;
        sp) part_sp all ;;
        sp:*) part_sp "${part#sp:}" ;;
        memory) part_memory all ;;
        memory:*) part_memory "${part#memory:}" ;;
        memory-full) part_memory_full all ;;
        memory-full:*) part_memory_full "${part#memory-full:}" ;;
        *) echo "unknown part: $part"; status=2; continue ;;
    esac
    rc=$?
    [ $rc = 0 ] || status=$rc
done
echo "=== done ($(date -u +%H:%M:%S)), status $status; files in $OUT:"
ls -la "$OUT"
exit $status
