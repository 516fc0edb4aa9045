#!/usr/bin/env bash
# Starts and stops a 3-node etcd cluster on loopback, the baseline that the
# benchmark compares Warrant against.
#
#   scripts/etcd-cluster.sh up DIR    install etcd-server if missing, start
#                                     members e1,e2,e3, wait until healthy,
#                                     print the client URLs (comma-separated)
#   scripts/etcd-cluster.sh down DIR  stop the members listed in DIR/eN.pid
#
# Members listen on 127.0.0.1 only, plain HTTP: clients on 23791-23793, peers
# on 23801-23803. Data lives in DIR/eN.etcd, logs in DIR/eN.log, pids in
# DIR/eN.pid. etcd's default durability is kept (fsync on every commit).
# Status messages go to stderr; stdout of `up` is only the client URL list.
# Use a fresh DIR for a clean benchmark: `up` on a DIR that already has data
# restarts that cluster from its data. `down` removes only the pid files.
set -euo pipefail

readonly members=(e1 e2 e3)
readonly host=127.0.0.1
readonly client_base=23790  # e1 -> 23791, e2 -> 23792, e3 -> 23793
readonly peer_base=23800    # e1 -> 23801, e2 -> 23802, e3 -> 23803
readonly health_timeout=30  # seconds `up` waits for a healthy cluster
readonly stop_timeout=10    # seconds `down` waits after TERM before KILL

say() { echo "etcd-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
  echo "usage: $0 up DIR | down DIR" >&2
  exit 2
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# index NAME -> 1 for e1, 2 for e2, ...
index() { echo "${1#e}"; }
# With ETCD_TLS_DIR (holding ca.pem, server.pem, server.key, client.pem,
# client.key), clients and peers use mutual TLS, as Warrant's nodes do.
tls_dir=${ETCD_TLS_DIR:-}
scheme=http
[ -n "$tls_dir" ] && scheme=https
client_url() { echo "$scheme://$host:$((client_base + $(index "$1")))"; }
peer_url() { echo "$scheme://$host:$((peer_base + $(index "$1")))"; }
curl_tls=()
if [ -n "$tls_dir" ]; then
  curl_tls=(--cacert "$tls_dir/ca.pem" --cert "$tls_dir/client.pem" --key "$tls_dir/client.key")
fi

# The pid in DIR/NAME.pid if that process is alive and is etcd, else nothing.
live_pid() {
  local file="$1/$2.pid" pid
  [ -f "$file" ] || return 0
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = etcd ]; then
    echo "$pid"
  fi
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_busy() {
  (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null
}

find_etcd() {
  if command -v etcd >/dev/null 2>&1; then
    command -v etcd
  elif [ -x /usr/bin/etcd ]; then
    echo /usr/bin/etcd
  fi
}

# Debian's etcd-server enables a system etcd service (systemd unit and SysV
# script) on the default ports 2379/2380. It has nothing to do with this
# cluster; stop and disable it so it does not run beside the benchmark.
# (Inside containers policy-rc.d usually keeps it from starting at all.)
disable_system_service() {
  if command -v systemctl >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
      if systemctl is-active --quiet etcd.service 2>/dev/null; then
        say "stopping the system etcd.service that the package started"
      fi
      as_root systemctl disable --now etcd.service >/dev/null 2>&1 ||
        say "warning: could not stop/disable etcd.service (ours uses other ports)"
    else
      # Not booted with systemd: disable works offline (removes the symlinks).
      as_root systemctl disable etcd.service >/dev/null 2>&1 || true
    fi
  fi
  if [ -x /etc/init.d/etcd ] && [ ! -d /run/systemd/system ]; then
    if pgrep -x etcd >/dev/null 2>&1; then
      say "stopping the system etcd that the package's init script started"
      as_root /etc/init.d/etcd stop >/dev/null 2>&1 ||
        say "warning: could not stop the system etcd (ours uses other ports)"
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
      as_root update-rc.d etcd disable >/dev/null 2>&1 || true
    fi
  fi
}

install_etcd() {
  say "etcd not found; installing Debian's etcd-server"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server >&2; then
    say "install failed; refreshing the package lists and trying once more"
    as_root apt-get update >&2 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server >&2 ||
      die "could not install etcd-server with apt-get"
  fi
  disable_system_service
}

# Stops the members one at a time. Stopping all at once makes the leader
# spend ~7 s trying to hand leadership to followers that are going away;
# one at a time, each handover (if any) goes to a live member and is quick.
stop_members() {
  local dir="$1" name pid stopped=0 deadline
  for name in "${members[@]}"; do
    pid=$(live_pid "$dir" "$name")
    if [ -n "$pid" ]; then
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$((SECONDS + stop_timeout))
      while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored TERM for ${stop_timeout}s; sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 5))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
          sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
          die "$name (pid $pid) is still running after KILL"
        fi
      fi
      stopped=$((stopped + 1))
    fi
    rm -f "$dir/$name.pid"
  done
  say "stopped $stopped member(s) in $dir"
}

