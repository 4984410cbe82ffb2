#!/usr/bin/env bash
# The GPU check, in one command on a machine with an NVIDIA GPU, its driver and PyTorch with CUDA
# (no Rust toolchain, no network needed): a prebuilt binary and the data come from
# scripts/gpu-pack.sh (dist/; --bin FILE also takes FILE.gz, unpacked into --work).
#
#   scripts/gpu-check.sh [--bin dist/frugal-cuda] [--data dist/fashion-mnist] [--out DIR]
#                        [--device cuda|cuda:N|cpu] [--only all|bench|pipeline] [--quick]
#                        [--epochs N] [--labels N] [--limit N] [--test-limit N] [--ft-epochs N]
#                        [--batch B] [--warmup W] [--steps S] [--models "M ..."]
#                        [--torch-models "M ..."] [--work DIR]
#
# 1. bench: `frugal bench speed --model M` for each of --models (default: reference-vae
#    reference-simclr vae simclr score mc-dropout) and `python3 scripts/peer_torch.py M` for each
#    of --torch-models (default: vae simclr score mc-dropout), on --device; each prints a
#    `RESULT key=value ...` line (img_per_s is read). A failing bench is recorded and the others
#    go on. In the table, reference-M is compared with the peer's M; frugal's own vae and simclr
#    steps are shown next to the peer's reference models too (a note says so).
# 2. pipeline: `frugal ssl-pretrain --method simclr --epochs N` (default 8, over all 60,000
#    images), then `frugal finetune --labels N` (default 2000) on that encoder; wall time per stage
#    and the final test accuracy (from the finetune run's summary.json).
#
# Writes to --out (default gpu-check-out; at most 8 files, so that a device machine's $OUT brings
# them all back): gpu-check.md (the summary tables), gpu-check.log (everything printed),
# env.txt (nvidia-smi, CUDA paths), bench.tsv, pipeline.tsv, pretrain-summary.json,
# finetune-summary.json. Run directories and raw outputs go to --work (default
# ${TMPDIR:-/tmp}/frugal-gpu-check).
#
# --quick: a short check (aim: under 5 minutes on a GPU): --warmup 2 --steps 5 for the benches,
# pretraining 1 epoch on the first 5,120 images, finetune 400 labels on that pool, 2,000 test
# images, at most 10 epochs per round. Explicit flags override it. To stay within a 10-minute
# limit per command, run the parts separately: --only bench, then --only pipeline.
#
# A dry run on the CPU (the scripts' plumbing, not a measurement):
#   scripts/gpu-check.sh --bin target/release/frugal --data /usr/share/datasets/fashion-mnist \
#     --device cpu --quick --limit 512 --epochs 1 --labels 60 --test-limit 500 --out /tmp/gc
set -euo pipefail
cd "$(dirname "$0")/.."

bin=dist/frugal-cuda
data=dist/fashion-mnist
out="gpu-check-out"
work=
device=cuda
only=all
quick=
epochs="" labels="" limit="" test_limit="" ft_epochs="" batch="" warmup="" steps=""
models="reference-vae reference-simclr vae simclr score mc-dropout"
torch_models="vae simclr score mc-dropout"
python=${PYTHON:-python3}

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --epochs) epochs=$2; shift 2 ;;
    --labels) labels=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --test-limit) test_limit=$2; shift 2 ;;
    --ft-epochs) ft_epochs=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --torch-models) torch_models=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$only" in all|bench|pipeline) ;; *) echo "gpu-check: --only all|bench|pipeline, not $only" >&2; exit 2 ;; esac
case "$device" in cpu|cuda|cuda:[0-9]*) ;; *) echo "gpu-check: --device cpu|cuda|cuda:N, not $device" >&2; exit 2 ;; esac

if [ -n "$quick" ]; then
  warmup=${warmup:-2} steps=${steps:-5}
  epochs=${epochs:-1} limit=${limit:-5120} labels=${labels:-400}
  test_limit=${test_limit:-2000} ft_epochs=${ft_epochs:-10}
