import Chaos
import ClusterHarness
import Foundation
import NIOCore
import Node

/// A cluster of real node processes whose every peer link (one per
/// direction) goes through a `FaultProxy` the harness controls.
final class ChaosCluster: Sendable {
    let cluster: LocalProcessCluster
    let nodes: [UInt64]
    private let proxies: [String: FaultProxy]

    private static func link(_ from: UInt64, _ to: UInt64) -> String { "\(from)->\(to)" }

    static func start(binary: String, nodes count: Int, directory: String, environment: [String: String]) async throws -> ChaosCluster {
        let basePort = LocalProcessCluster.pickBasePort()
        let nodes = (1...count).map { UInt64($0) }
        var proxies: [String: FaultProxy] = [:]
        var ports: [String: Int] = [:]
        for to in nodes {
            for from in nodes where from != to {
                let proxy = FaultProxy(target: try SocketAddress(ipAddress: "127.0.0.1", port: basePort + Int(to) - 1))
                ports[link(from, to)] = try await proxy.start()
                proxies[link(from, to)] = proxy
            }
        }
        let cluster = try LocalProcessCluster(binary: binary, directory: directory, nodes: count, basePort: basePort, environment: environment) { directory in
            // Each node reaches each peer through that link's proxy.
            for from in nodes {
                let path = "\(directory)/node-\(from)/config.yaml"
                var text = try String(contentsOfFile: path, encoding: .utf8)
                for to in nodes where to != from {
                    let direct = "address: \"127.0.0.1:\(basePort + Int(to) - 1)\""
                    // Exactly once: otherwise this link would bypass its
                    // proxy, and every network fault on it would do nothing.
                    guard text.components(separatedBy: direct).count == 2 else {
                        throw ChaosError("\(path): node \(to)'s peer address (\(direct)) is not there exactly once; the link \(from)->\(to) could not be routed through its proxy")
                    }
                    text = text.replacingOccurrences(of: direct, with: "address: \"127.0.0.1:\(ports[link(from, to)]!)\"")
                }
                try text.write(toFile: path, atomically: true, encoding: .utf8)
            }
        }
        return ChaosCluster(cluster: cluster, nodes: nodes, proxies: proxies)
    }

    private init(cluster: LocalProcessCluster, nodes: [UInt64], proxies: [String: FaultProxy]) {
        self.cluster = cluster
        self.nodes = nodes
        self.proxies = proxies
    }

    func set(from: UInt64, to: UInt64, _ mode: FaultProxy.Mode) { proxies[Self.link(from, to)]?.set(mode) }

    func cut(_ a: UInt64, _ b: UInt64, _ mode: FaultProxy.Mode = .drop) {
        set(from: a, to: b, mode)
        set(from: b, to: a, mode)
    }

    func healLinks() { for proxy in proxies.values { proxy.set(.pass) } }

    func close() async {
        await cluster.close()
        for proxy in proxies.values { await proxy.stop() }
    }
}

/// One applied fault, for the timeline.
struct FaultRecord: Codable, Sendable {
    var fault: String
    var detail: String
    /// Seconds since the run began.
    var start: Double
    var end: Double?
}

/// Applies the scenario's faults in a seeded order until the deadline:
/// each held for a drawn time, healed, then a calm interval.
final class Nemesis: @unchecked Sendable {
    let chaos: ChaosCluster
    let scenario: Scenario
    let clock: RunClock
    private var random: ChaosRandom
    private(set) var timeline: [FaultRecord] = []
    let fakeTimeLibrary: String?
    /// Ids of nodes added by membership faults (never reused).
    private var nextMemberID: UInt64
    let log: @Sendable (String) -> Void

    init(chaos: ChaosCluster, scenario: Scenario, seed: UInt64, clock: RunClock, log: @escaping @Sendable (String) -> Void) {
        self.chaos = chaos
        self.scenario = scenario
        self.clock = clock
        self.log = log
        random = ChaosRandom(seed: seed ^ 0x6E656D65)
        nextMemberID = UInt64(chaos.nodes.count + 1)
        fakeTimeLibrary = LocalProcessCluster.fakeTimeLibrary
    }

    private func seconds(_ range: ClosedRange<Double>) -> Double { Double.random(in: range, using: &random) }
    private func pick(_ nodes: [UInt64]) -> UInt64 { nodes[Int.random(in: 0..<nodes.count, using: &random)] }

