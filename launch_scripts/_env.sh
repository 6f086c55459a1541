# Shared by the mimscale batch scripts; sourced, never run on its own.
#
# It provides, in order of use:
#   the software environment  MIMSCALE_ENV (file or venv to source) or <repo>/.venv, then MIMSCALE_PYTHON
#   mimscale_recipe_command   mae_vitl | recipes/mae_vitl.py -> the interpreter arguments that run it
#   mimscale_dist_env         MASTER_ADDR / MASTER_PORT from the allocation, and the launcher
#   mimscale_run_resumable    start one process per task, pass preemption signals on, requeue on exit 75
#
# Settings (environment variables, all optional):
#   MIMSCALE_ROOT          the mimscale checkout (default: the directory sbatch was run from)
#   MIMSCALE_ENV           a file to source (module loads, conda activate) or a venv directory
#   MIMSCALE_PYTHON        the interpreter (default: python from that environment)
#   MIMSCALE_MAX_REQUEUES  how many times a job may requeue itself (default 20)
#   MIMSCALE_LAUNCHER      auto (default) | local | srun: who starts the ranks (see mimscale_launcher)
#   MIMSCALE_SRUN_ARGS     extra srun arguments (word-split; setting them makes auto pick srun)
#   MIMSCALE_SRUN_WAIT     seconds the other ranks may run on after the first one ended (default 300)
#   MIMSCALE_MASTER_ADDR   override the rendezvous host (default: the first node's NodeAddr)
#   MIMSCALE_MASTER_PORT   override the rendezvous port derived from the job id
#
# How a preemption or time-limit signal reaches the ranks (launch_scripts/README.md has the whole story):
# the trainer checkpoints at a step all ranks agree on and exits 75 on SIGUSR1 or SIGTERM. The batch shell
# traps both and passes SIGUSR1 on -- never SIGTERM to srun: srun answers its own SIGTERM (and SIGHUP,
# SIGQUIT) by SIGKILLing every task (Slurm src/srun/libsrun/srun_job.c, _srun_signal_mgr), while it
# forwards SIGUSR1 to the tasks unchanged. srun runs in its own process group, because
# `scancel --full` signals the batch script's process group (killpg in slurmstepd's req.c) and would
# otherwise reach srun too.

MIMSCALE_ROOT=$(cd "${MIMSCALE_ROOT:-.}" && pwd)
export MIMSCALE_ROOT

mimscale_log() { printf '[mimscale %(%F %T)T job %s] %s\n' -1 "${SLURM_JOB_ID:-local}" "$*"; }

