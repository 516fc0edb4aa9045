import Authority
import ClusterHarness
import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Node
import Synchronization
import SwiftASN1
import X509

// warrant-bench issue: audited issuance on the running 3-node cluster, with
// the raw signing rate of this machine measured in the same run.

/// Hands out prepared items to concurrent clients, each once.
final class Queue<Item: Sendable>: Sendable {
    private let state: Mutex<(items: [Item], next: Int)>
    init(_ items: [Item]) { state = Mutex((items, 0)) }
    func take() -> Item? {
        state.withLock { state in
            guard state.next < state.items.count else { return nil }
            defer { state.next += 1 }
            return state.items[state.next]
        }
    }
}

final class Collected: Sendable {
    let value = Mutex<[String]>([])
}

struct Timed: Sendable {
    var ok = 0
    var failed = 0
    var latencies: [Duration] = []
    var seconds = 0.0
    /// The load generator's CPU time when it ran in processes of its own (wrk).
    var clientCPUSeconds: Double?

    func line(_ name: String) -> String {
        let sorted = latencies.sorted()
        func p(_ q: Double) -> Double { sorted.isEmpty ? .nan : sorted[min(sorted.count - 1, Int(Double(sorted.count) * q))].milliseconds }
        return String(format: "%-34@ %8.0f /s  p50 %6.2f ms  p99 %6.2f ms  (%d ok, %d failed, %.1f s)", name as NSString,
                      Double(ok) / seconds, p(0.5), p(0.99), ok, failed, seconds)
    }
}

/// `clients` connections to `endpoints` (client mod count) sending
/// `makeRequest()` bodies to `path` until it returns nil or `seconds` pass.
func drive(endpoints: [SocketAddress], tls: NIOSSLContext, clients: Int, seconds: Double, path: String,
           makeRequest: @escaping @Sendable () -> [UInt8]?) async throws -> Timed {
    let start = ContinuousClock.now
    let end = start.advanced(by: .milliseconds(Int(seconds * 1000)))
    // Only verification answers 200 with a refusal inside; the check is a byte search (the client shares the machine).
    let checksVerdict = path == "/v1/verify"
    let invalidVerdict = Array("\"valid\":false".utf8)
    let results = try await withThrowingTaskGroup(of: Timed.self) { group in
        for client in 0..<clients {
            group.addTask {
                var timed = Timed()
                var connection: HTTPConnection?
                while ContinuousClock.now < end, let body = makeRequest() {
                    let began = ContinuousClock.now
                    do {
                        if connection == nil || !connection!.isActive {
                            connection = try await HTTPConnection.connect(to: endpoints[client % endpoints.count], tls: tls)
                        }
                        let response = try await connection!.request(.POST, path, headers: [("content-type", "application/json")], body: body)
                        if response.status == .ok && !(checksVerdict && contains(response.body, invalidVerdict)) {
                            timed.ok += 1
                            timed.latencies.append(began.duration(to: .now))
                        } else {
                            timed.failed += 1
                        }
                    } catch {
                        connection = nil
                        timed.failed += 1
                    }
                }
                await connection?.close()
                return timed
            }
        }
        var total = Timed()
        for try await part in group {
            total.ok += part.ok
            total.failed += part.failed
            total.latencies += part.latencies
        }
        return total
    }
    var timed = results
    timed.seconds = start.duration(to: .now).milliseconds / 1000
    return timed
}

/// What a phase sends: each body once, or one body over and over.
enum Bodies {
    case each([[UInt8]])
    case repeating([UInt8])
}

/// Whether phases use wrk (installed, and WARRANT_BENCH_CLIENT is not
/// "swift") or the Swift client (`drive`).
let usesWrk = Wrk.available && ProcessInfo.processInfo.environment["WARRANT_BENCH_CLIENT"] != "swift"

