import Foundation
import Raft
import Synchronization

public struct HarnessFailure: Error, CustomStringConvertible {
    public var description: String
}

/// What a kill loop saw.
public struct KillLoopResult: Sendable {
    public var kills: Int
    public var acknowledged: Int
    public var lost: [String]
    public var chainsAgree: Bool
    public var chains: String
    /// Leader kills only: milliseconds from SIGKILL to the first write
    /// (begun after it) that succeeded.
    public var outagesMilliseconds: [Double]
    public var directory: String

    public var passed: Bool { lost.isEmpty && chainsAgree }
}

/// SIGKILLs a node `kills` times under write load, the leader each time
/// (`leaderOnly`, measuring the outage) or a random node at a random
/// moment (seeded), restarting it and waiting until the cluster is ready
/// again before the next kill; then checks that every acknowledged write
/// reads back and that all nodes hold the same audit chain.
public enum KillLoop {
    public static func run(binary: String, kills: Int, leaderOnly: Bool, writers: Int, seed: UInt64, environment: [String: String] = [:],
                           log: @escaping @Sendable (String) -> Void) async throws -> KillLoopResult {
        var generator = SeededGenerator(seed: seed)
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("warrant-\(leaderOnly ? "failover" : "crash")-\(UUID().uuidString.prefix(8))").path
        let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort(),
                                              environment: environment)
        // A first election and every node's first TLS handshake: on a CI
        // machine shared with other suites, a debug build's handshakes
        // alone have taken seconds.
        guard await cluster.waitForLeader(seconds: 60) != nil, await cluster.waitUntilReady(seconds: 60) else {
            await cluster.close()
            throw HarnessFailure(description: "the cluster did not become ready (logs in \(directory)): \(cluster.notReadyReason())")
        }
        let load = AckedWriters(client: cluster.client)
        let stop = StopFlag()
        let loadTask = Task { await load.run(writers: writers, prefix: "acked", stop: { stop.isSet }) }
        try await Task.sleep(for: .milliseconds(500))
        var outages: [Double] = []
        do {
            for kill in 1...kills {
                let victim: UInt64
                if leaderOnly {
                    guard let leader = await cluster.waitForLeader(seconds: 10) else { throw HarnessFailure(description: "no leader before kill \(kill)") }
                    victim = leader
                } else {
                    victim = cluster.nodeIDs[generator.below(cluster.nodeIDs.count)]
                    try await Task.sleep(for: .milliseconds(generator.below(400)))
                }
                let killedAt = ContinuousClock.now
                cluster.kill9(victim)
                if leaderOnly {
                    let deadline = killedAt.advanced(by: .seconds(10))
                    while load.firstSuccess(after: killedAt) == nil && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(2)) }
                    guard let recovered = load.firstSuccess(after: killedAt) else {
                        throw HarnessFailure(description: "writes did not resume within 10 s after kill \(kill)")
                    }
                    let outage = killedAt.duration(to: recovered).milliseconds
                    outages.append(outage)
                    log(String(format: "kill %2d: leader %d SIGKILLed; writes succeeded again after %.0f ms", kill, victim, outage))
                } else {
                    try await Task.sleep(for: .milliseconds(generator.below(300)))
                    log("kill \(kill): node \(victim) SIGKILLed, restarting (\(load.acknowledgedCount) writes acknowledged so far)")
                }
                try cluster.start(victim)
                guard await cluster.waitUntilReady(seconds: 20) else {
                    throw HarnessFailure(description: "the cluster did not recover after kill \(kill) (logs in \(directory)): \(cluster.notReadyReason())")
                }
            }
            try await Task.sleep(for: .milliseconds(300))
        } catch {
            stop.set()
            await loadTask.value
            await cluster.close()
            throw error
        }
        stop.set()
        await loadTask.value
        let lost = await load.lostWrites()
        let (agree, chains) = await cluster.auditChainsAgree()
        log("\(load.acknowledgedCount) writes acknowledged, \(load.failureCount) attempts failed or were refused during outages; lost: \(lost.count)\(lost.isEmpty ? "" : " (" + lost.prefix(5).joined(separator: ", ") + ")")")
        log("audit chains: \(agree ? "identical" : "DIFFER") — \(chains)")
        if leaderOnly, !outages.isEmpty {
            let sorted = outages.sorted()
            log(String(format: "failover over %d leader kills: median %.0f ms, max %.0f ms, min %.0f ms", sorted.count,
                       sorted[sorted.count / 2], sorted.last!, sorted.first!))
        }
        await cluster.close()
        let result = KillLoopResult(kills: kills, acknowledged: load.acknowledgedCount, lost: lost, chainsAgree: agree, chains: chains,
                                    outagesMilliseconds: outages, directory: directory)
        if result.passed { try? FileManager.default.removeItem(atPath: directory) } else { log("logs kept in \(directory)") }
        return result
    }
}

/// Tells writer tasks to stop.
public final class StopFlag: Sendable {
    private let flag = Mutex(false)
    public init() {}
    public var isSet: Bool { flag.withLock { $0 } }
    public func set() { flag.withLock { $0 = true } }
}
