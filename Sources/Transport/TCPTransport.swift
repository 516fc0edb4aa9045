import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Raft
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Makes the type metadata of `handlers` (made by the caller) on this
/// thread, once. The Swift runtime can crash when two threads make the
/// metadata of the same generic class for the first time at once (races of
/// this kind were fixed in the runtime before; one more crashed a node here
/// that had just restarted, on two connections accepted together): a server
/// calls this with the generic handlers its connections get, before it
/// accepts any.
public func prepareTypes(of handlers: [any ChannelHandler]) {
    for handler in handlers { _ = String(reflecting: type(of: handler)) }
}

/// Turns inbound bytes into frames with `FrameDecoder`; a bad stream
/// closes the connection (the error travels to the reader, which logs it).
struct FrameByteDecoder: ByteToMessageDecoder {
    typealias InboundOut = Frame
    private var decoder: FrameDecoder

    init(frameBytesMax: Int) {
        decoder = FrameDecoder(frameBytesMax: frameBytesMax)
    }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if let bytes = buffer.readBytes(length: buffer.readableBytes) { decoder.append(bytes) }
        while let frame = try decoder.next() {
            context.fireChannelRead(wrapInboundOut(frame))
        }
        return .needMoreData
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}

/// Each peer has two links: bulk traffic (AppendEntries, snapshots,
/// forwarded proposals) and everything else, so heartbeats, votes and
/// acknowledgements never wait behind a large append or snapshot. Every
/// AppendEntries takes the bulk link, even one without entries: one sent
/// after entries must not overtake them (the follower would reject it for
/// a gap that is only entries still on the way, and the leader would
/// start over from the last acknowledged index).
public enum Lane: Sendable, Hashable {
    case control
    case bulk

    public init(_ message: Message) {
        switch message.body {
        case .appendEntries, .installSnapshot, .snapshotChunk, .forwardedProposal: self = .bulk
        default: self = .control
        }
    }
}

struct LinkKey: Hashable, Sendable {
    var peer: NodeID
    var lane: Lane
}

/// A peer whose certificate does not match what it claims.
public struct PeerIdentityError: Error, Sendable, CustomStringConvertible {
    public var reason: String
    public var description: String { reason }
}

/// Limits of one node's transport.
public struct TransportLimits: Sendable {
    public var frameBytesMax = 16 << 20
    /// Messages larger than this (snapshots) travel in pieces this large.
    public var chunkBytes = 1 << 20
    /// The largest message accepted in pieces: a snapshot as one message
    /// from a build before snapshot streams (at most the codec's 256 MiB),
    /// with room for its header. A node's own snapshots go as streams of
    /// 1 MiB pieces.
    public var chunkedMessageBytesMax = 272 << 20
    /// Messages queued for one peer; past this the oldest are dropped
    /// (Raft retransmits what matters).
    public var queuedMessagesPerPeerMax = 4096
    /// Also the time an accepted connection has to finish its TLS
    /// handshake before it is closed.
    public var connectTimeout: TimeAmount = .seconds(2)
    /// Accepted connections open at once (a node keeps one from each
    /// peer). When all are taken, a new one takes the slot of the oldest
    /// whose TLS handshake is not done (bare connections cannot keep a
    /// reconnecting peer out); with none, it is closed unread.
    public var inboundConnectionsMax = 32
    /// Connections accepted from one IP address in a second of the clock:
    /// past this a new one is closed unread, before any TLS work. Accepted
    /// connections are served on the driver's thread in a node, so a flood
    /// of handshakes must not take that thread from replication; counted
    /// per address, so one source's flood does not spend the others' accepts.
    public var inboundConnectionsPerSecond = 20
    /// Connections accepted in a second of the clock from all addresses
    /// that have not finished a TLS handshake here in the last 10 minutes
    /// (a peer that has is never refused for others' floods, only for its
    /// own address's rate).
    public var inboundConnectionsPerSecondTotal = 100
    public var reconnectBackoffMin: Duration = .milliseconds(20)
    public var reconnectBackoffMax: Duration = .seconds(2)
    /// How often each peer is sent this node's clock (on the control link,
    /// with whatever else goes, or alone).
    public var clockStampInterval: Duration = .seconds(1)

    public init() {}
}

/// Where a peer is reached: an address, or a host name looked up at each
/// connection attempt.
public enum PeerAddress: Sendable, Equatable {
    case resolved(SocketAddress)
    case named(host: String, port: Int)

    /// An IP literal becomes `.resolved`; anything else is a name.
    public init(host: String, port: Int) {
        if let address = try? SocketAddress(ipAddress: host, port: port) {
            self = .resolved(address)
        } else {
            self = .named(host: host, port: port)
        }
    }
}

