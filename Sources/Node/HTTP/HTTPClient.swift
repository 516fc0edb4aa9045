import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import Transport
import Synchronization

/// A response as the client received it.
public struct HTTPClientResponse: Sendable {
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: [UInt8]

    public var text: String { String(decoding: body, as: UTF8.self) }
}

public struct HTTPClientError: Error, Sendable, CustomStringConvertible {
    public var description: String
    /// The request was written before it failed: the server may have acted on it.
    public var requestSent = false

    public init(description: String, requestSent: Bool = false) {
        self.description = description
        self.requestSent = requestSent
    }
}

/// One keep-alive HTTPS/1.1 connection: requests go one at a time, in
/// order. Used by the CLI, by followers forwarding writes to the leader,
/// and by the load generator.
public final class HTTPConnection: Sendable {
    public let address: SocketAddress
    private let channel: any Channel
    /// Requests waiting for answers, oldest first.
    private let pending: NIOLoopBoundBox<[EventLoopPromise<HTTPClientResponse>]>

    /// Connects with TLS (`tls` non-nil) or in the clear, within `timeout`.
    /// `serverHostname` is sent as SNI and Host, and the server's
    /// certificate must name it (with none, it must name the IP address).
    /// `peerCheck` (with TLS): given the server's certificate (DER) once
    /// the handshake is done, and before anything is sent, a reason to
    /// refuse it, or nil.
    public static func connect(to address: SocketAddress, tls: NIOSSLContext?, serverHostname: String? = nil,
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                               timeout: TimeAmount = .seconds(3), responseBytesMax: Int = 64 << 20,
                               peerCheck: (@Sendable ([UInt8]) -> String?)? = nil) async throws -> HTTPConnection {
        try await connect(to: .resolved(address), tls: tls, serverHostname: serverHostname, group: group, timeout: timeout,
                          responseBytesMax: responseBytesMax, peerCheck: peerCheck)
    }

