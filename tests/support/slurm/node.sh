#!/usr/bin/env bash
# A throwaway single-node SLURM for mpmsub's tests: `node.sh start DIR` writes DIR/slurm.conf,
# starts slurmctld and slurmd (as root, no munge: auth/none), waits until the node is idle and
# has run one job, and prints `export SLURM_CONF=DIR/slurm.conf`. `node.sh stop DIR` cancels
# what is left, waits for it, and kills both daemons. Needs Debian's slurm-wlm (22.05 measured here).
# NODE_CPUS and NODE_MEM (MB) size the node; 2 and 20000 by default.
set -euo pipefail
action=${1:?usage: node.sh start|stop DIR}
dir=${2:?usage: node.sh start|stop DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
export SLURM_CONF=$dir/slurm.conf

# A daemon and its helpers (slurmscriptd) are killed at once with their process group: the node
# is thrown away, and on SIGTERM each daemon took about 2 s to close (measured). Only a process
# that is still the named daemon is killed (a stale pid file may name a reused pid), and only a
# group of its own; then the daemon is waited for, so that a new node can take its ports.
stop_pid() {
    local file=$1 name=$2 pid group state
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$name" ] || return 0
    group=$(ps -o pgid= -p "$pid" | tr -d ' ')
    if [ "$group" -gt 1 ] && [ "$group" != "$(ps -o pgid= -p $$ | tr -d ' ')" ]; then
        kill -9 -- "-$group" 2>/dev/null || true
    fi
    kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 50); do  # gone, or a zombie (holding no port) where init is slow to reap it
        state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        case $state in "" | Z*) return 0 ;; esac
        sleep 0.02
    done
}

if [ "$action" = stop ]; then
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        # A job's processes would outlive slurmd: cancel them all first.
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        # shellcheck disable=SC2086
        [ -z "$jobs" ] || scancel --full $jobs 2>/dev/null || true
        for _ in $(seq 100); do [ -z "$(squeue -h -t PD,R,CG -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    stop_pid "$dir/slurmd.pid" slurmd
    stop_pid "$dir/slurmctld.pid" slurmctld
    exit 0
fi

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
# Measured facts behind these lines: config_overrides lets RealMemory exceed the machine's memory
# (else the node is invalid); EnforcePartLimits=ALL makes sbatch refuse a job no node can hold
# (else it pends forever); OverMemoryKill kills a job over its --mem (sampled once a second).
# DefMemPerCPU gives a job without --mem 500M a CPU, as sites do (else it takes the whole node).
# Licenses: a cluster-wide pool of two seats, which jobs holding resources(licence=1) count.
cat >"$SLURM_CONF" <<EOF
ClusterName=mpmsubtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
MpiDefault=none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
Licenses=licence:2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${NODE_CPUS:-2} RealMemory=${NODE_MEM:-20000} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=500
EOF
slurmctld -i
slurmd -N localhost

fail() {
    echo "node.sh: $*" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
}
idle=
for _ in $(seq 300); do
    if [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]; then idle=1; break; fi
    sleep 0.1
done
[ -n "$idle" ] || fail "the node did not become idle"
# The controller first schedules about 3 s after it starts: one job makes the next ones prompt.
job=$(sbatch --parsable -J mpmsub-warmup -o /dev/null --wrap true) || fail "the warm-up job was refused"
state=
for _ in $(seq 300); do
    state=$(squeue -h -t all -j "$job" -o %T 2>/dev/null || true)
    [ "$state" = COMPLETED ] && break
    sleep 0.1
done
[ "$state" = COMPLETED ] || fail "the warm-up job did not complete (state: ${state:-unknown})"
echo "export SLURM_CONF=$SLURM_CONF"