fi
epochs=${epochs:-8}
labels=${labels:-2000}
work=${work:-${TMPDIR:-/tmp}/frugal-gpu-check}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
work=$(cd "$work" && pwd)
data=$(cd "$data" && pwd)
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then # as scripts/gpu-pack.sh packs it
  gzip -dc "$bin.gz" >"$work/frugal-cuda"
  chmod +x "$work/frugal-cuda"
  bin=$work/frugal-cuda
fi
[ -x "$bin" ] || { echo "gpu-check: no executable $bin or $bin.gz (scripts/gpu-pack.sh makes them)" >&2; exit 1; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

log=$out/gpu-check.log
: >"$log"
exec > >(tee -a "$log") 2>&1

say() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# step OUTFILE CMD...: prints CMD, runs it with its output shown and kept in OUTFILE; sets RC
# (its exit status) and SECS (wall seconds). Never stops the script.
step() {
  local file=$1 t0
  shift
  say "+ $*"
  t0=$(now)
  set +e
  "$@" 2>&1 | tee "$file"
  RC=${PIPESTATUS[0]}
  set -e
  SECS=$(since "$t0")
  if [ "$RC" -eq 0 ]; then say "ok in $SECS s"; else say "FAILED (exit $RC) after $SECS s"; fi
}

# The images-per-second figure of the last `RESULT ...` line of FILE (the first key found among
# the usual spellings), or nothing.
rate() {
  grep '^RESULT ' "$1" 2>/dev/null | tail -1 | tr ' ' '\n' | awk -F= '
    $1 == "img_per_s" || $1 == "images_per_second" || $1 == "images_per_s" ||
    $1 == "imgs_per_s" || $1 == "img_s" || $1 == "throughput" { print $2; exit }'
}

say "gpu-check: device $device, binary $bin, data $data, out $out, work $work${quick:+, quick}"

# --- The machine, and what burn's CUDA backend needs at run time --------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "binary: $bin ($("$bin" --version 2>&1 || true))"
} >"$out/env.txt"
gpu="(none)"
if [[ $device == cuda* ]]; then
  if command -v nvidia-smi >/dev/null; then
    say "+ nvidia-smi"
    nvidia-smi 2>&1 | tee -a "$out/env.txt" || true
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)
  else
    say "nvidia-smi not found"
  fi
  # burn's CUDA backend compiles its kernels at run time with NVRTC and includes the CUDA headers:
  # find a toolkit, else PyTorch's CUDA wheels, for both.
  if [ -z "${CUDA_PATH:-}" ]; then
    for d in /usr/local/cuda /opt/cuda; do
      if [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_PATH=$d; break; fi
    done
  fi
  if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    torch_libs=$("$python" - 2>/dev/null <<'PY' || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for f in sorted(glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so*"), recursive=True)):
        print(os.path.dirname(f))
PY
)
    for d in "${CUDA_PATH:-/usr/local/cuda}/lib64" "${CUDA_PATH:-/usr/local/cuda}/lib" $torch_libs; do
      if compgen -G "$d/libnvrtc.so*" >/dev/null; then
        export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        break
      fi
    done
  fi
  {
    echo "gpu: $gpu"
    echo "CUDA_PATH=${CUDA_PATH:-}"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo none)"
    echo "torch: $("$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1 | tail -1)"
  } >>"$out/env.txt"
  say "CUDA_PATH=${CUDA_PATH:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
fi

