import Authority
import Foundation
import Ledger
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization
import SwiftASN1
import Transport
import X509

/// Who is on the other end of an API connection, from the client
/// certificate (verified by the TLS layer against the cluster CA, or
/// against the trust domain's published authorities for a workload).
public enum APICaller: Sendable, Hashable {
    /// No client certificate: only the public endpoints answer.
    case anonymous
    /// An operator with an admin certificate (`warrant-admin://<cluster>/<name>`),
    /// its serial (canonical hex) and when it was issued (what a rule
    /// revoking admin certificates goes by: `AdminRevocationList`).
    case admin(name: String, serial: String, issuedAtMillis: UInt64)
    /// Another node of this cluster (forwarding a caller's write).
    case node(id: UInt64)
    /// A workload holding an X509-SVID of this trust domain (renewal).
    case workload(spiffeID: String, certificateDER: [UInt8])

    /// The identity written into audit records.
    public var actor: String {
        switch self {
        case .anonymous: return "anonymous"
        case .admin(let name, _, _): return "admin:\(name)"
        case .node(let id): return "node:\(id)"
        case .workload(let spiffeID, _): return spiffeID
        }
    }

    public var isOperator: Bool {
        switch self {
        case .admin, .node: return true
        case .anonymous, .workload: return false
        }
    }

    /// Admin and node certificates count only when the cluster CA issued
    /// them; any other verified certificate with a SPIFFE ID is a workload.
    static func from(certificateDER der: [UInt8], clusterID: String, clusterCA: DistinguishedName) -> APICaller {
        guard let certificate = try? Certificate(derEncoded: der),
              let names = try? certificate.extensions.subjectAlternativeNames else { return .anonymous }
        let uris = names.compactMap { name -> String? in
            if case .uniformResourceIdentifier(let uri) = name { return uri }
            return nil
        }
        if certificate.issuer == clusterCA {
            for uri in uris {
                if let admin = ClusterCA.adminName(inURI: uri, clusterID: clusterID) {
                    let issued = certificate.notValidBefore.addingTimeInterval(ClusterCA.backdate).timeIntervalSince1970
                    return .admin(name: admin, serial: Revocation.canonicalSerial(Hex.encode(certificate.serialNumber.bytes)),
                                  issuedAtMillis: UInt64(max(0, issued * 1000)))
                }
            }
            if let id = NodeIdentity.nodeID(inCertificateDER: der, clusterID: clusterID) { return .node(id: id) }
            return .anonymous
        }
        if uris.count == 1, uris[0].hasPrefix("spiffe://") { return .workload(spiffeID: uris[0], certificateDER: der) }
        return .anonymous
    }
}

public struct HTTPRequest: Sendable {
    public var method: HTTPMethod
    /// The path without the query, percent-decoded.
    public var path: String
    public var query: [String: String]
    public var headers: HTTPHeaders
    public var body: [UInt8]
    public var caller: APICaller
}

public struct HTTPResponse: Sendable {
    public var status: HTTPResponseStatus
    public var headers: [(String, String)]
    public var body: [UInt8]

