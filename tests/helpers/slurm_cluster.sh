#!/usr/bin/env bash
# A real single-node SLURM on this machine (Debian's packages), for the cluster tests.
#   bash tests/helpers/slurm_cluster.sh up      install (when missing), configure and start munged, slurmctld and slurmd
#   bash tests/helpers/slurm_cluster.sh down    stop every daemon `up` started (munged only when `up` started it)
#   bash tests/helpers/slurm_cluster.sh status  sinfo
# The node offers a `cpu` and a `gpu` partition; its one "GPU" is a fake GRES (File=/dev/null) so
# that GPU requests are scheduled, accounted and exported (CUDA_VISIBLE_DEVICES) as on a real cluster.
# Needs root. Nothing outside /etc/slurm, /etc/munge, /var/spool/slurm* and /var/log/slurm is touched,
# and a slurm.conf that this script did not write (a real cluster's) is never replaced.
set -euo pipefail

HOST=$(hostname -s)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
MARK="# Written by tests/helpers/slurm_cluster.sh"
LEGACY_MARK="# Written by tests/slurm_cluster.sh" # what this script wrote before it moved to tests/helpers/
# munged was started by `up` (a munged already running, e.g. a real cluster's, is left alone by `down`).
MUNGE_STARTED=/run/munge/started-by-slurm-cluster-test
MUNGE_PID=/run/munge/munged.pid

ours() { grep -qF -e "$MARK" -e "$LEGACY_MARK" "$1"; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
        touch "$MUNGE_STARTED"
    fi
    munge -n | unmunge >/dev/null
}

write_conf() {
    local cpus mem
    if [ -f "$CONF_DIR/slurm.conf" ] && ! ours "$CONF_DIR/slurm.conf"; then
        echo "$CONF_DIR/slurm.conf exists and was not written by this script: not touching a real SLURM set-up" >&2
        exit 3
    fi
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    cat >"$CONF_DIR/slurm.conf" <<CONF
$MARK: one node, a cpu and a gpu partition, no accounting.
ClusterName=factory
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
SchedulerType=sched/backfill
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=3600
KillWait=5
NodeName=$HOST CPUs=$cpus RealMemory=$mem Gres=gpu:fake:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF
    echo "Name=gpu Type=fake File=/dev/null" >"$CONF_DIR/gres.conf"
    echo "ConstrainCores=no" >"$CONF_DIR/cgroup.conf"
}

wait_for_node() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true)
        case "$state" in
            idle | mixed | allocated) return 0 ;;
            drain* | down*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    echo "SLURM node $HOST did not come up (state: ${state:-none}); see $LOG_DIR" >&2
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    return 1
}

up() {
    install
    start_munge
    write_conf
    if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; else slurmctld; fi
    pgrep -x slurmd >/dev/null || slurmd
    wait_for_node
    sinfo
}

down() {
    if [ -f "$CONF_DIR/slurm.conf" ] && ! ours "$CONF_DIR/slurm.conf"; then
        # A real SLURM set-up (`up` refused it): its slurmctld and slurmd are not ours to stop.
        echo "$CONF_DIR/slurm.conf was not written by this script: leaving SLURM's daemons alone" >&2
    else
        pkill -x slurmd 2>/dev/null || true
        pkill -x slurmctld 2>/dev/null || true
        for _ in $(seq 20); do
            pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
            sleep 0.5
        done
        rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
        # Remove the configuration too: with a slurm.conf naming a controller that is down, every
        # SLURM client call (and so every Snakemake start, whose SLURM plugin asks) waits ~10 s for it.
        rm -f "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf" "$CONF_DIR/cgroup.conf"
    fi
    stop_munge
}

stop_munge() {
    # Only the munged that `up` started: by the pid it wrote (munged's default pid file), else the munge user's munged.
    [ -f "$MUNGE_STARTED" ] || return 0
    local pid
    pid=$(cat "$MUNGE_PID" 2>/dev/null || true)
    [ -n "$pid" ] || pid=$(pgrep -x -u munge munged 2>/dev/null | head -n1 || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "munged ($pid) did not stop" >&2
            return 1
        fi
    fi
    rm -f "$MUNGE_STARTED"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
