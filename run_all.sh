#!/usr/bin/env bash
# Regenerate every figure and table of one profile (default: mini) from a fresh clone.
#   ./run_all.sh [--profile NAME] [--only NN] [--from NN] [--jobs N] [--setup-only] [--with-tests] [--help]
# It creates .venv if missing, installs saev with torch pinned to 2.13.0 (constraints.txt),
# then runs notebooks/NN_*.ipynb in order with papermill, writing executed notebooks to
# runs/<profile>/ and figures to figures/<profile>/.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'TXT'
Options:
  --profile NAME   params/NAME.yaml to run (default: mini)
  --only NN        run only notebook NN (e.g. 03)
  --from NN        run notebooks NN and later
  --jobs N         notebooks run at once (default 2, one per core): after 01 the others
                   only need its SAEs (05 needs 04's sweep), so they run side by side
  --setup-only     create/update .venv and stop (used by run_tests.sh)
  --with-tests     also install the test dependencies (pytest, nbval, sae-lens, ...)
  --help           this text
TXT
}

profile=mini only="" from="" setup_only=0 extras="" jobs=2
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --only) only=${2:?--only needs a notebook number}; shift 2 ;;
    --from) from=${2:?--from needs a notebook number}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    --setup-only) setup_only=1; shift ;;
    --with-tests) extras="[test]"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

find_python() {
  for py in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  echo "run_all.sh: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

# Create/refresh .venv; reinstall only when pyproject.toml, constraints.txt or the extras change.
bootstrap() {
  if [ ! -x .venv/bin/python ]; then
    local py; py=$(find_python)
    echo "==> creating .venv with $py"
    "$py" -m venv .venv
  fi
  local stamp=.venv/.saev-install-stamp want
  want=$( (cat pyproject.toml constraints.txt; echo "extras=$extras") | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing saev$extras into .venv (torch pinned by constraints.txt)"
    local t0=$SECONDS
    # pip's "Location ... is ignored" lines come from a machine-wide find-links setting, not from us.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".$extras" 2>&1 \
      | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "run_all.sh: pip install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
    echo "==> installed in $((SECONDS - t0)) s"
  fi
}

bootstrap
[ "$setup_only" = 1 ] && exit 0

[ -f "params/$profile.yaml" ] || { echo "run_all.sh: no profile params/$profile.yaml" >&2; exit 2; }
# A rehearsal profile (paper-*-rehearsal) first writes its models and fixture data sets, and serves its
# stub judge on loopback while the notebooks run.
if grep -q '^rehearsal:' "params/$profile.yaml"; then
  .venv/bin/python -m saev.rehearsal build --profile "$profile" || { echo "run_all.sh: rehearsal build failed" >&2; exit 1; }
  mkdir -p "runs/$profile"
  .venv/bin/python -m saev.rehearsal judge --profile "$profile" >"runs/$profile/judge-stub.log" 2>&1 &
  judge_pid=$!
  trap 'kill "$judge_pid" 2>/dev/null || true' EXIT
fi
# A profile that reads local checkpoints and data (paper-*) stops here, naming every unset path.
.venv/bin/python -m saev.paper check --profile "$profile" || { echo "run_all.sh: profile $profile is not ready to run (see above)" >&2; exit 2; }
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "runs/$profile" "figures/$profile"

shopt -s nullglob
notebooks=(notebooks/[0-9][0-9]_*.ipynb)
if [ ${#notebooks[@]} -eq 0 ]; then
  echo "run_all.sh: no notebooks yet in notebooks/; nothing to run"
  exit 0
fi

# What each notebook reads from an earlier one (everything else it computes or finds cached);
# a notebook starts once these have finished in this run (or were not selected to run).
declare -A needs=([02]=01 [03]=01 [04]=01 [05]="01 04" [06]=01)
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: --jobs must be a positive number, got '$jobs'" >&2; exit 2; }

# Which ready notebook starts first when a core frees: the longest (06, the ablation sweeps) before 02-04, so
# that 02 -> 03 -> 04 -> 05 run on one core beside it instead of 06 starting last and ending alone
# (mini, 2026-12-07: 04 -> 05 then ended 6 min before 06, one core idle meanwhile).
first=(06)
ordered=()
for f in "${first[@]}"; do for nb in "${notebooks[@]}"; do [[ "$(basename "$nb")" == "${f}_"* ]] && ordered+=("$nb"); done; done
for nb in "${notebooks[@]}"; do
  b=$(basename "$nb"); [[ " ${first[*]} " == *" ${b%%_*} "* ]] || ordered+=("$nb")
done
notebooks=("${ordered[@]}")

todo=()
for nb in "${notebooks[@]}"; do
  base=$(basename "$nb"); num=${base%%_*}
  [ -n "$only" ] && [ "$num" != "$only" ] && continue
  [ -n "$from" ] && [ "$num" \< "$from" ] && continue
  todo+=("$nb")
done
[ ${#todo[@]} -gt 0 ] || { echo "run_all.sh: no notebook matched --only/--from" >&2; exit 2; }

declare -A pid_of=() start_of=() state=() name_of=()   # state: waiting | running | done
for nb in "${todo[@]}"; do b=$(basename "$nb"); state[${b%%_*}]=waiting name_of[${b%%_*}]=$b; done
ready() {  # every notebook that $1 needs is done, or not part of this run
  local dep
  for dep in ${needs[$1]:-}; do
    [ -z "${state[$dep]:-}" ] || [ "${state[$dep]}" = done ] || return 1
  done
}
summary=() running=0 t_all=$SECONDS
while :; do
  for nb in "${todo[@]}"; do
    base=$(basename "$nb"); num=${base%%_*}
    [ "${state[$num]}" = waiting ] && [ "$running" -lt "$jobs" ] && ready "$num" || continue
    out="runs/$profile/$base"
    echo "==> $base (profile $profile) started"
    ( exec .venv/bin/python -m papermill --log-level WARNING --cwd notebooks "$nb" "$out" -p profile "$profile" \
        >"runs/$profile/${base%.ipynb}.log" 2>&1 ) &
    pid_of[$!]=$num start_of[$num]=$SECONDS state[$num]=running running=$((running + 1))
  done
  [ "$running" -gt 0 ] || break
  finished=""
  wait -n -p finished "${!pid_of[@]}" && rc=0 || rc=$?
  num=${pid_of[$finished]}; unset "pid_of[$finished]"
  running=$((running - 1)) state[$num]=done
  base=${name_of[$num]}
  if [ "$rc" -ne 0 ]; then
    cat "runs/$profile/${base%.ipynb}.log" >&2
    echo "run_all.sh: FAILED in $base (profile $profile); the failing cell and traceback are above and in runs/$profile/$base" >&2
    for p in "${!pid_of[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    exit 1
  fi
  echo "==> $base done in $((SECONDS - start_of[$num])) s"
  summary+=("$(printf '%-40s %6d s' "$base" $((SECONDS - start_of[$num])))")
done
echo "==> done: profile $profile, figures in figures/$profile/ ($((SECONDS - t_all)) s for the notebooks, $jobs at once)"
printf '  %s\n' "${summary[@]}"