    public init(status: HTTPResponseStatus, headers: [(String, String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// Limits on what the API accepts.
public struct HTTPServerLimits: Sendable {
    /// Larger bodies get 413 and the connection is closed.
    public var requestBodyBytesMax = 512 << 10
    public var connectionsMax = 1_024
    /// Connections from one IP address at most: no single client can take
    /// every slot.
    public var connectionsPerAddressMax = 256
    /// When every slot is taken, a new connection takes the slot of the one
    /// idle longest (no request being received or answered; never another
    /// node's), if that one has been idle this long; else it is closed.
    /// Held connections must keep sending requests to keep their slots.
    public var evictIdleAfter: TimeAmount = .seconds(2)
    /// Evictions in a second of the clock at most: an evicted connection
    /// may stay open a few seconds more while its TLS closes, and these
    /// must stay within the descriptors the node reserves.
    public var evictionsPerSecondMax = 32
    /// Connections idle this long are closed.
    public var idleTimeout: TimeAmount = .seconds(60)
    /// A request must be received whole this long after its first byte (the
    /// first request: after the connection opened, its TLS handshake
    /// included), or the connection is closed: a client sending a byte now
    /// and then cannot hold a connection.
    public var requestReceiveTimeout: TimeAmount = .seconds(30)
    /// Header fields in one request at most (NIO's default, 65,534, let a
    /// request of 80 KiB of `a:b` lines cost megabytes as strings).
    public var headerFieldsMax = 100
    /// The request line and header fields together, in bytes.
    public var headerBytesMax = 32 << 10
    public init() {}
}

/// HTTPS/1.1 on SwiftNIO: TLS 1.2+ with an optional client certificate
/// that must chain to the cluster CA when presented; each request is
/// handed, whole, to an async handler; keep-alive; bounded bodies and
/// connection count.
public final class HTTPServer: Sendable {
    public typealias Handler = @Sendable (HTTPRequest) async -> HTTPResponse
    /// Told of a request the server refused itself, without its body (a
    /// body over the limit), with the refusal, as it is answered.
    public typealias Refused = @Sendable (HTTPRequest, APIError) -> Void
    /// More roots client certificates may chain to (the trust domain's
    /// published authorities, for workloads renewing), and a version that
    /// changes when they do.
    public typealias ClientRoots = @Sendable () -> (version: UInt64, roots: [Certificate])?

    private let group: any EventLoopGroup
    private let tls: NIOSSLContext
    private let identity: NodeIdentity
    private let clientRoots: ClientRoots?
    private let workloadTLS = Mutex<(version: UInt64, context: NIOSSLContext)?>(nil)
    private let clusterCA: DistinguishedName
    private let clusterID: String
    private let limits: HTTPServerLimits
    private let handler: Handler
    private let refused: Refused?
    private let connections = ConnectionTable()
    private let channel = Mutex<(any Channel)?>(nil)

    public init(group: any EventLoopGroup, identity: NodeIdentity, limits: HTTPServerLimits = HTTPServerLimits(),
                clientRoots: ClientRoots? = nil, refused: Refused? = nil, handler: @escaping Handler) throws {
        self.group = group
        self.identity = identity
        self.clusterID = identity.clusterID
        self.clusterCA = identity.caCertificate.subject
        self.limits = limits
        self.handler = handler
        self.refused = refused
        self.clientRoots = clientRoots
        tls = try Self.context(identity, extraRoots: [])
    }

    private static func context(_ identity: NodeIdentity, extraRoots: [Certificate]) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: [.certificate(try identity.nioCertificate)],
                                                                     privateKey: .privateKey(try identity.nioPrivateKey))
        configuration.minimumTLSVersion = .tlsv12
        var roots = [try identity.nioCACertificate]
        for root in extraRoots {
            var der = DER.Serializer()
            try der.serialize(root)
            roots.append(try NIOSSLCertificate(bytes: der.serializedBytes, format: .der))
        }
        configuration.trustRoots = .certificates(roots)
        configuration.additionalTrustRoots = []
        configuration.certificateVerification = .optionalVerification
        return try NIOSSLContext(configuration: configuration)
    }

    /// The TLS context for a new connection: the cluster CA, plus the
    /// trust domain's authorities as they are now (rebuilt when they change).
    private func currentContext() -> NIOSSLContext {
        guard let clientRoots, let (version, roots) = clientRoots() else { return tls }
        if let cached = workloadTLS.withLock({ $0 }), cached.version == version { return cached.context }
        guard let context = try? Self.context(identity, extraRoots: roots) else { return tls }
        workloadTLS.withLock { $0 = (version, context) }
        return context
    }

    /// Binds and starts serving; returns the bound address.
    public func start(at address: SocketAddress) async throws -> SocketAddress {
        let limits = self.limits, handler = self.handler, refused = self.refused, clusterID = self.clusterID, clusterCA = self.clusterCA
        // The generic handlers of requests here and of the node's own
        // connections to others (forwarding), made once before serving.
        prepareTypes(of: [ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes), maximumBufferSize: 1 << 20),
                          ByteToMessageHandler(HTTPResponseDecoder(leftOverBytesStrategy: .dropBytes))])
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 256)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [connections, self] channel in
                let (admitted, evicted) = connections.admit(channel, limits: limits)
                evicted?.close(promise: nil)
                guard let activity = admitted else { return channel.close() }
                channel.closeFuture.whenComplete { _ in connections.remove(activity) }
                let tls = self.currentContext()
                return channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(NIOSSLServerHandler(context: tls))
                    try sync.addHandler(IdleStateHandler(allTimeout: limits.idleTimeout))
                    let deadline = RequestDeadline(timeout: limits.requestReceiveTimeout)
                    try sync.addHandler(RequestStartWatch(deadline: deadline, activity: activity))
                    // Bytes the decoder has not consumed, at most 1 MiB (it consumes as it parses).
                    var decoderLimits = NIOHTTPDecoderLimitConfiguration()
                    decoderLimits.maxHeaderFieldCount = limits.headerFieldsMax
                    decoderLimits.maxHeaderListSize = limits.headerBytesMax
                    decoderLimits.maxHeaderFieldSize = limits.headerBytesMax
                    try sync.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: decoderLimits),
                                                             maximumBufferSize: 1 << 20))
                    try sync.addHandler(RequestHandler(clusterID: clusterID, clusterCA: clusterCA, bodyBytesMax: limits.requestBodyBytesMax,
                                                         deadline: deadline, activity: activity, refused: refused, handler: handler))
                }
            }
            .bind(to: address).get()
        channel.withLock { $0 = server }
        guard let local = server.localAddress else { throw ChannelError.unknownLocalAddress }
        return local
    }

    /// Stops accepting connections (open ones finish their request).
    public func stop() async {
        let server = channel.withLock { $0 }
        try? await server?.close()
    }
}

