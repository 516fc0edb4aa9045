#!/usr/bin/env bash
# The cluster benchmark: builds in release mode, then in one run
#  1. a 3-node Warrant cluster on loopback, 1 and 64 concurrent clients
#     writing 256-byte documents (spread over all nodes);
#  2. the same load against a 3-node etcd (Debian's etcd-server, installed if
#     missing), first over plain HTTP, then with mutual TLS like Warrant;
#  3. the table with the ratios;
#  4. failover: the leader SIGKILLed 20 times under load, the time until
#     writes succeed again, and a check that nothing acknowledged was lost.
# Everything listens on 127.0.0.1 only. SECONDS_PER_RUN (default 10) per load run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
source scripts/release-build.sh
"$bin/warrant-bench" cluster --warrant-binary "$bin/warrant" --clients 1,64 --seconds "${SECONDS_PER_RUN:-10}" \
  --etcd-script scripts/etcd-cluster.sh --also-leader-only yes
echo
"$bin/warrant-bench" failover --warrant-binary "$bin/warrant" --kills 20