/// Node-to-node TCP: one listening socket for inbound connections, one
/// outbound connection per peer fed from a bounded queue and re-established
/// with exponential backoff. Every message travels as a `Frame`. Bad
/// inbound streams close their connection; the transport carries on.
/// With an identity, every connection is mutual TLS 1.3.
public final class TCPTransport: Sendable {
    public let id: NodeID
    public let limits: TransportLimits
    private let group: any EventLoopGroup
    /// Where accepted (inbound) connections are served; `group` otherwise.
    private let inboundGroup: any EventLoopGroup
    private let peerAddresses: Mutex<[NodeID: PeerAddress]>
    private let queues: Mutex<[LinkKey: LinkQueue]>
    /// Outbound links to start: the initial peers', then members added later.
    private let newLinks: AsyncStream<(LinkKey, LinkQueue)>
    private let newLinksContinuation: AsyncStream<(LinkKey, LinkQueue)>.Continuation
    private let rejected = Mutex<[String]>([])
    /// Told why each inbound connection was closed (the node logs it).
    private let onRejected: (@Sendable (String) -> Void)?
    /// Nodes whose certificates open no connection here any more (removed
    /// from the cluster: their certificates still chain to the cluster CA).
    private let refusedPeers = RefusedPeers()
    private let tls: (identity: NodeIdentity, server: NIOSSLContext, client: NIOSSLContext)?
    /// This node's wall clock, milliseconds since 1970 (a test may shift it).
    private let wallClock: @Sendable () -> UInt64
    /// How far each peer's clock is from `wallClock`, from their clock frames.
    public let peerClocks = PeerClocks()
    private let finished = Atomic<Bool>(false)

    /// The system's wall clock in milliseconds since 1970.
    public static let systemWallClock: @Sendable () -> UInt64 = {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1000 + UInt64(now.tv_nsec / 1_000_000)
    }

    /// `peers` names every other member; addresses may come later through
    /// `setAddress(_:of:)` (a link waits, backing off, until it has one).
    /// With `identity`, every connection is mutual TLS 1.3: both ends show
    /// a certificate from the cluster CA, and a peer's messages must come
    /// from the node its certificate names. Links to peers run on
    /// `group`; the connections peers open to this node, where their
    /// messages arrive and `deliver` is called, run on `inboundGroup`
    /// (`group` when nil).
    public init(id: NodeID, peers: [NodeID: SocketAddress?], group: any EventLoopGroup, inboundGroup: (any EventLoopGroup)? = nil,
                limits: TransportLimits = TransportLimits(), identity: NodeIdentity? = nil, wallClock: @escaping @Sendable () -> UInt64 = TCPTransport.systemWallClock,
                onRejected: (@Sendable (String) -> Void)? = nil) throws {
        self.id = id
        self.wallClock = wallClock
        self.onRejected = onRejected
        if let identity {
            precondition(identity.nodeID == id, "the identity names node \(identity.nodeID), not \(id)")
            let certificate = try identity.nioCertificate, ca = try identity.nioCACertificate, key = try identity.nioPrivateKey
            func configure(_ configuration: inout TLSConfiguration) {
                configuration.minimumTLSVersion = .tlsv13
                configuration.trustRoots = .certificates([ca])
                configuration.additionalTrustRoots = []
                configuration.certificateVerification = .noHostnameVerification
            }
            var server = TLSConfiguration.makeServerConfiguration(certificateChain: [.certificate(certificate)], privateKey: .privateKey(key))
            configure(&server)
            var client = TLSConfiguration.makeClientConfiguration()
            client.certificateChain = [.certificate(certificate)]
            client.privateKey = .privateKey(key)
            configure(&client)
            tls = (identity, try NIOSSLContext(configuration: server), try NIOSSLContext(configuration: client))
        } else {
            tls = nil
        }
        peerAddresses = Mutex(peers.compactMapValues { $0.map(PeerAddress.resolved) })
        self.group = group
        self.inboundGroup = inboundGroup ?? group
        self.limits = limits
        queues = Mutex([:])
        (newLinks, newLinksContinuation) = AsyncStream.makeStream()
        for peer in peers.keys { addPeer(peer) }
    }

    public func setAddress(_ address: SocketAddress, of peer: NodeID) {
        peerAddresses.withLock { $0[peer] = .resolved(address) }
    }

    /// A peer's address by name: an IP literal is used as it is; a host
    /// name is looked up again at every connection attempt (off the event
    /// loops), so a peer whose DNS name appears, or moves, after this node
    /// started is still reached.
    public func setAddress(host: String, port: Int, of peer: NodeID) {
        peerAddresses.withLock { $0[peer] = PeerAddress(host: host, port: port) }
    }

    /// Starts links to a peer (a member added after start); does nothing
    /// for a known peer or this node.
    public func addPeer(_ peer: NodeID, address: SocketAddress? = nil) {
        guard peer != id else { return }
        if let address { setAddress(address, of: peer) }
        startLinks(to: peer)
    }

    /// `addPeer` with the address by name (see `setAddress(host:port:of:)`).
    public func addPeer(_ peer: NodeID, host: String, port: Int) {
        guard peer != id else { return }
        setAddress(host: host, port: port, of: peer)
        startLinks(to: peer)
    }

    private func startLinks(to peer: NodeID) {
        let id = self.id, wallClock = self.wallClock
        let makeStamp: @Sendable () -> ClockStamp = { ClockStamp(from: id, wallMillis: wallClock()) }
        queues.withLock { queues in
            guard queues[LinkKey(peer: peer, lane: .control)] == nil else { return }
            for lane in [Lane.control, .bulk] {
                // Clock stamps travel on the control lane, never behind a snapshot.
                let stamp: (@Sendable () -> ClockStamp)? = lane == .control ? makeStamp : nil
                let queue = LinkQueue(limit: limits.queuedMessagesPerPeerMax, chunkBytes: limits.chunkBytes, messageIDs: messageIDs, stamp: stamp)
                queues[LinkKey(peer: peer, lane: lane)] = queue
                newLinksContinuation.yield((LinkKey(peer: peer, lane: lane), queue))
            }
        }
    }

