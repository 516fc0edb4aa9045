import Foundation
import Ledger
import NIOCore
import NIOPosix
import Raft
import Storage
import Synchronization
import Transport

/// One line per event on standard error: time (UTC, milliseconds), level,
/// message, fields. Nothing secret is ever passed here (keys and
/// certificates stay out).
public struct NodeLog: Sendable {
    let nodeID: NodeID
    public init(nodeID: NodeID) { self.nodeID = nodeID }

    public func info(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) { emit("info", message, fields) }
    public func warning(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) { emit("warn", message, fields) }
    public func error(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) { emit("error", message, fields) }

    /// Milliseconds: elections and faults are told apart by less than a second.
    public static let timeFormat = Date.ISO8601FormatStyle(includingFractionalSeconds: true)

    private func emit(_ level: String, _ message: String, _ fields: KeyValuePairs<String, String>) {
        var line = "\(Date().formatted(Self.timeFormat)) \(level) node=\(nodeID) \(message)"
        for (key, value) in fields { line += " \(key)=\(value.contains(" ") ? "\"\(value)\"" : value)" }
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
}

/// Why a node could not start serving (a port it cannot bind, say); it
/// stopped without joining the cluster.
public struct NodeStartError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// `warrant node start`: storage, driver, transport, API, ticker and
/// shutdown, wired together.
public final class NodeServer: Sendable {
    public let config: NodeConfig
    public let identity: NodeIdentity
    let log: NodeLog
    let store: RaftStore
    let driver: RaftDriver
    let transport: TCPTransport
    let members: MemberDirectory
    let api: NodeAPI
    let http: HTTPServer
    let authority: AuthorityService
    /// This node's clock against the cluster's (judged in the watcher).
    let clock = ClockCheck()
    let networkGroup: MultiThreadedEventLoopGroup
    let driverGroup: MultiThreadedEventLoopGroup
    private let stopping = Atomic<Bool>(false)
    private let stopRequests = AsyncStream<String>.makeStream()

    /// How long a graceful stop lets in-flight writes finish.
    public static let drainTimeout: Duration = .seconds(2)

    /// Where a node records that it started with `dataDirectory`: beside
    /// it (`<data_dir>.started`), outside a disk mounted there.
    static func startMarker(of dataDirectory: String) -> String {
        let directory = URL(fileURLWithPath: dataDirectory).standardizedFileURL
        return directory.deletingLastPathComponent().appendingPathComponent(directory.lastPathComponent + ".started").path
    }

    /// Opens the node's store, starting its state the first time. That
    /// first start is recorded beside the data directory (`startMarker`):
    /// a node that held state once and finds its data directory empty (a
    /// disk not mounted, or replaced) would start again from nothing and
    /// vote as if it had never acknowledged anything, which can lose
    /// committed entries. It refuses instead. A record that cannot be
    /// written does not stop the start (the node warns).
    package static func openStore(_ config: NodeConfig, configPath: String) throws -> RaftStore {
        let dataDirectory = ClusterFiles.resolve(config.dataDirectory, relativeTo: configPath)
        let marker = startMarker(of: dataDirectory)
        try FileManager.default.createDirectory(atPath: dataDirectory, withIntermediateDirectories: true)
        let store = try RaftStore(directory: dataDirectory, synchronous: config.unsafeNoFsync ? .none : .full)
        let started = FileManager.default.fileExists(atPath: marker)
        func record() {
            try? Data("node \(config.id) first started with \(dataDirectory)\n".utf8).write(to: URL(fileURLWithPath: marker), options: .atomic)
        }
        if store.hasState {
            if !started { record() } // a node started before the record was kept
            return store
        }
        if started {
            throw FileProblem(path: dataDirectory, problem: "this node started here before (\(marker)), but its data directory holds no Raft state now (a disk not mounted, or replaced?). Starting from nothing could lose committed entries, so the node refuses. If the data is truly gone, remove node \(config.id) from the cluster and add a new node in its place; to start a brand-new cluster's node anyway, delete \(marker)")
        }
        let voters = [config.id] + config.peers.map(\.id)
        try store.initialize(with: config.joinsExistingCluster ? .empty : .bootstrap(voters: voters.sorted()))
        record()
        return store
    }

