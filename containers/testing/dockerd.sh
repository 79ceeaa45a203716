#!/usr/bin/env bash
# A private Docker engine for the container tests, all of its state under one folder.
#
#   eval "$(bash containers/testing/dockerd.sh start)"   # prints: export DOCKER_HOST=unix://...
#   bash containers/testing/dockerd.sh stop
#
# `start` installs Debian's docker.io if dockerd is missing (root), starts dockerd with its data,
# exec root, pid file and socket under ${LLMBATCH_DOCKER_DIR:-/tmp/llmbatch-docker}, and waits until
# it answers. `stop` stops it through its pid file and leaves nothing running. Both are idempotent.
# Log: $DIR/dockerd.log.
set -euo pipefail
INSTALL=$(cd "$(dirname "$0")/../../slurm" && pwd)/install.sh

DIR=${LLMBATCH_DOCKER_DIR:-/tmp/llmbatch-docker}
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
SOCK=$DIR/docker.sock
PIDFILE=$DIR/dockerd.pid
LOG=$DIR/dockerd.log

log() { echo "dockerd.sh: $*" >&2; }

# The pid in $PIDFILE if that process is alive and is dockerd (guards against a reused pid).
running_pid() {
    local pid exe
    [ -s "$PIDFILE" ] || return 1
    pid=$(tr -dc 0-9 < "$PIDFILE")
    [ -n "$pid" ] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe##*/}
    [ "${exe% (deleted)}" = dockerd ] || return 1
    echo "$pid"
}

answers() { docker -H "unix://$SOCK" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install() {
    command -v dockerd >/dev/null && return 0
    log "installing docker.io"
    bash "$INSTALL" docker.io
}

start() {
    install
    mkdir -p "$DIR/data" "$DIR/exec"
    if ! running_pid >/dev/null; then
        rm -f "$PIDFILE" "$SOCK"
        log "starting dockerd (log: $LOG)"
        # --bridge none / --iptables=false: this engine never touches the host's network or firewall
        # (and cannot clash with a system docker0); containers use --network host, as llmbatch does.
        # setsid: the daemon outlives this script and the terminal's signals.
        setsid dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
            -H "unix://$SOCK" --bridge none --iptables=false --ip6tables=false \
            </dev/null >>"$LOG" 2>&1 &
    fi
    local i
    for ((i = 0; i < 600; i++)); do
        answers && break
        if ((i > 20)) && ! running_pid >/dev/null; then
            log "dockerd exited; last lines of $LOG:"; tail -n 20 "$LOG" >&2; exit 1
        fi
        sleep 0.1
    done
    answers || { log "dockerd did not answer within 60 s; see $LOG"; exit 1; }
    echo "export DOCKER_HOST=unix://$SOCK"
}

stop() {
    local pid i
    if pid=$(running_pid); then
        # dockerd stops its containers and its own containerd on SIGTERM.
        kill -TERM "$pid"
        for ((i = 0; i < 300; i++)); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
        if [ -e "/proc/$pid" ]; then
            log "dockerd (pid $pid) still running after 30 s; sending SIGKILL"
            kill -KILL "$pid"
        fi
    fi
    rm -f "$PIDFILE" "$SOCK"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