/// The API's open connections: at most `connectionsMax`, at most
/// `connectionsPerAddressMax` from one address; when all are taken, the
/// connection idle longest (past `evictIdleAfter`) gives its slot to a new
/// one. Each connection's handlers tell its `Activity` when a request
/// begins and when it is done with.
final class ConnectionTable: Sendable {
    /// One connection's slot: idle since when (uptime nanoseconds), or busy
    /// (0), or evicted (`UInt64.max`); changed only by compare-and-swap, so a
    /// request that begins and an eviction cannot both win.
    final class Activity: Sendable {
        let id: UInt64
        let address: String
        let channel: any Channel
        private let idleSince: Atomic<UInt64>
        /// Another node's connection (it forwards callers' requests over
        /// it): never evicted, so a forward is never cut unread.
        private let pinned = Atomic<Bool>(false)
        private static let busy: UInt64 = 0
        fileprivate static let evicted = UInt64.max

        init(id: UInt64, address: String, channel: any Channel, now: UInt64) {
            self.id = id
            self.address = address
            self.channel = channel
            // Idle from the start: a connection that never sends a request
            // (or never finishes its handshake) holds a slot no better.
            idleSince = Atomic(max(1, now))
        }

        /// Bytes of a request arrived; false if the connection was evicted
        /// (it is being closed: they are not read).
        func begin() -> Bool {
            var seen = idleSince.load(ordering: .relaxed)
            while true {
                if seen == Self.busy { return true }
                if seen == Self.evicted { return false }
                let (exchanged, original) = idleSince.compareExchange(expected: seen, desired: Self.busy, ordering: .relaxed)
                if exchanged { return true }
                seen = original
            }
        }

        /// Nothing is being received or answered on the connection now.
        func end(now: UInt64 = NIODeadline.now().uptimeNanoseconds) {
            _ = idleSince.compareExchange(expected: Self.busy, desired: max(1, now), ordering: .relaxed)
        }

        /// When it became idle, or nil (busy, evicted or pinned).
        var idle: UInt64? {
            guard !pinned.load(ordering: .relaxed) else { return nil }
            let since = idleSince.load(ordering: .relaxed)
            return since == Self.busy || since == Self.evicted ? nil : since
        }

        func pin() { pinned.store(true, ordering: .relaxed) }

        /// Evicts it if it is still idle since `since`.
        fileprivate func evict(idleSince since: UInt64) -> Bool {
            idleSince.compareExchange(expected: since, desired: Self.evicted, ordering: .relaxed).exchanged
        }
    }

    private struct State {
        var open: [UInt64: Activity] = [:]
        var byAddress: [String: Int] = [:]
        var nextID: UInt64 = 0
        var evictions = 0
        /// Evictions in the current second of the clock.
        var evictionSecond: UInt64 = 0
        var evictionsThisSecond = 0
    }

