#!/usr/bin/env bash
# Sets up the one-node Slurm cluster the Slurm backend's tests run against, on a fresh
# Debian machine (or a laptop), and reuses it when it already runs, so it can run before
# every test run (backends.md, "Slurm", has the recipe this follows):
#
#   - Debian's slurmctld, slurmd, slurm-client and munge, installed with apt-get when
#     missing (no systemd needed: nothing is started as a service);
#   - a private munged, slurmctld and slurmd on localhost, with their sockets, ports,
#     state, spool, logs and pid files under $DISPATCH_SLURM_STATE (default
#     /tmp/dispatch-slurm): nothing of the machine's own /etc/slurm is used or changed;
#   - memory limits enforced by Slurm's cgroup plugin (task/cgroup, ConstrainRAMSpace),
#     so a job over its --mem is killed and shows OUT_OF_MEMORY; where cgroups cannot be
#     used (DISPATCH_SLURM_CGROUP=no, or slurmd refuses them) the cluster runs with
#     task/none and says that memory is then not enforced.
#
#   scripts/setup-slurm.sh            # set up; say what was done on stderr
#   eval "$(scripts/setup-slurm.sh)"  # ... and export SLURM_CONF
#   scripts/setup-slurm.sh --stop     # stop the daemons this script started
#
# Environment:
#   DISPATCH_SLURM_STATE     where the cluster keeps its config, state, logs and sockets
#   DISPATCH_SLURM_PORT      slurmctld's TCP port on localhost (default 16817; slurmd
#                            takes the next one)
#   DISPATCH_SLURM_CGROUP    auto (default), yes or no: whether to enforce memory limits
#                            with cgroups (auto: yes when slurmd starts with them)
#   DISPATCH_SLURM_CPUS      CPUs the node offers (default 16, at least the machine's):
#                            more than the machine has (SlurmdParameters=config_overrides)
#                            so that tests running in parallel, each holding a CPU with a
#                            sleeping job, do not queue behind one another
#   DISPATCH_SLURM_TIMEOUT   seconds to wait for the cluster to come up (default 60)
#
# Runs daemons as root (slurmd must, to make cgroups): through sudo when not root. It
# stops nothing it did not start. The cluster holds test jobs only; never point it at a
# real cluster's state.
#
# Everything said for people goes to stderr; stdout carries only `export` lines.
set -euo pipefail
# The daemons live in sbin, which an ordinary user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

STATE="${DISPATCH_SLURM_STATE:-/tmp/dispatch-slurm}"
CTLD_PORT="${DISPATCH_SLURM_PORT:-16817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CGROUP_MODE="${DISPATCH_SLURM_CGROUP:-auto}"
TIMEOUT="${DISPATCH_SLURM_TIMEOUT:-60}"
CPUS="${DISPATCH_SLURM_CPUS:-16}"
(( CPUS < $(nproc) )) && CPUS=$(nproc)
CONF="$STATE/slurm.conf"
MUNGE_SOCKET="$STATE/munge/munge.sock"

say() { printf 'setup-slurm: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

# Runs a command as root: directly, through sudo, or not at all (with the reason).
as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        fail "'$*' needs root, and sudo is not installed: run this script as root, or run that command as root and run this script again"
    fi
}

