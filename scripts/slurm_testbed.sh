#!/usr/bin/env bash
# A real Slurm cluster of N nodes on this one machine (Debian bookworm packages, 22.05) with slurmdbd accounting and two
# preemption partitions, for the server-backed tests (docs: TESTBED.md). Needs root; works without systemd: every
# daemon is started directly and stopped by its pid file.
#
# Each node is one slurmd in its own network, UTS and mount namespaces: its own address and hostname (node1 =
# 10.77.0.11, node2 = 10.77.0.12, ... on the bridge cosimbr0, whose 10.77.0.1 is the controller's and the host's
# address) and its own /scratch (a private directory, /var/lib/slurm-testbed/<node>/scratch, mounted there): nothing
# written under /scratch by a job is seen by another node. The rest of the filesystem (the code, /tmp, the job logs)
# is shared, as a cluster's home filesystem is; services a job must reach (S3) listen on 10.77.0.1.
#
#   scripts/slurm_testbed.sh install   apt-get install the packages (a no-op when they are installed)
#   scripts/slurm_testbed.sh start     install if needed, write the configs, set up the nodes' namespaces, start munged,
#                                      mariadb, slurmdbd, slurmctld and one slurmd per node, and wait until every node
#                                      is idle (a no-op when all of it is up)
#   scripts/slurm_testbed.sh stop      cancel every job and stop the daemons
#   scripts/slurm_testbed.sh status    daemons, sinfo and squeue (exit code 3 when a daemon is down)
#
# Partitions: `low` (default, PriorityTier=1, GraceTime=30, preemptible by REQUEUE: SIGTERM, SIGKILL 30 s later) and
# `high` (PriorityTier=10, PreemptMode=OFF), both over every node. Each node declares CPUs=4 whatever the machine has: a
# job in `high` asking for 4 CPUs of a node preempts the `low` jobs there.
# Environment: SLURM_TESTBED_NODES (default 2), SLURM_TESTBED_TIMEOUT (seconds to wait for the nodes, default 60).
# Files: /etc/slurm/{slurm,slurmdbd}.conf, logs in /var/log/slurm (slurmd-<node>.log), state in /var/lib/slurm, pid
# files in /run (slurmd-<node>.pid), node names in /etc/hosts.
set -euo pipefail

CLUSTER=cosim
TIMEOUT=${SLURM_TESTBED_TIMEOUT:-60}
CONTROLLER=$(hostname -s)
NODES=${SLURM_TESTBED_NODES:-2}
[[ $NODES =~ ^[1-9]$ ]] || { echo "slurm_testbed: SLURM_TESTBED_NODES=$NODES: give 1 to 9 nodes" >&2; exit 2; }
NET=10.77.0                 # the bridge's /24: .1 the controller (host side), .1N node N
BRIDGE=cosimbr0
NODE_ROOT=/var/lib/slurm-testbed # <node>/scratch: the node's private /scratch
SLURMD_STARTED_AT= # set when this run starts a slurmd
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurm-testbed # mariadb listens on localhost only; the database is throwaway
# daemon name -> pid file (slurm*.pid paths are also written into the configs below)
declare -A PIDFILE=([munged]=/run/munge/munged.pid [mariadbd]=/run/mysqld/mysqld.pid [slurmdbd]=/run/slurmdbd.pid
                    [slurmctld]=/run/slurmctld.pid)
NODE_NAMES=()
for ((i = 1; i <= NODES; i++)); do
    NODE_NAMES+=("node$i")
    PIDFILE[node$i]=/run/slurmd-node$i.pid # a node's daemon is "slurmd" under its node name
done

log() { echo "slurm_testbed: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() { [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts system daemons)"; }

#----------------------------------------------------------------------------
# install

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || echo "$p"
    done
}