/// Sends `bodies` to `path` on `endpoints` with `clients` connections for at
/// most `seconds`: with wrk when it is there, else with the Swift client.
func load(_ bodies: Bodies, to endpoints: [SocketAddress], path: String, tls: NIOSSLContext, clients: Int, seconds: Double,
          directory: String) async throws -> Timed {
    if usesWrk {
        let targets = endpoints.map { (host: "127.0.0.1", port: $0.port ?? 0) }
        switch bodies {
        case .each(let list):
            return try await Wrk.post(endpoints: targets, path: path, bodies: list, checkVerdicts: path == "/v1/verify", connections: clients,
                                      seconds: seconds, directory: directory)
        case .repeating(let body):
            return try await Wrk.post(endpoints: targets, path: path, bodies: [body], repeating: true, checkVerdicts: path == "/v1/verify",
                                      connections: clients, seconds: seconds, directory: directory)
        }
    }
    switch bodies {
    case .each(let list):
        let queue = Queue(list)
        return try await drive(endpoints: endpoints, tls: tls, clients: clients, seconds: seconds, path: path) { queue.take() }
    case .repeating(let body):
        return try await drive(endpoints: endpoints, tls: tls, clients: clients, seconds: seconds, path: path) { body }
    }
}

/// A 3-node cluster of real processes in `directory`, once it has a leader
/// and every node is ready.
func startReadyCluster(binary: String, directory: String) async throws -> LocalProcessCluster {
    let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
    guard await cluster.waitForLeader(seconds: 20) != nil, await cluster.waitUntilReady() else {
        await cluster.close()
        throw BenchFailure(description: "the cluster did not become ready: \(cluster.notReadyReason())")
    }
    return cluster
}

/// Whether `needle` occurs in `haystack`.
func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard !needle.isEmpty, haystack.count >= needle.count else { return needle.isEmpty }
    for start in 0...(haystack.count - needle.count) where haystack[start] == needle[0] {
        if haystack[start..<(start + needle.count)].elementsEqual(needle) { return true }
    }
    return false
}

func jsonBytes(_ object: [String: Any]) -> [UInt8] { Array((try? JSONSerialization.data(withJSONObject: object)) ?? Data()) }

/// The issuance benchmark's phases, in the order they run.
let issuePhases = ["x509-all", "x509-leader", "jwt-leader", "verify"]

