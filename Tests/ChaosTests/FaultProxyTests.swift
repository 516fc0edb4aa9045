import ClusterHarness
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Node
import Synchronization
import Testing

@Suite("Fault-injecting proxy")
struct FaultProxyTests {
    /// An HTTPS server (the test OIDC provider) reached through the proxy.
    @Test("pass forwards, drop closes and refuses, delay holds every chunk, stall holds bytes until released, one direction at a time")
    func modes() async throws {
        let server = try TestIssuer(keys: [.ecdsaP256])
        try await server.serve()
        defer { Task { await server.stop() } }
        let port = Int(server.issuer.split(separator: ":").last!)!
        let proxy = FaultProxy(target: try SocketAddress(ipAddress: "127.0.0.1", port: port))
        let proxyPort = try await proxy.start()
        defer { Task { await proxy.stop() } }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(server.caPEM.utf8)))
        let tls = try NIOSSLContext(configuration: configuration)
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: proxyPort)
        // Generous timeouts: other suites may be keeping both cores busy.
        func fetch(timeout: TimeAmount = .seconds(15)) async -> (ok: Bool, seconds: Double) {
            let start = ContinuousClock.now
            do {
                let connection = try await HTTPConnection.connect(to: address, tls: tls, timeout: timeout)
                defer { Task { await connection.close() } }
                let response = try await connection.request(.GET, "/jwks", timeout: timeout)
                return (response.status == .ok, Double(start.duration(to: .now).components.attoseconds) / 1e18 + Double(start.duration(to: .now).components.seconds))
            } catch {
                return (false, 0)
            }
        }
        #expect(await fetch().ok, "pass")
        proxy.set(.drop)
        #expect(await !fetch(timeout: .seconds(3)).ok, "drop")
        proxy.set(.delay(milliseconds: 150))
        let delayed = await fetch()
        // The TLS handshake and the request cross the proxy several times.
        #expect(delayed.ok && delayed.seconds >= 0.3, "delay: \(delayed)")
        proxy.set(.pass)
        // (Only correctness here: on a loaded machine a passing fetch may take as long as a delayed one.)
        #expect(await fetch().ok, "pass again after delay")
        // A stalled connection moves nothing; switching back releases what was held.
        let connection = try await HTTPConnection.connect(to: address, tls: tls)
        #expect(try await connection.request(.GET, "/jwks").status == .ok)
        proxy.set(.stall)
        let held = Task { try await connection.request(.GET, "/jwks", timeout: .seconds(15)) }
        try await Task.sleep(for: .milliseconds(400))
        let before = server.jwksFetches
        proxy.set(.pass)
        #expect(try await held.value.status == .ok)
        #expect(server.jwksFetches == before + 1, "the held request reached the server only after the stall")
        await connection.close()
    }

    /// Notes each chunk it reads; answers "pong" when told to.
    private final class PongOnCue: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let channel = Mutex<(any Channel)?>(nil)
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { channel.withLock { $0 = context.channel } }
        func pong() { channel.withLock { $0 }?.writeAndFlush(ByteBuffer(string: "pong"), promise: nil) }
    }

    /// Collects what a client connection reads.
    private final class Collect: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let received = Mutex("")
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            received.withLock { $0 += String(buffer: buffer) }
        }
    }

    @Test("A heal releases bytes held in both directions: an answer the server sent while the link was stalled arrives once it passes again")
    func stallReleasesAnswers() async throws {
        let cue = PongOnCue()
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(cue) } }
            .bind(to: try SocketAddress(ipAddress: "127.0.0.1", port: 0)).get()
        defer { server.close(promise: nil) }
        let proxy = FaultProxy(target: try #require(server.localAddress))
        let proxyPort = try await proxy.start()
        defer { Task { await proxy.stop() } }
        let collect = Collect()
        let client = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collect) } }
            .connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: proxyPort)).get()
        defer { client.close(promise: nil) }
        try await client.writeAndFlush(ByteBuffer(string: "ping"))
        // The ping has passed; the pong comes back while the link is stalled.
        var pinged = false
        for _ in 0..<1_000 where !pinged {
            pinged = cue.channel.withLock { $0 } != nil
            if !pinged { try await Task.sleep(for: .milliseconds(10)) }
        }
        try #require(pinged, "the ping reached the server")
        proxy.set(.stall)
        cue.pong()
        try await Task.sleep(for: .milliseconds(300))
        #expect(collect.received.withLock { $0 }.isEmpty, "held while stalled")
        proxy.set(.pass)
        var arrived = false
        for _ in 0..<1_000 where !arrived {
            arrived = collect.received.withLock { $0 } == "pong"
            if !arrived { try await Task.sleep(for: .milliseconds(10)) }
        }
        #expect(arrived, "the held answer arrives at the heal, without waiting for more traffic")
    }
}
