# Shared by cluster/up and cluster/down: where the local cluster lives.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${WARRANT_CLUSTER_DIR:-$root/.cluster}
build=${WARRANT_BUILD:-release}

# The pid of node directory $1's process, if it is running.
node_pid() {
  local pid
  [ -f "$1/pid" ] || return 1
  pid=$(cat "$1/pid")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q warrant "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}