    /// The peers this transport keeps links to.
    public var peers: Set<NodeID> { queues.withLock { Set($0.keys.map(\.peer)) } }

    /// Queues messages for their peers; never blocks.
    public func send(_ messages: [Message]) {
        guard !messages.isEmpty else { return }
        var byLink: [LinkKey: [Message]] = [:]
        for message in messages { byLink[LinkKey(peer: message.to, lane: Lane(message)), default: []].append(message) }
        let targets = queues.withLock { queues in byLink.compactMap { key, batch in queues[key].map { ($0, batch) } } }
        for (queue, batch) in targets { queue.push(batch) }
    }

    /// Messages waiting for a link to `peer` to be up and take writes.
    public func waitingMessages(to peer: NodeID) -> Int {
        queues.withLock { queues in queues.filter { $0.key.peer == peer }.values.map(\.waiting).reduce(0, +) }
    }

    /// Whether a write to `peer` (on `lane`, or either) is under way: queued
    /// on its connection's loop, or partly written with pieces to come (for tests).
    public func writing(to peer: NodeID, lane: Lane? = nil) -> Bool {
        queues.withLock { queues in queues.filter { $0.key.peer == peer && (lane == nil || $0.key.lane == lane) }.values.contains { $0.isWriting } }
    }

    /// Why inbound connections were closed, most recent last (for logs and tests).
    public var rejectedConnections: [String] { rejected.withLock { $0 } }

    /// Listens on `address` and delivers every inbound message to `deliver`
    /// (called on the connection's event loop: it must not block), and
    /// keeps the outbound links, until the task is cancelled. Calls `ready`
    /// with the bound address once listening.
    ///
    /// Messages go straight between NIO's event loops and the caller: an
    /// inbound frame is decoded and delivered by a channel handler, and an
    /// outbound batch is written by the loop of its link's channel. (They
    /// went through Swift tasks on the cooperative pool, NIO's async
    /// channels, one more thread hop each way per message batch.)
    /// From now on, connections whose certificate names one of `nodes`
    /// are closed at their next frame (nodes removed from the cluster).
    public func refuse(_ nodes: Set<NodeID>) { refusedPeers.set(nodes) }

