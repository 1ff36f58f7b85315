#!/usr/bin/env bash
# gpu_check.sh: every CUDA check of the project in one go, for a machine with a GPU.
#
#   bash benchmarks/gpu_check.sh [--rehearse] [OUT_DIR]      (OUT_DIR default: ${OUT:-gpu_check_out})
#
# It starts by printing torch's version, torch.cuda.is_available(), the device and nvidia-smi's
# one-line summary, then runs the steps below one after the other, each under its own `timeout`,
# writing each one's table (the benchmarks' --markdown output; pytest's report) and log into
# OUT_DIR. A failed or timed-out step does not stop the run; the closing summary lists every step
# (ok / failed (rc) / timed out / skipped: reason) with the file holding its table, and reads the
# issue's bars off the tables it has. On an H100/H200-class GPU the whole run stays under 8
# minutes: the steps share a budget of GPU_CHECK_BUDGET_S seconds (default 460, the preamble
# included), each step's timeout is its own cap clamped so that every later step keeps at least
# 30 s; a step for which that is no longer possible is skipped ("time budget spent").
#
# Without a CUDA device (a CPU-only machine, CUDA_VISIBLE_DEVICES= empty) it says so, skips every
# step ("skipped: no CUDA device") and exits 0. --rehearse instead runs every step in its
# quickest CPU mode (--quick, --device cpu / the -cpu case), to exercise the plumbing on a CPU.
# Exit status: 0 when every step that ran was ok (or all were skipped for want of a GPU), 1 if any
# failed or timed out, 2 on bad usage.
#
# Steps (GPU mode), what they measure, and the bars of the project's issue they feed
# (README "Tests and benchmarks", docs/PERFORMANCE.md):
#   1 test_cuda             pytest tests/test_cuda.py: the engine on CUDA against the naive loop on
#                           CPU (mean_abs, mean, rms; the fallback parameters; the triton-compiled
#                           kernels) and the model's state left as found. Correctness, no bar.
#   2 bench_saliency        --cases resnet50-b64 --device cuda --reps 5: ResNet-50 224x224 batch 64,
#                           the engine against one plain forward+backward, the per-sample loop
#                           (naive), torch.func vmap, Captum's SampleGradientWrapper, the compiled
#                           kernels and rms. Feeds the bars engine / fwd+bwd <= 1.3 and naive (the
#                           per-sample loop) / engine >= 30 (the script itself prints its older
#                           target, <= 1.5); its engine median also extrapolates the statistics bar
#                           (fit_stats is one engine pass per batch plus a float64 Welford update):
#                           50,000 ImageNet-sized images / 64 x median < 5 minutes.
#   3 bench_stats           --cases resnet18-cuda --reps 2: fit_stats (eager and compiled) against
#                           the per-sample loop and a plain forward+backward, 2048 samples of
#                           3x32x32, batch 256: samples per second, the loop / fit_stats speed-up;
#                           what fit_stats adds to the engine. (Its images are 32x32: the 50,000
#                           ImageNet-image figure comes from step 2, see there.)
#   4 bench_input_saliency  --cases resnet18-cuda --reps 5: the parameter-guided input saliency
#                           against a plain forward+backward (bar on CPU: <= 5x) and the
#                           double-backprop loop, ResNet-18 64x3x32x32.
#   5 bench_transformers    --cases gpt2,llama --device cuda: GPT-2-small shape (12 layers) and the
#                           Llama shape, batch 16 x 128 tokens: the engine against fwd+bwd, the loop,
#                           vmap, Opacus, BackPACK; GPU bar: engine >= 10x faster than the loop at
#                           batch 16.
#   6 bench_spade_r20       bench_spade.py --cases resnet20-32-cuda --reps 2: SPADE's seconds per
#                           sample by phase (1024 views, moments, SparseGPT, OBC, attribution) on
#                           the benchmark's ResNet-20 at 32x32 (the paper: seconds per sample).
#   7 bench_spade_r50       bench_spade.py --cases resnet50-224-cuda --no-obc --reps 1: the same on a
#                           ResNet-50 at 224x224 without OBC (OBC of every row of a ResNet-50 is tens
#                           of minutes per sample even on a GPU: the paper quotes 41 on an RTX 2080;
#                           the script's --r50-rows only bounds the CPU case).
#   8 bench_pruning_curves  --devices cuda: the turn-off test's batched interventions (channel masks,
#                           vmap) against the one-at-a-time loop, trojaned ResNet-20, 2000 images.
# Not run: bench_spade_views.py (CPU only: it times the views on the CPU) and bench_versions.py
# (needs --baseline OTHER_CHECKOUT; no device flag).
#
# Rehearsal (--rehearse): the same steps, CPU only: test_cuda (its tests skip without CUDA),
# bench_saliency --cases resnet18 --device cpu --quick, bench_stats / bench_input_saliency
# --cases resnet18-cpu --quick, bench_transformers --cases gpt2,llama --device cpu --quick,
# bench_spade --quick (which runs resnet20-32-cpu whatever --cases says) with and without OBC,
# bench_pruning_curves --devices cpu --quick. Budget: GPU_CHECK_BUDGET_S, default 3600 there.

