import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL

/// The operator's client: mutual TLS with the admin certificate, several
/// endpoints, failing over to the next when one does not answer (a node
/// that is down, or one that says no leader is known yet).
public final class AdminClient: Sendable {
    public let endpoints: [SocketAddress]
    private let pools: [HTTPConnectionPool]

    public init(endpoints: [SocketAddress], caPEM: String, certificatePEM: String, keyPEM: String) throws {
        guard !endpoints.isEmpty else { throw HTTPClientError(description: "no endpoints given") }
        let tls = try Self.tlsContext(caPEM: caPEM, certificatePEM: certificatePEM, keyPEM: keyPEM)
        self.endpoints = endpoints
        pools = endpoints.map { HTTPConnectionPool(address: $0, tls: tls, idleMax: 4) }
    }

    /// The admin's TLS client context for the cluster in `directory`.
    public static func tlsContext(clusterDirectory directory: String) throws -> NIOSSLContext {
        try tlsContext(caPEM: ClusterFiles.read("\(directory)/ca.pem"), certificatePEM: ClusterFiles.read("\(directory)/admin.pem"),
                       keyPEM: ClusterFiles.read("\(directory)/admin.key"))
    }

    static func tlsContext(caPEM: String, certificatePEM: String, keyPEM: String) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(caPEM.utf8)))
        configuration.additionalTrustRoots = []
        configuration.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(certificatePEM.utf8)).map { .certificate($0) }
        configuration.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem))
        // Node certificates name the node (a URI), not a host: the chain to
        // the cluster CA is what is checked.
        configuration.certificateVerification = .noHostnameVerification
        return try NIOSSLContext(configuration: configuration)
    }

    /// A client for the cluster whose files `cluster init` wrote to
    /// `directory`, with the admin certificate and key there (`admin.pem`,
    /// `admin.key`) or at the paths given.
    public convenience init(clusterDirectory directory: String, endpoints: [SocketAddress]? = nil,
                            certificatePath: String? = nil, keyPath: String? = nil) throws {
        let listing = try ClusterListing(directory: directory)
        let addresses = try endpoints ?? listing.members.map { try SocketAddress.makeAddressResolvingHost($0.api.host, port: $0.api.port) }
        try self.init(endpoints: addresses, caPEM: ClusterFiles.read("\(directory)/ca.pem"),
                      certificatePEM: ClusterFiles.read(certificatePath ?? "\(directory)/admin.pem"),
                      keyPEM: ClusterFiles.read(keyPath ?? "\(directory)/admin.key"))
    }

    /// Sends to one endpoint.
    public func request(at endpoint: Int, _ method: HTTPMethod, _ uri: String, headers: [(String, String)] = [], body: [UInt8] = [],
                        timeout: TimeAmount = .seconds(10)) async throws -> HTTPClientResponse {
        try await pools[endpoint].request(method, uri, headers: headers, body: body, timeout: timeout)
    }

    /// Sends to the first endpoint that takes the request; returns the last
    /// answer or error if none does. A read (GET, HEAD) goes on to the next
    /// endpoint after any failure or 503. Anything else goes on only while
    /// it surely was not applied: it could not be sent, or the answer is a
    /// 503 other than `node_stopped` (a node that stopped while applying
    /// may have applied it). A write sent without an answer fails at once
    /// (its outcome unknown): sent again elsewhere it could be applied
    /// twice (`ca rotate --force` rotating twice, two tokens made).
    public func request(_ method: HTTPMethod, _ uri: String, headers: [(String, String)] = [], body: [UInt8] = [],
                        timeout: TimeAmount = .seconds(10), startingAt first: Int = 0) async throws -> HTTPClientResponse {
        let reads = method == .GET || method == .HEAD
        var lastError: (any Error)?
        var lastResponse: HTTPClientResponse?
        for offset in pools.indices {
            let index = (first + offset) % pools.count
            do {
                let response = try await request(at: index, method, uri, headers: headers, body: body, timeout: timeout)
                if response.status != .serviceUnavailable { return response }
                if !reads && Self.errorCode(of: response) == "node_stopped" { return response }
                lastResponse = response
            } catch where Task.isCancelled {
                // The caller gave up: no other node is asked, no earlier answer stands for it.
                throw CancellationError()
            } catch {
                if !reads, (error as? HTTPClientError)?.requestSent == true { throw error }
                lastError = error
            }
        }
        if let lastResponse { return lastResponse }
        throw lastError ?? HTTPClientError(description: "no endpoint answered")
    }

    /// The `error.code` of an API error body, if it is one.
    static func errorCode(of response: HTTPClientResponse) -> String? {
        ((try? JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any])
            .flatMap { $0["error"] as? [String: Any] }.flatMap { $0["code"] as? String }
    }

    public func closeAll() async {
        for pool in pools { await pool.closeAll() }
    }
}