    /// `connect(to:)` for an address or a host name, looked up now (off the event loops).
    public static func connect(to target: PeerAddress, tls: NIOSSLContext?, serverHostname: String? = nil,
                               group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                               timeout: TimeAmount = .seconds(3), responseBytesMax: Int = 64 << 20,
                               peerCheck: (@Sendable ([UInt8]) -> String?)? = nil) async throws -> HTTPConnection {
        try Task.checkCancellation()
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        let channel: any Channel
        let address: SocketAddress
        switch target {
        case .resolved(let resolved):
            channel = try await bootstrap.connect(to: resolved).get()
            address = resolved
        case .named(let host, let port):
            channel = try await bootstrap.connect(host: host, port: port).get()
            guard let remote = channel.remoteAddress else {
                try? await channel.close()
                throw HTTPClientError(description: "the connection to \(host):\(port) closed at once")
            }
            address = remote
        }
        let handshake: EventLoopPromise<Void>? = tls != nil && peerCheck != nil ? channel.eventLoop.makePromise(of: Void.self) : nil
        let box: NIOLoopBoundBox<[EventLoopPromise<HTTPClientResponse>]>
        do {
            box = try await channel.eventLoop.submit {
                let box = NIOLoopBoundBox<[EventLoopPromise<HTTPClientResponse>]>([], eventLoop: channel.eventLoop)
                let sync = channel.pipeline.syncOperations
                if let tls {
                    try sync.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: serverHostname))
                    if let handshake { try sync.addHandler(HandshakeWatcher(done: handshake)) }
                }
                try sync.addHTTPClientHandlers()
                try sync.addHandler(ResponseHandler(pending: box, responseBytesMax: responseBytesMax))
                return box
            }.get()
            if let handshake, let peerCheck {
                let deadline = channel.eventLoop.scheduleTask(in: timeout) {
                    handshake.fail(HTTPClientError(description: "no TLS handshake with \(address) within \(timeout.nanoseconds / 1_000_000) ms"))
                }
                defer { deadline.cancel() }
                try await handshake.futureResult.get()
                let certificate = try await channel.eventLoop.submit {
                    try channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate?.toDERBytes()
                }.get()
                guard let certificate else { throw HTTPClientError(description: "\(address) presented no certificate") }
                if let refusal = peerCheck(certificate) { throw HTTPClientError(description: "\(address) refused: \(refusal)") }
            }
        } catch {
            handshake?.fail(error)
            try? await channel.close()
            throw error
        }
        return HTTPConnection(address: address, channel: channel, pending: box, host: serverHostname ?? address.ipAddress ?? "localhost")
    }

    private let host: String

    private init(address: SocketAddress, channel: any Channel, pending: NIOLoopBoundBox<[EventLoopPromise<HTTPClientResponse>]>, host: String) {
        self.host = host
        self.address = address
        self.channel = channel
        self.pending = pending
    }

    public var isActive: Bool { channel.isActive }

    /// The loop this connection runs on.
    public var eventLoop: any EventLoop { channel.eventLoop }

    /// Sends one request and waits for its response, at most `timeout`.
    public func request(_ method: HTTPMethod, _ uri: String, headers: [(String, String)] = [], body: [UInt8] = [],
                        timeout: TimeAmount = .seconds(10)) async throws -> HTTPClientResponse {
        let channel = self.channel, pending = self.pending
        // A task cancelled closes the connection (an answer would come on a
        // connection nobody reads) and gets CancellationError: before the
        // request is written (on the loop), it is not; once it was, the
        // wait ends at once, not at the timeout.
        let cancelled = Atomic<Bool>(false)
        let send: @Sendable () -> EventLoopFuture<HTTPClientResponse> = {
            guard !cancelled.load(ordering: .acquiring) else { return channel.eventLoop.makeFailedFuture(CancellationError()) }
            guard channel.isActive else {
                return channel.eventLoop.makeFailedFuture(HTTPClientError(description: "the connection to \(self.address) is closed"))
            }
            let promise = channel.eventLoop.makePromise(of: HTTPClientResponse.self)
            pending.value.append(promise)
            var head = HTTPRequestHead(version: .http1_1, method: method, uri: uri)
            head.headers.add(name: "host", value: self.host)
            for (name, value) in headers { head.headers.add(name: name, value: value) }
            head.headers.add(name: "content-length", value: String(body.count))
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            if !body.isEmpty { channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil) }
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            let deadline = channel.eventLoop.scheduleTask(in: timeout) {
                promise.fail(HTTPClientError(description: "no response from \(self.address) within \(timeout.nanoseconds / 1_000_000) ms", requestSent: true))
                channel.close(promise: nil)
            }
            promise.futureResult.whenComplete { _ in deadline.cancel() }
            return promise.futureResult
        }
        do {
            return try await withTaskCancellationHandler {
                // Called on the connection's own loop (a follower's forward
                // from a handler running there), the request is written at
                // once, with no task queued on the loop.
                let future = channel.eventLoop.inEventLoop ? send() : channel.eventLoop.flatSubmit(send)
                return try await future.get()
            } onCancel: {
                cancelled.store(true, ordering: .releasing)
                channel.close(promise: nil)
            }
        } catch where Task.isCancelled {
            throw CancellationError()
        }
    }

    public func close() async {
        try? await channel.close()
    }
}

/// Tells when the TLS handshake is done (or the connection fails first).
private final class HandshakeWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    private let done: EventLoopPromise<Void>

    init(done: EventLoopPromise<Void>) { self.done = done }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted? = event as? TLSUserEvent { done.succeed() }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        done.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        done.fail(HTTPClientError(description: "the connection closed before its TLS handshake was done"))
        context.fireChannelInactive()
    }
}

private final class ResponseHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let pending: NIOLoopBoundBox<[EventLoopPromise<HTTPClientResponse>]>
    private let responseBytesMax: Int
    private var head: HTTPResponseHead?
    private var body: [UInt8] = []

    init(pending: NIOLoopBoundBox<[EventLoopPromise<HTTPClientResponse>]>, responseBytesMax: Int) {
        self.pending = pending
        self.responseBytesMax = responseBytesMax
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body = []
        case .body(var buffer):
            guard body.count + buffer.readableBytes <= responseBytesMax else {
                failAll(HTTPClientError(description: "the response is larger than \(responseBytesMax) bytes", requestSent: true))
                context.close(promise: nil)
                return
            }
            body += buffer.readBytes(length: buffer.readableBytes) ?? []
        case .end:
            guard let head, !pending.value.isEmpty else { return }
            self.head = nil
            let promise = pending.value.removeFirst()
            promise.succeed(HTTPClientResponse(status: head.status, headers: head.headers, body: body))
            body = []
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(HTTPClientError(description: "the server closed the connection", requestSent: true))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failAll(HTTPClientError(description: "connection failed: \(error)", requestSent: true))
        context.close(promise: nil)
    }

    private func failAll(_ error: HTTPClientError) {
        let promises = pending.value
        pending.value.removeAll()
        for promise in promises { promise.fail(error) }
    }
}