# --- 1. Speed: ours next to PyTorch's ----------------------------------------------------------
if [ "$only" != pipeline ]; then
  printf 'side\tmodel\tstatus\tseconds\timages_per_second\tresult\n' >"$out/bench.tsv"
  bench_opts=()
  [ -n "$batch" ] && bench_opts+=(--batch "$batch")
  [ -n "$warmup" ] && bench_opts+=(--warmup "$warmup")
  [ -n "$steps" ] && bench_opts+=(--steps "$steps")
  record() { # side model file
    local status=ok result
    [ "$RC" -eq 0 ] || status="failed (exit $RC)"
    result=$(grep '^RESULT ' "$3" 2>/dev/null | tail -1 || true)
    [ -n "$result" ] || [ "$RC" -ne 0 ] || status="no RESULT line"
    # Else the reason: the first error line, or the last line.
    [ -n "$result" ] || result=$(grep -m1 -E '^error|Error|Traceback|panicked' "$3" | cut -c1-200 || true)
    [ -n "$result" ] || result=$(grep -v '^\s*$' "$3" | tail -1 | cut -c1-200 || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$status" "$SECS" "$(rate "$3")" "$result" >>"$out/bench.tsv"
  }
  for m in $models; do
    f=$work/bench-ours-$m.txt
    step "$f" "$bin" bench speed --model "$m" --device "$device" --data-dir "$data" "${bench_opts[@]}"
    record ours "$m" "$f"
  done
  for m in $torch_models; do
    f=$work/bench-torch-$m.txt
    # The peer takes `M [batch] [warmup] [steps]` (its defaults: batch 1024 for scoring, else 256;
    # warm-up 5; 30 steps).
    torch_opts=()
    if [ -n "$batch$warmup$steps" ]; then
      case "$m" in score|mc-dropout) b=1024 ;; *) b=256 ;; esac
      torch_opts=("${batch:-$b}" "${warmup:-5}" "${steps:-30}")
    fi
    step "$f" "$python" scripts/peer_torch.py "$m" "${torch_opts[@]}" --device "$device" --data-dir "$data"
    record torch "$m" "$f"
  done
fi

# --- 2. The pipeline: SimCLR pretraining, then finetune ----------------------------------------
if [ "$only" != bench ]; then
  printf 'stage\tstatus\twall_seconds\tcommand\n' >"$out/pipeline.tsv"
  rm -f "$out/pretrain-summary.json" "$out/finetune-summary.json"
  runs=$work/runs
  rm -rf "$runs/gpu-simclr" "$runs/gpu-finetune"
  pre=(ssl-pretrain --method simclr --device "$device" --epochs "$epochs" --data-dir "$data"
       --checkpoints "$runs" --run gpu-simclr)
  [ -n "$limit" ] && pre+=(--limit "$limit")
  step "$work/pretrain.txt" "$bin" "${pre[@]}"
  status=ok; [ "$RC" -eq 0 ] || status="failed (exit $RC)"
  printf 'ssl-pretrain\t%s\t%s\t%s\n' "$status" "$SECS" "frugal ${pre[*]}" >>"$out/pipeline.tsv"
  cp "$runs/gpu-simclr/summary.json" "$out/pretrain-summary.json" 2>/dev/null || true
  if [ "$RC" -eq 0 ]; then
    ft=(finetune --encoder "$runs/gpu-simclr" --labels "$labels" --device "$device" --data-dir "$data"
        --checkpoints "$runs" --run gpu-finetune)
    [ -n "$limit" ] && ft+=(--limit "$limit")
    [ -n "$test_limit" ] && ft+=(--test-limit "$test_limit")
    [ -n "$ft_epochs" ] && ft+=(--epochs "$ft_epochs")
    if [ "$labels" -lt 400 ]; then # tiny budgets (dry runs): three purchases
      third=$(( labels / 3 > 0 ? labels / 3 : 1 ))
      ft+=(--initial "$third" --per-round "$third")
    fi
    step "$work/finetune.txt" "$bin" "${ft[@]}"
    status=ok; [ "$RC" -eq 0 ] || status="failed (exit $RC)"
    printf 'finetune\t%s\t%s\t%s\n' "$status" "$SECS" "frugal ${ft[*]}" >>"$out/pipeline.tsv"
    cp "$runs/gpu-finetune/summary.json" "$out/finetune-summary.json" 2>/dev/null || true
  else
    printf 'finetune\tskipped (pretraining failed)\t\t\n' >>"$out/pipeline.tsv"
  fi
