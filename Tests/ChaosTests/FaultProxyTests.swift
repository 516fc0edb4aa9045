import ClusterHarness
import Foundation
import NIOCore
import NIOSSL
import Node
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
}
