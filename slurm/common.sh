# shellcheck shell=bash disable=SC2034  # (variables used by the scripts that source this)
# Sourced by start-cluster.sh and stop-cluster.sh: where the local cluster keeps its files, and how
# its daemons are found and stopped (always through their pid files, never by process name).

DIR=${LLMBATCH_SLURM_DIR:-/tmp/llmbatch-slurm}
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
ETC=$DIR/etc          # slurm.conf, slurmdbd.conf, gres.conf
RUN=$DIR/run          # pid files
LOG=$DIR/log          # every daemon's log
CONF=$ETC/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
DB_SOCKET=$DIR/mariadb/mariadbd.sock
NODES=(n1 n2)

# The daemons, in start order: pid file name (under $RUN) and executable name.
DAEMONS=(munged:munged mariadb:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld
         slurmd-n1:slurmd slurmd-n2:slurmd)

log() { echo "slurm: $*" >&2; }

# alive PID: the process exists and is not a zombie.
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# runs PID EXE: process PID runs the program EXE. Debian's /usr/sbin/slurmd etc. are links (through
# /etc/alternatives) to slurmd-wlm etc., so compare with the link's target too.
runs() {
    local exe
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}
    [ "${exe##*/}" = "$2" ] || [ "$exe" = "$(readlink -f "/usr/sbin/$2")" ]
}

# pid_of NAME EXE: print the pid in $RUN/NAME.pid if that process is alive and runs EXE
# (the check on EXE guards against a stale pid file whose pid was reused).
pid_of() {
    local pid
    [ -s "$RUN/$1.pid" ] || return 1
    pid=$(head -n1 "$RUN/$1.pid" | tr -dc 0-9)
    [ -n "$pid" ] && alive "$pid" && runs "$pid" "$2" || return 1
    echo "$pid"
}

# stop_pid PID TIMEOUT: SIGTERM, wait up to TIMEOUT seconds, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid did not stop after SIGTERM within $2 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || return 0; sleep 0.1; done
}

# stop_daemon NAME EXE [TIMEOUT]
stop_daemon() {
    local pid
    if pid=$(pid_of "$1" "$2"); then
        stop_pid "$pid" "${3:-15}"
    fi
    rm -f "$RUN/$1.pid"
}

# Processes left behind by jobs of this cluster: slurmstepd and job tasks whose environment names
# this cluster's slurm.conf. Never the caller itself or its parents (e.g. a shell inside salloc).
stray_pids() {
    local ancestors=" " p=$BASHPID pid env
    while [ -n "$p" ] && [ "$p" -gt 1 ]; do
        ancestors+="$p "
        p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || break
    done
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        case $ancestors in *" $pid "*) continue ;; esac
        # (no `| grep -q` here: with pipefail, grep's early exit can fail the pipeline)
        env=$'\n'$(tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ")$'\n' || continue
        [[ $env == *$'\n'"SLURM_CONF=$CONF"$'\n'* ]] || continue
        if runs "$pid" slurmstepd || [[ $env == *$'\n'SLURM_JOB_ID=* ]]; then
            echo "$pid"
        fi
    done
}

# stop_all: cancel the jobs, stop every daemon (compute nodes first), then whatever jobs left behind.
stop_all() {
    local jobs i pid strays deadline
    if pid_of slurmctld slurmctld >/dev/null && [ -f "$CONF" ]; then
        jobs=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF timeout 10 scancel $jobs 2>/dev/null || true
            # Up to KillWait (10 s) between SIGTERM and SIGKILL, plus the epilog; only worth waiting
            # for when the nodes' slurmd are there to finish the jobs.
            deadline=$((SECONDS + 25))
            while [ $SECONDS -lt $deadline ] && pid_of slurmd-n1 slurmd >/dev/null &&
                  pid_of slurmd-n2 slurmd >/dev/null; do
                [ -z "$(SLURM_CONF=$CONF timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]%%:*}" "${DAEMONS[i]#*:}" 30
    done
    strays=$(stray_pids)
    if [ -n "$strays" ]; then
        log "stopping processes left by jobs: ${strays//$'\n'/ }"
        for pid in $strays; do stop_pid "$pid" 5 & done
        wait
    fi
}