/// A few reusable connections to one address.
public final class HTTPConnectionPool: Sendable {
    /// Where connections go: an address, or a name looked up for each new connection.
    public let target: PeerAddress
    private let tls: NIOSSLContext?
    private let idle = Mutex<[HTTPConnection]>([])
    private let idleMax: Int
    private let peerCheck: (@Sendable ([UInt8]) -> String?)?
    private let group: any EventLoopGroup
    private let loops: Set<ObjectIdentifier>

    /// `peerCheck`: see `HTTPConnection.connect`; every new connection is
    /// checked. `group`: where new connections run, unless the caller runs
    /// on one of its loops (see `request`).
    public init(address: SocketAddress, tls: NIOSSLContext?, idleMax: Int = 32, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                peerCheck: (@Sendable ([UInt8]) -> String?)? = nil) {
        self.target = .resolved(address)
        self.tls = tls
        self.idleMax = idleMax
        self.group = group
        self.loops = Set(group.makeIterator().map { ObjectIdentifier($0) })
        self.peerCheck = peerCheck
    }

    /// Connections to `host` (an IP literal, or a name looked up again for
    /// each new connection: a name that moves, or resolves only later, is
    /// followed, and one that fails is that connection's failure).
    public init(host: String, port: Int, tls: NIOSSLContext?, idleMax: Int = 32, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                peerCheck: (@Sendable ([UInt8]) -> String?)? = nil) {
        self.target = PeerAddress(host: host, port: port)
        self.tls = tls
        self.idleMax = idleMax
        self.group = group
        self.loops = Set(group.makeIterator().map { ObjectIdentifier($0) })
        self.peerCheck = peerCheck
    }

    /// A caller running on one of the group's loops (a follower's handler,
    /// forwarding) is given a connection of that loop: its request, the
    /// answer and the caller's continuation stay on one thread, with no
    /// wake-up of another (two per request otherwise, and a busier
    /// scheduler on a small machine).
    public func request(_ method: HTTPMethod, _ uri: String, headers: [(String, String)] = [], body: [UInt8] = [],
                        timeout: TimeAmount = .seconds(10)) async throws -> HTTPClientResponse {
        let here = MultiThreadedEventLoopGroup.currentEventLoop.flatMap { loops.contains(ObjectIdentifier($0)) ? $0 : nil }
        let reused = idle.withLock { idle -> HTTPConnection? in
            guard let here else { return idle.popLast() }
            guard let index = idle.lastIndex(where: { $0.eventLoop === here }) else { return nil }
            return idle.remove(at: index)
        }
        let connection: HTTPConnection
        if let reused, reused.isActive {
            connection = reused
        } else {
            connection = try await HTTPConnection.connect(to: target, tls: tls, group: here ?? group, peerCheck: peerCheck)
        }
        let response = try await connection.request(method, uri, headers: headers, body: body, timeout: timeout)
        let (kept, dropped) = idle.withLock { idle -> (Bool, HTTPConnection?) in
            // (One whose task was cancelled as its answer came is closing.)
            guard connection.isActive, !Task.isCancelled else { return (false, nil) }
            idle.removeAll { !$0.isActive }
            var dropped: HTTPConnection?
            // Full: one of the loop with the most makes room, so a burst on
            // one loop cannot leave another none to reuse (each caller on a
            // loop takes only that loop's).
            if idle.count >= idleMax {
                let counts = Dictionary(grouping: idle, by: { ObjectIdentifier($0.eventLoop) }).mapValues(\.count)
                let mine = counts[ObjectIdentifier(connection.eventLoop), default: 0]
                guard let (loop, most) = counts.max(by: { $0.value < $1.value }), most > mine + 1,
                      let index = idle.firstIndex(where: { ObjectIdentifier($0.eventLoop) == loop }) else { return (false, nil) }
                dropped = idle.remove(at: index)
            }
            idle.append(connection)
            return (true, dropped)
        }
        if let dropped { await dropped.close() }
        if !kept { await connection.close() }
        return response
    }

    /// The loops of the connections kept for reuse (for tests).
    var idleEventLoops: [any EventLoop] { idle.withLock { $0.map(\.eventLoop) } }

    public func closeAll() async {
        for connection in idle.withLock({ idle in defer { idle.removeAll() }; return idle }) { await connection.close() }
    }
}

extension SocketAddress {
    /// "127.0.0.1:8401" or "[::1]:8401".
    public var hostPort: String {
        let host = ipAddress ?? "?"
        return host.contains(":") ? "[\(host)]:\(port ?? 0)" : "\(host):\(port ?? 0)"
    }
}