    public func run(listeningOn address: SocketAddress, ready: @Sendable (SocketAddress) -> Void = { _ in },
                    deliver: @escaping @Sendable (Message) -> Void) async throws {
        let frameBytesMax = limits.frameBytesMax, chunkedMessageBytesMax = limits.chunkedMessageBytesMax
        let serverTLS = tls?.server, clusterID = tls?.identity.clusterID, refusedPeers = self.refusedPeers
        let inbound = OpenChannels(max: limits.inboundConnectionsMax, perSecond: limits.inboundConnectionsPerSecond,
                                   perSecondTotal: limits.inboundConnectionsPerSecondTotal, handshakes: serverTLS != nil)
        let handshakeTimeout = limits.connectTimeout
        let record: @Sendable (String) -> Void = { [self] reason in
            rejected.withLock { log in
                log.append(reason)
                if log.count > 100 { log.removeFirst(log.count - 100) }
            }
            onRejected?(reason)
        }
        let observe: @Sendable (ClockStamp) -> Void = { [peerClocks, wallClock] stamp in
            // Both below 2^53 (the decoder refuses larger stamps): no overflow.
            peerClocks.record(stamp.from, offsetMillis: Int64(stamp.wallMillis) - Int64(min(wallClock(), ClockStamp.wallMillisMax)))
        }
        prepareTypes(of: [ByteToMessageHandler(FrameByteDecoder(frameBytesMax: frameBytesMax))])
        let server = try await ServerBootstrap(group: inboundGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            .childChannelOption(Self.keepaliveIdle, value: Self.keepaliveSeconds.idle)
            .childChannelOption(Self.keepaliveInterval, value: Self.keepaliveSeconds.interval)
            .childChannelOption(Self.keepaliveProbes, value: Self.keepaliveSeconds.probes)
            .childChannelInitializer { channel in
                let (refusal, evicted) = inbound.add(channel)
                if let evicted {
                    record("closed connection from \(evicted.remoteAddress.map { "\($0)" } ?? "unknown peer"): its TLS handshake was not done when every slot was taken")
                    evicted.close(promise: nil)
                }
                if let refusal {
                    if let refusal = refusal.reason { record("refused connection from \(channel.remoteAddress.map { "\($0)" } ?? "unknown peer"): \(refusal)") }
                    return channel.close()
                }
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let serverTLS {
                        try sync.addHandler(NIOSSLServerHandler(context: serverTLS))
                        try sync.addHandler(InboundHandshakeDeadline(timeout: handshakeTimeout, reject: record) { inbound.handshakeDone(channel) })
                    }
                    try sync.addHandler(ByteToMessageHandler(FrameByteDecoder(frameBytesMax: frameBytesMax)))
                    try sync.addHandler(FrameReceiver(clusterID: clusterID, chunkedMessageBytesMax: chunkedMessageBytesMax,
                                                      deliver: deliver, clock: observe, reject: record, refused: refusedPeers.contains))
                }
            }
            .bind(to: address).get()
        if let local = server.localAddress { ready(local) }
        let newLinks = self.newLinks
        await withDiscardingTaskGroup { links in
            // Every peer gets this node's clock at least every
            // `clockStampInterval`, with Raft traffic or without.
            links.addTask { [self] in
                while !Task.isCancelled && !finished.load(ordering: .relaxed) {
                    let control = queues.withLock { queues in queues.filter { $0.key.lane == .control }.map(\.value) }
                    for queue in control { queue.pushClock() }
                    guard (try? await sleep(for: limits.clockStampInterval, on: group.any())) != nil else { return }
                }
            }
            for await (key, queue) in newLinks {
                links.addTask { await self.maintainLink(to: key.peer, queue) }
            }
        }
        // The links end with cancellation or `finish()`; inbound traffic is
        // served until cancellation.
        while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }
        try? await server.close()
        for channel in inbound.closeAll() { try? await channel.close() }
    }

    /// Connects to one peer and hands its queue the connection, reconnecting
    /// with exponential backoff after any failure, until cancelled or the
    /// queue closes.
    private func maintainLink(to peer: NodeID, _ queue: LinkQueue) async {
        var backoff = limits.reconnectBackoffMin
        let clientTLS = tls?.client, clusterID = tls?.identity.clusterID
        while !Task.isCancelled && !queue.isClosed {
            guard let address = peerAddresses.withLock({ $0[peer] }) else {
                guard (try? await sleep(for: backoff, on: group.any())) != nil else { return }
                continue
            }
            do {
                // The link takes messages once the connection is ready: TCP
                // up and, with TLS, the handshake done (NIOSSL would hold
                // every write until then, whatever the queue's bound), within
                // the connect timeout.
                let ready = LinkReadiness(group.any().makePromise(of: Void.self))
                let connected: any Channel
                do {
                    let bootstrap = ClientBootstrap(group: group)
                    .connectTimeout(limits.connectTimeout)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelOption(.socketOption(.so_keepalive), value: 1)
                    .channelOption(Self.keepaliveIdle, value: Self.keepaliveSeconds.idle)
                    .channelOption(Self.keepaliveInterval, value: Self.keepaliveSeconds.interval)
                    .channelOption(Self.keepaliveProbes, value: Self.keepaliveSeconds.probes)
                    .channelInitializer { [limits] channel in
                        channel.eventLoop.makeCompletedFuture {
                            if let clientTLS {
                                try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: clientTLS, serverHostname: nil))
                            }
                            try channel.pipeline.syncOperations.addHandler(LinkWatcher(queue: queue, ready: ready, waitsForHandshake: clientTLS != nil,
                                                                                     handshakeTimeout: limits.connectTimeout,
                                                                                     expected: clusterID.map { (peer, $0) }))
                        }
                    }
                    switch address {
                    case .resolved(let socketAddress): connected = try await bootstrap.connect(to: socketAddress).get()
                    case .named(let host, let port): connected = try await bootstrap.connect(host: host, port: port).get()
                    }
                } catch {
                    ready.settle(.failure(error))
                    throw error
                }
                let channel = connected
                // The handshake's deadline is the watcher's, on the
                // connection's loop: one kept here would also count the
                // time this task waits for a thread (a busy cooperative
                // pool held links down, closing each connection it made).
                do {
                    try await ready.future.get()
                } catch {
                    channel.close(promise: nil)
                    throw error
                }
                queue.attach(channel)
                let attached = ContinuousClock.now
                await withTaskCancellationHandler {
                    try? await channel.closeFuture.get()
                } onCancel: {
                    channel.close(promise: nil)
                }
                queue.detach(channel)
                // Backoff starts again only after a connection that lasted:
                // one the peer closes at once (it refuses this node, say)
                // is retried ever more slowly, not every few milliseconds,
                // which would spend the peer's accept budget for everyone.
                if attached.duration(to: .now) >= .seconds(1) { backoff = limits.reconnectBackoffMin }
            } catch {}
            guard !Task.isCancelled, !queue.isClosed, (try? await sleep(for: backoff, on: group.any())) != nil else { return }
            backoff = min(backoff * 2, limits.reconnectBackoffMax)
        }
    }

    private let messageIDs = MessageIDs()

    /// TCP keepalive on every peer connection: an idle one whose far end
    /// vanished without a word (its host lost power, a network dropped it)
    /// is found dead within about a minute and closed, instead of holding
    /// an inbound slot for ever (the receiving end never writes on it, so
    /// nothing else would notice). A live peer answers the probes in its
    /// kernel; nothing changes for it.
    static let keepaliveSeconds: (idle: Int, interval: Int, probes: Int) = (30, 10, 3)
    #if canImport(Glibc)
    static let keepaliveIdle = ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPIDLE))
    #else
    static let keepaliveIdle = ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPALIVE))
    #endif
    static let keepaliveInterval = ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPINTVL))
    static let keepaliveProbes = ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPCNT))

    /// Ends every outbound queue (closing its connection); `run` returns
    /// once its task is cancelled.
    public func finish() {
        finished.store(true, ordering: .relaxed)
        newLinksContinuation.finish()
        queues.withLock { queues in
            for queue in queues.values { queue.close() }
        }
    }
}

/// One inbound connection's end: each whole message (pieces of a large one
/// put back together) goes to `deliver` on the connection's event loop,
/// once the peer's certificate (with TLS) is seen to name its sender. A bad
/// stream, a sender other than the certified node, or a failed handshake
/// closes the connection, and `reject` is told why.
final class FrameReceiver: ChannelInboundHandler {
    typealias InboundIn = Frame