# A signal that arrives before the ranks exist must not kill this shell: remember it, and
# mimscale_run_resumable acts on it.
MIMSCALE_SIGNAL=""
MIMSCALE_FORWARD_TO=()   # the processes a signal is passed on to: the ranks (local) or srun
MIMSCALE_FORWARD_WHAT=""
_mimscale_on_signal() {
    MIMSCALE_SIGNAL=$1
    local -a alive=()
    local p
    for p in "${MIMSCALE_FORWARD_TO[@]}"; do
        kill -0 "$p" 2>/dev/null && alive+=("$p")
    done
    if (( ${#alive[@]} )); then
        mimscale_log "got SIG$1: sending SIGUSR1 to $MIMSCALE_FORWARD_WHAT to checkpoint and stop"
        kill -s USR1 "${alive[@]}" 2>/dev/null
    else
        mimscale_log "got SIG$1 (no training running)"
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
# mimscale_dist_env : MASTER_ADDR / MASTER_PORT, and MIMSCALE_LAUNCH (status 2 on a bad setting).
mimscale_dist_env() {
    # Rank 0 runs on the first node of the allocation. Its NodeAddr is the address slurmctld and the other
    # nodes already reach it at (the node name itself when slurm.conf sets no NodeAddr); the name may
    # not resolve at all where NodeAddr is set. The port is derived from the job id so that jobs sharing
    # a node never collide, and stays in 15000-29999 (below the ephemeral range): the formula of
    # mimscale.train.distributed.slurm_master_port (a test keeps them equal).
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1)
    MASTER_ADDR=${MIMSCALE_MASTER_ADDR:-$(_mimscale_node_addr "${first:-$(hostname)}")}
    MASTER_PORT=${MIMSCALE_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    export MASTER_ADDR MASTER_PORT
    # Per-rank values are set by the launcher; stale ones from the submitting shell must not leak.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE NODE_RANK
    mimscale_launcher || return 2
    mimscale_log "nodes=${SLURM_JOB_NUM_NODES:-1} tasks=${SLURM_NTASKS:-1} ($SLURM_JOB_NODELIST)" \
        "master=$MASTER_ADDR:$MASTER_PORT launcher=$MIMSCALE_LAUNCH gpus/node=${SLURM_GPUS_ON_NODE:-0}" \
        "cpus/task=${SLURM_CPUS_PER_TASK:-1}"
}

_mimscale_node_addr() {
    local addr
    addr=$(scontrol show node -o "$1" 2>/dev/null | sed -n 's/.*[[:space:]]NodeAddr=\([^[:space:]]*\).*/\1/p')
    printf '%s\n' "${addr:-$1}"
}

# mimscale_launcher : sets MIMSCALE_LAUNCH from MIMSCALE_LAUNCHER (auto | local | srun).
#   local  the batch script starts the ranks itself (one node only). Every signal Slurm sends to the
#          batch step reaches them -- including the SIGTERM of a time limit without warning, of a
#          preemption without GraceTime and of a plain scancel, after which they have KillWait seconds to
#          checkpoint; under srun that SIGTERM also reaches srun, which SIGKILLs them at once. A small
#          "signal relay" step passes on the signals Slurm sends to job steps only (preemption GraceTime,
#          scancel --signal without --batch/--full, --signal=USR1@T without B:).
#   srun   one task per rank started by srun: required on more than one node; also chosen by auto when
#          MIMSCALE_SRUN_ARGS is set (--container-image, --cpu-bind, ...), which only srun can apply.
mimscale_launcher() {
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    case ${MIMSCALE_LAUNCHER:-auto} in
        auto)
            if (( nodes > 1 )) || [[ -n ${MIMSCALE_SRUN_ARGS:-} ]]; then MIMSCALE_LAUNCH=srun; else MIMSCALE_LAUNCH=local; fi ;;
        srun) MIMSCALE_LAUNCH=srun ;;
        local)
            if (( nodes > 1 )); then
                mimscale_log "MIMSCALE_LAUNCHER=local needs a one-node allocation, this job has $nodes nodes:" \
                    "use MIMSCALE_LAUNCHER=srun (or auto, the default)" >&2
                return 2
            fi
            MIMSCALE_LAUNCH=local ;;
        *)
            mimscale_log "MIMSCALE_LAUNCHER=$MIMSCALE_LAUNCHER: allowed are auto, local and srun" >&2
            return 2 ;;
    esac
}

# ---------------------------------------------------------------- launchers
# _mimscale_start_srun CMD... : one CMD per task of the allocation (one per GPU with --ntasks-per-node=GPUs),
# in the background, in its own process group; sets MIMSCALE_SRUN_PID.
_mimscale_start_srun() {
    local -a extra=()
    # Slurm 22.05's srun does not inherit --cpus-per-task from the batch allocation: pass it on.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && extra+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # shellcheck disable=SC2206
    [[ -n ${MIMSCALE_SRUN_ARGS:-} ]] && extra+=($MIMSCALE_SRUN_ARGS)
    # --kill-on-bad-exit would kill the other ranks the moment one exits 75 after its checkpoint
    # shard, possibly before rank 0 has written the manifest; --wait bounds how long survivors of a
    # crashed rank may linger instead.
    local monitor=$-
    set -m  # own process group (see the top of this file); background jobs get one under job control
    # shellcheck disable=SC2016  # expanded by each task's bash, not here
    srun --kill-on-bad-exit=0 --wait="${MIMSCALE_SRUN_WAIT:-300}" "${extra[@]}" \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
                        NODE_RANK=$SLURM_NODEID
                 [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] && export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE%%(*}
                 exec "$@"' mimscale-task "$@" &
    MIMSCALE_SRUN_PID=$!
    MIMSCALE_FORWARD_TO=("$MIMSCALE_SRUN_PID")
    MIMSCALE_FORWARD_WHAT="srun (it passes SIGUSR1 to every task)"
    [[ $monitor == *m* ]] || set +m
}

