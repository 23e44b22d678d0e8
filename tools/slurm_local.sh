#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on localhost (Debian's slurm-wlm and munge), for trying the
# workflow's SLURM profile and for tests/test_slurm.py. No GPU, no slurmdbd: finished jobs are
# read back with `sacct -c` (JobCompType=jobcomp/filetxt).
#
#     tools/slurm_local.sh start [DIR]    # prints what to export (SLURM_CONF, PATH); DIR default /tmp/slurm-local
#     tools/slurm_local.sh status [DIR]
#     tools/slurm_local.sh stop [DIR]     # stops the daemons it started (by their PID files)
#
# Everything (config, munge socket, state, spool, logs) lives in DIR, so a second cluster in
# another DIR never shares state; each start gets fresh state and free ports. Needs root: slurmd
# runs the jobs (as the submitting user, root here).
set -euo pipefail

cmd=${1:-}
DIR=$(realpath -m "${2:-${SLURM_LOCAL_DIR:-/tmp/slurm-local}}")
CONF=$DIR/etc/slurm.conf
DAEMONS=(slurmd slurmctld munged)  # stop order

die() { echo "slurm_local: $*" >&2; exit 1; }

pid_of() {  # the PID of a daemon this script started in DIR, if it still runs
    local f=$DIR/run/$1.pid pid
    [ "$1" = munged ] && f=$DIR/munge/munged.pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local until=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $until ] || return 1
        sleep 0.2
    done
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    # The node as slurmd sees it; memory leaves a margin for the daemons and the submitting host.
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mem=$((mem > 2048 ? mem - 1024 : mem / 2))
    cat > "$CONF" <<EOF
ClusterName=local$$
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue (the plugin's status command here) for 10 minutes.
MinJobAge=600
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SchedulerParameters=sched_interval=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd runs the jobs)"
    for b in munged slurmctld slurmd sbatch squeue sacct; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge"
    done
    [ -r /etc/munge/munge.key ] || die "/etc/munge/munge.key missing: apt-get install -y munge makes it"
    for d in "${DAEMONS[@]}"; do
        pid_of "$d" >/dev/null && die "$d already runs for $DIR: tools/slurm_local.sh stop $DIR first"
    done
    rm -rf "$DIR"
    mkdir -p "$DIR"/{etc,state,spool,run,log,munge}
    chown munge: "$DIR/munge"
    chmod 755 "$DIR/munge"
    write_conf
    # snakemake-executor-plugin-slurm-jobstep drops every SLURM_* variable, SLURM_CONF included,
    # before its srun inside a job; a real cluster's srun finds /etc/slurm/slurm.conf, this one
    # finds DIR's through a wrapper first on PATH.
    mkdir -p "$DIR/bin"
    printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$CONF" "$(command -v srun)" > "$DIR/bin/srun"
    chmod +x "$DIR/bin/srun"
    export SLURM_CONF=$CONF
    runuser -u munge -- munged --socket="$DIR/munge/munge.sock" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    slurmctld
    slurmd
    wait_for 30 "the node" sh -c "sinfo -h -o %t | grep -qx idle" \
        || { tail -5 "$DIR"/log/*.log >&2; stop; die "the node did not become idle within 30 s (logs above)"; }
    echo "export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH"
}

stop() {
    local d pid
    # Jobs still running (a run that was interrupted) end first, so none outlives the cluster.
    if pid_of slurmctld >/dev/null; then
        SLURM_CONF=$CONF scancel --quiet --user="$(id -un)" 2>/dev/null || true
        wait_for 15 "jobs to end" sh -c "[ -z \"\$(SLURM_CONF=$CONF squeue -h -t running,completing)\" ]" || true
    fi
    for d in "${DAEMONS[@]}"; do
        pid=$(pid_of "$d") || continue
        kill "$pid" 2>/dev/null || true
        wait_for 15 "$d to stop" sh -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    done
}

status() {
    local d pid rc=0
    for d in munged slurmctld slurmd; do
        if pid=$(pid_of "$d"); then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=1; fi
    done
    [ $rc = 0 ] && SLURM_CONF=$CONF sinfo
    return $rc
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status [DIR]" ;;
esac