# True while the process runs (a zombie left unreaped by a minimal init counts as gone).
alive() {
    [[ -n "$1" && -r "/proc/$1/status" ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

pid_in() { [[ -s "$1" ]] && cat "$1" || true; }

# SLURM_CONF for every client call here.
slurm() { SLURM_CONF="$CONF" "$@"; }

stop_started() {
    local name file pid stopped=0
    for name in slurmd slurmctld munged; do
        case "$name" in
            munged) file="$STATE/munge/munged.pid" ;;
            *) file="$STATE/run/$name.pid" ;;
        esac
        pid="$(pid_in "$file")"
        if alive "$pid"; then
            say "stopping $name (pid $pid)"
            as_root kill -TERM "$pid"
            for _ in $(seq 1 "$TIMEOUT"); do
                alive "$pid" || break
                sleep 1
            done
            alive "$pid" && fail "$name (pid $pid) did not stop within ${TIMEOUT}s"
            stopped=$((stopped + 1))
        fi
    done
    [[ $stopped -gt 0 ]] || say "no daemon started by this script is running (pid files in $STATE)"
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_started
    exit 0
fi
if [[ $# -gt 0 ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi
case "$CGROUP_MODE" in auto | yes | no) ;; *) fail "DISPATCH_SLURM_CGROUP must be auto, yes or no, not '$CGROUP_MODE'" ;; esac

cluster_answers() {
    [[ -s "$CONF" ]] || return 1
    alive "$(pid_in "$STATE/run/slurmctld.pid")" || return 1
    alive "$(pid_in "$STATE/run/slurmd.pid")" || return 1
    slurm timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'
}

# 1. Reuse a cluster this script started earlier (in this boot).
if cluster_answers; then
    say "reusing the cluster running from $CONF ($(grep -o '^TaskPlugin=.*' "$CONF"))"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# 2. The packages.
missing=()
for program in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${program%%:*}" >/dev/null 2>&1 || missing+=("${program##*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing ${missing[*]} slurm-wlm-basic-plugins (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" slurm-wlm-basic-plugins >&2
fi
for program in slurmctld slurmd sbatch squeue scontrol scancel munged; do
    command -v "$program" >/dev/null 2>&1 || fail "$program is still missing after installing the packages"
done

# 3. Munge: the machine's key (made when missing), our own daemon and socket.
as_root mkdir -p "$STATE"/{state,spool,log,run,munge}
if ! as_root test -s /etc/munge/munge.key; then
    say "creating /etc/munge/munge.key"
    as_root mkdir -p /etc/munge
    as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    as_root chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    as_root chmod 400 /etc/munge/munge.key
fi
if alive "$(pid_in "$STATE/munge/munged.pid")"; then
    say "reusing munged (pid $(pid_in "$STATE/munge/munged.pid"))"
else
    say "starting munged (socket $MUNGE_SOCKET)"
    as_root rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    as_root munged --socket="$MUNGE_SOCKET" --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed" --force \
        || fail "munged did not start (log: $STATE/munge/munged.log)"
fi

# 4. The configuration. A stale daemon of ours (one died) is stopped first, so the two
# are started together on one configuration.
stop_stale() {
    local name pid
    for name in slurmd slurmctld; do
        pid="$(pid_in "$STATE/run/$name.pid")"
        if alive "$pid"; then
            say "stopping our $name (pid $pid): the cluster does not answer as a whole"
            as_root kill -TERM "$pid" || true
            for _ in $(seq 1 20); do alive "$pid" || break; sleep 0.5; done
        fi
    done
}
stop_stale

write_conf() {
    local cgroups="$1" task proctrack memory
    memory=$(($(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) * 3 / 4))
    if [[ "$cgroups" == yes ]]; then
        task=task/cgroup
        proctrack=proctrack/cgroup
    else
        task=task/none
        proctrack=proctrack/linuxproc
    fi
    # batch_sched_delay=0 and sched_min_interval=0: jobs start on the next tick instead of
    # after ~3 s; DefMemPerCPU: a job naming no --mem does not take the whole node.
    as_root tee "$CONF" >/dev/null <<CONF
# Written by scripts/setup-slurm.sh: a private one-node test cluster.
ClusterName=dispatch
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
ProctrackType=$proctrack
TaskPlugin=$task
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
DefMemPerCPU=100
MinJobAge=300
KillWait=5
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=localhost CPUs=$CPUS RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    # Read from beside slurm.conf. No swap past the limit, so a job over --mem is killed.
    as_root tee "$STATE/cgroup.conf" >/dev/null <<CGROUP
# Written by scripts/setup-slurm.sh.
CgroupPlugin=autodetect
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
AllowedSwapSpace=0
CGROUP
}

# 5. The daemons, and a wait for the node to take jobs.
node_idle() {
    local state
    state="$(slurm sinfo --noheader --nodes=localhost --format=%T 2>/dev/null | head -n 1)"
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

start_daemons() {
    as_root env SLURM_CONF="$CONF" slurmctld -i >&2 || return 1
    as_root env SLURM_CONF="$CONF" slurmd -N localhost >&2 || return 1
    local waited=0
    until node_idle; do
        alive "$(pid_in "$STATE/run/slurmd.pid")" || return 1
        alive "$(pid_in "$STATE/run/slurmctld.pid")" || return 1
        ((waited >= TIMEOUT * 2)) && return 1
        sleep 0.5
        waited=$((waited + 1))
    done
}

show_logs() {
    say "the end of slurmctld's log ($STATE/log/slurmctld.log):"
    as_root tail -n 15 "$STATE/log/slurmctld.log" >&2 || true
    say "the end of slurmd's log ($STATE/log/slurmd.log):"
    as_root tail -n 15 "$STATE/log/slurmd.log" >&2 || true
}

started=""
if [[ "$CGROUP_MODE" != no ]]; then
    write_conf yes
    say "starting slurmctld and slurmd with task/cgroup (memory limits enforced; config $CONF)"
    if start_daemons; then
        started=cgroup
    else
        show_logs
        stop_stale
        [[ "$CGROUP_MODE" == yes ]] && fail "the cluster did not start with cgroups (DISPATCH_SLURM_CGROUP=yes)"
        say "slurmd cannot use cgroups here: starting again with task/none, where Slurm does NOT enforce memory limits"
    fi
fi
if [[ -z "$started" ]]; then
    write_conf no
    say "starting slurmctld and slurmd with task/none (config $CONF)"
    start_daemons || { show_logs; fail "the cluster did not come up within ${TIMEOUT}s (is port $CTLD_PORT or $SLURMD_PORT taken? set DISPATCH_SLURM_PORT)"; }
    started=none
fi
say "the cluster is up: $(slurm sinfo --noheader --format='%P %D node(s) %c CPUs %m MiB %T' | head -n 1)"
echo "export SLURM_CONF=$CONF"