healthy() {
  local name body
  for name in "${members[@]}"; do
    body=$(curl -s --max-time 2 "${curl_tls[@]}" "$(client_url "$name")/health" 2>/dev/null) || return 1
    [[ "$body" =~ \"health\":[[:space:]]*\"?true ]] || return 1
  done
}

up() {
  local dir="$1" etcd name cluster="" urls="" pid extra=() deadline
  command -v curl >/dev/null 2>&1 || die "curl is needed to check the cluster's health"

  etcd=$(find_etcd)
  if [ -z "$etcd" ]; then
    install_etcd
    etcd=$(find_etcd)
    [ -n "$etcd" ] || die "etcd-server installed but no etcd binary found"
  fi

  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)

  for name in "${members[@]}"; do
    if pid=$(live_pid "$dir" "$name") && [ -n "$pid" ]; then
      die "member $name is already running (pid $pid); run: $0 down $dir"
    fi
  done
  for name in "${members[@]}"; do
    port_busy "$((client_base + $(index "$name")))" &&
      die "port $((client_base + $(index "$name"))) on $host is already in use"
    port_busy "$((peer_base + $(index "$name")))" &&
      die "port $((peer_base + $(index "$name"))) on $host is already in use"
  done

  # Quieter logs where the version supports it (3.4: zap logger + level).
  if "$etcd" --help 2>&1 | grep -q -- '--logger'; then
    extra+=(--logger zap)
  fi
  if "$etcd" --help 2>&1 | grep -q -- '--log-level'; then
    extra+=(--log-level warn)
  fi
  if [ -n "$tls_dir" ]; then
    extra+=(--cert-file "$tls_dir/server.pem" --key-file "$tls_dir/server.key" --trusted-ca-file "$tls_dir/ca.pem" --client-cert-auth
            --peer-cert-file "$tls_dir/server.pem" --peer-key-file "$tls_dir/server.key" --peer-trusted-ca-file "$tls_dir/ca.pem"
            --peer-client-cert-auth)
  fi

  for name in "${members[@]}"; do
    cluster+="${cluster:+,}$name=$(peer_url "$name")"
    urls+="${urls:+,}$(client_url "$name")"
  done

  say "starting $("$etcd" --version 2>/dev/null | head -n 1) as e1,e2,e3 in $dir"
  for name in "${members[@]}"; do
    # setsid: the members outlive this script and the caller's process group.
    # (Not a group leader here, so setsid execs in place and $! is etcd.)
    setsid "$etcd" \
      --name "$name" \
      --data-dir "$dir/$name.etcd" \
      --listen-client-urls "$(client_url "$name")" \
      --advertise-client-urls "$(client_url "$name")" \
      --listen-peer-urls "$(peer_url "$name")" \
      --initial-advertise-peer-urls "$(peer_url "$name")" \
      --initial-cluster "$cluster" \
      --initial-cluster-token warrant-bench-etcd \
      --initial-cluster-state new \
      "${extra[@]}" \
      </dev/null >"$dir/$name.log" 2>&1 &
    echo $! >"$dir/$name.pid"
  done

  deadline=$((SECONDS + health_timeout))
  until healthy; do
    for name in "${members[@]}"; do
      if [ -z "$(live_pid "$dir" "$name")" ]; then
        say "member $name exited during startup; last lines of $dir/$name.log:"
        tail -n 20 "$dir/$name.log" >&2 || true
        stop_members "$dir"
        die "cluster failed to start"
      fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      for name in "${members[@]}"; do
        say "last lines of $dir/$name.log:"
        tail -n 10 "$dir/$name.log" >&2 || true
      done
      stop_members "$dir"
      die "cluster not healthy after ${health_timeout}s"
    fi
    sleep 0.2
  done

  say "cluster healthy"
  echo "$urls"
}

[ $# -eq 2 ] || usage
case "$1" in
  up) up "$2" ;;
  down)
    [ -d "$2" ] || die "no such directory: $2"
    stop_members "$2"
    ;;
  *) usage ;;
esac
