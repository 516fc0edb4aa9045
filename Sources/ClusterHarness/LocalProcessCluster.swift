import Foundation
import NIOCore
import NIOHTTP1
import Node
import Synchronization

/// A cluster of real `warrant node start` processes on loopback, for the
/// crash test, the failover benchmark and the load benchmark. Every wait
/// is bounded; `stopAll()` (or deinit) kills what is left.
public final class LocalProcessCluster: Sendable {
    public let directory: String
    public let binary: String
    public let nodeIDs: [UInt64]
    public let client: AdminClient
    public let apiPorts: [UInt64: Int]
    private let processes = Mutex<[UInt64: Process]>([:])
    /// Nodes stopped through `kill9` or `terminate` (until started again).
    private let stoppedOnPurpose = Mutex<Set<UInt64>>([])
    /// Added to each node process's environment.
    public let environment: [String: String]

    /// Writes a new cluster's files with ports from `basePort` (peer ports
    /// basePort+N-1, API ports basePort+100+N-1) and starts every node.
    /// `configure` may change the written files (for example route peer
    /// links through proxies) before any node starts.
    public init(binary: String, directory: String, nodes: Int = 3, basePort: Int, tickMilliseconds: Int = 10, electionTicks: Int = 20,
                environment: [String: String] = [:], configure: ((String) throws -> Void)? = nil) throws {
        self.binary = binary
        self.environment = environment
        self.directory = directory
        nodeIDs = (1...nodes).map { UInt64($0) }
        let members = try nodeIDs.map { id in
            ClusterFiles.Member(id: id, peer: try HostPort(parsing: "127.0.0.1:\(basePort + Int(id) - 1)", at: "peer"),
                                api: try HostPort(parsing: "127.0.0.1:\(basePort + 100 + Int(id) - 1)", at: "api"))
        }
        try ClusterFiles.initialize(directory: directory, clusterID: "bench" + String(UInt32.random(in: 0...UInt32.max), radix: 16),
                                    members: members, tickIntervalMilliseconds: tickMilliseconds, electionTimeoutTicks: electionTicks)
        apiPorts = Dictionary(uniqueKeysWithValues: nodeIDs.map { ($0, basePort + 100 + Int($0) - 1) })
        client = try AdminClient(clusterDirectory: directory)
        try configure?(directory)
        for id in nodeIDs { try start(id) }
    }

    deinit {
        for process in processes.withLock({ $0.values }) where process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }

    /// A free-looking base port: random in 10000..<32108, checked by
    /// binding. Below Linux's ephemeral range (32768 and up): there the
    /// kernel may hand a port to an outgoing connection between the check
    /// and a node's bind, and a CI run saw a node left without its peer
    /// listener, isolated for a whole test.
    public static func pickBasePort() -> Int {
        for _ in 0..<50 {
            // Each base is handed out once per process: tests running side
            // by side both found 20000 free before either bound it.
            let base = candidateBases.randomElement()!
            if ports(ofBase: base).allSatisfy(isFree), handedOut.withLock({ $0.insert(base).inserted }) { return base }
        }
        return candidateBases.randomElement()!
    }

    /// Multiples of 200, so no two bases share a port: with multiples of
    /// 100, base 25900 put its API on 26000, the peer ports of base 26000.
    public static let candidateBases = Array(stride(from: 10_000, through: 32_000, by: 200))

    /// The ports a cluster from `base` may use: peers from `base`, APIs
    /// from `base + 100`, eight nodes each.
    public static func ports(ofBase base: Int) -> [Int] {
        (0..<8).flatMap { [base + $0, base + 100 + $0] }
    }

    private static let handedOut = Mutex<Set<Int>>([])

    private static func isFree(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }

    /// Debian's libfaketime (package faketime), if installed: preloaded, it
    /// shifts a process's wall clock (FAKETIME, or FAKETIME_TIMESTAMP_FILE).
    public static let fakeTimeLibrary: String? = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                                                  "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                                                  "/usr/lib/faketime/libfaketime.so.1"].first { FileManager.default.fileExists(atPath: $0) }

