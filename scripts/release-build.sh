# Sourced by the benchmark scripts: builds warrant and warrant-bench in
# release mode and sets $bin to where they are.
swift build -c release --product warrant 2>&1 | grep -Ev '^\[[0-9]+/[0-9]+\]' || true
swift build -c release --product warrant-bench 2>&1 | grep -Ev '^\[[0-9]+/[0-9]+\]' || true
bin="$(swift build -c release --show-bin-path)"
