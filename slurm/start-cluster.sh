#!/usr/bin/env bash
# Start a real Slurm cluster on this one machine (root, Debian 12), for the tests and by hand:
#   munged, MariaDB, slurmdbd (so sacct works), slurmctld, and two slurmd (nodes n1, n2) with
#   4 fake GPUs each; one partition `debug`.
# Everything (configs, state, logs, pid files, database, munge key) lives under
#   ${LLMBATCH_SLURM_DIR:-/tmp/llmbatch-slurm}
# Idempotent: returns at once when the cluster is already up and healthy, starts what is missing
# otherwise, and restarts everything when a config template changed.
# Prints `export SLURM_CONF=...` on stdout (also written to $LLMBATCH_SLURM_DIR/env.sh).
# Stop it with slurm/stop-cluster.sh.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

HOST=$(hostname -s)
PORT_BASE=${LLMBATCH_SLURM_PORT_BASE:-17800}
CTLD_PORT=$((PORT_BASE + 17))
DBD_PORT=$((PORT_BASE + 19))
DB_PORT=$((PORT_BASE + 6))
N1_PORT=$((PORT_BASE + 21))
N2_PORT=$((PORT_BASE + 22))
NODE_CPUS=${LLMBATCH_SLURM_NODE_CPUS:-16}   # 4 GPUs x the spec's default cpus_per_gpu (4)
NODE_MEM=${LLMBATCH_SLURM_NODE_MEM:-16000}   # MB
# Job credential lifetime (s), which is also how long a requeued job waits before it may start
# again (Slurm default 120, minimum 5).
CRED_EXPIRE=${LLMBATCH_SLURM_CRED_EXPIRE:-10}
DB_PASS=llmbatch   # MariaDB listens on 127.0.0.1 only; this is a throwaway test database
TIMEOUT=${LLMBATCH_SLURM_START_TIMEOUT:-30}   # seconds for each daemon to come up
SBIN=/usr/sbin

export SLURM_CONF=$CONF
t0=$(date +%s.%N)

if [ "$(id -u)" -ne 0 ]; then
    echo "start-cluster.sh: must run as root (Slurm runs as root here, and /etc/hosts is edited)" >&2
    exit 1
fi

bash "$HERE/install.sh"

mkdir -p "$DIR" "$ETC" "$RUN" "$LOG" "$DIR/state"
# One start or stop at a time. Every daemon is started with this descriptor closed (9>&-):
# one that inherited it would hold the lock for as long as it runs.
exec 9> "$DIR/lock"
flock -w 120 9 || { echo "start-cluster.sh: $DIR/lock is held by another process" >&2; exit 1; }

# fail MESSAGE [LOGFILE]: report, show the end of the daemon's log, exit non-zero.
fail() {
    echo "start-cluster.sh: $1" >&2
    if [ -n "${2:-}" ] && [ -f "$2" ]; then
        echo "---- last lines of $2 ----" >&2
        tail -n 30 "$2" >&2
        echo "----" >&2
    fi
    echo "start-cluster.sh: daemons that did come up are left running; logs in $LOG;" \
         "stop them with: LLMBATCH_SLURM_DIR=$DIR $HERE/stop-cluster.sh" >&2
    exit 1
}

# wait_for DAEMON LOGFILE COMMAND...: retry COMMAND every 0.2 s for up to $TIMEOUT s; DAEMON is
# NAME:EXE as in $DAEMONS. Gives up early when the daemon is gone (after a few seconds of grace for
# it to write its pid file).
wait_for() {
    local name=${1%%:*} exe=${1#*:} logfile=$2 start=$SECONDS
    shift 2
    while [ $SECONDS -lt $((start + TIMEOUT)) ]; do
        "$@" >/dev/null 2>&1 && return 0
        if [ $SECONDS -ge $((start + 5)) ] && ! pid_of "$name" "$exe" >/dev/null; then
            fail "$name is not running" "$logfile"
        fi
        sleep 0.2
    done
    fail "$name did not come up within $TIMEOUT s" "$logfile"
}

# ---------------------------------------------------------------------------------------------
# Checks, also used to decide whether there is anything to do.

munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }
db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping; }
dbd_ok() { timeout 5 sacctmgr -n -P list cluster format=cluster; }
ctld_ok() { [[ $(timeout 5 scontrol ping) == *'is UP'* ]]; }
sacct_ok() { timeout 5 sacct -n -X -S now; }