    private let state = Mutex(State())

    /// How many connections have given their slot to a new one.
    var evictions: Int { state.withLock { $0.evictions } }
    var count: Int { state.withLock { $0.open.count } }

    /// A slot for `channel`, and the connection that gave it up (to be
    /// closed); nil if its address has its share or no slot can be freed.
    func admit(_ channel: any Channel, limits: HTTPServerLimits,
               now: UInt64 = NIODeadline.now().uptimeNanoseconds) -> (admitted: Activity?, evicted: (any Channel)?) {
        let address = SourceAddress.key(channel.remoteAddress)
        return state.withLock { state in
            guard state.byAddress[address, default: 0] < limits.connectionsPerAddressMax else { return (nil, nil) }
            var evicted: Activity?
            if state.open.count >= limits.connectionsMax {
                let second = now / 1_000_000_000
                if state.evictionSecond != second { (state.evictionSecond, state.evictionsThisSecond) = (second, 0) }
                guard state.evictionsThisSecond < limits.evictionsPerSecondMax else { return (nil, nil) }
                let bound = UInt64(max(0, limits.evictIdleAfter.nanoseconds))
                let cutoff = now >= bound ? now - bound : 0
                let candidates = state.open.values.compactMap { activity in activity.idle.flatMap { $0 <= cutoff ? (activity, $0) : nil } }
                // The one idle longest that is still idle (one may begin a
                // request meanwhile: then the next).
                guard let oldest = candidates.sorted(by: { $0.1 < $1.1 }).first(where: { $0.0.evict(idleSince: $0.1) })?.0 else { return (nil, nil) }
                Self.forget(oldest, &state)
                state.evictions += 1
                state.evictionsThisSecond += 1
                evicted = oldest
            }
            state.nextID += 1
            let activity = Activity(id: state.nextID, address: address, channel: channel, now: now)
            state.open[activity.id] = activity
            state.byAddress[address, default: 0] += 1
            return (activity, evicted?.channel)
        }
    }

    /// The connection closed (a no-op if it was evicted: its slot is taken).
    func remove(_ activity: Activity) {
        state.withLock { state in
            guard state.open[activity.id] === activity else { return }
            Self.forget(activity, &state)
        }
    }

    private static func forget(_ activity: Activity, _ state: inout State) {
        state.open[activity.id] = nil
        state.byAddress[activity.address, default: 1] -= 1
        if state.byAddress[activity.address] == 0 { state.byAddress[activity.address] = nil }
    }
}

/// The time limit on receiving one request, shared by the handler that
/// sees its first bytes (`RequestStartWatch`, before the HTTP decoder) and
/// the one that sees its end (`RequestHandler`); used on the connection's
/// event loop only.
private final class RequestDeadline {
    let timeout: TimeAmount
    private var timer: Scheduled<Void>?
    /// Bytes of a request not yet received whole have arrived (or the
    /// connection is new: its first request is due).
    private(set) var receiving = false

    init(timeout: TimeAmount) { self.timeout = timeout }

    func start(_ context: ChannelHandlerContext) {
        guard !receiving else { return }
        receiving = true
        let channel = context.channel
        timer = context.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
    }

    func received() {
        receiving = false
        timer?.cancel()
        timer = nil
    }
}

