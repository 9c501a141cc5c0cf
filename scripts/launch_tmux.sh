#!/usr/bin/env bash
# Start a training run in a detached tmux session, so it survives a closed SSH connection.
#
#   scripts/launch_tmux.sh RUN_NAME CONFIG [extra training arguments...]
#
# The training script follows the config's model.name (resunet3d -> scripts/train_3d_unet.py,
# unetr2d -> scripts/train_unetr.py). The run goes to <training.output_dir>/RUN_NAME and is started
# with --auto-resume: launching the same RUN_NAME again after a stop continues from its last.pt.
# Everything the run prints is appended to <run folder>/console.log.
#
# Environment:
#   PYTHON       interpreter of the training (default: the repository's .venv/bin/python)
#   TMUX_SOCKET  tmux socket name (tmux -L); default: the user's usual tmux server
#   TMUX_BIN     tmux executable (default: tmux)
#   KITS19_PROGRESS  the run's output goes through a pipe into console.log, so progress comes as
#                plain periodic lines (utils/data/progress.py); 'bar' for tqdm bars, 'off' for none
# The run gets the caller's environment (CUDA_VISIBLE_DEVICES, WANDB_MODE, ...) and working
# directory, as if the training command had been typed here.
set -euo pipefail

PROGRAM=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
usage: $PROGRAM RUN_NAME CONFIG [extra training arguments...]

Start training in a detached tmux session named RUN_NAME:
  PYTHON scripts/train_X.py --config CONFIG --set training.run_name=RUN_NAME --auto-resume [extra...]
with its output appended to <training.output_dir>/RUN_NAME/console.log. The script (train_3d_unet.py
or train_unetr.py) follows the config's model.name. Launching the same RUN_NAME again after the run
stopped continues it from its last.pt.

example:
  $PROGRAM resunet3d_full configs/resunet3d.yaml --data "\$KITS19_DATA" --wandb

environment: PYTHON (default $REPO/.venv/bin/python), TMUX_SOCKET (tmux -L name), TMUX_BIN,
  KITS19_PROGRESS (lines, bar or off; default lines, as the output is piped into console.log)
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
if [[ $# -lt 2 ]]; then
    usage >&2
    exit 2
fi
RUN_NAME=$1
CONFIG=$2
shift 2

# tmux turns '.' and ':' in session names into '_', and the name is also a folder name.
[[ $RUN_NAME =~ ^[A-Za-z0-9_][A-Za-z0-9_+-]*$ ]] \
    || die "RUN_NAME must be letters, digits, '_', '+' or '-' (it names the tmux session and the run folder), got '$RUN_NAME'"

TMUX_BIN=${TMUX_BIN:-tmux}
command -v "$TMUX_BIN" >/dev/null 2>&1 || die "tmux is not installed (or '$TMUX_BIN' is not on PATH); install it (e.g. apt-get install tmux) or run the training script directly"
TMUX_CMD=("$TMUX_BIN")
if [[ -n ${TMUX_SOCKET:-} ]]; then
    TMUX_CMD+=(-L "$TMUX_SOCKET")
fi

[[ -f $CONFIG ]] || die "config file '$CONFIG' does not exist"
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

PYTHON=${PYTHON:-$REPO/.venv/bin/python}
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found; build the environment with 'make test' (or set PYTHON)"

if "${TMUX_CMD[@]}" has-session -t "=$RUN_NAME" 2>/dev/null; then
    die "a tmux session named '$RUN_NAME' is already running; attach with: ${TMUX_CMD[*]} attach -t $RUN_NAME"
fi

# model.name and training.output_dir of the config (a --set training.output_dir=... among the
# extra arguments wins, as in the training script).
read_config() {
    "$PYTHON" - "$CONFIG" "$@" <<'PYEOF'
import sys
import yaml

path, *extra = sys.argv[1:]
with open(path, encoding="utf-8") as handle:
    config = yaml.safe_load(handle) or {}
if not isinstance(config, dict):
    sys.exit(f"{path}: not a YAML mapping")
model = (config.get("model") or {}).get("name", "")
output_dir = (config.get("training") or {}).get("output_dir") or "checkpoints"
for index, argument in enumerate(extra):
    value = None
    if argument == "--set" and index + 1 < len(extra):
        value = extra[index + 1]
    elif argument.startswith("--set="):
        value = argument[len("--set="):]
    if value is not None and value.startswith("training.output_dir="):
        output_dir = yaml.safe_load(value.split("=", 1)[1])
print(model)
print(output_dir)
PYEOF
}
config_values=$(read_config "$@") || die "could not read '$CONFIG' (is it a valid YAML experiment config?)"
{ read -r MODEL_NAME; read -r OUTPUT_DIR; } <<<"$config_values"

case $MODEL_NAME in
    resunet3d) SCRIPT=$REPO/scripts/train_3d_unet.py ;;
    unetr2d) SCRIPT=$REPO/scripts/train_unetr.py ;;
    *) die "$CONFIG: model.name is '$MODEL_NAME'; expected resunet3d or unetr2d" ;;
esac

WORKDIR=$PWD
[[ $OUTPUT_DIR == /* ]] || OUTPUT_DIR=$WORKDIR/$OUTPUT_DIR
RUN_FOLDER=$OUTPUT_DIR/$RUN_NAME
mkdir -p "$RUN_FOLDER" || die "cannot create the run folder '$RUN_FOLDER'"
LOG=$RUN_FOLDER/console.log
# Created here, not by the session, so that `tail -f` works as soon as this launcher returns.
: >>"$LOG" || die "cannot write the log '$LOG'"

# The session runs a small script: the caller's environment, its working directory, then the
# training itself as the pane's process (exec), so its pid is tmux's #{pane_pid}. tee -i keeps
# logging through a Ctrl-C in the attached session.
runner=$(mktemp "${TMPDIR:-/tmp}/launch_tmux.XXXXXX")
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
    printf 'cd -- %q || exit 1\n' "$WORKDIR"
    printf 'echo "=== %s: training started $(date "+%%Y-%%m-%%d %%H:%%M:%%S") in tmux session %s ===" >>%q\n' \
        "$PROGRAM" "$RUN_NAME" "$LOG"
    printf 'exec > >(exec tee -a -i %q) 2>&1\n' "$LOG"
    printf 'exec'
    printf ' %q' "$PYTHON" "$SCRIPT" --config "$CONFIG" --set "training.run_name=$RUN_NAME" --auto-resume "$@"
    printf '\n'
} >"$runner"

if ! "${TMUX_CMD[@]}" new-session -d -s "$RUN_NAME" -c "$WORKDIR" "bash $(printf %q "$runner")"; then
    rm -f -- "$runner"
    die "tmux could not start the session '$RUN_NAME'"
fi
PANE_PID=$("${TMUX_CMD[@]}" display-message -p -t "=$RUN_NAME:" '#{pane_pid}' 2>/dev/null || true)

TMUX_SHOWN=${TMUX_CMD[*]}
cat <<EOF
started run '$RUN_NAME' ($(basename "$SCRIPT"), $CONFIG) in tmux session '$RUN_NAME'
  run folder: $RUN_FOLDER
  log:        $LOG   (tail -f $LOG)
  attach:     $TMUX_SHOWN attach -t $RUN_NAME   (detach again with Ctrl-b d)
  stop:       kill -TERM ${PANE_PID:-\$($TMUX_SHOWN display-message -p -t $RUN_NAME '#{pane_pid}')}   (saves last.pt after the current step; run this launcher again with the same RUN_NAME to continue; a second kill -TERM a few seconds later stops at once, without saving)
EOF