func runIssueBench(binary: String, clients: Int, seconds: Double, phases selected: Set<String> = Set(issuePhases)) async throws {
    print("issue: 3 nodes on loopback, \(clients) clients (\(usesWrk ? "wrk" : "the Swift client")), \(seconds) s per run; spread over all nodes (followers forward to the leader) or on the leader (as a leader-aware client)")
    // The machine's raw signing rate, one thread, with the same code the leader signs with.
    let key = P256.Signing.PrivateKey(compactRepresentable: false)
    var signatures = 0
    let signStart = ContinuousClock.now
    while signStart.duration(to: .now) < .seconds(1) {
        _ = try key.signature(for: Array("warrant".utf8))
        signatures += 1
    }
    let rawSign = Double(signatures) / (signStart.duration(to: .now).milliseconds / 1000)
    let ca = try X509Authority.create(trustDomain: "bench.local")
    let subject = Certificate.PublicKey(P256.Signing.PrivateKey().publicKey)
    let spiffe = try SpiffeID(parsing: "spiffe://bench.local/x")
    var minted = 0
    let mintStart = ContinuousClock.now
    while mintStart.duration(to: .now) < .seconds(1) {
        _ = try ca.issue(spiffeID: spiffe, publicKey: subject, ttl: 600, attributes: ["a": "b"])
        minted += 1
    }
    let rawMint = Double(minted) / (mintStart.duration(to: .now).milliseconds / 1000)
    print(String(format: "raw signing on this machine (one thread): %.0f P-256 signatures/s, %.0f X509-SVIDs built and signed/s", rawSign, rawMint))

    let directory = temporaryClusterDirectory("issue")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let cluster = try await startReadyCluster(binary: binary, directory: directory)
    let admin = cluster.client
    let tls = try AdminClient.tlsContext(clusterDirectory: directory)
    let listing = try ClusterListing(directory: directory)
    let endpoints = try listing.members.map { try SocketAddress(ipAddress: "127.0.0.1", port: $0.api.port) }

    let phases = Phases(cluster: cluster, listing: listing, endpoints: endpoints)
    let leader = phases.leader
    let phase = phases.run

    // Tokens, made beforehand (not timed): one per issuance, for three
    // timed phases, more per second than a phase issues (a phase that ran
    // out would show the token count, not the cluster's rate).
    let perPhase = [("x509-all", 8_000.0), ("x509-leader", 8_000.0), ("jwt-leader", 14_000.0)].filter { selected.contains($0.0) }
        .map { ($0.0, Int(seconds * $0.1)) }
    print("making \(perPhase.map(\.1).reduce(0, +)) join tokens (not timed)...")
    var queues: [String: Queue<String>] = [:]
    for (phase, count) in perPhase {
        queues[phase] = Queue(try await makeEach(count) { n, client in
            let response = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                   body: jsonBytes(["spiffe_id": "spiffe://warrant.local/bench/\(phase)/\(n)", "ttl_seconds": 600]),
                                                   startingAt: client)
            return (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["token"] as? String
        })
    }
    let csrPEM = try { () throws -> String in
        let request = try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName("bench") },
                                                    privateKey: .init(P256.Signing.PrivateKey()), attributes: CertificateSigningRequest.Attributes())
        return try request.serializeAsPEM().pemString
    }()
    // Request bodies, made beforehand too: the client shares the machine.
    func bodies(_ phase: String, _ body: (String) -> [String: Any]) -> Bodies {
        var tokens: [String] = []
        while let token = queues[phase]!.take() { tokens.append(token) }
        return .each(tokens.map { jsonBytes(body($0)) })
    }
    print("timing...")
    if selected.contains("x509-all") {
        let x509Bodies = bodies("x509-all") { ["token": $0, "csr": csrPEM] }
        _ = try await phase("X509-SVID, clients on all nodes") { _ in
            try await load(x509Bodies, to: endpoints, path: "/v1/svid/x509", tls: tls, clients: clients, seconds: seconds, directory: directory)
        }
    }
    /// Storage transactions and Raft messages so far, per node.
    func counters() async -> [(transactions: Double, messages: Double)] {
        var result: [(Double, Double)] = []
        for index in listing.members.indices {
            let values = await phases.metrics(["warrant_storage_write_seconds_count", "warrant_raft_messages_sent_total"], at: index)
            result.append((values[0], values[1]))
        }
        return result
    }
    /// Runs a phase on the leader and prints each node's synced log
    /// writes and Raft messages during it.
    func onLeader(_ name: String, _ requests: Bodies, path: String) async throws -> Timed {
        let before = await counters()
        let leaderID = try await leader().id
        let timed = try await phase(name) { leaderEndpoint in
            try await load(requests, to: leaderEndpoint, path: path, tls: tls, clients: clients, seconds: seconds, directory: directory)
        }
        let after = await counters()
        for (index, member) in listing.members.enumerated() {
            let transactions = after[index].transactions - before[index].transactions
            let messages = after[index].messages - before[index].messages
            print(String(format: "  node %d%@: %.0f synced log writes/s (%.1f issuances each), %.0f Raft messages sent/s", Int(member.id),
                         member.id == leaderID ? " (leader)" : "", transactions / timed.seconds, Double(timed.ok) / max(transactions, 1),
                         messages / timed.seconds))
        }
        return timed
    }
    var x509: Timed?
    if selected.contains("x509-leader") {
        x509 = try await onLeader("X509-SVID, clients on the leader", bodies("x509-leader") { ["token": $0, "csr": csrPEM] }, path: "/v1/svid/x509")
    }
    if selected.contains("jwt-leader") {
        _ = try await onLeader("JWT-SVID, clients on the leader", bodies("jwt-leader") { ["token": $0, "audience": ["bench"]] }, path: "/v1/svid/jwt")
    }
    if selected.contains("verify") {
        try await verifyPhases()
    }
    if let x509 {
        print(String(format: "audited X509-SVID issuance / raw single-thread signing: %.2f", Double(x509.ok) / x509.seconds / rawSign))
    }
    await cluster.close()

    // Verification on one follower.
    func verifyPhases() async throws {
    guard let leader = await cluster.waitForLeader(), let followerIndex = listing.members.firstIndex(where: { $0.id != leader }) else {
        throw BenchFailure(description: "no leader")
    }
    let spareToken = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                             body: jsonBytes(["spiffe_id": "spiffe://warrant.local/bench/verify"]))
    let secret = (try JSONSerialization.jsonObject(with: Data(spareToken.body)) as? [String: Any])?["token"] as? String ?? ""
    let svid = try await admin.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")], body: jsonBytes(["token": secret, "csr": csrPEM]))
    let certificate = (try JSONSerialization.jsonObject(with: Data(svid.body)) as? [String: Any])?["certificate"] as? String ?? ""
    let x509Verify = jsonBytes(["x509_chain": certificate])
    _ = try await phase("verify X509-SVID on a follower, one chain again and again") { _ in
        try await load(.repeating(x509Verify), to: [endpoints[followerIndex]], path: "/v1/verify", tls: tls, clients: clients, seconds: seconds / 2,
                       directory: directory)
    }
    let jwtToken = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                           body: jsonBytes(["spiffe_id": "spiffe://warrant.local/bench/verify-jwt"]))
    let jwtSecret = (try JSONSerialization.jsonObject(with: Data(jwtToken.body)) as? [String: Any])?["token"] as? String ?? ""
    let jwtSVID = try await admin.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")], body: jsonBytes(["token": jwtSecret, "audience": ["bench"]]))
    let jwtValue = (try JSONSerialization.jsonObject(with: Data(jwtSVID.body)) as? [String: Any])?["token"] as? String ?? ""
    let jwtVerifyBody = jsonBytes(["jwt": jwtValue, "audience": "bench"])
    _ = try await phase("verify JWT-SVID on a follower, one token again and again") { _ in
        try await load(.repeating(jwtVerifyBody), to: [endpoints[followerIndex]], path: "/v1/verify", tls: tls, clients: clients, seconds: seconds / 2,
                       directory: directory)
    }
    // Each identity seen once: the node's memo only helps one seen before;
    // the follower finds each in its issuance records (replicated from
    // the leader), and checks the signature of any it does not find. wrk
    // runs its whole duration even once they run out: enough for 40,000 a
    // second over two seconds.
    let distinct = min(80_000, Int(seconds * 10_000))
    let eachSeconds = min(seconds / 2, 2)
    for (kind, path, field) in [("JWT-SVID", "/v1/svid/jwt", "token"), ("X509-SVID", "/v1/svid/x509", "certificate")] {
        print("making \(distinct) \(kind)s (not timed)...")
        let joinTokens = try await makeEach(distinct) { n, client in
            let response = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                   body: jsonBytes(["spiffe_id": "spiffe://warrant.local/bench/verify-each/\(n)"]), startingAt: client)
            return (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["token"] as? String
        }
        let identities = try await makeEach(joinTokens.count) { n, client in
            let request: [String: Any] = kind == "JWT-SVID" ? ["token": joinTokens[n], "audience": ["bench"]] : ["token": joinTokens[n], "csr": csrPEM]
            let response = try await admin.request(.POST, path, headers: [("content-type", "application/json")], body: jsonBytes(request),
                                                   startingAt: client)
            return (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?[field] as? String
        }
        let bodies = identities.map { kind == "JWT-SVID" ? jsonBytes(["jwt": $0, "audience": "bench"]) : jsonBytes(["x509_chain": $0]) }
        let ways = ["warrant_verify_recorded_total", "warrant_verify_signatures_checked_total"]
        let before = await phases.metrics(ways, at: followerIndex)
        let each = try await phase("verify \(kind) on a follower, each once (\(identities.count))") { _ in
            try await load(.each(bodies), to: [endpoints[followerIndex]], path: "/v1/verify", tls: tls, clients: clients, seconds: eachSeconds,
                           directory: directory)
        }
        let after = await phases.metrics(ways, at: followerIndex)
        print(String(format: "  the follower knew %.0f by their issuance record (no signature check) and checked %.0f signatures",
                     after[0] - before[0], after[1] - before[1]))
        if each.ok + each.failed >= identities.count * 99 / 100 {
            print("  (every one was used before the time was up: the rate above is a lower bound)")
        }
    }
    }
}