    private let clusterID: String?
    private var assembler: ChunkAssembler
    private var certifiedPeer: NodeID?
    private let deliver: @Sendable (Message) -> Void
    private let clock: @Sendable (ClockStamp) -> Void
    private let reject: @Sendable (String) -> Void
    private let refused: @Sendable (NodeID) -> Bool
    private var failed = false

    init(clusterID: String?, chunkedMessageBytesMax: Int, deliver: @escaping @Sendable (Message) -> Void,
         clock: @escaping @Sendable (ClockStamp) -> Void = { _ in }, reject: @escaping @Sendable (String) -> Void,
         refused: @escaping @Sendable (NodeID) -> Bool = { _ in false }) {
        self.clusterID = clusterID
        assembler = ChunkAssembler(messageBytesMax: chunkedMessageBytesMax)
        self.deliver = deliver
        self.clock = clock
        self.reject = reject
        self.refused = refused
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        do {
            // The handshake is done once a frame arrives: only a node of
            // this cluster gets pieces of a large message held for it.
            if let clusterID, certifiedPeer == nil { certifiedPeer = try Self.certifiedNode(context, clusterID) }
            // Checked on every frame: a node removed while connected is cut off too.
            if let certifiedPeer, refused(certifiedPeer) {
                throw PeerIdentityError(reason: "node \(certifiedPeer) was removed from the cluster; its certificate opens nothing here")
            }
            let message: Message
            switch unwrapInboundIn(data) {
            case .raftMessage(let whole):
                message = whole
            case .chunk(let chunk):
                guard let whole = try assembler.add(chunk) else { return }
                message = whole
            case .clock(let stamp):
                try checkSender(stamp.from, "clock stamp")
                clock(stamp)
                return
            }
            try checkSender(message.from, "message")
            deliver(message)
        } catch {
            fail(context, error)
        }
    }

    /// The peer is judged once its handshake is done, before it sends
    /// anything: a certificate of the cluster CA that names no node (an
    /// operator's), or a removed node's, would otherwise hold one of the
    /// few inbound slots for as long as it stayed silent.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let clusterID, certifiedPeer == nil, !failed, case .handshakeCompleted? = event as? TLSUserEvent {
            do {
                let node = try Self.certifiedNode(context, clusterID)
                if refused(node) {
                    throw PeerIdentityError(reason: "node \(node) was removed from the cluster; refused at its TLS handshake")
                }
                certifiedPeer = node
            } catch {
                fail(context, error)
                return
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// With TLS, what arrives must come from the node the certificate names.
    private func checkSender(_ sender: NodeID, _ what: String) throws {
        guard clusterID != nil, sender != certifiedPeer else { return }
        throw PeerIdentityError(reason: "\(what) claims node \(sender) but the certificate names node \(certifiedPeer.map(String.init) ?? "none")")
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(context, error)
    }

    private func fail(_ context: ChannelHandlerContext, _ error: any Error) {
        guard !failed else { return }
        failed = true
        let peer = context.channel.remoteAddress.map { "\($0)" } ?? "unknown peer"
        reject("closed connection from \(peer): \(error)")
        context.close(promise: nil)
    }

    /// The node the peer's (already verified) certificate names.
    private static func certifiedNode(_ context: ChannelHandlerContext, _ clusterID: String) throws -> NodeID {
        guard let certificate = try context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate else {
            throw PeerIdentityError(reason: "the peer presented no certificate")
        }
        guard let node = NodeIdentity.nodeID(inCertificateDER: try certificate.toDERBytes(), clusterID: clusterID) else {
            throw PeerIdentityError(reason: "the peer certificate names no node of cluster \(clusterID)")
        }
        return node
    }
}

/// The nodes a transport refuses (`TCPTransport.refuse`).
final class RefusedPeers: Sendable {
    private let ids = Mutex<Set<NodeID>>([])
    func set(_ refused: Set<NodeID>) { ids.withLock { $0 = refused } }
    @Sendable func contains(_ id: NodeID) -> Bool { ids.withLock { $0.contains(id) } }
}

/// Ids for messages sent in pieces, unique across a transport's links.
final class MessageIDs: Sendable {
    private let last = Atomic<UInt64>(0)
    func next() -> UInt64 { last.wrappingAdd(1, ordering: .relaxed).newValue }
}

/// At most `perSecond` events in each second of the clock (a fixed window:
/// a burst across a second's end may take up to twice as many).
public final class PerSecondLimit: Sendable {
    private let state = Mutex<(second: Int64, count: Int)>((0, 0))
    public let perSecond: Int

    public init(_ perSecond: Int) {
        self.perSecond = perSecond
    }

    /// Whether one more event fits in this second (counting it if so).
    public func allow() -> Bool {
        let second = Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000_000)
        return state.withLock { state in
            if state.second != second { state = (second, 0) }
            guard state.count < perSecond else { return false }
            state.count += 1
            return true
        }
    }
}

/// The accepted connections open now (to close when the transport stops),
/// kept within a count and a rate of accepts per address and in all.
private final class OpenChannels: Sendable {
    enum Refusal {
        case closing, full, tooFast, tooFastInAll
        /// Why, for the log (nil: the transport is shutting down).
        var reason: String? {
            switch self {
            case .closing: nil
            case .full: "too many inbound connections open"
            case .tooFast: "too many inbound connections a second from its address"
            case .tooFastInAll: "too many inbound connections a second"
            }
        }
    }