/// Starts the clock on a request when its first (decrypted) bytes arrive,
/// and on the first request when the connection opens.
private final class RequestStartWatch: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private let deadline: RequestDeadline
    private let activity: ConnectionTable.Activity

    init(deadline: RequestDeadline, activity: ConnectionTable.Activity) {
        self.deadline = deadline
        self.activity = activity
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { deadline.start(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        deadline.start(context)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Evicted for a new connection: closing, nothing more is read.
        guard activity.begin() else { return }
        deadline.start(context)
        context.fireChannelRead(data)
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline.received()
        context.fireChannelInactive()
    }
}

/// Collects one request, runs the handler, writes the response; requests
/// on a connection are answered in order, one at a time: a request that
/// arrives (pipelined) while another is being answered waits, and the
/// socket is not read again until it is started. Responses are written
/// here as bytes, in one write each (NIO's HTTP/1 response encoder, header
/// validator and pipelining handler took four handler passes and three
/// writes per response).
private final class RequestHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private struct Received {
        var head: HTTPRequestHead
        var body: [UInt8] = []
        var tooLarge = false
        /// Answered with `connection: close`, and nothing after it.
        var lastOnConnection = false
    }

    private let clusterID: String
    private let clusterCA: DistinguishedName
    private let bodyBytesMax: Int
    private let deadline: RequestDeadline
    private let activity: ConnectionTable.Activity
    /// A body over the limit was refused: nothing more is read as a request.
    private var discarding = false
    private let handler: HTTPServer.Handler
    private let refused: HTTPServer.Refused?
    /// The request being received.
    private var receiving: Received?
    /// Requests received whole, not yet started (pipelined behind `answering`).
    private var waiting = CircularBuffer<Received>(initialCapacity: 2)
    /// A request's handler is running.
    private var answering = false
    /// `answerNext` is running (a handler answering at once re-enters it).
    private var startingNext = false
    /// The channel asked to read while requests were waiting or being
    /// answered: the read is made once they are done.
    private var readHeld = false
    /// No more requests are taken (a response said close, or the bytes
    /// were not HTTP/1.1); the connection closes after the one being answered.
    private var closing = false
    private var caller: APICaller?
    /// When the client certificate expires: from then on the connection's
    /// requests are anonymous (it was checked once, at the handshake).
    private var callerNotAfter: Date?
    private var executorOfLoop: EventLoopTaskExecutor?

    /// Tasks started for this connection's requests run on its event loop.
    private var executor: EventLoopTaskExecutor {
        if let executorOfLoop { return executorOfLoop }
        let made = EventLoopTaskExecutor(loop: loopOfConnection!)
        executorOfLoop = made
        return made
    }
    private var loopOfConnection: (any EventLoop)?

    func handlerAdded(context: ChannelHandlerContext) {
        loopOfConnection = context.eventLoop
    }

    init(clusterID: String, clusterCA: DistinguishedName, bodyBytesMax: Int, deadline: RequestDeadline, activity: ConnectionTable.Activity,
         refused: HTTPServer.Refused?, handler: @escaping HTTPServer.Handler) {
        self.clusterID = clusterID
        self.clusterCA = clusterCA
        self.bodyBytesMax = bodyBytesMax
        self.deadline = deadline
        self.activity = activity
        self.refused = refused
        self.handler = handler
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing, !discarding else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            // A request begins (its bytes may have come in the read that
            // ended the one before, which started no clock): busy until it
            // is answered, and due whole within the receive timeout.
            guard activity.begin() else {
                closing = true
                return
            }
            deadline.start(context)
            receiving = Received(head: head)
            // The decoder reads nothing after a CONNECT or an upgrade
            // request: it is answered (nothing is upgraded), then closed.
            if head.method == .CONNECT || head.headers.contains(name: "upgrade") { receiving!.lastOnConnection = true }
        case .body(let buffer):
            guard receiving != nil, !receiving!.tooLarge else { return }
            if receiving!.body.count + buffer.readableBytes > bodyBytesMax {
                // Refused now (in turn, after any request before it), not
                // once the rest has been read: the connection closes with
                // the answer, and nothing more is read from it.
                receiving!.tooLarge = true
                receiving!.body = []
                waiting.append(receiving!)
                receiving = nil
                discarding = true
                deadline.received()
                answerNext(context: context)
            } else {
                receiving!.body.append(contentsOf: buffer.readableBytesView)
            }
        case .end:
            guard let received = receiving else { return }
            receiving = nil
            deadline.received()
            waiting.append(received)
            answerNext(context: context)
        }
    }

    /// Starts waiting requests in order, one at a time, while none is being
    /// answered. A loop, not recursion: a handler that answers at once
    /// lets the next pipelined request start in the same pass, so a read
    /// full of small pipelined requests cannot deepen the stack.
    private func answerNext(context: ChannelHandlerContext) {
        guard !startingNext else { return }
        startingNext = true
        defer { startingNext = false }
        while !answering, !closing, context.channel.isWritable, let received = waiting.popFirst() {
            start(received, context: context)
        }
        if readHeld, waiting.isEmpty, !closing, !discarding, context.channel.isWritable {
            readHeld = false
            context.read()
        }
    }

    private func start(_ received: Received, context: ChannelHandlerContext) {
        if received.tooLarge {
            let refusal = APIError.payloadTooLarge("the request body is larger than \(bodyBytesMax) bytes")
            refused?(makeRequest(received.head, body: [], context: context), refusal)
            write(refusal.response, keepAlive: false, bodyless: false, context: context)
            return
        }
        answering = true
        let request = makeRequest(received.head, body: received.body, context: context)
        let keepAlive = received.head.isKeepAlive && !received.lastOnConnection, bodyless = received.head.method == .HEAD
        if !keepAlive { closing = true }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let handler = self.handler
        // The handler starts at once, here on this connection's event loop,
        // and runs on it after each await (its awaits hop to the driver
        // and back here), not on Swift's cooperative pool: two thread hops
        // fewer per request, and a handler that never suspends (a
        // verification) answers within this read. Handlers do not block.
        // The answer is written from the task itself (no promise and
        // future in between): after its last await it is back on this loop.
        let loop = context.eventLoop
        let finish: @Sendable (HTTPResponse) -> Void = { response in
            let (this, context) = loopBound.value
            this.answering = false
            this.write(response, keepAlive: keepAlive && !this.closing, bodyless: bodyless, context: context)
            this.answerNext(context: context)
            // Nothing more arrived meanwhile: idle from now on.
            if !this.answering, this.waiting.isEmpty, this.receiving == nil, !this.deadline.receiving { this.activity.end() }
        }
        Task.immediate(executorPreference: executor) {
            let response = await handler(request)
            if loop.inEventLoop { finish(response) } else { loop.execute { finish(response) } }
        }
    }

    /// Reads go on while one request is being answered (a client that does
    /// not pipeline sends nothing more meanwhile, and holding the read would
    /// cost two epoll_ctl calls per request); they stop while a whole
    /// request waits behind it, and while the connection takes no more
    /// writes (a client that pipelines and never reads would otherwise
    /// pile up answers here without end).
    func read(context: ChannelHandlerContext) {
        if !waiting.isEmpty || !context.channel.isWritable || discarding {
            readHeld = true
        } else {
            context.read()
        }
    }

    private func makeRequest(_ head: HTTPRequestHead, body: [UInt8], context: ChannelHandlerContext) -> HTTPRequest {
        if caller == nil {
            let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
            if let der = try? certificate?.toDERBytes() {
                caller = APICaller.from(certificateDER: der, clusterID: clusterID, clusterCA: clusterCA)
                callerNotAfter = (try? Certificate(derEncoded: der))?.notValidAfter
                if case .node = caller { activity.pin() }
            } else {
                caller = .anonymous
            }
        }
        let (path, query) = RequestTarget.split(head.uri)
        var current = caller ?? .anonymous
        if let callerNotAfter, Date() > callerNotAfter { current = .anonymous }
        return HTTPRequest(method: head.method, path: path, query: query, headers: head.headers, body: body, caller: current)
    }

    /// Writes the response in one write; without keep-alive, closes once it is written.
    private func write(_ response: HTTPResponse, keepAlive: Bool, bodyless: Bool, context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: 160 + response.headers.count * 48 + (bodyless ? 0 : response.body.count))
        if !HTTPResponseWriter.write(response, keepAlive: keepAlive, bodyless: bodyless, into: &buffer) {
            buffer.clear()
            let refusal = APIError(status: .internalServerError, code: "internal", message: "the response had a header that cannot be sent").response
            _ = HTTPResponseWriter.write(refusal, keepAlive: keepAlive, bodyless: bodyless, into: &buffer)
        }
        guard !keepAlive else {
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
            return
        }
        closing = true
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: promise)
        let channel = context.channel
        promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { answerNext(context: context) }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closing = true
        waiting.removeAll()
        receiving = nil
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Bytes that are not HTTP/1.1 get a 400 and the connection closes;
        // if a request is being answered, its answer goes out first, then
        // the connection closes (without the 400: the client is still
        // reading that answer). Anything else closes it at once.
        let undecodable = error is HTTPParserError || error is ByteToMessageDecoderError
        if closing && undecodable { return } // more bytes after the bad ones: the close is on its way
        guard undecodable else {
            context.close(promise: nil)
            return
        }
        waiting.removeAll()
        receiving = nil
        if answering {
            closing = true
        } else {
            let response = APIError(status: .badRequest, code: "bad_http", message: "the request is not valid HTTP/1.1 (\(error))").response
            write(response, keepAlive: false, bodyless: false, context: context)
        }
    }
}