    /// The leader: of the nodes that say they lead, the one in the highest
    /// term (just after a heal a deposed leader may still say so). With no
    /// leader within 3 s, a node picked at random, and the log says so.
    private func leader() async -> UInt64 {
        let cluster = chaos.cluster
        guard let first = await cluster.waitForLeader(seconds: 3) else {
            let picked = pick(chaos.nodes)
            log(String(format: "%7.1fs  no leader found within 3 s: the next fault's \"leader\" is node %llu, picked at random", clock.seconds, picked))
            return picked
        }
        var best = (id: first, term: await cluster.status(of: first, timeout: .seconds(1))?.term ?? 0)
        for id in chaos.nodes where id != first && cluster.isRunning(id) {
            if let status = await cluster.status(of: id, timeout: .seconds(1)), status.role == "leader", status.term > best.term { best = (id, status.term) }
        }
        return best.id
    }

    func run(until deadline: ContinuousClock.Instant) async {
        var order: [FaultKind] = []
        while ContinuousClock.now < deadline {
            if order.isEmpty { order = scenario.faults.shuffled(using: &random) }
            let kind = order.removeFirst()
            let hold = seconds(scenario.holdSeconds)
            let started = clock.seconds
            let (detail, heal) = await apply(kind, hold: hold)
            log(String(format: "%7.1fs  %@: %@", started, kind.rawValue, detail))
            timeline.append(FaultRecord(fault: kind.rawValue, detail: detail, start: started))
            try? await Task.sleep(for: .milliseconds(Int(hold * 1000)))
            await heal()
            timeline[timeline.count - 1].end = clock.seconds
            log(String(format: "%7.1fs  healed %@", clock.seconds, kind.rawValue))
            try? await Task.sleep(for: .milliseconds(Int(seconds(scenario.calmSeconds) * 1000)))
        }
    }

    /// Applies one fault; returns what it did and how to undo it.
    private func apply(_ kind: FaultKind, hold: Double) async -> (String, () async -> Void) {
        let nodes = chaos.nodes
        let cluster = chaos.cluster
        let chaos = self.chaos
        let restartDead: () async -> Void = {
            for id in nodes where !cluster.isRunning(id) { try? cluster.start(id) }
        }
        switch kind {
        case .isolateLeader:
            let leader = await leader()
            for other in nodes where other != leader { chaos.cut(leader, other) }
            return ("node \(leader) (leader) cut off from every peer", { chaos.healLinks() })
        case .partitionHalves:
            let shuffled = nodes.shuffled(using: &random)
            let minority = Array(shuffled.prefix(nodes.count / 2)), majority = Array(shuffled.dropFirst(nodes.count / 2))
            for a in minority { for b in majority { chaos.cut(a, b) } }
            return ("minority \(minority) | majority \(majority)", { chaos.healLinks() })
        case .partialPartition:
            let a = pick(nodes), b = pick(nodes.filter { $0 != a })
            chaos.cut(a, b)
            return ("link \(a) <-> \(b) cut; both still reach the others", { chaos.healLinks() })
        case .asymmetric:
            let leader = await leader()
            let other = pick(nodes.filter { $0 != leader })
            // The leader's messages to a follower are lost; the follower's still arrive.
            chaos.set(from: leader, to: other, .drop)
            return ("messages \(leader) -> \(other) dropped, \(other) -> \(leader) pass", { chaos.healLinks() })
        case .latency:
            let milliseconds = Int.random(in: 20...120, using: &random)
            for a in nodes { for b in nodes where a != b { chaos.set(from: a, to: b, .delay(milliseconds: milliseconds)) } }
            return ("\(milliseconds) ms added to every peer link", { chaos.healLinks() })
        case .stallNode:
            let victim = pick(nodes)
            for other in nodes where other != victim { chaos.cut(victim, other, .stall) }
            return ("node \(victim)'s peer connections stalled (open, no bytes move)", { chaos.healLinks() })
        case .killLeader:
            let leader = await leader()
            cluster.kill9(leader)
            return ("node \(leader) (leader) SIGKILLed; restarted at heal", restartDead)
        case .killRandom:
            let victim = pick(nodes)
            cluster.kill9(victim)
            return ("node \(victim) SIGKILLed; restarted at heal", restartDead)
        case .killMinority:
            let victims = Array(nodes.shuffled(using: &random).prefix(nodes.count / 2))
            for victim in victims { cluster.kill9(victim) }
            return ("nodes \(victims) SIGKILLed together; restarted at heal", restartDead)
        case .pauseLeader:
            let leader = await leader()
            if !cluster.pause(leader) {
                log(String(format: "%7.1fs  node %llu was not seen stopped within 2 s of SIGSTOP", clock.seconds, leader))
            }
            return ("node \(leader) (leader) SIGSTOPped for \(String(format: "%.1f", hold)) s", { cluster.resume(leader) })
        case .membership:
            return await membershipChange()
        case .clockSkew:
            guard let library = fakeTimeLibrary else {
                return ("skipped: libfaketime is not installed (apt-get install faketime)", {})
            }
            let victim = pick(nodes)
            let offset = (Bool.random(using: &random) ? 1 : -1) * Int.random(in: 30...300, using: &random)
            let jump = -offset / 2 + (offset > 0 ? -60 : 60)
            // The offset lives in a file libfaketime re-reads (at most every
            // second), so the clock can also jump while the node runs.
            let file = "\(cluster.directory)/node-\(victim)/faketime"
            try? String(format: "%+ds\n", offset).write(toFile: file, atomically: true, encoding: .utf8)
            cluster.kill9(victim)
            try? cluster.start(victim, extraEnvironment: ["LD_PRELOAD": library, "FAKETIME_TIMESTAMP_FILE": file, "FAKETIME_CACHE_DURATION": "1",
                                                          "FAKETIME_DONT_FAKE_MONOTONIC": "1"])
            let jumper = Task {
                try? await Task.sleep(for: .milliseconds(Int(hold * 500)))
                try? String(format: "%+ds\n", jump).write(toFile: file, atomically: true, encoding: .utf8)
            }
            return ("node \(victim) restarted with its wall clock \(offset > 0 ? "+" : "")\(offset) s, jumping to \(jump > 0 ? "+" : "")\(jump) s halfway (libfaketime)", {
                jumper.cancel()
                cluster.kill9(victim)
                try? cluster.start(victim)
            })
        }
    }