set -u

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }

REHEARSE=0
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --rehearse) REHEARSE=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$OUT_ARG" ]; then echo "gpu_check: one output folder only" >&2; exit 2; fi
            OUT_ARG="$arg" ;;
    esac
done
OUT_DIR="${OUT_ARG:-${OUT:-gpu_check_out}}"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac  # relative to the caller's folder

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }

if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python; fi
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

SECONDS=0
if [ "$REHEARSE" = 1 ]; then BUDGET="${GPU_CHECK_BUDGET_S:-3600}"; else BUDGET="${GPU_CHECK_BUDGET_S:-460}"; fi
RESERVE=30   # seconds kept for every later step
KILL_AFTER=5 # timeout -k: a step that ignores SIGTERM is killed this long after
SUMMARY_FILE="$OUT_DIR/summary.txt"

stamp() { printf '%02d:%02d' $((SECONDS / 60)) $((SECONDS % 60)); }
say() { printf '[gpu_check %s] %s\n' "$(stamp)" "$*"; }

# ----------------------------------------------------------------------------------------------
# Preamble: the environment
# ----------------------------------------------------------------------------------------------
say "repository $REPO; output $OUT_DIR; python $PY; mode $([ "$REHEARSE" = 1 ] && echo rehearse || echo gpu)"
say "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-(unset)}"
ENV_FILE="$OUT_DIR/environment.txt"
timeout 120 "$PY" - >"$ENV_FILE" 2>&1 <<'EOF'
import torch
print(f"torch {torch.__version__} (built with CUDA {torch.version.cuda})")
available = torch.cuda.is_available()
print(f"torch.cuda.is_available(): {available}")
if available:
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"device: {names[0]} ({len(names)} visible: {', '.join(names)})")
else:
    print("device: none")
print(f"CUDA_AVAILABLE={int(available)}")
EOF
PY_RC=$?
grep -v '^CUDA_AVAILABLE=' "$ENV_FILE" | sed 's/^/    /'
if [ "$PY_RC" != 0 ]; then
    say "could not import torch with $PY (rc $PY_RC): see above"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    SMI="$(timeout 20 nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total,utilization.gpu \
        --format=csv,noheader 2>&1)"
    SMI_RC=$?
    [ "$SMI_RC" = 0 ] || SMI="nvidia-smi failed (rc $SMI_RC): $SMI"
else
    SMI="not found"
fi
printf '%s\n' "$SMI" | sed 's/^/    nvidia-smi: /'
printf 'nvidia-smi: %s\n' "$SMI" >>"$ENV_FILE"

CUDA=0
grep -qx 'CUDA_AVAILABLE=1' "$ENV_FILE" && CUDA=1
SKIP_ALL=""
if [ "$PY_RC" != 0 ]; then
    SKIP_ALL="torch not importable"
elif [ "$CUDA" = 0 ] && [ "$REHEARSE" = 0 ]; then
    say "no CUDA device: torch.cuda.is_available() is False here; every GPU step is skipped (--rehearse runs them on CPU)"
    SKIP_ALL="no CUDA device"
elif [ "$CUDA" = 0 ]; then
    say "no CUDA device: rehearsal, every step in its quickest CPU mode"
fi

# ----------------------------------------------------------------------------------------------
# Steps: name, cap (seconds, GPU mode), command (GPU mode / rehearsal)
# ----------------------------------------------------------------------------------------------
STEPS=(test_cuda bench_saliency bench_stats bench_input_saliency bench_transformers
       bench_spade_r20 bench_spade_r50 bench_pruning_curves)
