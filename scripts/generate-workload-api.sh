#!/usr/bin/env bash
# Regenerates Sources/WorkloadAPI/Generated from proto/spiffe/workloadapi.proto
# (the SPIFFE standard's file, as it is, with its licence): builds the two
# protoc plugins once in a scratch package and runs protoc (Debian's
# protobuf-compiler). The generated code is committed; the build never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "install protobuf-compiler (apt-get install protobuf-compiler)" >&2; exit 1; }
scratch="${TMPDIR:-/tmp}/warrant-protoc-plugins"
mkdir -p "$scratch/noop"
cat > "$scratch/Package.swift" <<'SWIFT'
// swift-tools-version: 6.1
import PackageDescription
let package = Package(
    name: "plugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", exact: "2.4.1"),
        .package(url: "https://github.com/grpc/grpc-swift-2", exact: "2.4.3"),
    ],
    targets: [.executableTarget(name: "noop", path: "noop")]
)
SWIFT
echo 'print("")' > "$scratch/noop/main.swift"
(cd "$scratch" && swift build -c release --product protoc-gen-swift && swift build -c release --product protoc-gen-grpc-swift-2)
bin="$scratch/.build/release"
protoc --plugin=protoc-gen-swift="$bin/protoc-gen-swift" --swift_out=Sources/WorkloadAPI/Generated --swift_opt=Visibility=Public \
       --plugin=protoc-gen-grpc-swift-2="$bin/protoc-gen-grpc-swift-2" --grpc-swift-2_out=Sources/WorkloadAPI/Generated \
       --grpc-swift-2_opt=Visibility=Public -I proto/spiffe proto/spiffe/workloadapi.proto
echo "generated Sources/WorkloadAPI/Generated"