# Nodes usable: idle, mixed, allocated or completing, responding (no '*'), not drained or down.
nodes_ok() {
    local states
    states=$(timeout 5 sinfo -h -N -o '%N=%t' | sort -u | tr '\n' ' ') || return 1
    [[ $states =~ ^n1=(idle|mix|alloc|comp)\ n2=(idle|mix|alloc|comp)\ $ ]]
}

daemons_running() {
    local d
    for d in "${DAEMONS[@]}"; do pid_of "${d%%:*}" "${d#*:}" >/dev/null || return 1; done
}

# ---------------------------------------------------------------------------------------------
# Configuration: fill in the templates next to this script.

render() {
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@N1_PORT@|$N1_PORT|g" -e "s|@N2_PORT@|$N2_PORT|g" \
        -e "s|@NODE_CPUS@|$NODE_CPUS|g" -e "s|@NODE_MEM@|$NODE_MEM|g" \
        -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" -e "s|@DB_PASS@|$DB_PASS|g" "$HERE/$1.in" > "$ETC/$1.new"
    if grep -q '@[A-Z_]*@' "$ETC/$1.new"; then
        fail "unfilled placeholder in $ETC/$1.new: $(grep -o '@[A-Z_]*@' "$ETC/$1.new" | head -n1)"
    fi
}

config_changed=0
for f in slurm.conf slurmdbd.conf gres.conf; do
    render "$f"
    if ! cmp -s "$ETC/$f.new" "$ETC/$f"; then
        config_changed=1
    fi
done

if [ $config_changed = 0 ] && daemons_running && nodes_ok && sacct_ok; then
    echo "export SLURM_CONF=$CONF" | tee "$DIR/env.sh"
    exit 0
fi
if [ $config_changed = 1 ] && [ -f "$CONF" ]; then
    log "configuration changed: restarting the cluster"
    stop_all
fi
for f in slurm.conf slurmdbd.conf gres.conf; do mv -f "$ETC/$f.new" "$ETC/$f"; done
chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a config that others can read (it holds a password)

# n1 and n2 must resolve to this host: the launcher takes the first node of SLURM_JOB_NODELIST as
# the rendezvous address, as on a real cluster. /etc/hosts may be a bind mount: rewrite in place.
HOSTS_BEGIN="# BEGIN llmbatch-slurm, local test cluster"
HOSTS_END="# END llmbatch-slurm"
hosts_block="$HOSTS_BEGIN
127.0.0.1 ${NODES[*]}
$HOSTS_END"
if [ "$(sed -n "/^$HOSTS_BEGIN/,/^$HOSTS_END/p" /etc/hosts)" != "$hosts_block" ]; then
    others=$(sed "/^$HOSTS_BEGIN/,/^$HOSTS_END/d" /etc/hosts)
    printf '%s\n%s\n' "$others" "$hosts_block" > /etc/hosts
fi
for n in "${NODES[@]}"; do
    addr=$(getent ahostsv4 "$n" | awk '{print $1; exit}')
    [ "$addr" = 127.0.0.1 ] || fail "node name $n resolves to '$addr', not 127.0.0.1 (see /etc/hosts)"
done

# Fake GPUs: 4 character devices per node (copies of /dev/null; Slurm rejects plain files).
for n in "${NODES[@]}"; do
    mkdir -p "$DIR/dev/$n"
    for i in 0 1 2 3; do
        [ -c "$DIR/dev/$n/gpu$i" ] || { rm -f "$DIR/dev/$n/gpu$i"; mknod "$DIR/dev/$n/gpu$i" c 1 3; }
    done
done

# ---------------------------------------------------------------------------------------------
# Daemons, each started only when not already running. Daemons get no terminal and no inherited
# stdout: a caller capturing this script's output (`$(start-cluster.sh)`) must not wait on them.