    private struct Open {
        let channel: any Channel
        let address: String
        let order: UInt64
        /// Its TLS handshake is done (or there is none): it keeps its slot.
        var shaken: Bool
    }

    private struct State {
        var channels: [ObjectIdentifier: Open] = [:]
        var closed = false
        var opened: UInt64 = 0
        /// The accept rate's window: its second, accepts in all (from
        /// addresses not known) and per address.
        var second: Int64 = -1
        var acceptsInAll = 0
        var acceptsByAddress: [String: Int] = [:]
        /// Addresses that finished a TLS handshake (a certificate of the
        /// cluster's CA), with the second of the last; at most `knownMax`.
        var known: [String: Int64] = [:]
    }

    /// How long an address stays known after its last handshake, and how many are.
    static let knownSeconds: Int64 = 600
    static let knownMax = 64

    private let state = Mutex(State())
    private let max: Int
    private let perSecond: Int
    private let perSecondTotal: Int
    private let handshakes: Bool

    init(max: Int, perSecond: Int, perSecondTotal: Int, handshakes: Bool) {
        self.max = max
        self.perSecond = perSecond
        self.perSecondTotal = perSecondTotal
        self.handshakes = handshakes
    }

    /// Nil if `channel` is taken in (with the connection that gave up its
    /// slot for it, to close); otherwise why it is to be refused.
    func add(_ channel: any Channel) -> (refusal: Refusal?, evicted: (any Channel)?) {
        let key = ObjectIdentifier(channel)
        let address = SourceAddress.key(channel.remoteAddress)
        let second = Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000_000)
        let (refusal, evicted): (Refusal?, (any Channel)?) = state.withLock { state in
            guard !state.closed else { return (.closing, nil) }
            if state.second != second {
                state.second = second
                state.acceptsInAll = 0
                state.acceptsByAddress.removeAll(keepingCapacity: true)
            }
            let known = state.known[address].map { second - $0 < Self.knownSeconds } ?? false
            guard known || state.acceptsInAll < perSecondTotal else { return (.tooFastInAll, nil) }
            guard state.acceptsByAddress[address, default: 0] < perSecond else { return (.tooFast, nil) }
            var evicted: (any Channel)?
            if state.channels.count >= max {
                guard let oldest = state.channels.filter({ !$0.value.shaken }).min(by: { $0.value.order < $1.value.order }) else { return (.full, nil) }
                state.channels[oldest.key] = nil
                evicted = oldest.value.channel
            }
            if !known { state.acceptsInAll += 1 }
            state.acceptsByAddress[address, default: 0] += 1
            state.opened += 1
            state.channels[key] = Open(channel: channel, address: address, order: state.opened, shaken: !handshakes)
            return (nil, evicted)
        }
        if refusal == nil {
            channel.closeFuture.whenComplete { [self] _ in
                state.withLock { state in
                    if state.channels[key]?.channel === channel { state.channels[key] = nil }
                }
            }
        }
        return (refusal, evicted)
    }

    /// `channel`'s TLS handshake is done: it keeps its slot from now on,
    /// and its address is known.
    func handshakeDone(_ channel: any Channel) {
        let second = Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000_000)
        state.withLock { state in
            let key = ObjectIdentifier(channel)
            guard let open = state.channels[key], open.channel === channel else { return }
            state.channels[key]!.shaken = true
            state.known[open.address] = second
            if state.known.count > Self.knownMax, let stalest = state.known.min(by: { $0.value < $1.value })?.key {
                state.known[stalest] = nil
            }
        }
    }

    func closeAll() -> [any Channel] {
        state.withLock { state in
            state.closed = true
            return state.channels.values.map(\.channel)
        }
    }
}

/// What a connection's source address counts under, for limits per
/// address: its IP address, an IPv4-mapped IPv6 one as IPv4. (Not an IPv6
/// /64: nodes and pods of one data centre often share one.)
public enum SourceAddress {
    public static func key(_ address: SocketAddress?) -> String {
        switch address {
        case .v6(let v6):
            var raw = v6.address.sin6_addr
            let bytes = withUnsafeBytes(of: &raw) { Array($0) }
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF {
                return bytes[12..<16].map(String.init).joined(separator: ".")
            }
            return address?.ipAddress ?? ""
        case .some(let other):
            return other.ipAddress ?? ""
        case .none:
            return ""
        }
    }
}

/// Closes an accepted connection whose TLS handshake is not done in time
/// (a connection that never speaks would otherwise be held forever).
private final class InboundHandshakeDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    private let timeout: TimeAmount
    private let reject: @Sendable (String) -> Void
    private let done: () -> Void
    private var deadline: Scheduled<Void>?

    init(timeout: TimeAmount, reject: @escaping @Sendable (String) -> Void, done: @escaping () -> Void) {
        self.timeout = timeout
        self.reject = reject
        self.done = done
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel, timeout = timeout, reject = reject
        deadline = context.eventLoop.scheduleTask(in: timeout) {
            reject("closed connection from \(channel.remoteAddress.map { "\($0)" } ?? "unknown peer"): TLS handshake not done within \(timeout)")
            channel.close(promise: nil)
        }
    }

    /// Also when the connection closes (its handlers are removed then).
    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        context.fireUserInboundEventTriggered(event)
        if case .handshakeCompleted? = event as? TLSUserEvent {
            deadline?.cancel()
            deadline = nil
            done()
            // Done: out of the way of every later read.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

}

