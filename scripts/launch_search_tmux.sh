#!/usr/bin/env bash
# Start N hyperparameter-search workers on one multi-GPU machine, one GPU each, in one detached tmux
# session (one window per worker), so they survive a closed SSH connection.
#
#   scripts/launch_search_tmux.sh SESSION SEARCH_CONFIG GPUS [extra search arguments...]
#   scripts/launch_search_tmux.sh unetr_search configs/unetr2d_search.yaml 0,1,2,3 --trials 40 --data "$KITS19_DATA"
#
# Worker i runs, with CUDA_VISIBLE_DEVICES set to the i-th GPU of GPUS:
#   PYTHON scripts/hyperparameter_search.py --config SEARCH_CONFIG --storage STORAGE --worker-rank i [extra...]
# STORAGE defaults to journal:<output_dir>/<study_name>/study.journal (set STORAGE=postgresql://... for a
# database server). The workers share the study; --trials counts finished trials of all of them.
# Worker i's output is appended to <output_dir>/<study_name>/worker_i.log. Launching again after a stop
# continues the study; a trial of a killed worker is retried by another one from its last.pt.
#
# Environment:
#   PYTHON       interpreter (default: the repository's .venv/bin/python)
#   STORAGE      the workers' --storage (default: the study's journal file, see above)
#   TMUX_SOCKET  tmux socket name (tmux -L); default: the user's usual tmux server
#   TMUX_BIN     tmux executable (default: tmux)
#   KITS19_PROGRESS  progress in the logs: lines (default), bar or off
set -euo pipefail

PROGRAM=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
usage: $PROGRAM SESSION SEARCH_CONFIG GPUS [extra search arguments...]

Start one search worker per GPU of GPUS (comma-separated CUDA device ids, e.g. 0,1,2,3) in the
detached tmux session SESSION:
  CUDA_VISIBLE_DEVICES=<gpu> PYTHON scripts/hyperparameter_search.py --config SEARCH_CONFIG \\
      --storage STORAGE --worker-rank <i> [extra...]
Give --trials (and --data) among the extra arguments. The workers share one study (default storage:
journal:<output_dir>/<study_name>/study.journal); each logs to <study folder>/worker_<i>.log.

example:
  $PROGRAM unetr_search configs/unetr2d_search.yaml 0,1,2,3 --trials 40 --data "\$KITS19_DATA"

environment: PYTHON (default $REPO/.venv/bin/python), STORAGE, TMUX_SOCKET (tmux -L name), TMUX_BIN,
  KITS19_PROGRESS (lines, bar or off; default lines)
EOF
}

die() {
    echo "$PROGRAM: error: $*" >&2
    exit 1
}

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then
    usage
    exit 0