    /// Starts (or restarts) node `id`; `extraEnvironment` is added for this
    /// start only (for example libfaketime's settings).
    public func start(_ id: UInt64, extraEnvironment: [String: String] = [:]) throws {
        // A process being replaced that ended on its own is remembered:
        // a restart must not erase the evidence of a crash.
        if let old = processes.withLock({ $0[id] }), !old.isRunning, !stoppedOnPurpose.withLock({ $0.contains(id) }) {
            let tail = logTail(of: id, lines: 5)
            endedBeforeRestart.withLock { $0.append((id, tail)) }
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["node", "start", "--config", "config.yaml"]
        process.currentDirectoryURL = URL(fileURLWithPath: "\(directory)/node-\(id)")
        let logPath = "\(directory)/node-\(id)/log"
        if !FileManager.default.fileExists(atPath: logPath) { _ = FileManager.default.createFile(atPath: logPath, contents: nil) }
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        let added = environment.merging(extraEnvironment) { $1 }
        if !added.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(added) { $1 } }
        try process.run()
        // The new process first, then the mark: in between, a look at
        // `exitedOnTheirOwn` would take the killed one for a crash.
        processes.withLock { $0[id] = process }
        stoppedOnPurpose.withLock { _ = $0.remove(id) }
    }

    /// Nodes whose process had ended on its own when `start` replaced it
    /// (a crash a heal's restart would otherwise hide), with their logs' ends.
    public var restartedAfterEndingOnTheirOwn: [(id: UInt64, logTail: String)] { endedBeforeRestart.withLock { $0 } }
    private let endedBeforeRestart = Mutex<[(UInt64, String)]>([])

    /// Nodes whose process ended without `kill9` or `terminate` (a node
    /// that could not start, say), each with the end of its log.
    public func exitedOnTheirOwn() -> [(id: UInt64, logTail: String)] {
        let stopped = stoppedOnPurpose.withLock { $0 }
        let ended = processes.withLock { $0.filter { !$0.value.isRunning && !stopped.contains($0.key) }.map(\.key) }.sorted()
        return ended.map { id in (id, logTail(of: id, lines: 5)) }
    }

    /// The last `lines` lines of node `id`'s log.
    public func logTail(of id: UInt64, lines: Int) -> String {
        let log = (try? String(contentsOfFile: "\(directory)/node-\(id)/log", encoding: .utf8)) ?? ""
        return log.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    public func isRunning(_ id: UInt64) -> Bool { processes.withLock { $0[id]?.isRunning ?? false } }

    /// The process id of node `id`, while it runs.
    public func processID(of id: UInt64) -> Int32? { processes.withLock { $0[id].flatMap { $0.isRunning ? $0.processIdentifier : nil } } }

    /// SIGSTOP: the process is frozen (its connections stay open) until `resume`.
    /// SIGSTOP, and waits (at most 2 s) until the process is seen stopped:
    /// a request sent right after the signal could otherwise still be
    /// answered (CI saw a paused leader answer "leader" once).
    /// Whether the process was seen stopped within 2 s.
    @discardableResult
    public func pause(_ id: UInt64) -> Bool {
        guard let process = processes.withLock({ $0[id] }), process.isRunning else { return false }
        kill(process.processIdentifier, SIGSTOP)
        let deadline = ContinuousClock.now.advanced(by: .seconds(2))
        while ContinuousClock.now < deadline {
            // The state follows the command's closing parenthesis in /proc/<pid>/stat.
            let stat = (try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8)) ?? ""
            if let end = stat.lastIndex(of: ")"), stat[stat.index(after: end)...].trimmingCharacters(in: .whitespaces).first.map({ $0 == "T" || $0 == "t" }) ?? false {
                return true
            }
            usleep(1_000)
        }
        return false
    }

    public func resume(_ id: UInt64) {
        guard let process = processes.withLock({ $0[id] }), process.isRunning else { return }
        kill(process.processIdentifier, SIGCONT)
    }