/// A request's target: its path and query, percent-decoded.
enum RequestTarget {
    /// "/a%2Fb?x=1&y" → ("/a/b", ["x": "1", "y": ""]).
    static func split(_ uri: String) -> (String, [String: String]) {
        // Most targets are a plain path: no query, nothing escaped.
        if !uri.utf8.contains(where: { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "%") }) { return (uri, [:]) }
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = String(parts[0]).removingPercentEncodingSafely
        var query: [String: String] = [:]
        if parts.count > 1 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                query[String(kv[0]).removingPercentEncodingSafely] = kv.count > 1 ? String(kv[1]).removingPercentEncodingSafely : ""
            }
        }
        return (path, query)
    }
}

/// An HTTP/1.1 response as bytes: status line, the response's headers,
/// content-length (and `connection: close` without keep-alive), the body.
enum HTTPResponseWriter {
    /// False, with nothing useful written, when a header name is not an
    /// RFC 9110 token or a value holds CR, LF or NUL (a header of the
    /// response's own named content-length, connection or
    /// transfer-encoding is dropped: this writer sets framing). A `bodyless`
    /// response (to HEAD) keeps its content-length and leaves out its body.
    static func write(_ response: HTTPResponse, keepAlive: Bool, bodyless: Bool, into buffer: inout ByteBuffer) -> Bool {
        buffer.writeString("HTTP/1.1 ")
        buffer.writeString(String(response.status.code))
        buffer.writeInteger(UInt8(ascii: " "))
        buffer.writeString(response.status.reasonPhrase)
        buffer.writeStaticString("\r\n")
        for (name, value) in response.headers {
            guard !name.isEmpty, name.utf8.allSatisfy(isTokenByte), !value.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) else {
                return false
            }
            if isFraming(name) { continue }
            buffer.writeString(name)
            buffer.writeStaticString(": ")
            buffer.writeString(value)
            buffer.writeStaticString("\r\n")
        }
        buffer.writeStaticString("content-length: ")
        buffer.writeString(String(response.body.count))
        buffer.writeStaticString(keepAlive ? "\r\n\r\n" : "\r\nconnection: close\r\n\r\n")
        if !bodyless { buffer.writeBytes(response.body) }
        return true
    }

    private static func isTokenByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): return true
        default: return "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }

    private static func isFraming(_ name: String) -> Bool {
        guard name.utf8.count >= 10 else { return false }
        let lower = name.lowercased()
        return lower == "content-length" || lower == "connection" || lower == "transfer-encoding"
    }
}

/// Runs Swift tasks on an event loop's thread: an async handler started
/// from a channel stays on that channel's loop between its awaits.
final class EventLoopTaskExecutor: TaskExecutor, @unchecked Sendable {
    let loop: any EventLoop

    init(loop: any EventLoop) {
        self.loop = loop
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

extension String {
    /// Percent-decoding that leaves malformed escapes as they are.
    var removingPercentEncodingSafely: String {
        // Looked for as a byte: `contains("%")` is Foundation's substring
        // search (NSString range(of:)), 1% of a leader issuing JWT-SVIDs.
        guard utf8.contains(UInt8(ascii: "%")) else { return self }
        var bytes: [UInt8] = []
        var iterator = Array(utf8)[...]
        func hex(_ byte: UInt8) -> UInt8? {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        while let byte = iterator.popFirst() {
            // Two hex digits exactly (UInt8(_:radix:) would take "+A" too).
            if byte == UInt8(ascii: "%"), iterator.count >= 2, let high = hex(iterator[iterator.startIndex]),
               let low = hex(iterator[iterator.startIndex + 1]) {
                bytes.append(high << 4 | low)
                iterator = iterator.dropFirst(2)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