# _mimscale_start_local CMD... : SLURM_NTASKS processes of CMD on this node, children of this shell (in
# the batch step and in its process group); sets MIMSCALE_RANK_PIDS (index = rank).
_mimscale_start_local() {
    local n=${SLURM_NTASKS:-1} r
    MIMSCALE_RANK_PIDS=()
    MIMSCALE_FORWARD_TO=()
    for (( r = 0; r < n; r++ )); do
        # SLURM_PROCID/SLURM_LOCALID as srun would set them, for code that reads those
        (export RANK=$r LOCAL_RANK=$r WORLD_SIZE=$n LOCAL_WORLD_SIZE=$n NODE_RANK=0 \
                SLURM_PROCID=$r SLURM_LOCALID=$r
         exec "$@") &
        MIMSCALE_RANK_PIDS[r]=$!
        MIMSCALE_FORWARD_TO+=($!)
    done
    MIMSCALE_FORWARD_WHAT="the $n ranks"
}

# _mimscale_start_relay : a one-task step that only waits for signals and passes SIGTERM/SIGUSR1 on to
# this shell. Slurm sends some signals to the job's steps but not to the batch step (slurmctld's
# _signal_job with KILL_STEPS_ONLY: the preemption GraceTime SIGTERM, scancel --signal without
# --batch/--full); with the ranks in the batch step, only such a step receives them. It ends when its
# stdin closes (_mimscale_stop_relay). Sets MIMSCALE_RELAY_PID (empty if srun is missing).
_mimscale_start_relay() {
    MIMSCALE_RELAY_PID=""
    command -v srun >/dev/null || return 0
    local monitor=$- out
    exec {out}>&1
    set -m  # own process group: `scancel --full` must not make this srun kill the relay
    # shellcheck disable=SC2016  # expanded by the relay's bash
    coproc MIMSCALE_RELAY {
        exec srun --overlap --quiet --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 \
            --kill-on-bad-exit=0 --job-name=mimscale-signal-relay \
            bash -c 'relay() {
                         printf "[mimscale %(%F %T)T job %s] signal relay: SIG%s sent to the job steps," -1 "$SLURM_JOB_ID" "$1"
                         printf " passing it to the batch script\n"
                         kill -s "$1" "$MIMSCALE_BATCH_PID"
                     }
                     trap "relay TERM" TERM
                     trap "relay USR1" USR1
                     while :; do read -r _; s=$?; (( s == 0 || s > 128 )) || exit 0; done' >&"$out" 2>&1
    }
    [[ $monitor == *m* ]] || set +m
    exec {out}>&-
}

_mimscale_stop_relay() {
    [[ -n ${MIMSCALE_RELAY_PID:-} ]] || return 0
    local fd=${MIMSCALE_RELAY[1]:-}
    [[ -n $fd ]] && exec {fd}>&-   # EOF on the relay's stdin: it exits
    local t
    for (( t = 0; t < 50; t++ )); do
        kill -0 "$MIMSCALE_RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$MIMSCALE_RELAY_PID" 2>/dev/null && kill "$MIMSCALE_RELAY_PID" 2>/dev/null
    wait "$MIMSCALE_RELAY_PID" 2>/dev/null
    MIMSCALE_RELAY_PID=""
}

_mimscale_nap() {  # sleep, but return at once when a trapped signal arrives
    local s
    sleep "$1" &
    s=$!
    wait "$s"
    kill "$s" 2>/dev/null
}

_mimscale_status_text() {  # 137 -> "status 137 (killed by SIGKILL)"
    if (( $1 > 128 )); then
        printf 'status %s (killed by SIG%s)\n' "$1" "$(kill -l "$(( $1 - 128 ))" 2>/dev/null || echo "$(( $1 - 128 ))")"
    else
        printf 'status %s\n' "$1"
    fi
}