/// Runs `make(n, client)` for n in 0..<count on 64 concurrent clients
/// (untimed set-up); returns what each made (nil answers left out).
func makeEach(_ count: Int, _ make: @escaping @Sendable (Int, Int) async throws -> String?) async throws -> [String] {
    let numbers = Queue(Array(0..<count))
    let made = Collected()
    try await withThrowingTaskGroup(of: Void.self) { group in
        for client in 0..<64 {
            group.addTask {
                while let n = numbers.take() {
                    if let value = try await make(n, client) { made.value.withLock { $0.append(value) } }
                }
            }
        }
        try await group.waitForAll()
    }
    return made.value.withLock { $0 }
}

/// Timed phases on a cluster: each prints its figures and the CPU time
/// each operation took in every process.
struct Phases {
    let cluster: LocalProcessCluster
    let listing: ClusterListing
    let endpoints: [SocketAddress]
    let meter: CPUMeter

    init(cluster: LocalProcessCluster, listing: ClusterListing, endpoints: [SocketAddress]) {
        self.cluster = cluster
        self.listing = listing
        self.endpoints = endpoints
        meter = CPUMeter(cluster: cluster)
    }

    /// The leader now (it can change under load: the phases on the leader
    /// look it up when they start, and a change during one is reported).
    func leader() async throws -> (id: UInt64, endpoint: [SocketAddress]) {
        guard let id = await cluster.waitForLeader(), let index = listing.members.firstIndex(where: { $0.id == id }) else {
            throw BenchFailure(description: "no leader")
        }
        return (id, [endpoints[index]])
    }