do_install() {
    require_root
    local missing
    missing=$(missing_packages)
    if [[ -z $missing ]]; then
        log "packages already installed"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} by hand"
    # Keep the packages' maintainer scripts from starting daemons (we start them ourselves and track their pids).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also when interrupted
    fi
    log "installing: ${missing//$'\n'/ }"
    local rc=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } \
        >/tmp/slurm_testbed_install.log 2>&1 || rc=$?
    if [[ $made_policy == 1 ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
    if [[ $rc != 0 ]]; then
        tail -n 30 /tmp/slurm_testbed_install.log >&2
        die "apt-get failed (rc $rc); full log in /tmp/slurm_testbed_install.log"
    fi
    log "installed ($(dpkg-query -W -f='${Version}' slurmctld))"
}

#----------------------------------------------------------------------------
# daemons

pid_of() { # prints the pid of daemon $1 if its pid file names a live process of that name
    local f=${PIDFILE[$1]} pid
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "${1/#node*/slurmd}" ]] || return 1
    echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out after ${secs}s waiting for $what"; return 1; }
        sleep 0.2
    done
}

kill_daemons() { # SIGTERM to each named daemon at once, SIGKILL to those still alive after 10 s
    local name pid i alive
    local -A pids=()
    for name in "$@"; do
        if pid=$(pid_of "$name"); then
            pids[$name]=$pid
            kill -TERM "$pid" 2>/dev/null || true
        else
            rm -f "${PIDFILE[$name]}"
        fi
    done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.2
    done
    for name in "${!pids[@]}"; do
        pid=${pids[$name]}
        if [[ -d /proc/$pid ]]; then
            log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "${PIDFILE[$name]}"
        log "stopped $name ($pid)"
    done
}

show_logs() { # the last lines of each daemon's log, the node daemon's last (nearest to the error message)
    local f
    for f in /var/log/munge/munged.log "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-node*.log; do
        [[ -r $f ]] || continue
        echo "----- $f" >&2
        grep -v -e 'mpi/pmix' -e 'PMIx' -e 'MPI: Cannot' "$f" | tail -n 15 >&2 || true
    done
}

fail_start() { log "ERROR: $*"; show_logs; exit 1; }

#----------------------------------------------------------------------------
# start

write_if_changed() { # write_if_changed PATH MODE OWNER < content; returns 0 if the file changed
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        chmod "$mode" "$path"; chown "$owner" "$path"
        return 1
    fi
    install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$path"
    rm -f "$tmp"
    return 0
}

write_configs() { # returns 0 if a config changed
    local mem changed=1
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    install -d -m 755 "$CONF_DIR"
    write_if_changed "$CONF_DIR/slurm.conf" 644 root:root <<EOF && changed=0
# Written by scripts/slurm_testbed.sh: a test cluster of $NODES node(s) on one machine (see TESTBED.md). Edits are
# overwritten by start.
ClusterName=$CLUSTER
SlurmctldHost=$CONTROLLER($NET.1)
SlurmUser=slurm
AuthType=auth/munge
# Step credentials expire after 5 s, not 120: a requeued job restarts in seconds.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
MailProg=/bin/true
# No cgroups (containers, no systemd): no cgroup.conf on purpose.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Lets the node declare CPUs=4 on a 2-core machine.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Preemption by partition priority, as Slurm ships it: a preempted job gets SIGCONT + SIGTERM, SIGKILL after the
# partition's GraceTime, and is requeued (the job's own --signal, e.g. submitit's USR2, marks its time limit only).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
$(for i in "${!NODE_NAMES[@]}"; do echo "NodeName=${NODE_NAMES[i]} NodeAddr=$NET.1$((i + 1)) CPUs=4 RealMemory=$mem State=UNKNOWN"; done)
PartitionName=low Nodes=ALL Default=YES PriorityTier=1 GraceTime=30 MaxTime=INFINITE State=UP
PartitionName=high Nodes=ALL PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF
    write_if_changed "$CONF_DIR/slurmdbd.conf" 600 slurm:slurm <<EOF && changed=0
# Written by scripts/slurm_testbed.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG_DIR/slurmdbd.log
PidFile=${PIDFILE[slurmdbd]}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    # A stale cgroup.conf (e.g. from the package or an earlier setup) would enable cgroup plugins' checks.
    if [[ -e $CONF_DIR/cgroup.conf ]]; then
        mv "$CONF_DIR/cgroup.conf" "$CONF_DIR/cgroup.conf.disabled-by-testbed"
        changed=0
    fi
    return $changed
}

