import ClusterHarness
import Foundation
import Synchronization
import NIOCore
import Node

// warrant-bench cluster | failover | crash: real `warrant` node processes on
// loopback (see ClusterHarness), driven over HTTPS.

struct BenchFailure: Error, CustomStringConvertible {
    var description: String
}

func temporaryClusterDirectory(_ name: String) -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("warrant-\(name)-\(UUID().uuidString.prefix(8))").path
}

/// Load against the Warrant cluster, then (if a script is given) the same
/// load against a 3-node etcd, one after the other, with the ratio.
func runClusterBench(binary: String, clientCounts: [Int], seconds: Double, etcdScript: String?) async throws {
    print("cluster: 3 nodes on loopback, \(seconds) s per run after 1 s warm-up, 256-byte values, clients spread over all nodes, each with one keep-alive connection")
    var warrant: [LoadReport] = []
    let directory = temporaryClusterDirectory("bench")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
    guard await cluster.waitForLeader(seconds: 20) != nil, await cluster.waitUntilReady() else {
        await cluster.close()
        throw BenchFailure(description: "the Warrant cluster did not become ready; logs in \(directory)")
    }
    for clients in clientCounts {
        let report = try await LoadGenerator.run(.warrant(clusterDirectory: directory), clients: clients, seconds: seconds)
        print("warrant  \(report)")
        warrant.append(report)
    }
    await cluster.close()

    guard let etcdScript else { return }
    let etcdDirectory = temporaryClusterDirectory("etcd")
    defer { try? FileManager.default.removeItem(atPath: etcdDirectory) }
    try runScript(etcdScript, ["up", etcdDirectory])
    defer { try? runScript(etcdScript, ["down", etcdDirectory]) }
    let endpoints = try (23791...23793).map { try SocketAddress(ipAddress: "127.0.0.1", port: $0) }
    var etcd: [LoadReport] = []
    for clients in clientCounts {
        let report = try await LoadGenerator.run(.etcd(endpoints: endpoints), clients: clients, seconds: seconds)
        print("etcd     \(report)")
        etcd.append(report)
    }
    print("")
    print("clients  warrant w/s  etcd w/s  ratio   warrant p50/p99 ms   etcd p50/p99 ms")
    for (w, e) in zip(warrant, etcd) {
        print(String(format: "%7d  %11.0f  %8.0f  %5.2f   %7.2f / %7.2f   %7.2f / %7.2f", w.clients, w.throughput, e.throughput,
                     w.throughput / e.throughput, w.percentile(0.5), w.percentile(0.99), e.percentile(0.5), e.percentile(0.99)))
    }
}

func runScript(_ script: String, _ arguments: [String]) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/bash")
    process.arguments = [script] + arguments
    process.standardOutput = FileHandle.standardError
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw BenchFailure(description: "\(script) \(arguments.joined(separator: " ")) failed") }
}

/// SIGKILLs a node `kills` times under write load (the leader, or any node
/// at random), restarting it each time; reports how long writes stopped
/// succeeding after each leader kill, then checks that every acknowledged
/// write is readable and that all nodes hold the same audit chain.
func runKillLoop(binary: String, kills: Int, leaderOnly: Bool, writers: Int, seed: UInt64) async throws -> Bool {
    var generator = SplitMix(seed: seed)
    let directory = temporaryClusterDirectory(leaderOnly ? "failover" : "crash")
    let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
    guard await cluster.waitForLeader(seconds: 20) != nil, await cluster.waitUntilReady() else {
        await cluster.close()
        throw BenchFailure(description: "the cluster did not become ready; logs in \(directory)")
    }
    let load = AckedWriters(client: cluster.client)
    let stop = StopFlag()
    let loadTask = Task { await load.run(writers: writers, prefix: "acked", stop: { stop.isSet }) }
    try await Task.sleep(for: .milliseconds(500))
    var outages: [Double] = []
    for kill in 1...kills {
        let victim: UInt64
        if leaderOnly {
            guard let leader = await cluster.waitForLeader(seconds: 10) else { throw BenchFailure(description: "no leader before kill \(kill)") }
            victim = leader
        } else {
            victim = cluster.nodeIDs[Int(generator.next() % UInt64(cluster.nodeIDs.count))]
            try await Task.sleep(for: .milliseconds(Int(generator.next() % 400)))
        }
        let killedAt = ContinuousClock.now
        cluster.kill9(victim)
        if leaderOnly {
            let deadline = killedAt.advanced(by: .seconds(10))
            while load.firstSuccess(after: killedAt) == nil && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(2)) }
            guard let recovered = load.firstSuccess(after: killedAt) else { throw BenchFailure(description: "writes did not resume within 10 s after kill \(kill)") }
            let outage = killedAt.duration(to: recovered).milliseconds
            outages.append(outage)
            print(String(format: "kill %2d: leader %d SIGKILLed; writes succeeded again after %.0f ms", kill, victim, outage))
        } else {
            try await Task.sleep(for: .milliseconds(Int(generator.next() % 300)))
            print("kill \(kill): node \(victim) SIGKILLed, restarting (\(load.acknowledgedCount) writes acknowledged so far)")
        }
        try cluster.start(victim)
        guard await cluster.waitUntilReady(seconds: 20) else { throw BenchFailure(description: "the cluster did not recover after kill \(kill); logs in \(directory)") }
    }
    try await Task.sleep(for: .milliseconds(500))
    stop.set()
    await loadTask.value
    let lost = await load.lostWrites()
    let (agree, chains) = await cluster.auditChainsAgree()
    print("\(load.acknowledgedCount) writes acknowledged, \(load.failureCount) attempts failed or were refused during outages; lost: \(lost.count)\(lost.isEmpty ? "" : " (" + lost.prefix(5).joined(separator: ", ") + ")")")
    print("audit chains: \(agree ? "identical" : "DIFFER") — \(chains)")
    if leaderOnly, !outages.isEmpty {
        let sorted = outages.sorted()
        print(String(format: "failover over %d leader kills: median %.0f ms, max %.0f ms, min %.0f ms", sorted.count,
                     sorted[sorted.count / 2], sorted.last!, sorted.first!))
    }
    await cluster.close()
    if lost.isEmpty && agree { try? FileManager.default.removeItem(atPath: directory) } else { print("logs kept in \(directory)") }
    return lost.isEmpty && agree
}

