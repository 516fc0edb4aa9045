import Foundation
import Ledger
import Raft
import Storage

// warrant-bench storage: fsynced group commit through the real core.
// A single-voter node proposes B entries of 256 bytes per cycle; every
// Ready is persisted to a RaftStore (its write-ahead log, fdatasync) before advance.
// Prints cycles/s (one transaction and fsync each), entries/s and the
// per-cycle latency percentiles, for several batch sizes in one run.

let usage = """
warrant-bench: measures parts of Warrant below the node.

USAGE
  warrant-bench crash-writer --path DIRECTORY
      Writes until killed, printing "acked N" once commit index N is durable
      (used by the SIGKILL crash test).
  warrant-bench cluster --warrant-binary PATH [--clients 1,64] [--seconds 10] [--etcd-script scripts/etcd-cluster.sh]
      Starts a 3-node Warrant cluster on loopback and writes 256-byte documents
      with N concurrent clients; then, with --etcd-script, the same load against
      a 3-node etcd (v3 JSON gateway), and the ratio.
  warrant-bench failover --warrant-binary PATH [--kills 20] [--writers 4]
      SIGKILLs the leader under write load, restarts it; prints the time until
      writes succeed again, then checks no acknowledged write was lost.
  warrant-bench crash --warrant-binary PATH [--kills 50] [--writers 4] [--seed S]
      SIGKILLs random nodes at random moments under write load, restarting
      them; checks no acknowledged write was lost and the audit chains agree.
  warrant-bench issue --warrant-binary PATH [--clients 64] [--seconds 5] [--phases x509-all,x509-leader,jwt-leader,verify]
      Audited issuance on a 3-node cluster: X509-SVIDs from CSRs and JWT-SVIDs
      (one join token each, made beforehand), verification on a follower, and
      this machine's raw signing rate measured in the same run. The load
      comes from wrk when it is installed (WARRANT_BENCH_CLIENT=swift: the
      Swift client).
  warrant-bench join --warrant-binary PATH [--clients 64] [--seconds 5]
      Attested join on a 3-node cluster: GitHub-style RS256 tokens from a local
      OIDC provider (HTTPS, minted beforehand, one per join) exchanged for
      X509-SVIDs, with the provider's JWKS fetches counted.
  warrant-bench apply [--count N] [--batches 1,10,100] [--kinds x509,jwt] [--directory DIR]
      The ledger's share of an audited issuance: N issuance commands of
      each kind (each consuming a join token) applied through a single-voter
      core, B per transaction, as a node persists and applies them.
  warrant-bench snapshot [--count N] [--directory DIR]
      A ledger snapshot of N audit records (default 1,200,000: past the
      256 MiB one message could carry) made, streamed in 1 MiB pieces to a
      second store and installed there, as between nodes; prints the
      stream's size, each step's time and peak memory.
  warrant-bench storage [--seconds S] [--batches 1,10,100] [--directory DIR]
      Fsynced group commit: a single-voter core persisting each Ready to
      its write-ahead log (fdatasync), 256-byte entries, B entries per Ready.
"""

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}

/// A fresh store in `path` and a single-voter core that leads it.
func singleVoter(path: String) throws -> (RaftStore, RaftNode) {
    let store = try RaftStore(directory: path, synchronous: .full)
    try store.initialize(with: .bootstrap(voters: [1]))
    var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
    node.campaign()
    return (store, node)
}

func removeStore(_ path: String) {
    try? FileManager.default.removeItem(atPath: path)
}

func runStorage(secondsEach: Double, batches: [Int], directory: URL) throws {
    print("storage: single-voter core + write-ahead log (fdatasync), 256-byte entries, \(secondsEach) s per batch size")
    print("batch  cycles/s  entries/s  p50 ms  p99 ms  max ms")
    for batch in batches {
        let path = directory.appendingPathComponent("bench-\(batch)-\(UUID().uuidString)").path
        defer { removeStore(path) }
        var (store, node) = try singleVoter(path: path)
        func drain() throws {
            while node.hasReady {
                let ready = node.ready()
                try store.persist(ready)
                node.advance()
            }
        }
        try drain()
        let payloads = [[UInt8]](repeating: [UInt8](repeating: 0x5A, count: 256), count: batch)
        let clock = ContinuousClock()
        var latencies: [Double] = []
        let started = clock.now
        var entries = 0
        var compactedThrough: LogIndex = 0
        while seconds(clock.now - started) < secondsEach && latencies.count < 1_000_000 {
            let cycleStart = clock.now
            try node.propose(batch: payloads)
            try drain()
            latencies.append(seconds(clock.now - cycleStart) * 1000)
            entries += batch
            if node.appliedIndex - compactedThrough > 50_000 {
                let metadata = try node.compactLog(through: node.appliedIndex, snapshotData: [])
                try store.compact(through: metadata, data: [])
                compactedThrough = metadata.index
            }
        }
        let elapsed = seconds(clock.now - started)
        latencies.sort()
        func percentile(_ p: Double) -> Double { latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))] }
        print(String(format: "%5d  %8.0f  %9.0f  %6.2f  %6.2f  %6.2f", batch, Double(latencies.count) / elapsed, Double(entries) / elapsed,
                     percentile(0.5), percentile(0.99), latencies.last ?? 0))
    }
}

