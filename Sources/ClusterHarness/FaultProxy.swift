import NIOCore
import NIOPosix
import Synchronization

/// A TCP proxy for one directed peer link (node A's connections to node
/// B), whose behaviour the chaos harness switches at run time: pass bytes,
/// drop (close every connection and refuse new ones), stall (hold bytes,
/// up to a bound, until switched back), or delay every chunk. Node-to-node
/// connections carry one direction of Raft traffic each, so cutting one
/// proxy makes an asymmetric partition. No root needed: only loopback.
public final class FaultProxy: Sendable {
    public enum Mode: Sendable, Equatable, CustomStringConvertible {
        case pass
        case drop
        case stall
        case delay(milliseconds: Int)

        public var description: String {
            switch self {
            case .pass: return "pass"
            case .drop: return "drop"
            case .stall: return "stall"
            case .delay(let ms): return "delay \(ms) ms"
            }
        }
    }

    /// Bytes held per connection while stalled; past it the connection is closed.
    public static let stallBytesMax = 16 << 20

    public let target: SocketAddress
    private let group: any EventLoopGroup
    private let state = Mutex<(mode: Mode, connections: [ObjectIdentifier: any Channel])>((.pass, [:]))
    private let server = Mutex<(any Channel)?>(nil)

    public init(target: SocketAddress, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.target = target
        self.group = group
    }

    public var mode: Mode { state.withLock { $0.mode } }

    /// Switches the mode; `drop` closes every open connection at once.
    public func set(_ mode: Mode) {
        let toClose: [any Channel] = state.withLock { state in
            state.mode = mode
            guard mode == .drop else { return [] }
            defer { state.connections.removeAll() }
            return Array(state.connections.values)
        }
        for channel in toClose { channel.close(promise: nil) }
        if mode != .stall && mode != .drop {
            // Release what stalled connections held.
            for channel in state.withLock({ Array($0.connections.values) }) {
                channel.eventLoop.execute { channel.pipeline.fireUserInboundEventTriggered(ProxyRelease()) }
            }
        }
    }

    /// Listens on 127.0.0.1:`port` (0: any free port); returns the port.
    public func start(port: Int = 0) async throws -> Int {
        let target = self.target
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // Nothing is read from a new connection until its other side is connected.
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { [self] inbound in
                if self.mode == .drop { return inbound.close() }
                let id = ObjectIdentifier(inbound)
                state.withLock { $0.connections[id] = inbound }
                inbound.closeFuture.whenComplete { [self] _ in _ = state.withLock { $0.connections.removeValue(forKey: id) } }
                return ClientBootstrap(group: inbound.eventLoop)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .connectTimeout(.seconds(2))
                    .channelInitializer { outbound in
                        // Known too, so what it held back (answers to the
                        // connecting side) is released at a heal as well.
                        let outboundID = ObjectIdentifier(outbound)
                        self.state.withLock { $0.connections[outboundID] = outbound }
                        outbound.closeFuture.whenComplete { [self] _ in _ = self.state.withLock { $0.connections.removeValue(forKey: outboundID) } }
                        return outbound.eventLoop.makeCompletedFuture {
                            try outbound.pipeline.syncOperations.addHandler(ProxyHandler(peer: inbound, proxy: self))
                        }
                    }
                    .connect(to: target)
                    .flatMapThrowing { outbound in
                        try inbound.pipeline.syncOperations.addHandler(ProxyHandler(peer: outbound, proxy: self))
                        try inbound.syncOptions?.setOption(.autoRead, value: true)
                        inbound.closeFuture.whenComplete { _ in outbound.close(promise: nil) }
                        outbound.closeFuture.whenComplete { _ in inbound.close(promise: nil) }
                    }
                    .flatMapErrorThrowing { error in
                        inbound.close(promise: nil)
                        throw error
                    }
            }
            .bind(to: try SocketAddress(ipAddress: "127.0.0.1", port: port)).get()
        server.withLock { $0 = channel }
        return channel.localAddress?.port ?? 0
    }

    public func stop() async {
        set(.drop)
        try? await server.withLock { $0 }?.close()
    }
}

/// Tells a stalled handler to send on what it held.
struct ProxyRelease {}

/// Forwards what one side reads to the other, as the proxy's mode says.
private final class ProxyHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let peer: any Channel
    private let proxy: FaultProxy
    private var held: [ByteBuffer] = []
    private var heldBytes = 0
    /// Chunks waiting out a delay: when each may go.
    private var delayed: [(due: NIODeadline, buffer: ByteBuffer)] = []
    private var drainScheduled = false

    init(peer: any Channel, proxy: FaultProxy) {
        self.peer = peer
        self.proxy = proxy
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        switch proxy.mode {
        case .pass:
            flushHeld()
            guard delayed.isEmpty else { return queue(buffer, after: 0, context: context) }
            peer.writeAndFlush(buffer, promise: nil)
        case .drop:
            context.close(promise: nil)
        case .stall:
            held.append(buffer)
            heldBytes += buffer.readableBytes
            if heldBytes > FaultProxy.stallBytesMax { context.close(promise: nil) }
        case .delay(let milliseconds):
            flushHeld()
            queue(buffer, after: milliseconds, context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ProxyRelease { flushHeld() } else { context.fireUserInboundEventTriggered(event) }
    }

    private func flushHeld() {
        guard !held.isEmpty else { return }
        for buffer in held { peer.write(buffer, promise: nil) }
        peer.flush()
        held.removeAll()
        heldBytes = 0
    }

    /// Keeps order: a chunk never overtakes one delayed before it.
    private func queue(_ buffer: ByteBuffer, after milliseconds: Int, context: ChannelHandlerContext) {
        let due = max(NIODeadline.now() + .milliseconds(Int64(milliseconds)), delayed.last?.due ?? .uptimeNanoseconds(0))
        delayed.append((due, buffer))
        scheduleDrain(context: context)
    }

    private func scheduleDrain(context: ChannelHandlerContext) {
        guard !drainScheduled, let first = delayed.first else { return }
        drainScheduled = true
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(deadline: first.due) {
            let (handler, context) = loopBound.value
            handler.drainScheduled = false
            let now = NIODeadline.now()
            while let first = handler.delayed.first, first.due <= now {
                handler.peer.write(first.buffer, promise: nil)
                handler.delayed.removeFirst()
            }
            handler.peer.flush()
            handler.scheduleDrain(context: context)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