    /// Drives a phase (given the leader's endpoint) and prints its figures.
    func run(_ name: String, _ body: ([SocketAddress]) async throws -> Timed) async throws -> Timed {
        let (leaderID, leaderEndpoint) = try await leader()
        let checkpointsBefore = await checkpoints()
        let faultsBefore = meter.nodeFaults()
        let before = meter.sample()
        let timed = try await body(leaderEndpoint)
        var after = meter.sample()
        let faultsAfter = meter.nodeFaults()
        let checkpointsAfter = await checkpoints()
        // With wrk the client is its processes: this one only wrote their
        // request files beforehand and read their results afterwards.
        if let wrk = timed.clientCPUSeconds { after[after.count - 2] = before[before.count - 2] + wrk }
        print(timed.line(name))
        print(meter.line(from: before, to: after, operations: timed.ok, leader: leaderID, seconds: timed.seconds))
        print(meter.faultLine(from: faultsBefore, to: faultsAfter, operations: timed.ok, leader: leaderID))
        if let now = try? await leader().id, now != leaderID { print("  (the leader changed during this phase: node \(leaderID), then node \(now))") }
        // A checkpoint writes the whole ledger (on every node at about the
        // same index): a phase that holds one pays for it, where a long
        // run pays one per ledger-size of entries.
        let overlapping = listing.members.indices.compactMap { index -> String? in
            let begun = checkpointsAfter[index].begun - checkpointsBefore[index].begun
            let running = checkpointsBefore[index].begun > checkpointsBefore[index].taken
            guard begun > 0 || running else { return nil }
            return "node \(listing.members[index].id) " + [running ? "one from before" : nil, begun > 0 ? "\(Int(begun)) begun" : nil].compactMap { $0 }.joined(separator: " + ")
        }
        if !overlapping.isEmpty { print("  ledger checkpoints written while timed: " + overlapping.joined(separator: ", ")) }
        return timed
    }