fi

# --- The summary -------------------------------------------------------------------------------
# The sentences about the two runs, from their summary.json files (written by frugal).
run_lines() {
  "$python" - "$out/pretrain-summary.json" "$out/finetune-summary.json" <<'PY' 2>/dev/null || true
import json, os, sys
pre, ft = sys.argv[1], sys.argv[2]
if os.path.exists(pre):
    p = json.load(open(pre))
    dash = ", ".join(f"{k} {v:.4f}" for k, v in sorted(p.get("dashboard", {}).items()))
    print(f"Pretraining: {p.get('epochs')} epochs over {p.get('images')} images, "
          f"{p.get('train_seconds', 0):.1f} s in training steps, "
          f"{p.get('images_per_second', 0):.0f} images/s; device {p.get('device')}"
          + (f"; dashboard: {dash}" if dash else "") + ".")
    print()
if os.path.exists(ft):
    f = json.load(open(ft))
    print(f"**Final test accuracy: {100 * f['test_accuracy']:.2f}%** ({f.get('labels_bought')} labels "
          f"bought, {f.get('test_images')} test images; finetune {f.get('seconds', 0):.1f} s).")
else:
    print("No final test accuracy: the finetune stage did not finish.")
PY
}
md=$out/gpu-check.md
{
  echo "# gpu-check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname), device \`$device\`, GPU: $gpu"
  echo "binary: \`$(basename "$bin")\` ($("$bin" --version 2>&1 || true))${quick:+; quick mode}"
  echo
  if [ -f "$out/bench.tsv" ] && [ "$only" != pipeline ]; then
    echo "## Speed (images/s; ours/torch above 1 means frugal is faster)"
    echo
    echo "| model | ours img/s | torch img/s | ours/torch | notes |"
    echo "|---|---|---|---|---|"
    awk -F'\t' '
      NR == 1 { next }
      { key = $1 SUBSEP $2; rate[key] = $5; status[key] = $3; seen[$2] = 1; if (!($2 in order)) { order[$2] = ++n; name[n] = $2 } }
      END {
        for (i = 1; i <= n; i++) {
          m = name[i]; peer = m; sub(/^reference-/, "", peer)
          o = rate["ours" SUBSEP m]; t = rate["torch" SUBSEP peer]
          note = ""
          if ((("ours" SUBSEP m) in status) && status["ours" SUBSEP m] != "ok") note = note "ours " status["ours" SUBSEP m] "; "
          if ((("torch" SUBSEP peer) in status) && status["torch" SUBSEP peer] != "ok") note = note "torch " status["torch" SUBSEP peer] "; "
          if (peer != m && t != "") note = note "torch column: peer_torch.py " peer "; "
          if ((m == "vae" || m == "simclr") && t != "") note = note "ours: frugal'"'"'s own pretraining step, torch: the reference model; "
          sub(/; $/, "", note)
          ratio = (o != "" && t != "" && t + 0 > 0) ? sprintf("%.2f", o / t) : ""
          printf "| %s | %s | %s | %s | %s |\n", m, (o == "" ? "-" : o), (t == "" ? "-" : t), (ratio == "" ? "-" : ratio), note
        }
      }' "$out/bench.tsv"
    echo
    echo "Raw RESULT lines: \`bench.tsv\`; full outputs in \`gpu-check.log\`."
    echo
  fi
  if [ -f "$out/pipeline.tsv" ] && [ "$only" != bench ]; then
    echo "## Pipeline (SimCLR pretraining, then finetune)"
    echo
    echo "| stage | status | wall s | command |"
    echo "|---|---|---|---|"
    awk -F'\t' 'NR > 1 { printf "| %s | %s | %s | `%s` |\n", $1, $2, $3, $4 }' "$out/pipeline.tsv"
    echo
    run_lines
    echo
  fi
} >"$md"
say "summary: $md"
cat "$md"