    public init(configPath: String) throws {
        let text = try ClusterFiles.read(configPath, bytesMax: NodeConfig.fileBytesMax)
        let config: NodeConfig
        do {
            config = try NodeConfig(yaml: text)
        } catch {
            throw FileProblem(path: configPath, problem: error.description)
        }
        self.config = config
        log = NodeLog(nodeID: config.id)
        identity = try ClusterFiles.loadIdentity(config, configPath: configPath)

        store = try Self.openStore(config, configPath: configPath)
        let marker = Self.startMarker(of: ClusterFiles.resolve(config.dataDirectory, relativeTo: configPath))
        if !FileManager.default.fileExists(atPath: marker) {
            log.warning("cannot record this node's first start; if its data directory is ever found empty, it will start again from nothing", ["file": marker])
        }
        if config.unsafeNoFsync {
            log.warning("storage.unsafe_no_fsync: writes are not synced; a machine crash can lose acknowledged writes (tests only)")
        }

        var initial: [NodeID: MemberDirectory.Addresses] = [config.id: .init(peer: config.peerListen, api: config.apiListen)]
        for peer in config.peers { initial[peer.id] = .init(peer: peer.address, api: peer.api) }
        let members = MemberDirectory(initial)
        self.members = members

        // Two threads for the API's sockets and TLS. (One, on this 2-core
        // machine with three nodes, gave about 5% more issuances but a
        // slower single client: 1.65 ms instead of 1.42 ms per write.)
        networkGroup = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        // The driver's thread, which also serves the peer connections this
        // node accepts: what peers send it (acknowledgements on a leader,
        // AppendEntries on a follower) is read, decrypted and handed to the
        // core there, with no thread hop and no queueing behind the API's
        // HTTP, TLS and signing work. Its own sends go out on the network
        // threads: serving those on the driver's thread too (tried) had it
        // encrypt all of a leader's replication, and joins' p99 lost what
        // JWT-SVIDs gained. Interleaved runs, accepted connections here
        // against on the network threads: JWT-SVIDs 10,411 / 10,635 /
        // 10,164 against 9,677 / 10,242 / 9,705 per second; joins on the
        // leader 4,299 / 4,566 per second p99 25.8 / 25.2 ms against
        // 3,805 / 3,886 p99 30.0 / 30.9 ms.
        driverGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Peers' names are looked up at each connection attempt: a peer
        // whose DNS name is not there yet (a pod still starting) is reached
        // once it is.
        var peers: [NodeID: SocketAddress?] = [:]
        for (id, _) in initial where id != config.id { peers.updateValue(nil, forKey: id) }
        let log = self.log
        let refusals = PerSecondLimit(10) // a peer hammering the port must not flood the log
        let transport = try TCPTransport(id: config.id, peers: peers, group: networkGroup, inboundGroup: driverGroup, identity: identity,
                                         onRejected: { reason in
            if refusals.allow() { log.warning("peer connection closed", ["reason": reason]) }
        })
        self.transport = transport
        for (id, addresses) in initial where id != config.id { transport.setAddress(host: addresses.peer.host, port: addresses.peer.port, of: id) }

        var configuration = Configuration(id: config.id, randomSeed: UInt64.random(in: 1...UInt64.max))
        configuration.electionTimeoutTicks = config.electionTimeoutTicks
        configuration.heartbeatIntervalTicks = config.heartbeatIntervalTicks
        configuration.inflightMessagesMax = config.inflightMessagesMax
        // The core requires it above the election timeout, which operators set.
        configuration.snapshotTimeoutTicks = max(configuration.snapshotTimeoutTicks, 2 * config.electionTimeoutTicks)
        // A member's addresses, as the cluster learns them.
        let learn = { @Sendable (id: NodeID, addresses: MemberDirectory.Addresses) in
            members.set(id, addresses)
            transport.addPeer(id, host: addresses.peer.host, port: addresses.peer.port)
        }
        let metrics = NodeMetrics()
        metrics.certificateNotAfter.store(UInt64(max(0, identity.certificate.notValidAfter.timeIntervalSince1970)), ordering: .relaxed)
        driver = try RaftDriver(
            configuration: configuration, store: store, sender: transport,
            requestTimeoutTicks: max(1, 5_000 / config.tickIntervalMilliseconds),
            compactEveryEntries: LogIndex(config.snapshotEveryEntries), loop: driverGroup.next(), metrics: metrics,
            onApplied: { entries in
                for entry in entries {
                    if let (id, addresses) = MemberDirectory.addresses(in: entry) { learn(id, addresses) }
                    if case .configChange(let change) = entry.payload {
                        log.info("membership change applied", ["change": "\(change)", "index": "\(entry.index)"])
                        if case .addLearner(let id) = change { transport.addPeer(id) }
                    }
                }
            },
            onReplicationTrouble: { reason in
                log.error("replication trouble", ["error": reason])
            })
        // Members added after the configuration was written: those in the
        // checkpoint the driver loaded now; later ones as their entries apply.
        for document in try store.documents(prefix: "\(NodeAPI.reservedPrefix)members/", limit: 1_000) {
            guard let full = try store.document(named: document.name),
                  let (id, addresses) = MemberDirectory.addresses(name: full.name, content: full.content), id != config.id else { continue }
            learn(id, addresses)
        }
        authority = AuthorityService(trustDomain: config.trustDomain, keyAlgorithm: config.keyAlgorithm,
                                     kek: try KeyEncryptionKey.load(path: ClusterFiles.resolve(config.keyEncryptionKeyFile, relativeTo: configPath)),
                                     store: store)
        let joins = JoinService(trustDomain: config.trustDomain, store: store,
                                fetcher: KeySetFetcher(allowHTTPLoopback: config.allowHTTPLoopbackIssuers),
                                refetchInterval: .seconds(config.jwksRefetchSeconds))
        let clock = self.clock
        driver.setClockCheck { clock.verdict.disagreeing.isEmpty }
        api = NodeAPI(id: config.id, driver: driver, store: store, members: members, forwarder: try Forwarder(identity: identity, group: networkGroup), metrics: metrics,
                      authority: authority, joins: joins, clock: clock, identityRecordsMax: config.identityRecordsMax,
                      jwtIssuer: config.jwtIssuer,
                      workloadIssuanceBurst: config.workloadIssuanceBurst, workloadIssuancePerSecond: config.workloadIssuancePerSecond)
        let api = self.api
        let authority = self.authority
        // Workloads renewing present X509-SVIDs: their TLS roots are the
        // trust domain's published authorities, as they are now.
        http = try HTTPServer(group: networkGroup, identity: identity, clientRoots: {
            guard let keys = try? authority.keys() else { return nil }
            return (keys.bundle.sequence, keys.bundle.x509Authorities)
        }, refused: { request, refusal in api.refusedByServer(request, refusal) }) { request in await api.handle(request) }
    }