    /// Adds a node (a learner, promoted once caught up) while a link between
    /// two founders is cut; at heal the link returns and the node is removed.
    private func membershipChange() async -> (String, () async -> Void) {
        let nodes = chaos.nodes, cluster = chaos.cluster, chaos = self.chaos
        let a = pick(nodes), b = pick(nodes.filter { $0 != a })
        chaos.cut(a, b)
        let id = nextMemberID
        nextMemberID += 1
        let base = LocalProcessCluster.pickBasePort()
        do {
            let listing = try ClusterListing(directory: cluster.directory)
            let member = ClusterFiles.Member(id: id, peer: try HostPort(parsing: "127.0.0.1:\(base)", at: "peer"),
                                             api: try HostPort(parsing: "127.0.0.1:\(base + 100)", at: "api"))
            try ClusterFiles.addNode(directory: cluster.directory, member: member, peers: listing.members)
            try cluster.start(id)
        } catch {
            return ("link \(a) <-> \(b) cut; adding node \(id) failed before it was proposed: \(error)", { chaos.healLinks() })
        }
        let body = Array("{\"id\":\(id),\"peer_address\":\"127.0.0.1:\(base)\",\"api_address\":\"127.0.0.1:\(base + 100)\"}".utf8)
        let added = try? await cluster.client.request(.POST, "/v1/cluster/members", headers: [("content-type", "application/json")], body: body,
                                                       timeout: .seconds(5))
        let outcome = added.map { "\($0.status.code)" } ?? "no answer"
        return ("link \(a) <-> \(b) cut; node \(id) added as a learner (answer \(outcome)); removed at heal", {
            chaos.healLinks()
            // Remove it (retrying while the cluster settles), then stop its process.
            for _ in 0..<40 {
                let removed = try? await cluster.client.request(.DELETE, "/v1/cluster/members/\(id)", timeout: .seconds(5))
                if let code = removed?.status.code, code == 200 || code == 404 || code == 409 { break }
                try? await Task.sleep(for: .milliseconds(250))
            }
            try? await Task.sleep(for: .milliseconds(500))
            cluster.kill9(id)
        })
    }

    /// Undoes everything: links pass, paused nodes continue, dead ones restart.
    func healAll() {
        chaos.healLinks()
        for id in chaos.nodes {
            chaos.cluster.resume(id)
            if !chaos.cluster.isRunning(id) { try? chaos.cluster.start(id) }
        }
    }
}

/// Seconds and nanoseconds since the run began.
struct RunClock: Sendable {
    let start = ContinuousClock.now
    var nanos: UInt64 {
        let elapsed = start.duration(to: .now).components
        return UInt64(max(0, elapsed.seconds)) * 1_000_000_000 + UInt64(max(0, elapsed.attoseconds / 1_000_000_000))
    }
    var seconds: Double { Double(nanos) / 1e9 }
}
