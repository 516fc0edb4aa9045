import NIOCore
import NIOPosix
import NIOSSL
import Raft
import Synchronization

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

struct FrameByteEncoder: MessageToByteEncoder {
    typealias OutboundIn = Frame
    func encode(data: Frame, out: inout ByteBuffer) throws {
        out.writeBytes(data.encoded)
    }
}

/// Each peer has two links: bulk traffic (entries, snapshots, forwarded
/// proposals) and everything else, so heartbeats, votes and
/// acknowledgements never wait behind a large append or snapshot.
public enum Lane: Sendable, Hashable {
    case control
    case bulk

    public init(_ message: Message) {
        switch message.body {
        case .appendEntries(let append) where !append.entries.isEmpty: self = .bulk
        case .installSnapshot, .forwardedProposal: self = .bulk
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
    /// The largest message accepted in pieces (a snapshot).
    public var chunkedMessageBytesMax = 1 << 30
    /// Messages queued for one peer; past this the oldest are dropped
    /// (Raft retransmits what matters).
    public var queuedMessagesPerPeerMax = 4096
    public var connectTimeout: TimeAmount = .seconds(2)
    public var reconnectBackoffMin: Duration = .milliseconds(20)
    public var reconnectBackoffMax: Duration = .seconds(2)

    public init() {}
}

/// Node-to-node TCP: one listening socket for inbound connections, one
/// outbound connection per peer fed from a bounded queue and re-established
/// with exponential backoff. Every message travels as a `Frame`. Bad
/// inbound streams close their connection; the transport carries on.
/// (Mutual TLS is added on top of this with issue 3.)
public final class TCPTransport: Sendable {
    public let id: NodeID
    public let limits: TransportLimits
    private let group: any EventLoopGroup
    private let peerAddresses: Mutex<[NodeID: SocketAddress]>
    private let queues: Mutex<[LinkKey: LinkQueue]>
    /// Outbound links to start: the initial peers', then members added later.
    private let newLinks: AsyncStream<(LinkKey, LinkQueue)>
    private let newLinksContinuation: AsyncStream<(LinkKey, LinkQueue)>.Continuation
    private let rejected = Mutex<[String]>([])
    /// Told why each inbound connection was closed (the node logs it).
    private let onRejected: (@Sendable (String) -> Void)?
    private let tls: (identity: NodeIdentity, server: NIOSSLContext, client: NIOSSLContext)?

    /// `peers` names every other member; addresses may come later through
    /// `setAddress(_:of:)` (a link waits, backing off, until it has one).
    /// With `identity`, every connection is mutual TLS 1.3: both ends show
    /// a certificate from the cluster CA, and a peer's messages must come
    /// from the node its certificate names.
    public init(id: NodeID, peers: [NodeID: SocketAddress?], group: any EventLoopGroup, limits: TransportLimits = TransportLimits(),
                identity: NodeIdentity? = nil, onRejected: (@Sendable (String) -> Void)? = nil) throws {
        self.id = id
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
        peerAddresses = Mutex(peers.compactMapValues { $0 })
        self.group = group
        self.limits = limits
        queues = Mutex([:])
        (newLinks, newLinksContinuation) = AsyncStream.makeStream()
        for peer in peers.keys { addPeer(peer) }
    }

    public func setAddress(_ address: SocketAddress, of peer: NodeID) {
        peerAddresses.withLock { $0[peer] = address }
    }

    /// Starts links to a peer (a member added after start); does nothing
    /// for a known peer or this node.
    public func addPeer(_ peer: NodeID, address: SocketAddress? = nil) {
        guard peer != id else { return }
        if let address { setAddress(address, of: peer) }
        queues.withLock { queues in
            guard queues[LinkKey(peer: peer, lane: .control)] == nil else { return }
            for lane in [Lane.control, .bulk] {
                let queue = LinkQueue(limit: limits.queuedMessagesPerPeerMax)
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

    /// Why inbound connections were closed, most recent last (for logs and tests).
    public var rejectedConnections: [String] { rejected.withLock { $0 } }

    /// Listens on `address` and delivers every inbound message to `deliver`,
    /// and keeps the outbound links, until the task is cancelled. Calls
    /// `ready` with the bound address once listening.
    public func run(listeningOn address: SocketAddress, ready: @Sendable (SocketAddress) -> Void = { _ in },
                    deliver: @escaping @Sendable (Message) async -> Void) async throws {
        let frameBytesMax = limits.frameBytesMax
        let serverTLS = tls?.server
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(to: address) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let serverTLS { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: serverTLS)) }
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameByteDecoder(frameBytesMax: frameBytesMax)))
                    return try NIOAsyncChannel<Frame, Never>(wrappingChannelSynchronously: channel)
                }
            }
        if let local = server.channel.localAddress { ready(local) }
        let newLinks = self.newLinks
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                await withDiscardingTaskGroup { links in
                    for await (key, queue) in newLinks {
                        links.addTask { await self.maintainLink(to: key.peer, queue) }
                    }
                }
            }
            try await server.executeThenClose { connections in
                for try await connection in connections {
                    group.addTask { await self.serve(connection, deliver) }
                }
            }
        }
    }

    private func serve(_ connection: NIOAsyncChannel<Frame, Never>, _ deliver: @Sendable (Message) async -> Void) async {
        do {
            try await connection.executeThenClose { inbound, _ in
                var certifiedPeer: NodeID?
                var assembler = ChunkAssembler(messageBytesMax: limits.chunkedMessageBytesMax)
                for try await frame in inbound {
                    let message: Message
                    switch frame {
                    case .raftMessage(let whole):
                        message = whole
                    case .chunk(let chunk):
                        guard let whole = try assembler.add(chunk) else { continue }
                        message = whole
                    }
                    if let tls {
                        // The handshake is done once a frame arrives.
                        if certifiedPeer == nil { certifiedPeer = try await self.certifiedNode(of: connection.channel, tls.identity.clusterID) }
                        guard message.from == certifiedPeer else {
                            throw PeerIdentityError(reason: "message claims node \(message.from) but the certificate names node \(certifiedPeer.map(String.init) ?? "none")")
                        }
                    }
                    await deliver(message)
                }
            }
        } catch is CancellationError {
            return // shutting down
        } catch {
            let peer = connection.channel.remoteAddress.map { "\($0)" } ?? "unknown peer"
            let reason = "closed connection from \(peer): \(error)"
            rejected.withLock { log in
                log.append(reason)
                if log.count > 100 { log.removeFirst(log.count - 100) }
            }
            onRejected?(reason)
        }
    }

    /// The node the peer's (already verified) certificate names.
    private func certifiedNode(of channel: any Channel, _ clusterID: String) async throws -> NodeID {
        let der = try await channel.eventLoop.submit { () throws -> [UInt8] in
            guard let certificate = try channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate else {
                throw PeerIdentityError(reason: "the peer presented no certificate")
            }
            return try certificate.toDERBytes()
        }.get()
        guard let node = NodeIdentity.nodeID(inCertificateDER: der, clusterID: clusterID) else {
            throw PeerIdentityError(reason: "the peer certificate names no node of cluster \(clusterID)")
        }
        return node
    }

    /// Connects to one peer and writes its queued messages, reconnecting
    /// with exponential backoff after any failure, until cancelled.
    private func maintainLink(to peer: NodeID, _ queue: LinkQueue) async {
        var backoff = limits.reconnectBackoffMin
        var carried: [Message] = []
        let clientTLS = tls?.client
        while !Task.isCancelled {
            guard let address = peerAddresses.withLock({ $0[peer] }) else {
                guard (try? await Task.sleep(for: backoff)) != nil else { return }
                continue
            }
            do {
                let channel = try await ClientBootstrap(group: group)
                    .connectTimeout(limits.connectTimeout)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .connect(to: address) { channel in
                        channel.eventLoop.makeCompletedFuture {
                            if let clientTLS {
                                try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: clientTLS, serverHostname: nil))
                            }
                            try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(FrameByteEncoder()))
                            return try NIOAsyncChannel<Never, Frame>(wrappingChannelSynchronously: channel)
                        }
                    }
                backoff = limits.reconnectBackoffMin
                try await channel.executeThenClose { _, outbound in
                    // Everything queued goes out in one write and one flush.
                    if !carried.isEmpty {
                        try await outbound.write(contentsOf: self.frames(carried))
                        carried = []
                    }
                    while let batch = await queue.next() {
                        carried = batch
                        try await outbound.write(contentsOf: self.frames(batch))
                        carried = []
                    }
                }
                return // the queue closed: the transport is shutting down
            } catch {
                guard (try? await Task.sleep(for: backoff)) != nil else { return }
                backoff = min(backoff * 2, limits.reconnectBackoffMax)
            }
        }
    }

    private let nextMessageID = Atomic<UInt64>(1)

    /// Frames for a batch: large messages (snapshots) in pieces of
    /// `limits.chunkBytes`, so no frame nears the frame limit.
    private func frames(_ messages: [Message]) -> [Frame] {
        messages.flatMap { message in
            Frame.frames(for: message, chunkBytes: limits.chunkBytes,
                         messageID: nextMessageID.wrappingAdd(1, ordering: .relaxed).oldValue)
        }
    }

    /// Ends every outbound queue; `run` returns once its task is cancelled.
    public func finish() {
        newLinksContinuation.finish()
        queues.withLock { queues in
            for queue in queues.values { queue.close() }
        }
    }
}