# _mimscale_wait_local : wait for the ranks of _mimscale_start_local; sets MIMSCALE_RC: 75 if any rank
# exited 75 (it checkpointed on a signal), else the first non-zero status, else 0. Like srun --wait, the
# ranks still running MIMSCALE_SRUN_WAIT seconds after the first one ended are killed (a rank whose peer
# died waits in a collective).
_mimscale_wait_local() {
    local grace=${MIMSCALE_SRUN_WAIT:-300} first_end="" killed="" r pid rc
    local -a live=("${!MIMSCALE_RANK_PIDS[@]}") still
    local relay_noted=""
    MIMSCALE_RC=0
    local any75=""
    while (( ${#live[@]} )); do
        still=()
        for r in "${live[@]}"; do
            pid=${MIMSCALE_RANK_PIDS[r]}
            if kill -0 "$pid" 2>/dev/null; then
                still+=("$r")
                continue
            fi
            wait "$pid"
            rc=$?
            [[ -n $first_end ]] || first_end=$SECONDS
            if (( rc == 75 )); then
                any75=1
            elif (( rc != 0 )); then
                mimscale_log "rank $r (pid $pid) ended with $(_mimscale_status_text "$rc")"
                (( MIMSCALE_RC == 0 )) && MIMSCALE_RC=$rc
            fi
        done
        live=("${still[@]}")
        (( ${#live[@]} )) || break
        if [[ -n $first_end && -z $killed ]] && (( SECONDS - first_end >= grace )); then
            local -a pids=()
            for r in "${live[@]}"; do pids+=("${MIMSCALE_RANK_PIDS[r]}"); done
            mimscale_log "ranks ${live[*]} still running ${grace} s after the first rank ended" \
                "(MIMSCALE_SRUN_WAIT=$grace): killing them"
            kill -s KILL "${pids[@]}" 2>/dev/null
            killed=1
        fi
        if [[ -n ${MIMSCALE_RELAY_PID:-} && -z $relay_noted ]] && ! kill -0 "$MIMSCALE_RELAY_PID" 2>/dev/null; then
            mimscale_log "the signal relay step ended early: signals sent to job steps only (preemption" \
                "GraceTime, scancel --signal without --batch/--full) no longer reach the ranks"
            relay_noted=1
        fi
        _mimscale_nap 1
    done
    [[ -n $any75 ]] && MIMSCALE_RC=75
    return 0
}

_mimscale_wait_srun() {
    local rc
    while :; do
        wait "$MIMSCALE_SRUN_PID"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; srun is then still alive
        kill -0 "$MIMSCALE_SRUN_PID" 2>/dev/null || break
    done
    MIMSCALE_RC=$rc
}

# mimscale_run_resumable OUTPUT_DIR CMD... : run CMD once per task and implement the preemption protocol.
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
    [[ -n ${MIMSCALE_LAUNCH:-} ]] || mimscale_launcher || return 2

    export MIMSCALE_BATCH_PID=$$  # for the signal relay
    if [[ $MIMSCALE_LAUNCH == srun ]]; then
        _mimscale_start_srun "$@"
    else
        _mimscale_start_local "$@"
    fi
    # a signal that arrived while they were being started found nobody to pass it to
    [[ -n $MIMSCALE_SIGNAL ]] && _mimscale_on_signal "$MIMSCALE_SIGNAL"
    if [[ $MIMSCALE_LAUNCH == srun ]]; then
        _mimscale_wait_srun
    else
        _mimscale_start_relay
        _mimscale_wait_local
        _mimscale_stop_relay
    fi
    MIMSCALE_FORWARD_TO=()
    local rc=$MIMSCALE_RC

    if (( rc == 0 )); then
        mimscale_log "training finished (status 0); last checkpoint: $(mimscale_latest "$out")"
        return 0
    fi
    if (( rc == 75 )) || [[ -n $MIMSCALE_SIGNAL ]]; then
        mimscale_log "training stopped with status $rc${MIMSCALE_SIGNAL:+ after SIG$MIMSCALE_SIGNAL}"
        _mimscale_requeue "$out"
        return $?
    fi
    mimscale_log "training FAILED with $(_mimscale_status_text "$rc") (not requeued);" \
        "resubmit the same command to resume from checkpoint $(mimscale_latest "$out")"
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
    # Immune to SIGTERM: when Slurm is already ending or requeueing the job, its SIGTERM to every process of
    # the batch step would kill scontrol mid-request, and the log would wrongly say that the requeue failed.
    if (trap '' TERM; exec scontrol requeue "$SLURM_JOB_ID"); then
        return 0
    fi
    # Slurm may be requeueing the job itself (`scontrol requeue` by an admin, a preemption with
    # PreemptMode=REQUEUE): then its restart count has already gone up.
    local info now
    info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)
    now=$(sed -n 's/.*[[:space:]]Restarts=\([0-9]*\).*/\1/p' <<< "$info")
    if (( ${now:-0} > restarts )); then
        mimscale_log "Slurm itself is requeueing the job (restart $now); the next start resumes from checkpoint $tag"
        return 0
    fi
    mimscale_log "scontrol requeue failed (job not requeueable, or ending:" \
        "$(grep -o 'JobState=[^[:space:]]*' <<< "$info")): resubmit the same command to resume from checkpoint $tag"
    return 75
}
