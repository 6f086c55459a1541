# Shared by the mimscale batch scripts; sourced, never run on its own.
#
# It provides, in order of use:
#   the software environment  MIMSCALE_ENV (file or venv to source) or <repo>/.venv, then MIMSCALE_PYTHON
#   mimscale_recipe_command   mae_vitl | recipes/mae_vitl.py -> the interpreter arguments that run it
#   mimscale_dist_env         MASTER_ADDR / MASTER_PORT from the allocation
#   mimscale_srun             one process per task with RANK, LOCAL_RANK, WORLD_SIZE set
#   mimscale_run_resumable    the preemption protocol: forward USR1/TERM, requeue on exit 75
#
# Settings (environment variables, all optional):
#   MIMSCALE_ROOT          the mimscale checkout (default: the directory sbatch was run from)
#   MIMSCALE_ENV           a file to source (module loads, conda activate) or a venv directory
#   MIMSCALE_PYTHON        the interpreter (default: python from that environment)
#   MIMSCALE_MAX_REQUEUES  how many times a job may requeue itself (default 20)
#   MIMSCALE_SRUN_ARGS     extra srun arguments (word-split)
#   MIMSCALE_SRUN_WAIT     seconds srun lets the other tasks finish after the first exits (default 300)
#   MIMSCALE_MASTER_ADDR   override the rendezvous host (default: first node of the allocation)
#   MIMSCALE_MASTER_PORT   override the rendezvous port derived from the job id

MIMSCALE_ROOT=$(cd "${MIMSCALE_ROOT:-.}" && pwd)
export MIMSCALE_ROOT

mimscale_log() { printf '[mimscale %(%F %T)T job %s] %s\n' -1 "${SLURM_JOB_ID:-local}" "$*"; }

# A warning signal that arrives before the training step exists must not kill this shell:
# remember it, and mimscale_run_resumable acts on it.
MIMSCALE_SIGNAL=""
MIMSCALE_STEP_PID=""
_mimscale_on_signal() {
    MIMSCALE_SIGNAL=$1
    if [[ -n $MIMSCALE_STEP_PID ]] && kill -0 "$MIMSCALE_STEP_PID" 2>/dev/null; then
        mimscale_log "got SIG$1: asking the training tasks to checkpoint and stop"
        kill -s "$1" "$MIMSCALE_STEP_PID" 2>/dev/null  # srun forwards it to every task
    else
        mimscale_log "got SIG$1 (no training step running)"
    fi
}
trap '_mimscale_on_signal USR1' USR1
trap '_mimscale_on_signal TERM' TERM