ensure_hosts() { # every node name resolves to its address (the ranks' rendezvous and gloo go by hostname)
    local i name addr
    for i in "${!NODE_NAMES[@]}"; do
        name=${NODE_NAMES[i]} addr=$NET.1$((i + 1))
        [[ $(getent hosts "$name" | awk '{print $1}') == "$addr" ]] && continue
        sed -i "/[[:space:]]$name\$/d" /etc/hosts
        echo "$addr $name" >>/etc/hosts
        log "added '$addr $name' to /etc/hosts"
    done
}

setup_network() { # the bridge (the controller's address) and one network namespace per node, linked by a veth pair
    local i ns name
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || fail_start "cannot create the bridge $BRIDGE (needs CAP_NET_ADMIN)"
        ip addr add "$NET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for i in "${!NODE_NAMES[@]}"; do
        name=${NODE_NAMES[i]} ns=cosim-${NODE_NAMES[i]}
        ip netns list | grep -qw "$ns" && continue
        ip netns add "$ns" || fail_start "ip netns add $ns failed"
        ip link add "veth-$name" type veth peer name eth0 netns "$ns"
        ip link set "veth-$name" master "$BRIDGE" up
        ip -n "$ns" addr add "$NET.1$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        log "node $name: network namespace $ns at $NET.1$((i + 1))"
    done
}

start_munge() {
    install -d -o munge -g munge -m 700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 711 /var/lib/munge
    install -d -o munge -g munge -m 755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    running munged && return
    rm -f "${PIDFILE[munged]}" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    wait_until 10 "munged" sh -c 'munge -n | unmunge' || fail_start "munged does not answer"
    log "started munged ($(pid_of munged))"
}