/// Writes forever through a single-voter core into `path`, printing
/// "acked N" after each Ready whose commit index N is durable. For the
/// SIGKILL crash test: whatever was printed must survive the kill.
func crashWriter(path: String) throws -> Never {
    let store = try RaftStore(directory: path, synchronous: .full)
    if !store.hasState { try store.initialize(with: .bootstrap(voters: [1])) }
    let durable = try store.loadDurableState()
    var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: UInt64(getpid())), durable: durable)
    node.campaign()
    var counter: UInt64 = 0
    while true {
        var batch: [[UInt8]] = []
        for _ in 0..<10 {
            counter += 1
            batch.append((0..<8).map { UInt8(truncatingIfNeeded: counter >> UInt64($0 * 8)) } + [UInt8](repeating: 0x61, count: 56))
        }
        if node.role == .leader { try node.propose(batch: batch) }
        while node.hasReady {
            let ready = node.ready()
            try store.persist(ready)
            node.advance()
            if ready.hardState != nil || !ready.entries.isEmpty {
                print("acked \(ready.hardState?.commitIndex ?? node.commitIndex)")
                fflush(nil)
            }
        }
    }
}

var arguments = CommandLine.arguments.dropFirst()
if arguments.first == "crash-writer" {
    guard arguments.count == 3, arguments[arguments.startIndex + 1] == "--path" else {
        FileHandle.standardError.write(Data("warrant-bench: crash-writer --path DIRECTORY\n".utf8))
        exit(2)
    }
    do {
        try crashWriter(path: arguments[arguments.startIndex + 2])
    } catch {
        FileHandle.standardError.write(Data("warrant-bench: \(error)\n".utf8))
        exit(1)
    }
}
if let command = arguments.first, ["cluster", "failover", "crash", "issue", "join"].contains(command) {
    exit(await runClusterCommand(Array(arguments)))
}
guard let command = arguments.popFirst(), ["storage", "apply", "snapshot"].contains(command) else {
    print(usage)
    exit(CommandLine.arguments.count > 1 && !["--help", "-h"].contains(CommandLine.arguments[1]) ? 2 : 0)
}
var secondsEach = 3.0
var batches = [1, 10, 100]
var directory = FileManager.default.temporaryDirectory
var count = 20_000
var countGiven = false
var kinds: [Issuance.Kind] = [.x509, .jwt]
while let option = arguments.popFirst() {
    guard let value = arguments.popFirst() else {
        FileHandle.standardError.write(Data("warrant-bench: \(option) needs a value\n".utf8))
        exit(2)
    }
    switch option {
    case "--seconds":
        guard let parsed = Double(value), parsed > 0, parsed <= 600 else {
            FileHandle.standardError.write(Data("warrant-bench: --seconds must be in (0, 600], got '\(value)'\n".utf8))
            exit(2)
        }
        secondsEach = parsed
    case "--batches":
        let parsed = value.split(separator: ",").compactMap { Int($0) }
        guard !parsed.isEmpty, parsed.allSatisfy({ (1...100_000).contains($0) }) else {
            FileHandle.standardError.write(Data("warrant-bench: --batches takes sizes in 1...100000, like 1,10,100\n".utf8))
            exit(2)
        }
        batches = parsed
    case "--kinds" where command == "apply":
        let parsed = value.split(separator: ",").map { $0 == "x509" ? Issuance.Kind.x509 : $0 == "jwt" ? .jwt : nil }
        guard !parsed.isEmpty, !parsed.contains(nil) else {
            FileHandle.standardError.write(Data("warrant-bench: --kinds takes x509, jwt or both (x509,jwt), got '\(value)'\n".utf8))
            exit(2)
        }
        kinds = parsed.compactMap { $0 }
    case "--count" where command == "apply" || command == "snapshot":
        let most = command == "apply" ? 1_000_000 : 20_000_000
        guard let parsed = Int(value), (1...most).contains(parsed) else {
            FileHandle.standardError.write(Data("warrant-bench: --count must be in 1...\(most), got '\(value)'\n".utf8))
            exit(2)
        }
        count = parsed
        countGiven = true
    case "--directory":
        directory = URL(fileURLWithPath: value)
    default:
        FileHandle.standardError.write(Data("warrant-bench: unknown option \(option)\n".utf8))
        exit(2)
    }
}
do {
    if command == "apply" {
        try runApply(count: count, batches: batches, kinds: kinds, directory: directory)
    } else if command == "snapshot" {
        try runSnapshotBench(records: countGiven ? count : 1_200_000, directory: directory)
    } else {
        try runStorage(secondsEach: secondsEach, batches: batches, directory: directory)
    }
} catch {
    FileHandle.standardError.write(Data("warrant-bench: \(error)\n".utf8))
    exit(1)
}
