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

    /// Sends to the first endpoint that answers with something other than
    /// 503; returns the last answer or error if none does.
    public func request(_ method: HTTPMethod, _ uri: String, headers: [(String, String)] = [], body: [UInt8] = [],
                        timeout: TimeAmount = .seconds(10), startingAt first: Int = 0) async throws -> HTTPClientResponse {
        var lastError: (any Error)?
        var lastResponse: HTTPClientResponse?
        for offset in pools.indices {
            let index = (first + offset) % pools.count
            do {
                let response = try await request(at: index, method, uri, headers: headers, body: body, timeout: timeout)
                if response.status != .serviceUnavailable { return response }
                lastResponse = response
            } catch {
                lastError = error
            }
        }
        if let lastResponse { return lastResponse }
        throw lastError ?? HTTPClientError(description: "no endpoint answered")
    }

    public func closeAll() async {
        for pool in pools { await pool.closeAll() }
    }
}