fi
if [[ $# -lt 3 ]]; then
    usage >&2
    exit 2
fi
SESSION=$1
CONFIG=$2
GPUS=$3
shift 3

[[ $SESSION =~ ^[A-Za-z0-9_][A-Za-z0-9_+-]*$ ]] \
    || die "SESSION must be letters, digits, '_', '+' or '-', got '$SESSION'"
[[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS must be comma-separated device ids like 0,1,2, got '$GPUS'"
IFS=, read -r -a GPU_LIST <<<"$GPUS"

TMUX_BIN=${TMUX_BIN:-tmux}
command -v "$TMUX_BIN" >/dev/null 2>&1 || die "tmux is not installed (or '$TMUX_BIN' is not on PATH); install it (e.g. apt-get install tmux) or start the workers by hand"
TMUX_CMD=("$TMUX_BIN")
if [[ -n ${TMUX_SOCKET:-} ]]; then
    TMUX_CMD+=(-L "$TMUX_SOCKET")
fi

[[ -f $CONFIG ]] || die "search config '$CONFIG' does not exist"
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (or set PYTHON)"

if "${TMUX_CMD[@]}" has-session -t "=$SESSION" 2>/dev/null; then
    die "a tmux session named '$SESSION' is already running; attach with: ${TMUX_CMD[*]} attach -t $SESSION"
fi

# The study folder: output_dir/study_name of the search config (a --study-name among the extra
# arguments wins, as in the search script).
STUDY_FOLDER=$("$PYTHON" - "$CONFIG" "$@" <<'PYEOF'
import sys
import yaml

path, *extra = sys.argv[1:]
with open(path, encoding="utf-8") as handle:
    config = yaml.safe_load(handle) or {}
if not isinstance(config, dict):
    sys.exit(f"{path}: not a YAML mapping")
name = config.get("study_name") or "unetr2d_search"
for index, argument in enumerate(extra):
    if argument == "--study-name" and index + 1 < len(extra):
        name = extra[index + 1]
    elif argument.startswith("--study-name="):
        name = argument.split("=", 1)[1]
print(f"{config.get('output_dir') or 'checkpoints'}/{name}")
PYEOF
) || die "could not read '$CONFIG' (is it a valid YAML search config?)"
WORKDIR=$PWD
[[ $STUDY_FOLDER == /* ]] || STUDY_FOLDER=$WORKDIR/$STUDY_FOLDER
mkdir -p "$STUDY_FOLDER" || die "cannot create the study folder '$STUDY_FOLDER'"
STORAGE=${STORAGE:-journal:$STUDY_FOLDER/study.journal}
export KITS19_PROGRESS=${KITS19_PROGRESS:-lines}

# Each window runs a small script: the caller's environment, its working directory, the worker's GPU,
# then the worker itself as the pane's process (exec), so 'kill -TERM <pane pid>' reaches it.
for index in "${!GPU_LIST[@]}"; do
    gpu=${GPU_LIST[$index]}
    log=$STUDY_FOLDER/worker_$index.log
    : >>"$log" || die "cannot write the log '$log'"  # so tail -f works as soon as this returns
    runner=$(mktemp "${TMPDIR:-/tmp}/launch_search_tmux.XXXXXX")
    {
        echo 'rm -f -- "$0"'
        while IFS= read -r -d '' entry; do
            name=${entry%%=*}
            case $name in
                TMUX | TMUX_PANE | SHLVL | _ | PWD | OLDPWD | TERM | SHELLOPTS | BASHOPTS | COLUMNS | LINES) continue ;;
            esac
            [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
            printf 'export %s=%q\n' "$name" "${entry#*=}"
        done < <(env -0)
        printf 'export CUDA_VISIBLE_DEVICES=%q\n' "$gpu"
        printf 'cd -- %q || exit 1\n' "$WORKDIR"
        printf 'echo "=== %s: worker %s started $(date "+%%Y-%%m-%%d %%H:%%M:%%S") on GPU %s ===" >>%q\n' \
            "$PROGRAM" "$index" "$gpu" "$log"
        printf 'exec > >(exec tee -a -i %q) 2>&1\n' "$log"
        printf 'exec'
        printf ' %q' "$PYTHON" "$REPO/scripts/hyperparameter_search.py" --config "$CONFIG" --storage "$STORAGE" \
            --worker-rank "$index" "$@"
        printf '\n'
    } >"$runner"
    if [[ $index -eq 0 ]]; then
        started=("${TMUX_CMD[@]}" new-session -d -s "$SESSION" -n "worker$index" -c "$WORKDIR")
    else
        started=("${TMUX_CMD[@]}" new-window -d -t "=$SESSION:" -n "worker$index" -c "$WORKDIR")
    fi
    if ! "${started[@]}" "bash $(printf %q "$runner")"; then
        rm -f -- "$runner"
        die "tmux could not start worker $index in session '$SESSION'"
    fi
done

TMUX_SHOWN=${TMUX_CMD[*]}
cat <<EOF
started ${#GPU_LIST[@]} search worker(s) on GPU(s) $GPUS in tmux session '$SESSION'
  study folder: $STUDY_FOLDER   (results.csv, best_config.yaml when done)
  storage:      $STORAGE
  logs:         $STUDY_FOLDER/worker_<i>.log
  attach:       $TMUX_SHOWN attach -t $SESSION   (windows worker0..worker$(( ${#GPU_LIST[@]} - 1 )); detach with Ctrl-b d)
  stop:         $TMUX_SHOWN list-panes -s -t $SESSION -F '#{pane_pid}' | xargs kill -TERM   (each worker saves its trial's last.pt and exits 75; launch again to continue)
EOF
