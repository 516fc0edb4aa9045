import ClusterHarness
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Node
import Testing

/// One in-process cluster at a time: they share this process's threads with
/// every other suite, and two at once starved each other's elections.
actor ClusterSlot {
    static let shared = ClusterSlot()
    private var busy = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func acquire() async {
        if !busy {
            busy = true
            return
        }
        await withCheckedContinuation { waiters.append($0) }
    }

    func release() {
        if waiters.isEmpty { busy = false } else { waiters.removeFirst().resume() }
    }
}

/// Runs `body` holding the slot: tests that start real node processes
/// take turns with the in-process clusters, since two clusters at once on
/// two cores made elections churn (and requests fail) in both.
func withClusterSlot<T>(_ body: () async throws -> T) async rethrows -> T {
    await ClusterSlot.shared.acquire()
    do {
        let result = try await body()
        await ClusterSlot.shared.release()
        return result
    } catch {
        await ClusterSlot.shared.release()
        throw error
    }
}

/// Node servers in this process (real TLS, HTTP, TCP and SQLite), on
/// loopback ports picked at random. Make one with `start()`; `shutdown()`
/// frees the slot for the next.
final class InProcessCluster: @unchecked Sendable {
    /// `extraConfig` (YAML) is appended to every node's configuration.
    static func start(nodes: Int = 3, snapshotEveryEntries: Int? = nil, extraConfig: String = "") async throws -> InProcessCluster {
        await ClusterSlot.shared.acquire()
        do {
            return try InProcessCluster(nodes: nodes, snapshotEveryEntries: snapshotEveryEntries, extraConfig: extraConfig)
        } catch {
            await ClusterSlot.shared.release()
            throw error
        }
    }

    /// 500 ms to 1 s (ticks of 10 ms), not the default 200 ms: these nodes
    /// share two cores with every other suite, and a CI run saw one cluster
    /// re-elect 37 times in a minute while a crash test hammered fsync.
    static let electionTimeoutTicks = 50

    let directory: String
    let basePort: Int
    let client: AdminClient
    private(set) var servers: [UInt64: NodeServer] = [:]
    private(set) var tasks: [UInt64: Task<Void, any Error>] = [:]