final class StopFlag: Sendable {
    private let flag = Mutex(false)
    var isSet: Bool { flag.withLock { $0 } }
    func set() { flag.withLock { $0 = true } }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Parses and runs `cluster`, `failover` or `crash`; returns the exit status.
func runClusterCommand(_ arguments: [String]) async -> Int32 {
    var options: [String: String] = [:]
    var rest = arguments.dropFirst()
    while let option = rest.popFirst() {
        guard option.hasPrefix("--"), let value = rest.popFirst() else {
            FileHandle.standardError.write(Data("warrant-bench: \(option) needs a value\n".utf8))
            return 2
        }
        options[String(option.dropFirst(2))] = value
    }
    let known: Set<String> = ["warrant-binary", "clients", "seconds", "etcd-script", "kills", "writers", "seed"]
    if let unknown = options.keys.first(where: { !known.contains($0) }) {
        FileHandle.standardError.write(Data("warrant-bench: unknown option --\(unknown)\n".utf8))
        return 2
    }
    guard let binary = options["warrant-binary"], FileManager.default.isExecutableFile(atPath: binary) else {
        FileHandle.standardError.write(Data("warrant-bench: --warrant-binary must name the built warrant executable\n".utf8))
        return 2
    }
    func integer(_ name: String, _ fallback: Int, _ range: ClosedRange<Int>) -> Int? {
        guard let text = options[name] else { return fallback }
        guard let value = Int(text), range.contains(value) else {
            FileHandle.standardError.write(Data("warrant-bench: --\(name) must be in \(range)\n".utf8))
            return nil
        }
        return value
    }
    do {
        switch arguments[0] {
        case "cluster":
            let clients = (options["clients"] ?? "1,64").split(separator: ",").compactMap { Int($0) }
            guard !clients.isEmpty, clients.allSatisfy({ (1...1024).contains($0) }) else {
                FileHandle.standardError.write(Data("warrant-bench: --clients takes counts in 1...1024, like 1,64\n".utf8))
                return 2
            }
            guard let seconds = Double(options["seconds"] ?? "10"), seconds > 0, seconds <= 600 else {
                FileHandle.standardError.write(Data("warrant-bench: --seconds must be in (0, 600]\n".utf8))
                return 2
            }
            try await runClusterBench(binary: binary, clientCounts: clients, seconds: seconds, etcdScript: options["etcd-script"])
            return 0
        default:
            let leaderOnly = arguments[0] == "failover"
            guard let kills = integer("kills", leaderOnly ? 20 : 50, 1...1000), let writers = integer("writers", 4, 1...64) else { return 2 }
            let seed = UInt64(options["seed"] ?? "") ?? UInt64.random(in: 1...UInt64.max)
            if !leaderOnly { print("crash: seed \(seed)") }
            return try await runKillLoop(binary: binary, kills: kills, leaderOnly: leaderOnly, writers: writers, seed: seed) ? 0 : 1
        }
    } catch {
        FileHandle.standardError.write(Data("warrant-bench: \(error)\n".utf8))
        return 1
    }
}
