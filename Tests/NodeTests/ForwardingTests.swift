import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
@testable import Node
import Synchronization
import Testing
import Transport

@Suite("Forwarding to the leader")
struct ForwardingTests {
    @Test("Past its bound of requests in flight a follower answers 503 overloaded at once and sends nothing; the slot comes back when a forward ends")
    func inFlightBound() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // A "leader" that accepts TCP and never speaks TLS: a forward to it
        // stays in flight until the client's 3 s handshake deadline.
        let accepted = Atomic(0)
        let silent = try await ServerBootstrap(group: group)
            .childChannelInitializer { _ in
                accepted.wrappingAdd(1, ordering: .relaxed)
                return group.any().makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let ca = try ClusterCA.create(clusterID: "forward")
        let forwarder = try Forwarder(identity: try ca.issueNodeIdentity(2), inFlightMax: 1)
        let address = try HostPort(parsing: "127.0.0.1:\(silent.localAddress!.port!)", at: "leader")
        let request = HTTPRequest(method: .POST, path: "/v1/svid/jwt", query: [:], headers: HTTPHeaders([("content-type", "application/json")]),
                                  body: Array(#"{"token":"t","audience":["a"]}"#.utf8), caller: .anonymous)
        @Sendable func forwarded() async -> String? {
            do {
                _ = try await forwarder.forward(request, to: 1, at: address, actor: "anonymous")
                return nil
            } catch {
                return (error as? APIError)?.code ?? "\(error)"
            }
        }

        let firstEnded = Atomic(false)
        let first = Task {
            let outcome = await forwarded()
            firstEnded.store(true, ordering: .relaxed)
            return outcome
        }
        // (Generous: other suites' tasks may hold the shared pool's threads a while before it starts.)
        #expect(await eventuallyTrue(seconds: 60) { accepted.load(ordering: .relaxed) == 1 }, "the first forward connects")
        #expect(await forwarded() == "overloaded")
        // Refused at once, not after waiting for the slot (a timed bound
        // here failed when a busy machine held the test a second).
        let firstEndedBeforeRefusal = firstEnded.load(ordering: .relaxed)
        #expect(!firstEndedBeforeRefusal, "refused while the first was still in flight")
        #expect(accepted.load(ordering: .relaxed) == 1, "the refused forward opened no connection")
        #expect(await first.value == "leader_unreachable", "the first ends at its handshake deadline")
        // Its slot is free again: the next forward is tried (and fails the same way, not as overloaded).
        #expect(await forwarded() == "leader_unreachable")
        #expect(accepted.load(ordering: .relaxed) == 2)
        try await silent.close()
        try await group.shutdownGracefully()
    }

    @Test("A path with nothing to encode is sent as it is; one with spaces, percent signs or non-ASCII is encoded as Foundation does")
    func pathEncoding() {
        for path in ["/v1/svid/x509", "/v1/documents/a-b_c.d~e/F9"] { #expect(Forwarder.encodedPath(path) == path) }
        for path in ["/v1/documents/a b", "/v1/documents/50%", "/v1/documents/é", "/v1/documents/a?b#c"] {
            #expect(Forwarder.encodedPath(path) == path.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed))
            #expect(Forwarder.encodedPath(path) != path)
        }
    }

    @Test("A request made on one of the pool's loops goes over a connection of that loop; one made elsewhere takes any")
    func connectionOnTheCallersLoop() async throws {
        // One server thread: every connection's responder runs on it and shares the gate.
        let serverGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let gate = AnswerGate()
        let server = try await ServerBootstrap(group: serverGroup)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(OKResponder(gate: gate))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let loops = Array(group.makeIterator())
        let pool = HTTPConnectionPool(address: server.localAddress!, tls: nil, group: group)
        func ask(on loop: (any EventLoop)?) async throws -> HTTPResponseStatus {
            guard let loop else { return try await pool.request(.GET, "/").status }
            return try await Task(executorPreference: EventLoopTaskExecutor(loop: loop)) {
                #expect(loop.inEventLoop, "the task runs on the loop")
                return try await pool.request(.GET, "/").status
            }.value
        }
        #expect(try await ask(on: loops[1]) == .ok)
        #expect(pool.idleEventLoops.map { ObjectIdentifier($0) } == [ObjectIdentifier(loops[1])])
        // The idle connection is on the other loop: a new one is made on this one.
        #expect(try await ask(on: loops[0]) == .ok)
        #expect(Set(pool.idleEventLoops.map { ObjectIdentifier($0) }) == Set(loops.map { ObjectIdentifier($0) }))
        #expect(try await ask(on: loops[1]) == .ok)
        #expect(pool.idleEventLoops.count == 2, "reused, not a third")
        // From outside the group: whichever is idle.
        #expect(try await ask(on: nil) == .ok)
        #expect(pool.idleEventLoops.count == 2)
        await pool.closeAll()

        // Full of one loop's connections: another loop's returning one
        // takes the place of one of them, not closed for want of room.
        let small = HTTPConnectionPool(address: server.localAddress!, tls: nil, idleMax: 2, group: group)
        func askSmall(on loop: any EventLoop) async throws -> HTTPResponseStatus {
            try await Task(executorPreference: EventLoopTaskExecutor(loop: loop)) { try await small.request(.GET, "/").status }.value
        }
        // The server holds its answers until both requests are in, so the
        // second cannot reuse the first's connection however the two are scheduled.
        try await serverGroup.next().submit { gate.needed = 2 }.get()
        async let first = askSmall(on: loops[0])
        async let second = askSmall(on: loops[0])
        #expect(try await [first, second] == [.ok, .ok])
        try await serverGroup.next().submit { gate.needed = 1 }.get()
        #expect(small.idleEventLoops.map { ObjectIdentifier($0) } == [ObjectIdentifier(loops[0]), ObjectIdentifier(loops[0])], "two at once: two connections")
        #expect(try await askSmall(on: loops[1]) == .ok)
        #expect(Set(small.idleEventLoops.map { ObjectIdentifier($0) }) == Set(loops.map { ObjectIdentifier($0) }), "one of each loop kept")
        await small.closeAll()
        try await server.close()
        try await group.shutdownGracefully()
        try await serverGroup.shutdownGracefully()
    }
}

/// Answers are held until `needed` requests are waiting, then all are
/// answered. Touched only on the (single) server loop.
private final class AnswerGate: @unchecked Sendable {
    var needed = 1
    var waiting: [ChannelHandlerContext] = []
}

private final class OKResponder: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let gate: AnswerGate

    init(gate: AnswerGate) { self.gate = gate }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .end = unwrapInboundIn(data) else { return }
        gate.waiting.append(context)
        guard gate.waiting.count >= gate.needed else { return }
        for held in gate.waiting {
            var head = HTTPResponseHead(version: .http1_1, status: .ok)
            head.headers.add(name: "content-length", value: "0")
            held.write(wrapOutboundOut(.head(head)), promise: nil)
            held.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
        gate.waiting.removeAll()
    }
}

/// Whether `condition` holds within `seconds` (polled every 10 ms).
func eventuallyTrue(seconds: Double = 10, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}