CAPS=(75 120 100 75 100 75 60 75)
REHEARSE_CAP=600
N=${#STEPS[@]}

step_command() {  # $1: step name; sets CMD (an array) for the current mode
    local name=$1
    if [ "$REHEARSE" = 0 ]; then
        case "$name" in
            test_cuda) CMD=("$PY" -m pytest tests/test_cuda.py -rA --tb=short -p no:cacheprovider) ;;
            bench_saliency) CMD=("$PY" benchmarks/bench_saliency.py --cases resnet50-b64 --device cuda --reps 5 --markdown) ;;
            bench_stats) CMD=("$PY" benchmarks/bench_stats.py --cases resnet18-cuda --reps 2 --markdown) ;;
            bench_input_saliency) CMD=("$PY" benchmarks/bench_input_saliency.py --cases resnet18-cuda --reps 5 --markdown) ;;
            bench_transformers) CMD=("$PY" benchmarks/bench_transformers.py --cases gpt2,llama --device cuda --markdown) ;;
            bench_spade_r20) CMD=("$PY" benchmarks/bench_spade.py --cases resnet20-32-cuda --reps 2 --markdown) ;;
            bench_spade_r50) CMD=("$PY" benchmarks/bench_spade.py --cases resnet50-224-cuda --no-obc --reps 1 --markdown) ;;
            bench_pruning_curves) CMD=("$PY" benchmarks/bench_pruning_curves.py --devices cuda --markdown) ;;
        esac
    else
        case "$name" in
            test_cuda) CMD=("$PY" -m pytest tests/test_cuda.py -rA --tb=short -p no:cacheprovider) ;;
            bench_saliency) CMD=("$PY" benchmarks/bench_saliency.py --cases resnet18 --device cpu --quick --markdown) ;;
            bench_stats) CMD=("$PY" benchmarks/bench_stats.py --cases resnet18-cpu --quick --markdown) ;;
            bench_input_saliency) CMD=("$PY" benchmarks/bench_input_saliency.py --cases resnet18-cpu --quick --markdown) ;;
            bench_transformers) CMD=("$PY" benchmarks/bench_transformers.py --cases gpt2,llama --device cpu --quick --markdown) ;;
            bench_spade_r20) CMD=("$PY" benchmarks/bench_spade.py --quick --markdown) ;;
            bench_spade_r50) CMD=("$PY" benchmarks/bench_spade.py --quick --no-obc --markdown) ;;
            bench_pruning_curves) CMD=("$PY" benchmarks/bench_pruning_curves.py --devices cpu --quick --markdown) ;;
        esac
    fi
}

STATUS=()
TOOK=()
TABLE=()
FAILED=0

run_step() {  # $1: index
    local i=$1 n=$(($1 + 1)) name=${STEPS[$1]}
    local base
    base="$OUT_DIR/$(printf '%02d' "$n")_$name"
    local table="$base.md" logf="$base.log"
    [ "$name" = test_cuda ] && table="$base.txt"
    TABLE[i]="-"
    TOOK[i]="-"
    if [ -n "$SKIP_ALL" ]; then
        STATUS[i]="skipped: $SKIP_ALL"
        say "step $n/$N $name: ${STATUS[i]}"
        return
    fi
    local cap=${CAPS[$i]}
    [ "$REHEARSE" = 1 ] && cap=$REHEARSE_CAP
    local left=$((BUDGET - SECONDS - KILL_AFTER - RESERVE * (N - n)))
    local limit=$cap
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        STATUS[i]="skipped: time budget spent (${BUDGET}s, GPU_CHECK_BUDGET_S)"
        say "step $n/$N $name: ${STATUS[i]}"
        FAILED=1
        return
    fi
    step_command "$name"
    say "step $n/$N $name: ${CMD[*]#"$REPO/"} (timeout ${limit}s)"
    local started=$SECONDS rc
    if [ "$name" = test_cuda ]; then
        # pytest's report is its stdout: into the table file and onto the terminal
        timeout -k "$KILL_AFTER" "$limit" "${CMD[@]}" 2>&1 | tee "$table" | sed -u 's/^/    | /'
        rc=${PIPESTATUS[0]}
        cp "$table" "$logf"
    else
        # the table is the benchmark's stdout; its progress (stderr) goes to the log and the terminal
        timeout -k "$KILL_AFTER" "$limit" "${CMD[@]}" 2>&1 >"$table" | tee "$logf" | sed -u 's/^/    | /'
        rc=${PIPESTATUS[0]}
    fi
    TOOK[i]="$((SECONDS - started))s"
    TABLE[i]="$table"
    if [ "$rc" = 0 ] && grep -q '(no case ran)' "$table"; then
        STATUS[i]="failed (rc 0, but no case ran)"
        FAILED=1
    elif [ "$rc" = 0 ]; then
        STATUS[i]="ok"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STATUS[i]="timed out (after ${limit}s, rc $rc)"
        FAILED=1
    else
        STATUS[i]="failed (rc $rc)"
        FAILED=1
    fi
    [ -s "$table" ] || TABLE[i]="$table (empty; log: $logf)"
    say "step $n/$N $name: ${STATUS[i]}, ${TOOK[i]}, exit status $rc; table $table"
    if [ "$rc" != 0 ]; then
        say "step $n/$N $name: last lines of $logf:"
        tail -n 8 "$logf" | sed 's/^/    ! /'
    fi
}

