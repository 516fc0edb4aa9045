// swift-tools-version: 6.1
import PackageDescription

// Our own modules build in Swift 6 language mode (complete concurrency
// checking) with warnings treated as errors.
let strict: [SwiftSetting] = [
    .unsafeFlags(["-warnings-as-errors"])
]

let package = Package(
    name: "Warrant",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "Raft", targets: ["Raft"]),
        .executable(name: "warrant-sim", targets: ["warrant-sim"]),
        .executable(name: "warrant-bench", targets: ["warrant-bench"]),
        .executable(name: "warrant", targets: ["warrant"]),
        .executable(name: "warrant-chaos", targets: ["warrant-chaos"]),
    ],
    dependencies: [
        .package(url: "https://github.com/groue/GRDB.swift", exact: "7.10.0"),
        .package(url: "https://github.com/apple/swift-crypto", exact: "4.5.2"),
        .package(url: "https://github.com/apple/swift-nio", exact: "2.101.3"),
        .package(url: "https://github.com/jpsim/Yams", exact: "6.2.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", exact: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates", exact: "1.21.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", exact: "1.8.2"),
        .package(url: "https://github.com/apple/swift-asn1", exact: "1.7.4"),
        .package(url: "https://github.com/grpc/grpc-swift-2", exact: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", exact: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", exact: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),
        .package(url: "https://github.com/apple/swift-nio-http2", exact: "1.46.0"),
        .package(url: "https://github.com/apple/swift-collections", exact: "1.6.0"),
    ],
    targets: [
        // The pure consensus core: messages in, Ready out. No I/O, no clock,
        // no global randomness; only Encoding, for its codec's UTF-8 text.
        .target(name: "Raft", dependencies: ["Encoding"], swiftSettings: strict),
        // Durable state: the Raft log and hard state in write-ahead log
        // files, the ledger in memory (a persistent map, so a checkpoint's
        // copy costs nothing) with checkpoint files, the audit chain in
        // its own append-only files (SQLite only to move an older node's
        // audit table over); CRC-32C checksums verified on read.
        .target(name: "Storage", dependencies: ["Raft", "Ledger", "Encoding", "CCRC32C", .product(name: "GRDB", package: "GRDB.swift"), .product(name: "GRDBSQLite", package: "GRDB.swift"),
                                                .product(name: "HashTreeCollections", package: "swift-collections")], swiftSettings: strict),
        // CRC-32C with the CPU's instruction (SSE4.2, AArch64 CRC), for Storage.
        .target(name: "CCRC32C"),
        // The replicated state machine: documents and the audit chain.
        // apply() is deterministic: time and actors come stamped in commands.
        .target(name: "Ledger", dependencies: ["Raft", "Encoding", .product(name: "Crypto", package: "swift-crypto")], swiftSettings: strict),
        // Hand-written JSON for hot paths (no dependencies).
        .target(name: "Encoding", swiftSettings: strict),
        // The trust domain's authority: SPIFFE IDs, X509-SVIDs from CSRs,
        // JWT-SVIDs, bundles and verification. No I/O.
        .target(name: "Authority", dependencies: [
            "Encoding",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
        ], swiftSettings: strict),
        // Platform tokens (GitHub, GitLab, Kubernetes, any OIDC issuer):
        // strict parsing, pinned algorithms, key sets, claims. No I/O.
        .target(name: "Attestation", dependencies: [
            "Encoding", "Authority",
            .product(name: "Crypto", package: "swift-crypto"),
        ], swiftSettings: strict),
        // Issuers and join rules as documents: matching, SPIFFE ID
        // templates, explanations and lint. No I/O.
        .target(name: "Policy", dependencies: ["Attestation", "Authority", .product(name: "Yams", package: "Yams"),
                                              .product(name: "Crypto", package: "swift-crypto")], swiftSettings: strict),
        // Node-to-node framing (and, with issue 3, TCP and mutual TLS).
        .target(name: "Transport", dependencies: [
            "Raft",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
        ], swiftSettings: strict),
        // Wires it all: the driver loop, the node process, the HTTPS API
        // (forwarding, metrics), the cluster's files and the admin client.
        .target(name: "Node", dependencies: [
            "Raft", "Ledger", "Storage", "Transport", "Authority", "Attestation", "Policy", "Encoding",
            .product(name: "Yams", package: "Yams"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
            .product(name: "Crypto", package: "swift-crypto"),
        ], swiftSettings: strict),
        // What a job or agent uses: the cluster client (endpoints, pinned
        // CA, failover, retries), platform token sources, identity files.
        .target(name: "Client", dependencies: [
            "Node",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ], swiftSettings: strict),
        // The SPIFFE Workload API over a Unix socket: the generated code
        // (scripts/generate-workload-api.sh) and the server the agent and
        // `warrant exec` run.
        .target(name: "WorkloadAPI", dependencies: [
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "NIOHPACK", package: "swift-nio-http2"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // The operator's command: node start, cluster init/status, documents,
        // audit, membership.
        .executableTarget(name: "warrant", dependencies: [
            "Node", "Authority", "Client", "WorkloadAPI", "Transport", "Encoding",
            .product(name: "Yams", package: "Yams"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ], swiftSettings: strict,
        // tcmalloc (libgoogle-perftools-dev, scripts/setup.sh) in place of
        // glibc's malloc: its per-thread caches cost a node far less for
        // the many small allocations of each request (README: Speed).
        linkerSettings: [.linkedLibrary("tcmalloc_minimal", .when(platforms: [.linux]))]),
        // Deterministic whole-cluster simulator over the pure core.
        .target(name: "RaftSimulator", dependencies: ["Raft"], swiftSettings: strict),
        // Simulator soak runs, seed replay and the core benchmark.
        .executableTarget(name: "warrant-sim", dependencies: ["Raft", "RaftSimulator"], swiftSettings: strict),
        // Real node processes on loopback, load generation and acknowledged-
        // write tracking: shared by the benchmarks and the crash tests.
        .target(name: "ClusterHarness", dependencies: [
            "Node", "Raft", "Authority", "Encoding", "Transport",
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ], swiftSettings: strict),
        // Histories of client operations and the checkers that judge them
        // (linearizability of versioned registers). No I/O.
        .target(name: "Chaos", dependencies: ["Raft"], swiftSettings: strict),
        // The chaos suite operators run locally: real node processes behind
        // fault-injecting proxies, a seeded nemesis, workloads, checkers, a report.
        .executableTarget(name: "warrant-chaos", dependencies: [
            "Chaos", "ClusterHarness", "Node", "Authority",
            .product(name: "Yams", package: "Yams"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
        ], path: "chaos/Sources/warrant-chaos", swiftSettings: strict),
        // Benchmarks: storage, the running cluster against etcd, failover.
        .executableTarget(name: "warrant-bench", dependencies: ["Raft", "Storage", "Ledger", "Node", "ClusterHarness", "Transport", "Authority",
                                                                 .product(name: "Crypto", package: "swift-crypto"),
                                                                 .product(name: "SwiftASN1", package: "swift-asn1"),
                                                                 .product(name: "NIOHTTP1", package: "swift-nio"),
                                                                 .product(name: "NIOCore", package: "swift-nio"),
                                                                 .product(name: "NIOSSL", package: "swift-nio-ssl"),
                                                                 .product(name: "X509", package: "swift-certificates")], swiftSettings: strict),
        // What the test targets share: keeping blocking tests off Swift's
        // cooperative pool (Tests/TestSupport).
        .target(name: "TestSupport", path: "Tests/TestSupport", swiftSettings: strict),
        .testTarget(name: "RaftTests", dependencies: ["Raft", "RaftSimulator"], swiftSettings: strict),
        .testTarget(name: "RaftSimulatorTests", dependencies: ["TestSupport", "Raft", "RaftSimulator"], swiftSettings: strict),
        .testTarget(name: "NodeTests", dependencies: ["TestSupport", "Raft", "Ledger", "Storage", "Node", "Policy", "Transport", "Encoding", "Authority", .product(name: "X509", package: "swift-certificates"), .product(name: "Crypto", package: "swift-crypto"), .product(name: "GRDB", package: "GRDB.swift"), .product(name: "NIOPosix", package: "swift-nio"), .product(name: "NIOCore", package: "swift-nio")], swiftSettings: strict),
        .testTarget(name: "LedgerTests", dependencies: ["Raft", "Ledger", "RaftSimulator", "Encoding"], swiftSettings: strict),
        .testTarget(name: "TransportTests", dependencies: ["Raft", "Transport", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                                                    .product(name: "NIOSSL", package: "swift-nio-ssl"), .product(name: "X509", package: "swift-certificates")], swiftSettings: strict),
        .testTarget(name: "AuthorityTests", dependencies: [
            "TestSupport", "Authority",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
        ], exclude: ["wycheproof"], swiftSettings: strict),
        .testTarget(name: "AttestationTests", dependencies: [
            "TestSupport", "Attestation", "Policy", "Authority", "Encoding", "ClusterHarness",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
        ], swiftSettings: strict),
        .testTarget(name: "ChaosTests", dependencies: ["TestSupport", "Chaos", "ClusterHarness", "Node",
                                                      .product(name: "NIOCore", package: "swift-nio"),
                                                      .product(name: "NIOSSL", package: "swift-nio-ssl"),
                                                      .product(name: "NIOPosix", package: "swift-nio")], swiftSettings: strict),
        .testTarget(name: "ClusterTests", dependencies: [
            "TestSupport", "Node", "ClusterHarness", "Client", "Ledger", "Raft", "Authority", "Transport", "WorkloadAPI",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Yams", package: "Yams"),
            .product(name: "X509", package: "swift-certificates"),
        ], exclude: ["python"], swiftSettings: strict),
        .testTarget(name: "StorageTests", dependencies: ["TestSupport", "Raft", "Storage", "Ledger", "RaftSimulator", .product(name: "GRDB", package: "GRDB.swift")], swiftSettings: strict),
    ],
    swiftLanguageModes: [.v6]
)
