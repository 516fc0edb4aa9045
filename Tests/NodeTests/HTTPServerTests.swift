import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
@testable import Node
import Synchronization
import Testing
import Transport

/// The API's HTTP/1.1 layer, spoken to byte for byte over TLS: pipelined
/// requests, bytes that are not HTTP, HEAD, HTTP/1.0 and oversized bodies.
@Suite("HTTP server", .serialized)
struct HTTPServerTests {
    /// Reads everything a TLS connection receives until it closes or `until` holds.
    private final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let received = Mutex<[UInt8]>([])
        let closed = Mutex(false)
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            received.withLock { $0 += buffer.readableBytesView }
        }
        func channelInactive(context: ChannelHandlerContext) {
            closed.withLock { $0 = true }
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }

    private struct Exchange {
        var text: String
        var closed: Bool
    }

    private struct Server {
        let group: MultiThreadedEventLoopGroup
        let server: HTTPServer
        let address: SocketAddress
        let identity: NodeIdentity
        let counters: Counters
        var handled: Int { counters.handled.load(ordering: .relaxed) }
    }

    /// A server whose handler echoes the body, after `delay` ms from the
    /// query (so a later request could finish first), counting how many run at once.
    /// `plain`: the query's delay and 503 are ignored (a node that answers at once).
    /// `oneConnection`: the client uses one connection at a time, so no two
    /// requests may run at once. `unavailable`: every request is answered
    /// 503 with this code at once (a node without a leader).
    private static func withServer(ca given: ClusterCA? = nil, plain: Bool = false, unavailable: String? = nil, oneConnection: Bool = true,
                                   limits change: (inout HTTPServerLimits) -> Void = { _ in },
                                   _ body: (Server) async throws -> Void) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ca = try given ?? ClusterCA.create(clusterID: "http-test")
        let identity = try ca.issueNodeIdentity(1, hosts: ["127.0.0.1"])
        let counters = Counters()
        let server = try HTTPServer(group: group, identity: identity, limits: { var l = HTTPServerLimits(); l.requestBodyBytesMax = 1_000; change(&l); return l }(),
                                    refused: { request, error in
                                        counters.refused.withLock { $0.append("\(request.method.rawValue) \(request.path) \(request.body.count) \(error.code)") }
                                    }) { request in
            if let unavailable {
                counters.handled.wrappingAdd(1, ordering: .relaxed)
                return APIError.unavailable(unavailable, "unavailable for the test").response
            }
            let now = counters.running.wrappingAdd(1, ordering: .relaxed).newValue
            counters.mostAtOnce.max(now)
            if !plain, let delay = request.query["delay"].flatMap(Int.init) { try? await Task.sleep(for: .milliseconds(delay)) }
            counters.running.wrappingSubtract(1, ordering: .relaxed)
            counters.handled.wrappingAdd(1, ordering: .relaxed)
            if let size = request.query["size"].flatMap(Int.init) { return HTTPResponse(status: .ok, body: [UInt8](repeating: 0x61, count: size)) }
            if !plain, let code = request.query["unavailable"] { return APIError.unavailable(code, "unavailable for the test").response }
            return HTTPResponse(status: .ok, headers: [("content-type", "text/plain"), ("Content-Length", "999")],
                                body: Array("\(request.method.rawValue) \(request.path) ".utf8) + request.body)
        }
        let address = try await server.start(at: try SocketAddress(ipAddress: "127.0.0.1", port: 0))
        do {
            try await body(Server(group: group, server: server, address: address, identity: identity, counters: counters))
            #expect(!oneConnection || counters.mostAtOnce.load() <= 1, "requests on one connection ran at once")
        } catch {
            await server.stop()
            try await group.shutdownGracefully()
            throw error
        }
        await server.stop()
        try await group.shutdownGracefully()
    }

    private final class Counters: Sendable {
        let running = Atomic<Int>(0)
        let handled = Atomic<Int>(0)
        let mostAtOnce = MaxCounter()
        /// What the server refused itself: method, path, body size, error code.
        let refused = Mutex<[String]>([])
    }

    final class MaxCounter: Sendable {
        private let value = Atomic<Int>(0)
        func max(_ candidate: Int) {
            var seen = value.load(ordering: .relaxed)
            while candidate > seen {
                let (exchanged, original) = value.compareExchange(expected: seen, desired: candidate, ordering: .relaxed)
                if exchanged { return }
                seen = original
            }
        }
        func load() -> Int { value.load(ordering: .relaxed) }
    }

    /// Sends `bytes` in one write and collects the answer until the server
    /// closes, `expectedResponses` status lines have arrived, or 30 s pass.
    /// With `awaitClose`, waits (as long) for the close the test expects
    /// after the answers; without, lingers 150 ms for one that should not
    /// come (a stall then only hides a close, it never fails the test).
    private static func exchange(_ server: Server, _ bytes: String, expectedResponses: Int, awaitClose: Bool = false) async throws -> Exchange {
        try await exchange(server, [bytes], expectedResponses: expectedResponses, awaitClose: awaitClose)
    }

    /// A client's TLS, trusting the server's CA.
    private static func clientTLS(_ server: Server) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates([try server.identity.nioCACertificate])
        configuration.certificateVerification = .noHostnameVerification
        return try NIOSSLContext(configuration: configuration)
    }

    /// Connects over TLS (the client's channel, unread after `stopReading`).
    private static func connect(_ server: Server, _ collector: Collector) async throws -> any Channel {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates([try server.identity.nioCACertificate])
        configuration.certificateVerification = .noHostnameVerification
        let tls = try NIOSSLContext(configuration: configuration)
        return try await ClientBootstrap(group: server.group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: nil))
                    try channel.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(to: server.address).get()
    }

    /// Sends each part in a write of its own, 50 ms apart, and collects as `exchange` does.
    private static func exchange(_ server: Server, _ parts: [String], expectedResponses: Int, awaitClose: Bool = false) async throws -> Exchange {
        let collector = Collector()
        let channel = try await connect(server, collector)
        for (index, part) in parts.enumerated() {
            if index > 0 { try await Task.sleep(for: .milliseconds(50)) }
            try? await channel.writeAndFlush(ByteBuffer(string: part))
        }
        // Generous: a busy machine (CI, suites in parallel) once held a
        // three-request exchange past 5 s; a passing exchange ends early.
        let deadline = ContinuousClock.now + .seconds(30)
        func statusLines() -> Int {
            let text = String(decoding: collector.received.withLock { $0 }, as: UTF8.self)
            return text.components(separatedBy: "HTTP/1.1 ").count - 1
        }
        while ContinuousClock.now < deadline, !collector.closed.withLock({ $0 }) {
            // Waits a little past the last response for a close that should not come.
            if statusLines() >= expectedResponses, !awaitClose {
                try await Task.sleep(for: .milliseconds(150))
                break
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        let closed = collector.closed.withLock { $0 }
        try? await channel.close()
        return Exchange(text: String(decoding: collector.received.withLock { $0 }, as: UTF8.self), closed: closed)
    }

    @Test("Pipelined requests are answered in order, one at a time, the slow first one before the quick second")
    func pipelined() async throws {
        try await Self.withServer { server in
            let requests = "POST /slow?delay=150 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nfirst"
                + "POST /quick HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nsecond"
                + "GET /third HTTP/1.1\r\nhost: x\r\n\r\n"
            let answer = try await Self.exchange(server, requests, expectedResponses: 3)
            let first = try #require(answer.text.range(of: "POST /slow first"))
            let second = try #require(answer.text.range(of: "POST /quick second"))
            let third = try #require(answer.text.range(of: "GET /third "))
            #expect(first.lowerBound < second.lowerBound && second.lowerBound < third.lowerBound)
            #expect(!answer.closed)
            // The handler's own content-length is replaced by the true one.
            #expect(answer.text.components(separatedBy: "content-length: 16\r\n").count == 2)
            #expect(!answer.text.contains("999"))
        }
    }

    @Test("Thousands of small requests pipelined in one write are all answered, in order")
    func manyPipelined() async throws {
        try await Self.withServer { server in
            let count = 3_000
            let requests = (0..<count).map { "GET /n\($0) HTTP/1.1\r\nhost: x\r\n\r\n" }.joined()
            let answer = try await Self.exchange(server, requests, expectedResponses: count)
            let bodies = answer.text.components(separatedBy: "\r\n\r\n").dropFirst().map { $0.components(separatedBy: "HTTP/1.1").first ?? "" }
            #expect(bodies.count == count)
            #expect(bodies == (0..<count).map { "GET /n\($0) " })
            #expect(!answer.closed)
        }
    }

    @Test("Bad bytes after a request being answered: its answer still arrives, then the connection closes")
    func answerBeforeBadBytes() async throws {
        try await Self.withServer { server in
            let answer = try await Self.exchange(server, ["POST /slow?delay=5000 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok",
                                                          "NOT HTTP\r\n\r\n", "more bytes after the bad ones\r\n"], expectedResponses: 1, awaitClose: true)
            #expect(answer.text.hasPrefix("HTTP/1.1 200 OK\r\n"))
            #expect(answer.text.contains("connection: close\r\n"))
            #expect(answer.text.hasSuffix("POST /slow ok"))
            #expect(answer.closed)
        }
    }

    @Test("An upgrade or CONNECT request is answered with connection: close, nothing is upgraded, and nothing after it is read")
    func upgradeCloses() async throws {
        try await Self.withServer { server in
            for first in ["GET /u HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                          "CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n"] {
                let answer = try await Self.exchange(server, first + "GET /after HTTP/1.1\r\nhost: x\r\n\r\n", expectedResponses: 1, awaitClose: true)
                #expect(answer.text.hasPrefix("HTTP/1.1 200 OK\r\n"), "\(answer.text)")
                #expect(answer.text.contains("connection: close\r\n"))
                #expect(!answer.text.contains("/after"))
                #expect(answer.closed)
            }
        }
    }

    @Test("A client that pipelines and stops reading stops being answered once its connection is full")
    func unreadAnswersAreBounded() async throws {
        try await Self.withServer { server in
            let collector = Collector()
            let channel = try await Self.connect(server, collector)
            // One answer read (the handshake is done), then nothing more is read.
            try await channel.writeAndFlush(ByteBuffer(string: "GET /first HTTP/1.1\r\nhost: x\r\n\r\n"))
            for _ in 0..<500 where !String(decoding: collector.received.withLock { $0 }, as: UTF8.self).contains("GET /first ") {
                try await Task.sleep(for: .milliseconds(10))
            }
            try await channel.setOption(.autoRead, value: false).get()
            let requests = String(repeating: "GET /big?size=262144 HTTP/1.1\r\nhost: x\r\n\r\n", count: 400)
            try await channel.writeAndFlush(ByteBuffer(string: requests))
            // Waits until the server stops answering (bounded: 5 s).
            var last = -1
            for _ in 0..<50 where server.handled != last {
                last = server.handled
                try await Task.sleep(for: .milliseconds(100))
            }
            // What fits in the sockets' buffers and the channel's write
            // watermark, not the 400 answers of 256 KiB (100 MiB) asked for.
            #expect(server.handled < 150, "\(server.handled) answers made for a client reading nothing")
            try await channel.close()
        }
    }

    @Test("Bytes that are not HTTP/1.1 get 400 bad_http and the connection closes")
    func notHTTP() async throws {
        try await Self.withServer { server in
            let answer = try await Self.exchange(server, "HELLO THERE\r\n\r\n", expectedResponses: 1, awaitClose: true)
            #expect(answer.text.hasPrefix("HTTP/1.1 400 Bad Request\r\n"))
            #expect(answer.text.contains("\"code\":\"bad_http\""))
            #expect(answer.text.contains("connection: close\r\n"))
            #expect(answer.closed)
            // Smuggling-shaped framing (both content-length and chunked) is refused the same way.
            let smuggled = try await Self.exchange(server, "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                                                   expectedResponses: 1, awaitClose: true)
            #expect(smuggled.text.hasPrefix("HTTP/1.1 400 "))
            #expect(smuggled.closed)
        }
    }

    @Test("Past 100 header fields or 32 KiB of header a request gets 400 bad_http and the connection closes; at the limits it is answered")
    func headerLimits() async throws {
        try await Self.withServer { server in
            func request(fields: Int, valueBytes: Int = 1) -> String {
                "GET /ok HTTP/1.1\r\nhost: x\r\n" + (1..<fields).map { "x-\($0): \(String(repeating: "v", count: valueBytes))\r\n" }.joined() + "\r\n"
            }
            let atLimit = try await Self.exchange(server, request(fields: 100), expectedResponses: 1)
            #expect(atLimit.text.hasPrefix("HTTP/1.1 200 OK\r\n"), "\(atLimit.text.prefix(200))")
            for (name, text) in [("101 fields", request(fields: 101)), ("40 KiB in one field", request(fields: 2, valueBytes: 40 << 10)),
                                 ("40 KiB in 20 fields", request(fields: 21, valueBytes: 2 << 10))] {
                let answer = try await Self.exchange(server, text, expectedResponses: 1, awaitClose: true)
                #expect(answer.text.hasPrefix("HTTP/1.1 400 Bad Request\r\n") && answer.text.contains("\"code\":\"bad_http\""), "\(name): \(answer.text.prefix(200))")
                #expect(answer.closed, "\(name)")
            }
        }
    }

    @Test("A request after a bad one on the same connection is not answered, and the good one before it is")
    func goodThenBad() async throws {
        try await Self.withServer { server in
            let answer = try await Self.exchange(server, "GET /ok?delay=100 HTTP/1.1\r\nhost: x\r\n\r\nNOT HTTP\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
                                                 expectedResponses: 2, awaitClose: true)
            #expect(answer.text.hasPrefix("HTTP/1.1 200 OK\r\n"))
            #expect(answer.text.contains("GET /ok "))
            #expect(!answer.text.contains("/never"))
            #expect(answer.closed)
        }
    }

    @Test("HEAD gets the headers with the body's length and no body; HTTP/1.0 without keep-alive is closed after its answer")
    func headAndHTTP10() async throws {
        try await Self.withServer { server in
            let head = try await Self.exchange(server, "HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /after HTTP/1.1\r\nhost: x\r\n\r\n", expectedResponses: 2)
            let parts = head.text.components(separatedBy: "\r\n\r\n")
            #expect(parts.count == 3, "\(head.text)")
            #expect(parts.first?.contains("content-length: 8") == true)
            #expect(parts.dropFirst().first?.hasPrefix("HTTP/1.1 200 OK") == true, "the HEAD answer carried a body")
            let old = try await Self.exchange(server, "GET /old HTTP/1.0\r\n\r\n", expectedResponses: 1, awaitClose: true)
            #expect(old.text.contains("connection: close\r\n"))
            #expect(old.text.hasSuffix("GET /old "))
            #expect(old.closed)
        }
    }

    @Test("A body over the limit gets 413 too_large, the handler never sees it (the refusal hook does, without the body), and the connection closes")
    func oversized() async throws {
        try await Self.withServer { server in
            let body = String(repeating: "x", count: 1_001)
            let answer = try await Self.exchange(server, "POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: 1001\r\n\r\n\(body)GET /next HTTP/1.1\r\n\r\n",
                                                 expectedResponses: 1, awaitClose: true)
            #expect(answer.text.hasPrefix("HTTP/1.1 413 Payload Too Large\r\n"))
            #expect(answer.text.contains("too_large"))
            #expect(!answer.text.contains("/big"))
            #expect(!answer.text.contains("/next"))
            #expect(answer.closed)
            #expect(server.handled == 0)
            #expect(server.counters.refused.withLock { $0 } == ["POST /big 0 too_large"])
        }
    }

    @Test("Response headers that could split a response are refused, framing headers are the writer's own")
    func writerRefusesInjection() {
        var buffer = ByteBufferAllocator().buffer(capacity: 64)
        #expect(HTTPResponseWriter.write(HTTPResponse(status: .ok, headers: [("x", "a\r\nset-cookie: b")]), keepAlive: true, bodyless: false, into: &buffer) == false)
        #expect(HTTPResponseWriter.write(HTTPResponse(status: .ok, headers: [("bad name", "a")]), keepAlive: true, bodyless: false, into: &buffer) == false)
        #expect(HTTPResponseWriter.write(HTTPResponse(status: .ok, headers: [("x", "a\u{0}")]), keepAlive: true, bodyless: false, into: &buffer) == false)
        buffer.clear()
        let ok = HTTPResponseWriter.write(HTTPResponse(status: .created, headers: [("x-a", "1"), ("Transfer-Encoding", "chunked"), ("connection", "upgrade")],
                                                       body: Array("abc".utf8)), keepAlive: true, bodyless: false, into: &buffer)
        #expect(ok)
        #expect(String(buffer: buffer) == "HTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 3\r\n\r\nabc")
    }

    @Test("A request target's path and query are percent-decoded; malformed escapes stay as they are")
    func requestTarget() {
        #expect(RequestTarget.split("/v1/documents/a%2Fb") == ("/v1/documents/a/b", [:]))
        #expect(RequestTarget.split("/plain/path") == ("/plain/path", [:]))
        let (path, query) = RequestTarget.split("/v1/audit?after=10&kind=identity%2Eissue&flag&x%3D=%zz&pct=100%")
        #expect(path == "/v1/audit")
        #expect(query == ["after": "10", "kind": "identity.issue", "flag": "", "x=": "%zz", "pct": "100%"])
        #expect(RequestTarget.split("/a%41%4a?") == ("/aAJ", [:]))
        #expect(RequestTarget.split("/%E2%9C%93") == ("/\u{2713}", [:]))
        #expect(RequestTarget.split("/a%+A%-0%0") == ("/a%+A%-0%0", [:]), "a sign is not a hex digit")
    }

    @Test("A body announced larger than the limit is refused with 413 as soon as the limit is passed, not once the rest arrives, and nothing more is read")
    func oversizedEarly() async throws {
        try await Self.withServer { server in
            let answer = try await Self.exchange(server, "POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000000\r\n\r\n" + String(repeating: "x", count: 2_000),
                                                 expectedResponses: 1, awaitClose: true)
            #expect(answer.text.hasPrefix("HTTP/1.1 413 Payload Too Large\r\n"), "\(answer.text)")
            #expect(answer.closed)
            #expect(server.handled == 0)
        }
    }

    @Test("A request must arrive whole within the receive timeout of its first byte (the first one, of the connection's opening): a trickle or a connection that never says anything is closed; an idle kept-alive connection is not")
    func receiveTimeout() async throws {
        try await Self.withServer(limits: { $0.requestReceiveTimeout = .seconds(2) }) { server in
            let trickle = try await Self.exchange(server, ["GET /slow HTTP/1.1\r\n", "ho"], expectedResponses: 1)
            #expect(trickle.text.isEmpty && trickle.closed, "\(trickle.text)")
            #expect(server.handled == 0)

            // Bare TCP, no TLS handshake.
            let collector = Collector()
            let bare = try await ClientBootstrap(group: server.group)
                .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) } }
                .connect(to: server.address).get()
            for _ in 0..<800 where !collector.closed.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(10)) }
            #expect(collector.closed.withLock { $0 }, "a connection that never shook hands is closed")
            try? await bare.close()

            // Requests each sent at once, with idle time between them longer than the timeout.
            // (2.5 s idle between them.)
            let kept = try await Self.exchange(server, ["GET /one HTTP/1.1\r\nhost: x\r\n\r\n"] + Array(repeating: "", count: 50)
                                                        + ["GET /two HTTP/1.1\r\nhost: x\r\n\r\n"], expectedResponses: 2)
            #expect(kept.text.contains("GET /one ") && kept.text.contains("GET /two ") && !kept.closed, "\(kept.text)")
        }
    }

    @Test("No address gets more than its share of connections: the one over it is closed, and a slot freed is taken again")
    func connectionsPerAddress() async throws {
        try await Self.withServer(limits: { $0.connectionsPerAddressMax = 2 }) { server in
            var open: [(Collector, any Channel)] = []
            for _ in 0..<3 {
                let collector = Collector()
                open.append((collector, try await Self.connect(server, collector)))
            }
            for (collector, channel) in open { try? await channel.writeAndFlush(ByteBuffer(string: "GET /x HTTP/1.1\r\nhost: x\r\n\r\n")); _ = collector }
            for _ in 0..<300 where open.filter({ !$0.0.received.withLock { $0 }.isEmpty }).count < 2 { try await Task.sleep(for: .milliseconds(10)) }
            for _ in 0..<50 { try await Task.sleep(for: .milliseconds(10)) }
            let answered = open.filter { !$0.0.received.withLock { $0 }.isEmpty }.count
            let closed = open.filter { $0.0.closed.withLock { $0 } }.count
            #expect(answered == 2 && closed == 1, "answered \(answered), closed \(closed)")
            for (_, channel) in open { try? await channel.close() }
            try await Task.sleep(for: .milliseconds(100))
            let again = try await Self.exchange(server, "GET /again HTTP/1.1\r\nhost: x\r\n\r\n", expectedResponses: 1)
            #expect(again.text.contains("GET /again "))
        }
    }

    @Test("When every slot is taken, a new connection takes the slot of the one idle longest (past the idle bound): never a busy one, nor one idle a moment; with none to take, the new one is closed")
    func fullServerEvictsTheLongestIdle() async throws {
        // Bounds of seconds, not a fraction: a busy CI machine can hold the
        // test that long between two steps that must both fall within one.
        try await Self.withServer(oneConnection: false, limits: { $0.connectionsMax = 2; $0.evictIdleAfter = .seconds(2) }) { server in
            func open() async throws -> (Collector, any Channel) {
                let collector = Collector()
                return (collector, try await Self.connect(server, collector))
            }
            func answered(_ collector: Collector, _ count: Int = 1) async throws -> Bool {
                for _ in 0..<3_000 {
                    let text = String(decoding: collector.received.withLock { $0 }, as: UTF8.self)
                    if text.components(separatedBy: "HTTP/1.1 200").count - 1 >= count { return true }
                    try await Task.sleep(for: .milliseconds(10))
                }
                return false
            }
            func closed(_ collector: Collector) async throws -> Bool {
                for _ in 0..<3_000 where !collector.closed.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(10)) }
                return collector.closed.withLock { $0 }
            }
            // b: opened first, a slow request under way (busy). a: answered, then idle.
            let (b, bChannel) = try await open()
            try await bChannel.writeAndFlush(ByteBuffer(string: "GET /b?delay=8000 HTTP/1.1\r\nhost: x\r\n\r\n"))
            let (a, aChannel) = try await open()
            try await aChannel.writeAndFlush(ByteBuffer(string: "GET /a HTTP/1.1\r\nhost: x\r\n\r\n"))
            #expect(try await answered(a))
            // a has been idle less than the bound: nothing to take.
            let (c, _) = try await open()
            #expect(try await closed(c), "a new connection is closed when no slot can be freed")
            #expect(!a.closed.withLock { $0 })
            // Past the bound, a (idle) gives its slot; b (busy) keeps it.
            try await Task.sleep(for: .milliseconds(2_500))
            let (d, dChannel) = try await open()
            #expect(try await closed(a), "the idle connection was evicted")
            try await dChannel.writeAndFlush(ByteBuffer(string: "GET /d HTTP/1.1\r\nhost: x\r\n\r\n"))
            #expect(try await answered(d), "the new connection took its slot")
            #expect(try await answered(b), "the busy connection was left to finish")
            #expect(!b.closed.withLock { $0 } && !d.closed.withLock { $0 })
            for channel in [aChannel, bChannel, dChannel] { try? await channel.close() }
        }
    }

    @Test("A connection stays busy while a request pipelined behind one answered at once is answered (not evictable); another node's connection is never taken; evictions are bounded per second")
    func evictionSparesBusyAndNodes() async throws {
        let ca = try ClusterCA.create(clusterID: "http-test")
        try await Self.withServer(ca: ca, oneConnection: false, limits: { $0.connectionsMax = 2; $0.evictIdleAfter = .seconds(2) }) { server in
            func open(_ tls: NIOSSLContext? = nil) async throws -> (Collector, any Channel) {
                let collector = Collector()
                let tls = try tls ?? Self.clientTLS(server)
                let channel = try await ClientBootstrap(group: server.group)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: nil))
                            try channel.pipeline.syncOperations.addHandler(collector)
                        }
                    }
                    .connect(to: server.address).get()
                return (collector, channel)
            }
            func count(_ collector: Collector) -> Int {
                String(decoding: collector.received.withLock { $0 }, as: UTF8.self).components(separatedBy: "HTTP/1.1 200").count - 1
            }
            func settle(_ ms: Int) async throws { try await Task.sleep(for: .milliseconds(ms)) }
            // A quick request answered at once, a slow one pipelined behind it in the same write.
            let (a, aChannel) = try await open()
            try await aChannel.writeAndFlush(ByteBuffer(string: "GET /quick HTTP/1.1\r\nhost: x\r\n\r\nGET /slow?delay=6000 HTTP/1.1\r\nhost: x\r\n\r\n"))
            try await settle(600)
            let (b, bChannel) = try await open()
            let (c, cChannel) = try await open()
            for _ in 0..<3_000 where !c.closed.withLock({ $0 }) || count(a) < 2 { try await settle(10) }
            #expect(count(a) == 2 && !a.closed.withLock { $0 }, "the slow answer was cut: \(count(a)) answers")
            #expect(c.closed.withLock { $0 }, "no slot could be freed: a was busy, b idle a moment")
            for channel in [aChannel, bChannel, cChannel] { try? await channel.close() }
            _ = b
            try await settle(200)

            // Another node's connection (its certificate) and a caller's, both idle past the bound.
            var nodeTLS = TLSConfiguration.makeClientConfiguration()
            let peer = try ca.issueNodeIdentity(2)
            nodeTLS.trustRoots = .certificates([try server.identity.nioCACertificate])
            nodeTLS.certificateVerification = .noHostnameVerification
            nodeTLS.certificateChain = [.certificate(try peer.nioCertificate)]
            nodeTLS.privateKey = .privateKey(try peer.nioPrivateKey)
            let (n, nChannel) = try await open(try NIOSSLContext(configuration: nodeTLS))
            try await nChannel.writeAndFlush(ByteBuffer(string: "GET /n HTTP/1.1\r\nhost: x\r\n\r\n"))
            try await settle(100)
            let (x, xChannel) = try await open()
            try await xChannel.writeAndFlush(ByteBuffer(string: "GET /x HTTP/1.1\r\nhost: x\r\n\r\n"))
            for _ in 0..<3_000 where count(x) < 1 || count(n) < 1 { try await settle(10) }
            try await settle(2_500)
            let (y, yChannel) = try await open()
            for _ in 0..<3_000 where !x.closed.withLock({ $0 }) { try await settle(10) }
            #expect(x.closed.withLock { $0 }, "the caller's idle connection gave its slot")
            #expect(!n.closed.withLock { $0 } && count(n) == 1, "the node's connection, idle longer, was kept")
            try await yChannel.writeAndFlush(ByteBuffer(string: "GET /y HTTP/1.1\r\nhost: x\r\n\r\n"))
            for _ in 0..<3_000 where count(y) < 1 { try await settle(10) }
            #expect(count(y) == 1)
            for channel in [nChannel, xChannel, yChannel] { try? await channel.close() }
        }
    }

    @Test("At most so many evictions a second: past them a new connection is closed even with idle ones to take")
    func evictionsPerSecondBound() async throws {
        try await Self.withServer(oneConnection: false, limits: { $0.connectionsMax = 3; $0.evictIdleAfter = .milliseconds(100); $0.evictionsPerSecondMax = 1 }) { server in
            var held: [(Collector, any Channel)] = []
            for _ in 0..<3 {
                let collector = Collector()
                held.append((collector, try await Self.connect(server, collector)))
            }
            try await Task.sleep(for: .milliseconds(300))
            var fresh: [(Collector, any Channel)] = []
            let started = ContinuousClock.now
            for _ in 0..<3 {
                let collector = Collector()
                fresh.append((collector, try await Self.connect(server, collector)))
            }
            // Each new one either evicts a held one or is closed itself.
            func closedCount(_ list: [(Collector, any Channel)]) -> Int { list.filter { $0.0.closed.withLock { $0 } }.count }
            for _ in 0..<3_000 where closedCount(held) + closedCount(fresh) < 3 { try await Task.sleep(for: .milliseconds(10)) }
            // One a second, counted in seconds of the clock: as many as the
            // seconds the three connections spanned (two when they came
            // within one second; a busy machine may spread them further).
            let windows = Int(started.duration(to: .now).components.seconds) + 2
            let (evicted, refused) = (closedCount(held), closedCount(fresh))
            #expect(evicted >= 1 && evicted <= min(3, windows) && refused == 3 - evicted, "evicted \(evicted), refused \(refused) over \(windows) windows")
            for (_, channel) in held + fresh { try? await channel.close() }
        }
    }

    @Test("Connections count by IP address (an IPv4-mapped one as IPv4)")
    func addressKeys() throws {
        func key(_ text: String) throws -> String { SourceAddress.key(try SocketAddress(ipAddress: text, port: 443)) }
        #expect(try key("2001:db8::1") == key("2001:db8:0:0::1"))
        #expect(try key("2001:db8::1") != key("2001:db8::2"))
        #expect(try key("::ffff:10.1.2.3") == "10.1.2.3")
        #expect(try key("127.0.0.1") == "127.0.0.1")
        #expect(try key("127.0.0.1") != key("127.0.0.2"))
    }

    @Test("The API routes HEAD as GET (the server then leaves the body out), and no other method a route does not take")
    func headRouting() {
        #expect(NodeAPI.match(.HEAD, "/healthz").route?.template == "/healthz")
        #expect(NodeAPI.match(.HEAD, "/v1/documents/a/b").route?.template == "/v1/documents/{name}")
        #expect(NodeAPI.match(.HEAD, "/v1/documents/a/b").parameter == "a/b")
        #expect(NodeAPI.match(.PATCH, "/healthz").route == nil && NodeAPI.match(.PATCH, "/healthz").pathKnown)
    }

    @Test("A client request that was sent and got no answer fails as sent (its outcome unknown); one that could not be sent fails as not sent")
    func clientSentOrNot() async throws {
        try await Self.withServer { server in
            let tls = try Self.clientTLS(server)
            let connection = try await HTTPConnection.connect(to: server.address, tls: tls)
            do {
                _ = try await connection.request(.POST, "/slow?delay=2000", body: Array("x".utf8), timeout: .milliseconds(300))
                Issue.record("answered within 300 ms")
            } catch let error as HTTPClientError {
                #expect(error.requestSent, "\(error)")
            }
            for _ in 0..<200 where connection.isActive { try await Task.sleep(for: .milliseconds(10)) }
            do {
                _ = try await connection.request(.GET, "/after")
                Issue.record("a timed-out connection is closed")
            } catch let error as HTTPClientError {
                #expect(!error.requestSent, "\(error)")
            }
        }
    }

    @Test("A client request whose task is cancelled ends at once with CancellationError, before its answer or its timeout, and closes its connection; one cancelled before it starts sends nothing; the operator's client gives the cancellation, not an earlier node's 503")
    func cancelledRequest() async throws {
        let ca = try ClusterCA.create(clusterID: "http-test")
        try await Self.withServer(ca: ca) { server in
            let tls = try Self.clientTLS(server)
            let connection = try await HTTPConnection.connect(to: server.address, tls: tls)
            let waiting = Task { try await connection.request(.POST, "/slow?delay=10000", body: [1], timeout: .seconds(60)) }
            #expect(await eventuallyTrue(seconds: 30) { server.counters.running.load(ordering: .relaxed) == 1 }, "the server runs the request")
            waiting.cancel()
            await #expect(throws: CancellationError.self) { _ = try await waiting.value }
            #expect(server.handled == 0, "it ended before the server answered")
            #expect(await eventuallyTrue(seconds: 30) { !connection.isActive }, "the connection is closed")

            let second = try await HTTPConnection.connect(to: server.address, tls: tls)
            let early = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                return try await second.request(.POST, "/early", body: [2])
            }
            await #expect(throws: CancellationError.self) { _ = try await early.value }
            #expect(await eventuallyTrue(seconds: 30) { !second.isActive }, "its connection is closed")
            // Once the slow one is answered (to nobody), nothing else came.
            #expect(await eventuallyTrue(seconds: 30) { server.handled == 1 })
            try await Task.sleep(for: .milliseconds(300))
            #expect(server.handled == 1 && server.counters.running.load(ordering: .relaxed) == 0, "the request cancelled before it started was not sent")

            // The operator's client, cancelled while the second node works on
            // a read the first answered 503: the cancellation, not the 503, is
            // what the caller gets.
            let admin = try ca.issueAdminIdentity(name: "alice")
            try await Self.withServer(ca: ca, unavailable: "no_leader") { first in
                try await Self.withServer(ca: ca, oneConnection: false) { slow in
                    let client = try AdminClient(endpoints: [first.address, slow.address], caPEM: try ca.certificate.serializeAsPEM().pemString,
                                                 certificatePEM: try admin.certificate.serializeAsPEM().pemString, keyPEM: admin.privateKey.pemRepresentation)
                    defer { Task { await client.closeAll() } }
                    let read = Task { try await client.request(.GET, "/x?delay=10000", timeout: .seconds(60)) }
                    #expect(await eventuallyTrue(seconds: 30) { slow.counters.running.load(ordering: .relaxed) == 1 })
                    #expect(first.handled == 1)
                    read.cancel()
                    await #expect(throws: CancellationError.self) { _ = try await read.value }
                }
            }
        }
    }

    @Test("The operator's client tries the next node after any failure of a read, but after a write's only while it surely was not applied: not sent, or a 503 other than node_stopped")
    func adminClientFailover() async throws {
        let ca = try ClusterCA.create(clusterID: "http-test")
        let admin = try ca.issueAdminIdentity(name: "alice")
        try await Self.withServer(ca: ca, oneConnection: false) { first in
            try await Self.withServer(ca: ca, plain: true, oneConnection: false) { second in
                let client = try AdminClient(endpoints: [first.address, second.address], caPEM: try ca.certificate.serializeAsPEM().pemString,
                                             certificatePEM: try admin.certificate.serializeAsPEM().pemString, keyPEM: admin.privateKey.pemRepresentation)
                defer { Task { await client.closeAll() } }
                // Sent, no answer in time: a read goes on, a write fails as sent.
                // (The timeout also covers the second node's handshake: 2 s, not less, for a busy machine.)
                #expect(try await client.request(.GET, "/x?delay=5000", timeout: .seconds(2)).status == .ok)
                #expect(second.handled == 1)
                await #expect(throws: HTTPClientError.self) { _ = try await client.request(.POST, "/x?delay=5000", body: [1], timeout: .seconds(2)) }
                #expect(second.handled == 1, "a write sent without an answer is not sent again elsewhere")
                // A 503 that surely did nothing: a write goes on too.
                #expect(try await client.request(.POST, "/x?unavailable=no_leader", body: [1]).status == .ok)
                #expect(second.handled == 2, "no_leader: the next node was asked")
                // A node that stopped while applying may have applied it.
                #expect(try await client.request(.POST, "/x?unavailable=node_stopped", body: [1]).status == .serviceUnavailable)
                #expect(second.handled == 2, "node_stopped: a write is not sent again elsewhere")
                #expect(try await client.request(.GET, "/x?unavailable=node_stopped").status == .ok)
                #expect(second.handled == 3, "a read is")
            }
        }
    }

    @Test("A client's check of the server's certificate runs once the handshake is done and before anything is sent: refused, nothing reaches the server")
    func peerCheck() async throws {
        try await Self.withServer { server in
            let tls = try Self.clientTLS(server)
            let seen = Mutex<[UInt8]>([])
            await #expect(throws: HTTPClientError.self) {
                _ = try await HTTPConnection.connect(to: server.address, tls: tls, peerCheck: { der in
                    seen.withLock { $0 = der }
                    return "not the node asked"
                })
            }
            #expect(seen.withLock { $0 } == (try server.identity.certificateDER), "the check saw the server's certificate")
            let pool = HTTPConnectionPool(address: server.address, tls: tls) { _ in "never" }
            await #expect(throws: HTTPClientError.self) { _ = try await pool.request(.POST, "/secret", body: Array("token".utf8)) }
            #expect(server.handled == 0, "nothing was sent to a server the check refused")
            let accepted = try await HTTPConnection.connect(to: server.address, tls: tls, peerCheck: { _ in nil })
            #expect(try await accepted.request(.GET, "/ok").status == .ok)
            await accepted.close()
        }
    }
}
