#!/usr/bin/env bash
# A demonstration of the consensus core alone: it builds the simulator in
# release mode, replays one
# seeded cluster run with its fault timeline, runs 500 more seeds under
# random faults, and measures the pure core's throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
swift build -c release --product warrant-sim
sim=.build/release/warrant-sim
echo
echo "== One seeded 5-node run, its faults and the verdict (replayable exactly):"
"$sim" replay --seed 2026 --nodes 5 --trace | tail -n 25
echo
echo "== 500 seeds, 3/5/7 nodes, random faults, every safety property checked after every step:"
"$sim" run --seeds 500
echo
echo "== The pure core's speed:"
"$sim" bench