# munged: private key, socket, pid and log file.
if ! pid_of munged munged >/dev/null; then
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR/munge"   # clients need to reach the socket; the key itself is 0600
    [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    rm -f "$MUNGE_SOCKET"
    # --force: munged otherwise refuses to run as root / with a socket outside /run/munge
    $SBIN/munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --num-threads=10 \
        < /dev/null >> "$LOG/munged.log" 2>&1 9>&- || fail "munged failed to start" "$LOG/munged.log"
fi
wait_for munged:munged "$LOG/munged.log" munge_ok

# MariaDB: private datadir, socket and port (127.0.0.1 only); not the system service.
if ! pid_of mariadb mariadbd >/dev/null; then
    mkdir -p "$DIR/mariadb/tmp"
    if [ ! -d "$DIR/mariadb/data/mysql" ]; then
        rm -rf "$DIR/mariadb/data"
        mariadb-install-db --no-defaults --datadir="$DIR/mariadb/data" --user=root \
            --auth-root-authentication-method=socket --skip-test-db \
            > "$LOG/mariadb-install.log" 2>&1 ||
            fail "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    # Relaxed flushing: a throwaway test database. (slurmdbd logs an error below a 512M buffer pool;
    # the pool is only touched as it is used.)
    setsid $SBIN/mariadbd --no-defaults --user=root --datadir="$DIR/mariadb/data" \
        --tmpdir="$DIR/mariadb/tmp" --socket="$DB_SOCKET" --pid-file="$RUN/mariadb.pid" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=512M \
        --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2 \
        < /dev/null >> "$LOG/mariadb.log" 2>&1 9>&- &
fi
wait_for mariadb:mariadbd "$LOG/mariadb.log" db_ok
mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
    fail "could not create the database user for slurmdbd" "$LOG/mariadb.log"

# slurmdbd (finds slurmdbd.conf next to $SLURM_CONF), then register the cluster (slurmctld would
# do it too, but only after logging a connection error).
if ! pid_of slurmdbd slurmdbd >/dev/null; then
    $SBIN/slurmdbd < /dev/null >> "$LOG/slurmdbd.log" 2>&1 9>&- ||
        fail "slurmdbd failed to start" "$LOG/slurmdbd.log"
fi
wait_for slurmdbd:slurmdbd "$LOG/slurmdbd.log" dbd_ok
if [[ $'\n'$(dbd_ok)$'\n' != *$'\n'llmbatch$'\n'* ]]; then
    sacctmgr -i add cluster llmbatch > /dev/null || fail "sacctmgr add cluster failed" "$LOG/slurmdbd.log"
fi

if ! pid_of slurmctld slurmctld >/dev/null; then
    $SBIN/slurmctld < /dev/null >> "$LOG/slurmctld.log" 2>&1 9>&- ||
        fail "slurmctld failed to start" "$LOG/slurmctld.log"
fi
wait_for slurmctld:slurmctld "$LOG/slurmctld.log" ctld_ok

for n in "${NODES[@]}"; do
    if ! pid_of "slurmd-$n" slurmd >/dev/null; then
        mkdir -p "$DIR/state/slurmd-$n"
        $SBIN/slurmd -N "$n" < /dev/null >> "$LOG/slurmd-$n.log" 2>&1 9>&- ||
            fail "slurmd $n failed to start" "$LOG/slurmd-$n.log"
    fi
done

# Wait for both nodes to be usable. A node that answers but was left drained or down (node state
# is kept across restarts, e.g. a test drained it) is resumed, once. ('down*' only means that its
# slurmd has not registered yet.)
resumed=" "
deadline=$((SECONDS + TIMEOUT))
while [ $SECONDS -lt $deadline ]; do
    nodes_ok && break
    for n in "${NODES[@]}"; do
        state=$(timeout 5 sinfo -h -N -n "$n" -o '%t') || continue
        if [[ $state =~ ^(drain|drng|drained|down|fail)$ && $resumed != *" $n "* ]]; then
            log "resuming node $n ($(sinfo -h -N -n "$n" -o '%t: %E'))"
            scontrol update nodename="$n" state=resume || true
            resumed+="$n "
        fi
    done
    sleep 0.2
done
if ! nodes_ok; then
    sinfo -N -o '%N %t %E' >&2 || true
    for n in "${NODES[@]}"; do tail -n 15 "$LOG/slurmd-$n.log" >&2 || true; done
    fail "nodes n1 and n2 not idle within $TIMEOUT s" "$LOG/slurmctld.log"
fi
wait_for slurmdbd:slurmdbd "$LOG/slurmdbd.log" sacct_ok

echo "export SLURM_CONF=$CONF" > "$DIR/env.sh"
log "cluster up in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}") s:" \
    "nodes n1 n2 (4 GPUs each), partition debug, logs in $LOG"
echo "export SLURM_CONF=$CONF"