    /// Serves until SIGTERM or SIGINT (or `stop()`), then shuts down
    /// gracefully: no new requests, in-flight writes get `drainTimeout`
    /// to finish, leadership is handed over, then everything closes.
    public func run(handleSignals: Bool = true) async throws {
        raiseOpenFileLimit()
        let peerAddress = try SocketAddress.makeAddressResolvingHost(config.peerListen.host, port: config.peerListen.port)
        let apiAddress = try SocketAddress.makeAddressResolvingHost(config.apiListen.host, port: config.apiListen.port)
        if handleSignals { Self.watchSignals(stopRequests.continuation) }
        let transport = self.transport, driver = self.driver
        // The API opens only once the peer listener is bound: a node that
        // cannot hear its peers must not serve as if it were in the cluster.
        let listening = AsyncStream<(any Error)?>.makeStream()
        let transportTask = Task {
            defer { listening.continuation.finish() }
            do {
                try await transport.run(listeningOn: peerAddress, ready: { _ in listening.continuation.yield(nil) }) { message in driver.enqueue(message) }
            } catch {
                listening.continuation.yield(error)
                throw error
            }
        }
        var failure: String? = "the listener stopped before it was bound"
        for await outcome in listening.stream {
            failure = outcome.map { "\($0)" }
            break
        }
        if let reason = failure {
            await abandonStart(transportTask)
            throw NodeStartError(message: "cannot listen for peers on \(config.peerListen): \(reason)")
        }
        let boundAPI: SocketAddress
        do {
            boundAPI = try await http.start(at: apiAddress)
        } catch {
            await abandonStart(transportTask)
            throw NodeStartError(message: "cannot serve the API on \(config.apiListen): \(error)")
        }
        log.info("node started", ["cluster": identity.clusterID, "peer": "\(config.peerListen)", "api": boundAPI.hostPort,
                                  "term": "\(await driver.status.term)", "applied": "\(await driver.status.appliedIndex)"])
        #if DEBUG
        let plantedBugs = Set((ProcessInfo.processInfo.environment["WARRANT_PLANTED_BUG"] ?? "").split(separator: ",").map(String.init))
        if plantedBugs.contains("acknowledge-before-commit") {
            log.warning("PLANTED BUG: writes are acknowledged before they commit (test builds only)")
            await driver.plantAcknowledgeBeforeCommit()
        }
        if plantedBugs.contains("stale-reads") {
            log.warning("PLANTED BUG: reads are served without confirming leadership (test builds only)")
            await driver.plantStaleReads()
        }
        #endif
        let log = self.log
        let ticking = driver.startTicking(every: .milliseconds(Int64(config.tickIntervalMilliseconds))) { error in
            if error is LedgerRulesError {
                log.error("the node stopped: the ledger adopted rules its build does not know; it answers 503 until started with a build that does",
                          ["error": "\(error)"])
            } else {
                log.error("the node stopped after a storage failure; it answers 503 until restarted", ["error": "\(error)"])
            }
        }
        let tickerTask = Task { await self.watchUntilStopped() }
        // A certificate that expires soon is said at start and twice a day:
        // past its expiry, peer TLS and the API refuse this node.
        let certificateWatch = Task { [identity, config] in
            while !Task.isCancelled {
                if let warning = Self.certificateWarning(identity.certificate.notValidAfter, node: config.id) {
                    log.warning(warning.message, ["not_after": warning.notAfter, "days_left": String(warning.daysLeft), "renew": warning.renew])
                }
                try? await Task.sleep(for: .seconds(12 * 3_600))
            }
        }
        for await signal in stopRequests.stream {
            log.info("shutting down", ["signal": signal])
            break
        }
        await shutdown()
        ticking.cancel()
        certificateWatch.cancel()
        tickerTask.cancel()
        transportTask.cancel()
        _ = await tickerTask.result
        _ = await transportTask.result
        try? await networkGroup.shutdownGracefully()
        try? await driverGroup.shutdownGracefully()
        log.info("stopped")
    }