/// A link's TLS handshake did not finish within the connect timeout.
struct LinkHandshakeTimeout: Error, CustomStringConvertible {
    let timeout: TimeAmount
    var description: String { "the TLS handshake did not finish within \(timeout.nanoseconds / 1_000_000) ms" }
}

/// Whether a link's new connection became ready, settled once by whichever
/// learns first (the connection's watcher, or a connect that failed).
final class LinkReadiness: Sendable {
    private let promise: EventLoopPromise<Void>
    private let settled = Atomic(false)
    init(_ promise: EventLoopPromise<Void>) { self.promise = promise }
    var future: EventLoopFuture<Void> { promise.futureResult }
    func settle(_ result: Result<Void, any Error>) {
        guard !settled.exchange(true, ordering: .acquiringAndReleasing) else { return }
        promise.completeWith(result)
    }
}

/// Watches a link's outbound connection: says when it is ready (TCP up,
/// and the TLS handshake done when there is TLS), or that it closed before
/// that; tells the queue when the connection takes writes again.
private final class LinkWatcher: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let queue: LinkQueue
    private let ready: LinkReadiness
    private let waitsForHandshake: Bool
    private let handshakeTimeout: TimeAmount
    private var handshakeDeadline: Scheduled<Void>?
    /// With TLS: the node the link is for, and its cluster. The server's
    /// certificate must name that node (any node certificate of the
    /// cluster passes the handshake), or nothing is sent on the connection.
    private let expected: (node: NodeID, clusterID: String)?

    init(queue: LinkQueue, ready: LinkReadiness, waitsForHandshake: Bool, handshakeTimeout: TimeAmount,
         expected: (node: NodeID, clusterID: String)? = nil) {
        self.queue = queue
        self.ready = ready
        self.waitsForHandshake = waitsForHandshake
        self.handshakeTimeout = handshakeTimeout
        self.expected = expected
    }

    private func settle(_ result: Result<Void, any Error>) {
        handshakeDeadline?.cancel()
        handshakeDeadline = nil
        ready.settle(result)
    }

    func channelActive(context: ChannelHandlerContext) {
        if waitsForHandshake {
            // TCP is up; the TLS handshake has until the deadline.
            let ready = self.ready, channel = context.channel, timeout = handshakeTimeout
            handshakeDeadline = context.eventLoop.scheduleTask(in: timeout) {
                ready.settle(.failure(LinkHandshakeTimeout(timeout: timeout)))
                channel.close(promise: nil)
            }
        } else {
            settle(.success(()))
        }
        context.fireChannelActive()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if !waitsForHandshake && context.channel.isActive { settle(.success(())) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted? = event as? TLSUserEvent {
            if let expected {
                let der = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate?.toDERBytes()
                if let refusal = NodeIdentity.refusal(ofServer: der, expecting: expected.node, clusterID: expected.clusterID) {
                    settle(.failure(PeerIdentityError(reason: "the link to node \(expected.node) reached a server: \(refusal)")))
                    context.close(promise: nil)
                    return
                }
            }
            settle(.success(()))
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        settle(.failure(ChannelError.ioOnClosedChannel))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        settle(.failure(error))
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { queue.drainLater(context.channel) }
        context.fireChannelWritabilityChanged()
    }
}

/// One link's outbound messages. A batch pushed while the link's connection
/// is up, takes writes and has no earlier write of this link still to make
/// is written at once: right there when pushed on the connection's event
/// loop, else by a task on it. Otherwise
/// it waits here (the oldest dropped beyond `limit`: Raft resends what
/// matters) and is written after that write, or once the connection is up
/// and writable again. A write larger than `pieceBytes` (snapshots) goes a
/// piece per loop task, so the loop's other work runs
/// between its pieces instead of waiting until all of it is encrypted and
/// written. Batches reach the connection in the order they were pushed:
/// one write of a link is under way at a time (`writing`).
final class LinkQueue: Sendable {
    private struct State {
        var messages: [Message] = []
        var channel: (any Channel)?
        var closed = false
        /// A write of this link's is queued on the connection's loop or
        /// under way there (in pieces); batches wait in `messages` behind it.
        var writing = false
        /// The next write starts with a clock stamp.
        var stampWanted = false

        /// Whether the write being taken starts with a stamp (then the
        /// next one need not).
        mutating func takeStamp() -> Bool {
            defer { stampWanted = false }
            return stampWanted
        }
    }
    private let state = Mutex(State())
    let limit: Int
    private let chunkBytes: Int
    private let messageIDs: MessageIDs
    /// Makes this node's clock stamp (control lanes only).
    private let stamp: (@Sendable () -> ClockStamp)?
    /// The most one loop task writes.
    static let pieceBytes = 1 << 20

    init(limit: Int, chunkBytes: Int, messageIDs: MessageIDs, stamp: (@Sendable () -> ClockStamp)? = nil) {
        self.limit = limit
        self.chunkBytes = chunkBytes
        self.messageIDs = messageIDs
        self.stamp = stamp
    }

    var isClosed: Bool { state.withLock { $0.closed } }

    /// Messages waiting for a connection (for tests).
    var waiting: Int { state.withLock { $0.messages.count } }

    /// Whether a write is under way, in pieces or queued on the loop (for tests).
    var isWriting: Bool { state.withLock { $0.writing } }

    /// Queues `batch` (with `clock`, and nothing else, this node's clock
    /// stamp): written at once if the link is idle, else after what is
    /// under way.
    func push(_ batch: [Message], clock: Bool = false) {
        let direct: (channel: any Channel, stamped: Bool)? = state.withLock { state in
            guard !state.closed else { return nil }
            if clock { state.stampWanted = true }
            if let channel = state.channel, state.messages.isEmpty, !state.writing, channel.isWritable {
                state.writing = true
                return (channel, state.takeStamp())
            }
            state.messages.append(contentsOf: batch)
            if state.messages.count > limit { state.messages.removeFirst(state.messages.count - limit) }
            return nil
        }
        guard let (channel, stamped) = direct else { return }
        // Framed once the write is this batch's (outside the lock: a large
        // batch is slow to frame); a batch that waits is framed when taken.
        writeNow(framed(batch, stamped: stamped, channel.allocator), to: channel)
    }

    private func writeNow(_ bytes: ByteBuffer, to channel: any Channel) {
        if channel.eventLoop.inEventLoop {
            write(bytes, to: channel)
        } else {
            channel.eventLoop.execute { self.write(bytes, to: channel) }
        }
    }

    /// Sends this node's clock stamp: now if the link is idle, else at the
    /// start of its next write.
    func pushClock() {
        if stamp != nil { push([], clock: true) }
    }

    /// The link's new connection: what waited is written first.
    func attach(_ channel: any Channel) {
        let refused = state.withLock { state in
            guard !state.closed else { return true }
            state.channel = channel
            state.stampWanted = stamp != nil
            if !state.messages.isEmpty { channel.eventLoop.execute { self.drain(channel) } }
            return false
        }
        if refused { channel.close(promise: nil) }
    }

    /// The connection closed; batches wait again until the next one.
    func detach(_ channel: any Channel) {
        state.withLock { state in
            if state.channel === channel { state.channel = nil }
        }
    }

    /// Writes what waits, behind every write already queued on the loop.
    func drainLater(_ channel: any Channel) {
        channel.eventLoop.execute { self.drain(channel) }
    }

    /// On the channel's loop: writes what waits if no write is under way,
    /// the channel is still this link's and it takes writes.
    private func drain(_ channel: any Channel) {
        guard let bytes = takeWaiting(for: channel, continuing: false) else { return }
        write(bytes, to: channel)
    }

    /// On the channel's loop, as the link's one write under way: writes
    /// `bytes`, at most `pieceBytes` now and the rest in later tasks; then
    /// what waited meanwhile, the same way.
    private func write(_ bytes: ByteBuffer, to channel: any Channel) {
        var next: ByteBuffer? = bytes
        while var rest = next {
            let piece = rest.readSlice(length: min(Self.pieceBytes, rest.readableBytes))!
            channel.writeAndFlush(piece, promise: nil)
            if rest.readableBytes > 0 && channel.isActive {
                let remaining = rest
                channel.eventLoop.execute { self.write(remaining, to: channel) }
                return
            }
            // Done (or the connection closed: the rest is lost, as on any network).
            next = takeWaiting(for: channel, continuing: true)
        }
    }

    /// The bytes of what waits, if they are to be written to `channel` now;
    /// the caller then makes the link's write. `continuing`: the caller's
    /// write just ended (if nothing follows it, the link has none under
    /// way, and what waits for a newer connection is drained there).
    private func takeWaiting(for channel: any Channel, continuing: Bool) -> ByteBuffer? {
        let (batch, stamped, newer): ([Message], Bool, (any Channel)?) = state.withLock { state in
            guard continuing || !state.writing else { return ([], false, nil) }
            guard state.channel === channel, !state.messages.isEmpty, channel.isActive, channel.isWritable else {
                state.writing = false
                let newer = state.channel.flatMap { $0 === channel || state.messages.isEmpty ? nil : $0 }
                return ([], false, newer)
            }
            state.writing = true
            defer { state.messages.removeAll(keepingCapacity: true) }
            return (state.messages, state.takeStamp(), nil)
        }
        if let newer { drainLater(newer) }
        return batch.isEmpty ? nil : framed(batch, stamped: stamped, channel.allocator)
    }

    /// Frames for a batch, as the bytes of one write (after this node's
    /// clock stamp, made now, if `stamped`): large messages (snapshots) in
    /// pieces of `chunkBytes`, so no frame nears the frame limit.
    private func framed(_ messages: [Message], stamped: Bool, _ allocator: ByteBufferAllocator) -> ByteBuffer {
        var encoded = stamped ? [stamp.map { Frame.clock($0()).encoded } ?? []] : []
        encoded += messages.flatMap { message in
            Frame.frames(for: message, chunkBytes: chunkBytes, messageID: messageIDs.next()).map(\.encoded)
        }
        var buffer = allocator.buffer(capacity: encoded.reduce(0) { $0 + $1.count })
        for bytes in encoded { buffer.writeBytes(bytes) }
        return buffer
    }

    func close() {
        let channel = state.withLock { state in
            state.closed = true
            state.messages = []
            defer { state.channel = nil }
            return state.channel
        }
        channel?.close(promise: nil)
    }
}