/// One link's outbound messages: pushes never block (the oldest are dropped
/// beyond `limit`; Raft resends what matters), and the link takes
/// everything queued at once.
final class LinkQueue: Sendable {
    private struct State {
        var messages: [Message] = []
        var waiter: CheckedContinuation<[Message]?, Never>?
        var closed = false
    }
    private let state = Mutex(State())
    let limit: Int

    init(limit: Int) {
        self.limit = limit
    }

    func push(_ batch: [Message]) {
        let (waiter, handed): (CheckedContinuation<[Message]?, Never>?, [Message]) = state.withLock { state in
            guard !state.closed else { return (nil, []) }
            if let waiter = state.waiter {
                state.waiter = nil
                return (waiter, Array(batch.suffix(limit)))
            }
            state.messages.append(contentsOf: batch)
            if state.messages.count > limit { state.messages.removeFirst(state.messages.count - limit) }
            return (nil, [])
        }
        waiter?.resume(returning: handed)
    }

    /// Everything queued, waiting for something if empty; nil once closed.
    func next() async -> [Message]? {
        await withTaskCancellationHandler {
            await take()
        } onCancel: {
            close()
        }
    }

    private func take() async -> [Message]? {
        await withCheckedContinuation { continuation in
            let ready: [Message]?? = state.withLock { state in
                if !state.messages.isEmpty {
                    defer { state.messages.removeAll(keepingCapacity: true) }
                    return .some(state.messages)
                }
                if state.closed { return .some(nil) }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    func close() {
        let waiter = state.withLock { state in
            state.closed = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: nil)
    }
}