start_mariadb() {
    if ! running mariadbd; then
        install -d -o mysql -g mysql -m 755 /run/mysqld
        # setsid: mysqld_safe does not daemonize; keep it out of the caller's process group (a test runner killing
        # its group must not take mariadb down).
        setsid -w /etc/init.d/mariadb start </dev/null >/tmp/slurm_testbed_mariadb.log 2>&1 \
            || { cat /tmp/slurm_testbed_mariadb.log >&2; fail_start "mariadb did not start"; }
        log "started mariadb ($(pid_of mariadbd || echo '?'))"
    fi
    wait_until 30 "mariadb" mysqladmin --no-defaults -uroot -S /run/mysqld/mysqld.sock ping || fail_start "mariadb does not answer"
    mysql -uroot -S /run/mysqld/mysqld.sock <<EOF || fail_start "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

any_slurmd() { pgrep -x slurmd >/dev/null; }

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

start_slurm() {
    install -d -o slurm -g slurm -m 755 "$LOG_DIR" "$STATE_DIR" "$STATE_DIR/slurmctld"
    # slurmctld refuses to start on the saved state of another cluster name: the state is throwaway.
    local saved=$STATE_DIR/slurmctld/clustername
    if [[ -f $saved && $(cat "$saved") != "$CLUSTER" ]] && ! running slurmctld; then
        log "discarding the saved slurmctld state of cluster '$(cat "$saved")'"
        find "$STATE_DIR/slurmctld" -mindepth 1 -delete
    fi
    if ! running slurmdbd; then
        rm -f "${PIDFILE[slurmdbd]}"
        /usr/sbin/slurmdbd || fail_start "slurmdbd exited with an error"
        log "started slurmdbd"
    fi
    wait_until 30 "slurmdbd" sacctmgr -n -P list cluster || fail_start "slurmdbd does not answer sacctmgr"
    if ! cluster_registered; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || cluster_registered || fail_start "sacctmgr add cluster $CLUSTER failed"
        log "added cluster $CLUSTER to the accounting database"
    fi
    if ! running slurmctld; then
        rm -f "${PIDFILE[slurmctld]}"
        /usr/sbin/slurmctld || fail_start "slurmctld exited with an error"
        log "started slurmctld"
    fi
    wait_until 30 "slurmctld" scontrol ping || fail_start "slurmctld does not answer scontrol ping"
    local name
    for name in "${NODE_NAMES[@]}"; do
        running "$name" && continue
        rm -f "${PIDFILE[$name]}"
        install -d -o root -g root -m 755 "$STATE_DIR/slurmd-$name" "$NODE_ROOT/$name/scratch" /scratch
        SLURMD_STARTED_AT=$(date +%Y-%m-%dT%H:%M:%S)
        # The node's namespaces: its network (nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup
        # filesystem slurmd checks), its hostname and its /scratch (a private mount); -N: the node
        # name in slurm.conf. slurmd daemonizes; the jobs it starts inherit all three.
        nsenter --net="/run/netns/cosim-$name" unshare --uts --mount --propagation private sh -c \
            "hostname $name && mount --bind $NODE_ROOT/$name/scratch /scratch && exec /usr/sbin/slurmd -N $name" \
            || fail_start "slurmd of $name exited with an error"
        log "started slurmd of $name"
    done
}

node_state() { sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n 1; }

slurmd_start_time() { scontrol show node "$1" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2; }

node_ready() {
    [[ $(node_state "$1") =~ ^(idle|mix|mixed|alloc|allocated)$ ]] || return 1
    # sinfo lags behind a slurmd that just died or restarted: when we started slurmd, wait for its registration.
    [[ -z ${SLURMD_STARTED_AT:-} || ! $(slurmd_start_time "$1") < $SLURMD_STARTED_AT ]]
}

wait_nodes() {
    local deadline=$((SECONDS + TIMEOUT)) state node name
    local -A resumed=()
    for node in "${NODE_NAMES[@]}"; do
        while ! node_ready "$node"; do
            for name in slurmdbd slurmctld "${NODE_NAMES[@]}"; do
                running "$name" || fail_start "$name died (see its log below)"
            done
            state=$(node_state "$node")
            # A node left down/drained by an earlier unclean stop: bring it back once.
            if [[ -z ${resumed[$node]:-} && $state =~ ^(down|drain|drng|drained|fail)$ ]]; then
                scontrol update nodename="$node" state=resume 2>/dev/null || true
                resumed[$node]=1
            fi
            ((SECONDS < deadline)) || fail_start "node $node not ready after ${TIMEOUT}s (state '${state:-none}'; sinfo: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ' '))"
            sleep 0.2
        done
        running "$node" || fail_start "slurmd of $node died (see its log below)"
        log "node $node is $(node_state "$node")"
    done
}

do_start() {
    require_root
    do_install
    local t0=$SECONDS
    ensure_hosts
    if write_configs && { running slurmdbd || running slurmctld || any_slurmd; }; then
        log "configuration changed: restarting the Slurm daemons"
        stop_slurm_daemons
    fi
    setup_network
    start_munge
    start_mariadb
    start_slurm
    wait_nodes
    log "up in $((SECONDS - t0)) s"
}

#----------------------------------------------------------------------------
# stop / status

stop_slurm_daemons() {
    kill_daemons "${NODE_NAMES[@]}" slurmctld
    pkill -x slurmd 2>/dev/null || true # a node of an earlier, larger testbed (SLURM_TESTBED_NODES)
    kill_daemons slurmdbd # last: slurmctld reports to it while shutting down
}

cancel_jobs() {
    running slurmctld || return 0
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    # shellcheck disable=SC2016 # expanded by sh
    wait_until 20 "the cancelled jobs to end" sh -c '[ -z "$(squeue -h -o %A)" ]' || true
}

do_stop() {
    require_root
    cancel_jobs
    stop_slurm_daemons
    kill_daemons mariadbd munged # mariadbd shuts down cleanly on SIGTERM
}

do_status() {
    local name pid rc=0
    for name in munged mariadbd slurmdbd slurmctld "${NODE_NAMES[@]}"; do
        if pid=$(pid_of "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            rc=3
        fi
    done
    if running slurmctld; then
        sinfo || true
        squeue || true
    fi
    return $rc
}

case ${1:-} in
    install) do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