    /// SIGKILL, and waits (at most 10 s) for the process to be gone.
    public func kill9(_ id: UInt64) {
        guard let process = processes.withLock({ $0[id] }) else { return }
        stoppedOnPurpose.withLock { _ = $0.insert(id) }
        kill(process.processIdentifier, SIGKILL)
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while process.isRunning && ContinuousClock.now < deadline { usleep(2_000) }
    }

    /// SIGTERM; returns the exit status, or nil if it did not exit within `seconds`.
    public func terminate(_ id: UInt64, seconds: Double = 10) async -> Int32? {
        guard let process = processes.withLock({ $0[id] }) else { return nil }
        stoppedOnPurpose.withLock { _ = $0.insert(id) }
        process.terminate()
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { try? await Task.sleep(for: .milliseconds(20)) }
        return process.isRunning ? nil : process.terminationStatus
    }

    /// Kills every node started, including ones added after the founders.
    public func stopAll() {
        for id in processes.withLock({ Array($0.keys) }) where isRunning(id) { kill9(id) }
    }

    public func endpointIndex(of id: UInt64) -> Int { nodeIDs.firstIndex(of: id) ?? 0 }

    /// The node's status, or nil if it does not answer (within the node's
    /// probe timeout when `timeout` is nil).
    public func status(of id: UInt64, timeout: TimeAmount? = nil) async -> ClusterStatusBody? {
        guard case .success(let response) = await probe(id, "/v1/cluster/status", timeout: timeout), response.status == .ok else { return nil }
        return try? APIJSON.decode(ClusterStatusBody.self, from: response.body)
    }

    /// How long the next probe of each node may wait: 500 ms, doubled (up
    /// to 4 s) after each probe that got no answer, back to 500 ms after
    /// one that did. A probe that times out closes its connection, and the
    /// next one starts with a new TLS handshake: under a full test suite a
    /// debug build's handshake took longer than a fixed 500 ms, so every
    /// probe of a healthy node was cut short and a CI run waited 20 s for
    /// readiness that was there.
    private let probeTimeouts = Mutex<[UInt64: TimeAmount]>([:])
    static let probeTimeoutFirst = TimeAmount.milliseconds(500)
    static let probeTimeoutMax = TimeAmount.seconds(4)
    /// What each node's last readiness probe got, for `notReadyReason`.
    private let lastReadiness = Mutex<[UInt64: String]>([:])

    /// Sets how long the next probe of `id` may wait, as probes that got
    /// no answer would (tests: a frozen node whose probe would outlast any
    /// stall of a busy machine).
    public func setProbeTimeout(of id: UInt64, _ timeout: TimeAmount) {
        probeTimeouts.withLock { $0[id] = timeout }
    }

    /// GET `path` on node `id`, within `timeout` or the node's probe timeout.
    func probe(_ id: UInt64, _ path: String, timeout: TimeAmount? = nil) async -> Result<HTTPClientResponse, any Error> {
        let bound = timeout ?? probeTimeouts.withLock { $0[id] } ?? Self.probeTimeoutFirst
        do {
            let response = try await client.request(at: endpointIndex(of: id), .GET, path, timeout: bound)
            probeTimeouts.withLock { $0[id] = nil }
            return .success(response)
        } catch {
            probeTimeouts.withLock { $0[id] = min(bound * 2, Self.probeTimeoutMax) }
            return .failure(error)
        }
    }