    /// Undoes a start that failed before serving: nothing was written, so
    /// the driver stops and the threads end.
    private func abandonStart(_ transportTask: Task<Void, any Error>) async {
        stopping.store(true, ordering: .relaxed)
        await driver.stop()
        transport.finish()
        transportTask.cancel()
        _ = await transportTask.result
        try? await networkGroup.shutdownGracefully()
        try? await driverGroup.shutdownGracefully()
    }

    /// What to log about a node certificate that expires within 30 days
    /// (or has expired), or nil.
    static func certificateWarning(_ notAfter: Date, node: UInt64, now: Date = Date()) -> (message: String, notAfter: String, daysLeft: Int, renew: String)? {
        let remaining = notAfter.timeIntervalSince(now)
        guard remaining < 30 * 86_400 else { return nil }
        return (remaining <= 0 ? "this node's certificate has expired: peers and clients refuse it" : "this node's certificate expires within 30 days",
                notAfter.formatted(.iso8601), max(0, Int(remaining / 86_400)),
                "warrant cluster renew-cert --dir <cluster dir> --node \(node), then restart this node")
    }

    /// Ends `run()` as a signal would.
    public func stop() {
        stopRequests.continuation.yield("stop")
    }

    /// Tells the transport which nodes were removed (their connections are
    /// closed), logs role changes, judges this node's clock against its peers' and,
    /// on the leader, promotes caught-up learners, every 10 ticks (the
    /// ticks themselves run on the driver's thread).
    private func watchUntilStopped() async {
        var lastRole: Role = .follower
        var lastLeader: NodeID = noNode
        var lastHandOver: ContinuousClock.Instant?
        while !Task.isCancelled && !stopping.load(ordering: .relaxed) {
            try? await driver.sleep(for: .milliseconds(10 * config.tickIntervalMilliseconds))
            let status = await driver.status
            transport.refuse(status.membership.removed)
            if status.role != lastRole || status.leaderID != lastLeader {
                log.info("role changed", ["role": status.role.rawValue, "term": "\(status.term)", "leader": "\(status.leaderID)"])
                lastRole = status.role
                lastLeader = status.leaderID
            }
            let offsets = transport.peerClocks.offsets(maxAge: ClockCheck.readingMaxAge)
            if clock.update(own: config.id, voters: status.membership.voters, offsets: offsets) {
                let verdict = clock.verdict
                if verdict.disagreeing.isEmpty {
                    log.info("clock agrees with the cluster again; signing identities", ["offsets": "\(offsets)"])
                } else {
                    log.error("clock disagrees with the cluster; signing no identities until it agrees", ["clock": verdict.description, "offsets": "\(offsets)"])
                }
            }
            if status.role == .leader {
                if !clock.verdict.disagreeing.isEmpty, lastHandOver.map({ $0.duration(to: .now) >= .seconds(2) }) ?? true {
                    lastHandOver = .now
                    await handOverForClock(status)
                }
                await promoteCaughtUpLearners(status)
                await initializeAuthorityIfMissing()
            }
        }
    }