for ((i = 0; i < N; i++)); do
    run_step "$i"
done

# ----------------------------------------------------------------------------------------------
# Summary, and the bars read off the tables
# ----------------------------------------------------------------------------------------------
bars() {
    local sal="$OUT_DIR/02_bench_saliency.md" stats="$OUT_DIR/03_bench_stats.md" tf="$OUT_DIR/05_bench_transformers.md"
    if [ -s "$sal" ] && grep -q '| engine |' "$sal"; then
        # columns: | case | method | median ms | min ms | / engine | / fwd+bwd | peak MiB | rel diff |
        awk -F'|' '
            function trim(s) { gsub(/^ +| +$/, "", s); return s }
            $3 ~ /^ *engine *$/ { c = trim($2); eng[c] = trim($4); ratio[c] = trim($7); order[++n] = c }
            $3 ~ /^ *naive *$/ { naive[trim($2)] = trim($6) }
            END {
                for (k = 1; k <= n; k++) {
                    c = order[k]
                    printf "  %s: engine / fwd+bwd = %s (bar <= 1.3), naive / engine = %s (bar >= 30)", c, ratio[c], naive[c]
                    if (c ~ /^resnet50-b64/ && eng[c] + 0 > 0)
                        printf "; 50,000 images / 64 x %s ms = %.0f s of engine passes (bar < 300 s)", eng[c], 50000 / 64 * eng[c] / 1000
                    else if (c !~ /^resnet50-b64/)
                        printf " [not the bars'"'"' case: they are set on resnet50-b64]"
                    printf "\n"
                }
            }' "$sal"
    else
        echo "  bench_saliency: no table, the engine bars are not measured"
    fi
    if [ -s "$stats" ] && grep -q '| fit_stats |' "$stats"; then
        # columns: | case | method | median s | samples/s | naive / this | / fwd+bwd |
        awk -F'|' '
            function trim(s) { gsub(/^ +| +$/, "", s); return s }
            $3 ~ /^ *fit_stats *$/ && trim($5) + 0 > 0 {
                printf "  %s: fit_stats %s samples/s, %s x the loop, %s fwd+bwd; 50,000 of these images in %.0f s\n",
                    trim($2), trim($5), trim($6), trim($7), 50000 / trim($5)
            }' "$stats"
    fi
    if [ -s "$tf" ]; then
        # the script's own summary lines, one per case: on CUDA the bar naive / engine >= 10 at batch 16
        grep -E '^- (encoder|gpt2|llama|long-)' "$tf" | cut -c3- | cut -d';' -f1-2 | sed 's/^/  /'
    fi
}

{
    if [ "$REHEARSE" = 1 ]; then MODE="rehearsal on CPU"; elif [ -n "$SKIP_ALL" ]; then MODE="nothing run: $SKIP_ALL"
    else MODE="GPU run"; fi
    say "summary ($MODE, ${SECONDS}s in all; output $OUT_DIR)"
    for ((i = 0; i < N; i++)); do
        printf '  %d/%d %-22s %-40s %6s  %s\n' $((i + 1)) "$N" "${STEPS[$i]}" "${STATUS[$i]}" "${TOOK[$i]}" "${TABLE[$i]}"
    done
    if [ -z "$SKIP_ALL" ]; then
        say "bars (the issue's; docs/PERFORMANCE.md):"
        bars
    fi
} | tee "$SUMMARY_FILE"

if [ -n "$SKIP_ALL" ] && [ "$SKIP_ALL" != "no CUDA device" ]; then
    exit 1
fi
exit "$FAILED"