# ---------------------------------------------------------------- software environment
if [[ -n ${MIMSCALE_ENV:-} ]]; then
    if [[ -d $MIMSCALE_ENV && -f $MIMSCALE_ENV/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$MIMSCALE_ENV/bin/activate"
    elif [[ -f $MIMSCALE_ENV ]]; then
        # shellcheck disable=SC1090
        source "$MIMSCALE_ENV"
    else
        mimscale_log "MIMSCALE_ENV=$MIMSCALE_ENV is neither a file nor a virtualenv"; exit 2
    fi
elif [[ -f $MIMSCALE_ROOT/.venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source "$MIMSCALE_ROOT/.venv/bin/activate"
fi
MIMSCALE_PYTHON=${MIMSCALE_PYTHON:-python}
# The checkout the scripts came from is the code that runs, installed or not.
export PYTHONPATH=$MIMSCALE_ROOT${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
MIMSCALE_MAX_REQUEUES=${MIMSCALE_MAX_REQUEUES:-20}

# mimscale_recipe_command NAME_OR_PATH : sets MIMSCALE_RECIPE_CMD (the interpreter's arguments) and
# MIMSCALE_RECIPE_NAME. A name (mae_vitl) runs the registered recipe, `python -m mimscale.recipes NAME`
# (mimscale.recipes.load_recipe); a path (recipes/mae_vitl.py, or a recipe file of your own) runs that file.
mimscale_recipe_command() {
    local r=$1 cand
    if [[ $r == *.py || $r == */* ]]; then
        for cand in "$r" "$MIMSCALE_ROOT/$r"; do
            if [[ -f $cand ]]; then
                MIMSCALE_RECIPE_CMD=("$cand")
                MIMSCALE_RECIPE_NAME=$(basename "$cand" .py)
                return 0
            fi
        done
        mimscale_log "no recipe file '$r' (looked in . and $MIMSCALE_ROOT)" >&2
        return 2
    fi
    if "$MIMSCALE_PYTHON" -c 'import sys; from mimscale.recipes import list_recipes
sys.exit(0 if sys.argv[1] in list_recipes() else 1)' "$r" 2>/dev/null; then
        MIMSCALE_RECIPE_CMD=(-m mimscale.recipes "$r")
        MIMSCALE_RECIPE_NAME=$r
        return 0
    fi
    mimscale_log "no recipe '$r': known recipes are $("$MIMSCALE_PYTHON" -c \
        'from mimscale.recipes import list_recipes; print(" ".join(list_recipes()))' 2>/dev/null)" >&2
    return 2
}

# mimscale_arg_value NAME ARGS... -> prints the value of --NAME VALUE or --NAME=VALUE (last wins)
mimscale_arg_value() {
    local name=$1 value="" prev=""
    shift
    for a in "$@"; do
        if [[ $prev == "$name" ]]; then value=$a; fi
        if [[ $a == "$name="* ]]; then value=${a#"$name="}; fi
        prev=$a
    done
    printf '%s\n' "$value"
}

# ---------------------------------------------------------------- distributed environment
mimscale_dist_env() {
    # Rank 0 runs on the first node of the allocation; the port is derived from the job id so
    # that jobs sharing a node never collide, and stays in 15000-29999 (below the ephemeral range):
    # the formula of mimscale.train.distributed.slurm_master_port (a test keeps them equal).
    MASTER_ADDR=${MIMSCALE_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    MASTER_PORT=${MIMSCALE_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    export MASTER_ADDR MASTER_PORT
    # Per-task values are set by mimscale_srun; stale ones from the submitting shell must not leak.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE NODE_RANK
    mimscale_log "nodes=${SLURM_JOB_NUM_NODES:-1} tasks=${SLURM_NTASKS:-1} ($SLURM_JOB_NODELIST)" \
        "master=$MASTER_ADDR:$MASTER_PORT gpus/node=${SLURM_GPUS_ON_NODE:-0} cpus/task=${SLURM_CPUS_PER_TASK:-1}"
}

# mimscale_srun CMD... : one CMD per task of the allocation (one per GPU with --ntasks-per-node=GPUs).
# It execs srun: call it in a subshell or as the last command.
mimscale_srun() {
    local -a extra=()
    # Slurm 22.05's srun does not inherit --cpus-per-task from the batch allocation: pass it on.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && extra+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # shellcheck disable=SC2206
    [[ -n ${MIMSCALE_SRUN_ARGS:-} ]] && extra+=($MIMSCALE_SRUN_ARGS)
    # --kill-on-bad-exit would kill the other ranks the moment one exits 75 after its checkpoint
    # shard, possibly before rank 0 has written `latest`; --wait bounds how long survivors of a
    # crashed rank may linger instead.
    # shellcheck disable=SC2016  # expanded by each task's bash, not here
    exec srun --kill-on-bad-exit=0 --wait="${MIMSCALE_SRUN_WAIT:-300}" "${extra[@]}" \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
                        NODE_RANK=$SLURM_NODEID
                 [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] && export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE%%(*}
                 exec "$@"' mimscale-task "$@"
}

# mimscale_run_resumable OUTPUT_DIR CMD... : run CMD under srun and implement the preemption protocol.
#   exit 0          -> done
#   exit 75         -> the trainer checkpointed on a signal: requeue this job (it resumes from
#                      OUTPUT_DIR/checkpoints/latest with the same command), up to MIMSCALE_MAX_REQUEUES
#   other, after a forwarded signal -> also requeue (the last complete checkpoint is still valid)
#   other           -> fail with that status
mimscale_run_resumable() {
    local out=$1
    shift
    local restarts=${SLURM_RESTART_COUNT:-0}
    if (( restarts > MIMSCALE_MAX_REQUEUES )); then
        mimscale_log "STOP: job was requeued $restarts times, more than MIMSCALE_MAX_REQUEUES=$MIMSCALE_MAX_REQUEUES" \
            "(by Slurm after preemption or node failure, or by scontrol requeue)." \
            "Checkpoint: $(mimscale_latest "$out") in $out. Resubmit the same command to continue from it."
        return 75
    fi
    if [[ -f $out/checkpoints/latest ]]; then
        mimscale_log "start $((restarts + 1)): resuming from $(mimscale_latest "$out") in $out"
    else
        mimscale_log "start $((restarts + 1)): no checkpoint in $out yet, starting from scratch"
    fi
    if [[ -n $MIMSCALE_SIGNAL ]]; then
        mimscale_log "SIG$MIMSCALE_SIGNAL arrived before launch: not starting"
        _mimscale_requeue "$out"
        return $?
    fi

    mimscale_srun "$@" &
    MIMSCALE_STEP_PID=$!
    local rc
    while :; do
        wait "$MIMSCALE_STEP_PID"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; srun is then still alive
        kill -0 "$MIMSCALE_STEP_PID" 2>/dev/null || break
    done
    MIMSCALE_STEP_PID=""

    if (( rc == 0 )); then
        mimscale_log "training finished (status 0); last checkpoint: $(mimscale_latest "$out")"
        return 0
    fi
    if (( rc == 75 )) || [[ -n $MIMSCALE_SIGNAL ]]; then
        mimscale_log "training stopped with status $rc${MIMSCALE_SIGNAL:+ after SIG$MIMSCALE_SIGNAL}"
        _mimscale_requeue "$out"
        return $?
    fi
    mimscale_log "training FAILED with status $rc (not requeued)"
    return "$rc"
}

mimscale_latest() {
    if [[ -f $1/checkpoints/latest ]]; then printf '%s\n' "$(< "$1/checkpoints/latest")"; else echo "none"; fi
}

_mimscale_requeue() {
    local out=$1 restarts=${SLURM_RESTART_COUNT:-0} tag
    tag=$(mimscale_latest "$out")
    if (( restarts >= MIMSCALE_MAX_REQUEUES )); then
        mimscale_log "NOT requeueing: job already requeued $restarts times (MIMSCALE_MAX_REQUEUES=$MIMSCALE_MAX_REQUEUES)." \
            "Checkpoint: $tag in $out. Resubmit the same command to continue from it."
        return 75
    fi
    mimscale_log "requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $MIMSCALE_MAX_REQUEUES);" \
        "the next start resumes from checkpoint $tag"
    if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
    fi
    mimscale_log "scontrol requeue failed (job not requeueable or already ending):" \
        "resubmit the same command to resume from checkpoint $tag"
    return 75
}