    private init(nodes: Int, snapshotEveryEntries: Int?, extraConfig: String) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-api-\(UUID().uuidString.prefix(8))").path
        let basePort = LocalProcessCluster.pickBasePort()
        self.basePort = basePort
        let members = try (1...nodes).map { n in
            ClusterFiles.Member(id: UInt64(n), peer: try HostPort(parsing: "127.0.0.1:\(basePort + n - 1)", at: "peer"),
                                api: try HostPort(parsing: "127.0.0.1:\(basePort + 100 + n - 1)", at: "api"))
        }
        try ClusterFiles.initialize(directory: directory, clusterID: "test" + String(UInt16.random(in: 0...UInt16.max), radix: 16), members: members,
                                    electionTimeoutTicks: Self.electionTimeoutTicks, snapshotEveryEntries: snapshotEveryEntries)
        client = try AdminClient(clusterDirectory: directory)
        // These tests are about the API, not durability (the SIGKILL and
        // chaos tests sync every write): unsynced, their elections do not
        // stall behind other suites' fsyncs on a shared disk.
        for member in members {
            let path = "\(directory)/node-\(member.id)/config.yaml"
            try (try String(contentsOfFile: path, encoding: .utf8) + "storage:\n  unsafe_no_fsync: true\n" + extraConfig)
                .write(toFile: path, atomically: true, encoding: .utf8)
        }
        for member in members { try start(member.id) }
    }

    func start(_ id: UInt64) throws {
        let server = try NodeServer(configPath: "\(directory)/node-\(id)/config.yaml")
        servers[id] = server
        tasks[id] = Task { try await server.run(handleSignals: false) }
    }

    func apiAddress(_ id: UInt64) throws -> SocketAddress {
        try SocketAddress(ipAddress: "127.0.0.1", port: basePort + 100 + Int(id) - 1)
    }

    /// A client for one node's API, with the admin certificate (or none).
    /// A connection presenting the admin certificate `cluster init` made,
    /// another one's (`credentials`: its PEM files), or none.
    func connection(to id: UInt64, admin: Bool = true, credentials: (certificate: String, key: String)? = nil) async throws -> HTTPConnection {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile("\(directory)/ca.pem"))
        configuration.additionalTrustRoots = []
        configuration.certificateVerification = .noHostnameVerification
        if admin {
            let (certificate, key) = credentials ?? ("\(directory)/admin.pem", "\(directory)/admin.key")
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        }
        return try await HTTPConnection.connect(to: try apiAddress(id), tls: try NIOSSLContext(configuration: configuration))
    }

    /// A connection to node `id` presenting node `node`'s certificate, as a
    /// follower forwarding a write would.
    func connection(to id: UInt64, asNode node: UInt64) async throws -> HTTPConnection {
        let identity = try #require(servers[node]).identity
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile("\(directory)/ca.pem"))
        configuration.additionalTrustRoots = []
        configuration.certificateVerification = .noHostnameVerification
        configuration.certificateChain = [.certificate(try identity.nioCertificate)]
        configuration.privateKey = .privateKey(try identity.nioPrivateKey)
        return try await HTTPConnection.connect(to: try apiAddress(id), tls: try NIOSSLContext(configuration: configuration))
    }

    func status(_ id: UInt64) async -> ClusterStatusBody? {
        guard let connection = try? await connection(to: id) else { return nil }
        defer { Task { await connection.close() } }
        guard let response = try? await connection.request(.GET, "/v1/cluster/status", timeout: .seconds(5)), response.status == .ok else { return nil }
        return try? APIJSON.decode(ClusterStatusBody.self, from: response.body)
    }

    /// Polls until a node reports itself leader and every node knows it.
    func waitForLeader(seconds: Double = 60) async -> UInt64? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            var leaders: Set<UInt64> = []
            var all = true
            for id in servers.keys.sorted() {
                guard let status = await status(id), status.leader != 0 else { all = false; break }
                leaders.insert(status.leader)
            }
            if all, leaders.count == 1, let leader = leaders.first { return leader }
            try? await Task.sleep(for: .milliseconds(50))
        }
        // What each node says, for the failure's record.
        for id in servers.keys.sorted() {
            let status = await status(id)
            print("waitForLeader: node \(id): " + (status.map { "role \($0.role), term \($0.term), leader \($0.leader), commit \($0.commitIndex), applied \($0.appliedIndex)" }
                                                          ?? "no status answer"))
        }
        return nil
    }

    func stop(_ id: UInt64) async {
        servers[id]?.stop()
        _ = await tasks[id]?.result
        servers[id] = nil
        tasks[id] = nil
    }

    func shutdown() async {
        for id in servers.keys.sorted() { await stop(id) }
        await client.closeAll()
        try? FileManager.default.removeItem(atPath: directory)
        await ClusterSlot.shared.release()
    }
}

extension InProcessCluster {
    /// A ready 3-node cluster and, on one follower, an admin connection and
    /// one without a client certificate; `body` runs with them, its errors
    /// are recorded, and everything is closed and shut down after.
    static func withReadyFollower(extraConfig: String = "",
                                  _ body: (InProcessCluster, _ leader: UInt64, _ follower: UInt64, _ admin: HTTPConnection,
                                           _ open: HTTPConnection) async throws -> Void) async throws {
        let cluster = try await InProcessCluster.start(extraConfig: extraConfig)
        do {
            let leader = try #require(await cluster.waitForLeader())
            let follower = try #require([UInt64(1), 2, 3].first { $0 != leader })
            let admin = try await cluster.connection(to: follower)
            let open = try await cluster.connection(to: follower, admin: false)
            #expect(await eventually { (try? await open.request(.GET, "/readyz"))?.status == .ok }, "ready once the trust domain's keys exist")
            do {
                try await body(cluster, leader, follower, admin, open)
            } catch {
                Issue.record(error)
            }
            await admin.close()
            await open.close()
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }
}

/// Polls `condition` every 50 ms for at most `seconds`.
func eventually(seconds: Double = 20, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return try await condition()
}

let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