    /// A running node that says it leads, waiting at most `seconds` (nil
    /// at once if the caller is cancelled).
    ///
    /// Each node is asked in a loop of its own and the first that says it
    /// leads is the answer. Asked one after another, a node slow to answer
    /// (its probe may wait 4 s) held up the nodes behind it: on a loaded
    /// CI machine a start-up wait of 20 s ran out while the leader had
    /// been elected in the first second. A loop still in a probe when the
    /// answer is known ends with that probe (within its timeout).
    public func waitForLeader(seconds: Double = 10) async -> UInt64? {
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(seconds * 1000)))
        let found = StopFlag()
        defer { found.set() }
        let (answers, sink) = AsyncStream.makeStream(of: UInt64?.self)
        for id in nodeIDs {
            Task {
                while !found.isSet && ContinuousClock.now < deadline {
                    if self.isRunning(id), await self.status(of: id)?.role == "leader" {
                        sink.yield(id)
                        return
                    }
                    try? await Task.sleep(for: .milliseconds(20))
                }
                sink.yield(nil)
            }
        }
        var ended = 0
        // The stream ends early if the caller is cancelled.
        for await answer in answers {
            if let answer { return answer }
            ended += 1
            if ended == nodeIDs.count { break }
        }
        return nil
    }

    /// Why the cluster is not ready, for an error message: the nodes that
    /// ended on their own, with their logs' last lines; or, when none did,
    /// the last lines of every node's log (the directory may be gone by
    /// the time anyone reads the message).
    public func notReadyReason() -> String {
        let ended = exitedOnTheirOwn()
        guard !ended.isEmpty else {
            let answers = lastReadiness.withLock { $0 }
            return "no leader, or a node not answering /readyz in time; the end of each node's log:\n"
                + nodeIDs.map { id in
                    "node \(id)\(isRunning(id) ? "" : " (not running)")\(answers[id].map { ", its last /readyz answer: \($0)" } ?? ""):\n\(logTail(of: id, lines: 8))"
                }.joined(separator: "\n")
        }
        return ended.map { "node \($0.id) exited:\n\($0.logTail)" }.joined(separator: "\n")
    }

    /// Waits until every running node answers /readyz with 200; false at
    /// once if a node's process ended on its own (see `exitedOnTheirOwn`).
    public func waitUntilReady(seconds: Double = 20) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        lastReadiness.withLock { $0.removeAll() }
        while Date() < deadline && !Task.isCancelled {
            guard exitedOnTheirOwn().isEmpty else { return false }
            // Side by side (see `waitForLeader`); here every answer is needed.
            let notReady = await withTaskGroup(of: (UInt64, String?).self) { group in
                for id in nodeIDs where isRunning(id) {
                    group.addTask {
                        switch await self.probe(id, "/readyz") {
                        case .success(let response) where response.status == .ok: return (id, nil)
                        case .success(let response): return (id, "\(response.status.code) \(response.text.prefix(300))")
                        case .failure(let error): return (id, "\(error)")
                        }
                    }
                }
                var notReady: [UInt64: String] = [:]
                for await (id, answer) in group { if let answer { notReady[id] = answer } }
                return notReady
            }
            lastReadiness.withLock { $0.merge(notReady) { $1 } }
            if notReady.isEmpty { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return false
    }

    /// Each running node's audit verification.
    public func auditVerifications() async -> [UInt64: AuditVerifyBody] {
        var results: [UInt64: AuditVerifyBody] = [:]
        for id in nodeIDs where isRunning(id) {
            if let response = try? await client.request(at: endpointIndex(of: id), .GET, "/v1/audit/verify", timeout: .seconds(30)),
               let body = try? APIJSON.decode(AuditVerifyBody.self, from: response.body) {
                results[id] = body
            }
        }
        return results
    }

    /// Whether every running node holds the same audit chain: same length
    /// once caught up (waits up to `seconds`), intact, same head hash.
    public func auditChainsAgree(seconds: Double = 20) async -> (Bool, String) {
        let deadline = Date().addingTimeInterval(seconds)
        var last = ""
        while Date() < deadline {
            let results = await auditVerifications()
            let running = nodeIDs.filter(isRunning)
            last = results.sorted { $0.key < $1.key }.map { "node \($0.key): \($0.value.intact ? "intact" : "BROKEN") \($0.value.records) records head \($0.value.headHash?.prefix(16) ?? "-")" }.joined(separator: "; ")
            if results.count == running.count, results.values.allSatisfy(\.intact), Set(results.values.map(\.headHash)).count == 1 {
                return (true, last)
            }
            try? await Task.sleep(for: .milliseconds(200))
        }
        return (false, last)
    }

    public func close() async {
        stopAll()
        await client.closeAll()
    }
}