    /// Ledger checkpoints begun and finished so far, per node (from /metrics).
    func checkpoints() async -> [(begun: Double, taken: Double)] {
        var result: [(Double, Double)] = []
        for index in listing.members.indices {
            let values = await metrics(["warrant_ledger_checkpoints_begun_total", "warrant_raft_snapshots_taken_total"], at: index)
            result.append((values[0], values[1]))
        }
        return result
    }

    /// The values of `names` on the node at `index` (from /metrics; 0 if absent).
    func metrics(_ names: [String], at index: Int) async -> [Double] {
        let text = (try? await cluster.client.request(at: index, .GET, "/metrics"))?.text ?? ""
        return names.map { name in
            text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
        }
    }
}

/// CPU time (user + system) of processes, read from /proc: where each
/// operation's cost goes when clients and nodes share the machine.
struct CPUMeter {
    /// A label and a process id per process; the bench itself is "client".
    let processes: [(label: String, pid: Int32)]

    let nodeIDs: [UInt64?]

    init(cluster: LocalProcessCluster) {
        var processes = cluster.nodeIDs.compactMap { id in cluster.processID(of: id).map { (label: "node \(id)", pid: $0) } }
        nodeIDs = cluster.nodeIDs.filter { cluster.processID(of: $0) != nil } + [nil]
        processes.append(("client", getpid()))
        self.processes = processes
    }

    /// The fields of /proc/PID/stat after the command, from field 3 (state) on.
    static func statFields(of pid: Int32) -> [Substring] {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return [] }
        return text[text.index(after: close)...].split(separator: " ")
    }

    static func seconds(of pid: Int32) -> Double {
        let fields = statFields(of: pid)
        // utime is field 14 and stime 15.
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Minor page faults of each node so far (field 10): pages of new
    /// memory touched, each a host fault on a virtual machine that gives
    /// freed pages back to its host.
    func nodeFaults() -> [Double] {
        processes.dropLast().map { process in
            let fields = Self.statFields(of: process.pid)
            return fields.count > 7 ? Double(fields[7]) ?? 0 : 0
        }
    }

    func faultLine(from before: [Double], to after: [Double], operations: Int, leader: UInt64?) -> String {
        let parts = zip(zip(processes, nodeIDs), zip(before, after)).map { process, faults in
            String(format: "%@%@ %.2f", process.0.label, process.1 != nil && process.1 == leader ? " (leader)" : "", (faults.1 - faults.0) / Double(max(operations, 1)))
        }
        return "  page faults per operation: " + parts.joined(separator: ", ")
    }

    /// CPU time of each process, then (last) the machine's stolen time:
    /// what the hypervisor gave other guests while this one wanted to run.
    func sample() -> [Double] { processes.map { Self.seconds(of: $0.pid) } + [Self.stolenSeconds()] }

    static func stolenSeconds() -> Double {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8), let line = text.split(separator: "\n").first else { return 0 }
        let fields = line.split(separator: " ")
        // cpu user nice system idle iowait irq softirq steal ...
        guard fields.count > 8, let steal = Double(fields[8]) else { return 0 }
        return steal / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Microseconds of CPU per operation, per process and in all.
    func line(from before: [Double], to after: [Double], operations: Int, leader: UInt64? = nil, seconds: Double = 0) -> String {
        let stolen = (after.last ?? 0) - (before.last ?? 0)
        let perOperation = zip(before.dropLast(), after.dropLast()).map { ($1 - $0) / Double(max(operations, 1)) * 1e6 }
        let parts = zip(zip(processes, nodeIDs), perOperation).map { process, cpu in
            String(format: "%@%@ %.0f", process.0.label, process.1 != nil && process.1 == leader ? " (leader)" : "", cpu)
        }
        let steal = seconds > 0 ? String(format: "; stolen by the hypervisor: %.0f%% of the machine", stolen / (seconds * Double(ProcessInfo.processInfo.activeProcessorCount)) * 100) : ""
        return "  CPU per operation (µs): " + parts.joined(separator: ", ") + String(format: "; all %.0f", perOperation.reduce(0, +)) + steal
    }
}
