# shellcheck shell=bash
# A throw-away one-node SLURM cluster on 127.0.0.1 for CI, with two fake GPUs.
#
# Source this file, then:
#   slurm_install               install Debian's slurmctld slurmd slurm-client munge (root)
#   slurm_start STATE_DIR       write the configs, start munged, slurmctld, slurmd; wait for
#                               the node; exports SLURM_CONF for the client commands
#   slurm_stop STATE_DIR        cancel jobs, stop the daemons by their pid files
#
# Everything (keys, configs, spool, state, logs, pid files, sockets) lives under STATE_DIR, so
# the cluster can be started again. One exception: /etc/slurm/slurm.conf and gres.conf are
# symlinks to STATE_DIR while the cluster runs (removed by slurm_stop), because Snakemake's
# jobstep plugin strips SLURM_CONF from the job environment before it calls srun
# (snakemake-executor-plugin-slurm issue #164), so srun inside a job finds only the default path.
# No slurmdbd: `sacct` does not work, so Snakemake must query with `squeue`, and finished jobs
# must stay visible to squeue for longer than its polling interval (MinJobAge).

# Ports of the controller and the node daemon; override when the defaults are taken.
: "${BCELLMAP_SLURMCTLD_PORT:=6817}"
: "${BCELLMAP_SLURMD_PORT:=6818}"
# The one partition jobs land in.
BCELLMAP_SLURM_PARTITION=ci

_slurm_log() { echo "[slurm-ci] $*" >&2; }

slurm_install() {
    local missing=()
    local tool
    for tool in munged slurmctld slurmd sbatch squeue; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        _slurm_log "SLURM and munge already installed: slurm $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null)"
        return 0
    fi
    _slurm_log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    _slurm_log "installed: slurm $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null)"
}

# The node line of slurm.conf, from what slurmd detects on this machine (CPUs, sockets, memory).
_slurm_node_hardware() {
    # `slurmd -C` prints "NodeName=host CPUs=2 ... RealMemory=24105" and an UpTime line.
    slurmd -C | head -n 1 | tr ' ' '\n' \
        | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' \
        | tr '\n' ' '
}

_slurm_write_config() {
    local state=$1 node=$2 hardware=$3
    local etc="$state/etc"
    # slurmctld only runs on a host whose name matches SlurmctldHost.
    local host
    host=$(hostname -s)
    cat >"$etc/slurm.conf" <<EOF
ClusterName=bcellmapci
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${BCELLMAP_SLURMCTLD_PORT}
SlurmdPort=${BCELLMAP_SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${state}/munge/munge.socket
CredType=cred/munge
StateSaveLocation=${state}/spool/slurmctld
SlurmdSpoolDir=${state}/spool/slurmd
SlurmctldPidFile=${state}/run/slurmctld.pid
SlurmdPidFile=${state}/run/slurmd.pid
SlurmctldLogFile=${state}/log/slurmctld.log
SlurmdLogFile=${state}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers and CI runners: track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# Hand out cores and memory, so several 1-core jobs run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# No slurmdbd: no accounting, no sacct.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Keep finished jobs visible to squeue for 5 minutes: the Snakemake plugin reads job
# states with squeue and needs MinJobAge >= 3 x its first polling interval.
MinJobAge=300
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
# Fake GPUs: gres.conf maps them to /dev/null and /dev/zero, enough for --gres=gpu:1 /
# --gpus=1 requests. Two, so that two 1-GPU jobs run at once on the 2 cores.
GresTypes=gpu
NodeName=${node} NodeHostname=${host} NodeAddr=127.0.0.1 ${hardware} Gres=gpu:2 State=UNKNOWN
PartitionName=${BCELLMAP_SLURM_PARTITION} Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$etc/gres.conf" <<EOF
NodeName=${node} Name=gpu File=/dev/null
NodeName=${node} Name=gpu File=/dev/zero
EOF
}

# Point /etc/slurm/{slurm,gres}.conf at STATE_DIR; refuse to replace a real (site) config.
_slurm_link_default_config() {
    local state=$1 name
    mkdir -p /etc/slurm
    for name in slurm.conf gres.conf; do
        if [ -e "/etc/slurm/$name" ] && [ ! -L "/etc/slurm/$name" ]; then
            _slurm_log "/etc/slurm/$name exists and is not ours: refusing to replace it"
            return 1
        fi
        ln -sfn "$state/etc/$name" "/etc/slurm/$name"
    done
}

_slurm_unlink_default_config() {
    local state=$1 name
    for name in slurm.conf gres.conf; do
        if [ "$(readlink "/etc/slurm/$name" 2>/dev/null)" = "$state/etc/$name" ]; then
            rm -f "/etc/slurm/$name"
        fi
    done
}

# Wait until COMMAND succeeds, at most SECONDS seconds.
_slurm_wait_for() {
    local seconds=$1
    shift
    local waited=0
    until "$@" >/dev/null 2>&1; do
        if [ "$waited" -ge "$seconds" ]; then
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

_slurm_node_idle() {
    [ "$(sinfo --noheader --Node --format=%t 2>/dev/null | head -n 1)" = "idle" ]
}

slurm_start() {
    local state=$1
    local node=bcellmap-ci
    mkdir -p "$state"/{etc,munge,spool/slurmctld,spool/slurmd,run,log}
    chmod 700 "$state/munge"

    # munge: a fresh key and a private socket, so a host munged (if any) is left alone.
    dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$state/munge/munge.key"
    munged --force \
        --key-file="$state/munge/munge.key" \
        --socket="$state/munge/munge.socket" \
        --pid-file="$state/run/munged.pid" \
        --log-file="$state/log/munged.log" \
        --seed-file="$state/munge/munged.seed"
    _slurm_wait_for 20 test -S "$state/munge/munge.socket" || {
        _slurm_log "munged did not start"; cat "$state/log/munged.log" >&2; return 1; }

    local hardware
    hardware=$(_slurm_node_hardware)
    _slurm_write_config "$state" "$node" "$hardware"
    _slurm_link_default_config "$state"
    export SLURM_CONF="$state/etc/slurm.conf"
    _slurm_log "node ${node}: ${hardware}Gres=gpu:2 (fake: /dev/null, /dev/zero)"

    # -i: ignore state left by an earlier cluster (there is none in a fresh STATE_DIR).
    slurmctld -i -f "$SLURM_CONF"
    _slurm_wait_for 30 scontrol ping || {
        _slurm_log "slurmctld did not answer"; cat "$state/log/slurmctld.log" >&2; return 1; }
    slurmd -f "$SLURM_CONF" -N "$node"
    if ! _slurm_wait_for 60 _slurm_node_idle; then
        _slurm_log "node ${node} did not become idle"
        sinfo --Node --long >&2 || true
        tail -n 40 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
        return 1
    fi
    sinfo --Node --long >&2
}

# Send SIGTERM to the process in PIDFILE and wait (up to 20 s) until it is gone.
_slurm_stop_pidfile() {
    local pidfile=$1 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        local waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 20 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

slurm_stop() {
    local state=$1
    [ -d "$state" ] || return 0
    if [ -s "$state/run/slurmctld.pid" ] && [ -f "$state/etc/slurm.conf" ]; then
        SLURM_CONF="$state/etc/slurm.conf" scancel --user=root 2>/dev/null || true
    fi
    _slurm_stop_pidfile "$state/run/slurmd.pid"
    _slurm_stop_pidfile "$state/run/slurmctld.pid"
    _slurm_stop_pidfile "$state/run/munged.pid"
    _slurm_unlink_default_config "$state"
    _slurm_log "daemons stopped ($state)"
}