    /// A leader whose clock disagrees with the cluster's hands leadership
    /// to the most caught-up voter whose clock agrees with a quorum of the
    /// voters (by this node's readings); if none does, it keeps leading
    /// and signs nothing.
    private func handOverForClock(_ status: Status) async {
        guard let target = handOverTarget(status, orAnyClock: false) else { return }
        log.error("handing leadership over: this node's clock disagrees with the cluster's", ["clock": clock.verdict.description, "to": "\(target)"])
        do {
            try await driver.transferLeadership(to: target)
        } catch {
            log.warning("could not hand leadership over", ["to": "\(target)", "error": "\(error)"])
        }
    }

    private func handOverTarget(_ status: Status, orAnyClock: Bool) -> NodeID? {
        ClockCheck.handOverTarget(own: config.id, membership: status.membership, matchIndexes: status.followers.mapValues(\.matchIndex),
                                  offsets: clock.offsets, orAnyClock: orAnyClock)
    }

    /// The first leader makes the trust domain's keys (sealed with the
    /// KEK) and commits them; the ledger keeps the first that commits.
    private func initializeAuthorityIfMissing() async {
        do {
            // The CA certificate's validity comes from this clock.
            guard try store.document(named: AuthorityDocuments.keyring) == nil, clock.verdict.disagreeing.isEmpty else { return }
            let keyring = try authority.makeKeyring()
            let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: "node:\(config.id)",
                                                                    requestID: "authority-init-\(UUID().uuidString)",
                                                                    operation: .initializeAuthority(keyring: keyring)))
            if case .written = outcome.result {
                log.info("trust domain keys created", ["trust_domain": config.trustDomain])
            }
        } catch {
            log.warning("could not create the trust domain's keys yet", ["error": "\(error)"])
        }
    }

    /// A learner whose log has reached the leader's commit index becomes a voter.
    private func promoteCaughtUpLearners(_ status: Status) async {
        for learner in status.membership.learners {
            guard let follower = status.followers[learner], follower.matchIndex >= status.commitIndex else { continue }
            do {
                let index = try await driver.proposeConfigChange(.promoteLearner(learner))
                log.info("learner promoted to voter", ["learner": "\(learner)", "index": "\(index)"])
            } catch {
                log.warning("could not promote learner yet", ["learner": "\(learner)", "error": "\(error)"])
            }
        }
    }

    private func shutdown() async {
        stopping.store(true, ordering: .relaxed)
        await http.stop()
        // A leader hands over first, so the cluster need not wait for an
        // election: to a voter whose clock agrees, if one does (one that
        // disagrees would sign nothing and hand over again).
        let status = await driver.status
        let target = status.role == .leader ? handOverTarget(status, orAnyClock: true) : nil
        if let target { try? await driver.transferLeadership(to: target) }
        // The ticker keeps running meanwhile (ticking here too had run the
        // node's clock twice as fast while it drained). A leader that handed
        // over waits to hear from its successor, for up to an election
        // timeout once it has stepped down (a successor that is down, or a
        // step-down for want of a quorum, never answers).
        let deadline = ContinuousClock.now.advanced(by: Self.drainTimeout)
        let successorWait = Duration.milliseconds(config.electionTimeoutTicks * config.tickIntervalMilliseconds)
        var steppedDown: ContinuousClock.Instant?
        while ContinuousClock.now < deadline {
            let (pending, now) = (await driver.pendingRequestCount, await driver.status)
            if pending == 0 && now.role != .leader {
                guard target != nil, now.leaderID == noNode else { break }
                let since = steppedDown ?? .now
                steppedDown = since
                if since.duration(to: .now) >= successorWait { break }
            }
            try? await driver.sleep(for: .milliseconds(config.tickIntervalMilliseconds))
        }
        if target != nil {
            let after = await driver.status
            if after.role != .leader && after.leaderID != noNode {
                log.info("leadership handed over", ["to": "\(after.leaderID)", "term": "\(after.term)"])
            } else {
                log.warning("stopping without having handed leadership over", ["role": after.role.rawValue, "term": "\(after.term)"])
            }
        }
        await driver.stop()
        transport.finish()
    }

    /// Files and sockets this node may need open at once: API connections,
    /// peer connections and links, log, audit and checkpoint files, and room.
    static let openFilesNeeded = HTTPServerLimits().connectionsMax + 2 * TransportLimits().inboundConnectionsMax + 256

    /// Raises the soft limit on open files to the hard one: a soft limit of
    /// 1,024 (a common default) is used up by API connections alone, and
    /// the next log or audit file could then not be opened, which stops the
    /// node. Below what the node may need, it says so.
    private func raiseOpenFileLimit() {
        #if os(Linux)
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        #else
        let resource = RLIMIT_NOFILE
        #endif
        var limit = rlimit()
        guard getrlimit(resource, &limit) == 0 else { return }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(resource, &raised) == 0 { limit = raised }
        }
        if limit.rlim_cur < rlim_t(Self.openFilesNeeded) {
            log.warning("the limit on open files is low: connections beyond it fail, and the node stops if it cannot open a log file; raise it (ulimit -n, or LimitNOFILE for systemd)",
                        ["limit": "\(limit.rlim_cur)", "needed": "\(Self.openFilesNeeded)"])
        }
    }

    // MARK: - Signals

    /// Sends SIGTERM and SIGINT to `continuation` (their default action,
    /// ending the process at once, is disabled).
    private static func watchSignals(_ continuation: AsyncStream<String>.Continuation) {
        for (number, name) in [(SIGTERM, "SIGTERM"), (SIGINT, "SIGINT")] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { continuation.yield(name) }
            source.resume()
            _ = Unmanaged.passRetained(source as AnyObject) // lives as long as the process
        }
    }
}
