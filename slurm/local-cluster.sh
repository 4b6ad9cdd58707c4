#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and CI.
#
#   slurm/local-cluster.sh start    install (if missing), configure, start, wait until idle
#   slurm/local-cluster.sh stop     stop every daemon by the PID in its pid file
#   slurm/local-cluster.sh status   exit 0 and print `sinfo` when the node and accounting
#                                   answer; else one line saying what is down, exit 1
#
# Why it looks like this (found by doing it on Debian bookworm, SLURM 22.05.8,
# as root): no systemd and no cgroups, so proctrack/linuxproc + task/none +
# jobacct_gather/none; submitit polls `sacct`, so accounting is real (MariaDB +
# slurmdbd + `sacctmgr add cluster`), otherwise a job that dies without a
# result makes `job.result()` wait forever; MariaDB segfaults unless its
# --log-error lives in a directory owned by mysql; AuthInfo=cred_expire=10 and
# fast scheduler intervals make a requeued job restart in ~10 s instead of ~2 min.
# Idempotent: `start` on a running cluster only checks it.
set -euo pipefail

CLUSTER=hypergrad
STATE=${HYPERGRAD_SLURM_STATE:-/var/lib/hypergrad-slurm}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARKER="# written by hypergrad slurm/local-cluster.sh"
MYSQL_SOCKET=$STATE/mysql/mysqld.sock
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
}

install_packages() {
  local missing=0
  for binary in munged slurmctld slurmd sinfo slurmdbd mariadbd; do
    command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing=1
  done
  [ "$missing" = 0 ] && return 0
  log "installing $PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null
}

pid_alive() {  # pid_alive PIDFILE: true when the file names a running process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${seconds}s waiting for $what (logs: $STATE/log)"
    sleep 0.2
  done
}

write_configs() {
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it"
  fi
  local host cpus memory_mb
  host=$(hostname -s)
  cpus=$(nproc)
  memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p /etc/slurm "$STATE"/{log,spool/slurmctld,spool/slurmd,run,mysql,mysql-log}
  cat > "$CONF" <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DBD_CONF" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
StoragePort=3306
EOF
  chmod 600 "$DBD_CONF"
  # MariaDB refuses a socket path or log directory it cannot write as mysql.
  chown -R mysql:mysql "$STATE/mysql" "$STATE/mysql-log"
}

start_munge() {
  pid_alive /run/munge/munged.pid && return 0
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munge sh -c 'munge -n | unmunge'
}

mysql_root() { mariadb --socket="$MYSQL_SOCKET" -uroot "$@"; }

start_mariadb() {
  # A MariaDB that the package's init script already started (no policy-rc.d
  # on this machine) owns the datadir: use it rather than start a second one.
  if ! pid_alive "$STATE/mysql/mariadb.pid" && [ -S /run/mysqld/mysqld.sock ] \
      && mariadb --socket=/run/mysqld/mysqld.sock -uroot -e 'select 1' >/dev/null 2>&1; then
    MYSQL_SOCKET=/run/mysqld/mysqld.sock
  elif ! pid_alive "$STATE/mysql/mariadb.pid"; then
    # The Debian package's datadir /var/lib/mysql is initialised at install time;
    # root logs in through the unix socket, which is what slurmdbd (as root) uses.
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    # Socket and pid file in a directory mysql owns, log in its own mysql-owned directory.
    nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
      --socket="$MYSQL_SOCKET" --pid-file="$STATE/mysql/mariadb.pid" \
      --log-error="$STATE/mysql-log/error.log" --bind-address=127.0.0.1 --port=3306 \
      --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
    wait_for 60 mariadb mysql_root -e 'select 1'
  fi
  mysql_root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db"
}

start_slurmdbd() {
  if ! pid_alive "$STATE/run/slurmdbd.pid"; then
    # slurmdbd reaches MariaDB on StorageHost=localhost through the default socket path.
    if [ "$MYSQL_SOCKET" != /run/mysqld/mysqld.sock ]; then
      mkdir -p /run/mysqld && ln -sfn "$MYSQL_SOCKET" /run/mysqld/mysqld.sock
    fi
    /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

node_idle() { sinfo -h -o '%T' | grep -Eq '^(idle|mixed|allocated)'; }

start_slurm() {
  pid_alive "$STATE/run/slurmctld.pid" || /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  pid_alive "$STATE/run/slurmd.pid" || /usr/sbin/slurmd
  wait_for 60 "the node to be idle" node_idle
  # A node left down/drained by an earlier stop comes back.
  if sinfo -h -o '%T' | grep -Eq 'down|drain'; then
    scontrol update nodename="$(hostname -s)" state=resume || true
    wait_for 30 "the node to be idle" node_idle
  fi
}

start() {
  require_root
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && sinfo >/dev/null 2>&1; then
    log "a SLURM cluster not started by this script is configured; using it"
    return 0
  fi
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  log "ready: $(sinfo -h -o '%P %D %T %c cpus')"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait, then KILL
  local name=$1 file=$2 pid
  pid_alive "$file" || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { log "stopped $name"; return 0; }; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  log "killed $name"
}

stop() {
  require_root
  stop_pidfile slurmd "$STATE/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
  stop_pidfile slurmdbd "$STATE/run/slurmdbd.pid"
  stop_pidfile mariadb "$STATE/mysql/mariadb.pid"
  stop_pidfile munged /run/munge/munged.pid
}

accounting_problem() {  # why accounting (sacct -> slurmdbd -> MariaDB) does not answer; nothing if it does
  local output first
  output=$(timeout 20 sacct -n -X -S now -o JobID 2>&1) && ! grep -qiE 'error|unable' <<<"$output" && return 0
  first=$(grep -m1 -iE 'error|unable' <<<"$output" || true)
  first=${first#sacct: }
  echo "accounting does not answer (sacct: ${first:-${output:-no answer in 20 s}})"
}

daemon_dead() {  # daemon_dead PIDFILE...: the first pid file there is names no live process
  local file
  for file in "$@"; do
    [ -e "$file" ] || continue
    ! pid_alive "$file"
    return
  done
  return 1  # no pid file: not a daemon this script started
}

status() {
  local fix="fix: bash $0 stop; bash $0 start" problems=() dead=() accounting
  if ! command -v sinfo >/dev/null 2>&1; then
    log "down: SLURM is not installed; fix: bash $0 start"
    return 1
  fi
  if command -v munge >/dev/null 2>&1; then
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || problems+=("munge does not answer")
  fi
  node_idle 2>/dev/null || problems+=("no idle node (sinfo)")
  accounting=$(accounting_problem)
  [ -z "$accounting" ] || problems+=("$accounting")
  daemon_dead "$STATE/mysql/mariadb.pid" /run/mysqld/mysqld.pid && dead+=(MariaDB)
  daemon_dead "$STATE/run/slurmdbd.pid" && dead+=(slurmdbd)
  daemon_dead "$STATE/run/slurmctld.pid" && dead+=(slurmctld)
  daemon_dead "$STATE/run/slurmd.pid" && dead+=(slurmd)
  [ ${#dead[@]} -eq 0 ] || problems+=("not running: ${dead[*]}")
  if [ ${#problems[@]} -eq 0 ]; then
    sinfo
    log "up: node idle, accounting answers"
    return 0
  fi
  local joined
  joined=$(printf '%s, ' "${problems[@]}")
  log "down: ${joined%, }; $fix"
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
