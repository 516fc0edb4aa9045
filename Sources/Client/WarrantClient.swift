import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Node
import Synchronization

/// What a job or agent uses to reach the cluster: several endpoints, TLS
/// pinned to the cluster's CA (nothing else is trusted), the node that
/// answered last tried first, an endpoint that failed set aside for a
/// while, and every request retried on the next endpoint when its answer
/// was lost or the node could not serve it. Requests that change state are
/// retried only with the same body, so an idempotency key in it makes a
/// retry return the same identity rather than a second one.
public final class WarrantClient: Sendable {
    public struct Failure: Error, CustomStringConvertible, Sendable {
        /// What each endpoint said, in the order tried.
        public var attempts: [String]
        public var description: String {
            "no cluster endpoint could answer: " + attempts.joined(separator: "; ")
        }
    }

    public let endpoints: [HostPort]
    private let pools: [HTTPConnectionPool]
    private let state = Mutex<(preferred: Int, setAsideUntil: [ContinuousClock.Instant?], nodeAt: [Int: UInt64])>((0, [], [:]))
    public let timeout: TimeAmount
    /// How long an endpoint that failed is tried only after the others.
    static let setAside: Duration = .seconds(10)

    /// `certificatePEM`/`keyPEM`: a client certificate to present (a
    /// workload's X509-SVID, for renewal over mutual TLS).
    public init(endpoints: [HostPort], caPEM: String, certificatePEM: String? = nil, keyPEM: String? = nil, timeout: TimeAmount = .seconds(10)) throws {
        guard !endpoints.isEmpty else { throw Failure(attempts: ["no cluster endpoints were given"]) }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(caPEM.utf8)))
        configuration.additionalTrustRoots = []
        // Node certificates name the node (a URI) and its API addresses;
        // the chain to the cluster CA is what is pinned.
        configuration.certificateVerification = .noHostnameVerification
        if let certificatePEM, let keyPEM {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(certificatePEM.utf8)).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem))
        }
        let tls = try NIOSSLContext(configuration: configuration)
        self.endpoints = endpoints
        // Names are looked up at each connection, without blocking: one
        // that does not resolve is that endpoint's failure, not the client's.
        pools = endpoints.map { HTTPConnectionPool(host: $0.host, port: $0.port, tls: tls, idleMax: 2) }
        self.timeout = timeout
        state.withLock { $0.setAsideUntil = Array(repeating: nil, count: endpoints.count) }
    }

    /// The endpoints in the order to try them: the preferred one, then the
    /// rest, endpoints set aside last.
    func order() -> [Int] {
        let now = ContinuousClock.now
        return state.withLock { state in
            let rotated = (0..<pools.count).map { (state.preferred + $0) % pools.count }
            let healthy = rotated.filter { state.setAsideUntil[$0].map { $0 <= now } ?? true }
            return healthy + rotated.filter { !healthy.contains($0) }
        }
    }

    /// Sends the request to each endpoint in turn until one gives an
    /// answer that is not "unavailable" (503) and not a lost connection.
    public func request(_ method: HTTPMethod, _ path: String, json body: [UInt8] = []) async throws -> HTTPClientResponse {
        var attempts: [String] = []
        for index in order() {
            let endpoint = endpoints[index]
            do {
                let response = try await pools[index].request(method, path, headers: [("content-type", "application/json")], body: body, timeout: timeout)
                if response.status == .serviceUnavailable {
                    attempts.append("\(endpoint): \(Self.reason(response))")
                    continue
                }
                learn(from: response, at: index)
                return response
            } catch where Task.isCancelled {
                // The caller gave up: no fault of the endpoint's, none tried after it.
                throw CancellationError()
            } catch {
                attempts.append("\(endpoint): \(error)")
                let until = ContinuousClock.now.advanced(by: Self.setAside)
                state.withLock { $0.setAsideUntil[index] = until }
            }
        }
        throw Failure(attempts: attempts)
    }

    /// Follows the leader: a direct answer from the leader (`warrant-leader`
    /// alone) names the endpoint's node; a forwarded one names the follower
    /// (`warrant-forwarded-by`) and the leader. The leader's endpoint is
    /// preferred once known; until then, a forwarded answer moves the
    /// preference to an endpoint whose node is not known yet, so the
    /// client finds the leader within a few requests.
    private func learn(from response: HTTPClientResponse, at index: Int) {
        let leader = response.headers.first(name: "warrant-leader").flatMap(UInt64.init)
        let forwardedBy = response.headers.first(name: "warrant-forwarded-by").flatMap(UInt64.init)
        state.withLock { state in
            state.setAsideUntil[index] = nil
            if let forwardedBy { state.nodeAt[index] = forwardedBy } else if let leader { state.nodeAt[index] = leader }
            guard let leader, forwardedBy != nil else {
                state.preferred = index
                return
            }
            if let known = state.nodeAt.first(where: { $0.value == leader })?.key {
                state.preferred = known
            } else if let unknown = (1..<pools.count).map({ (index + $0) % pools.count }).first(where: { state.nodeAt[$0] == nil }) {
                state.preferred = unknown
            } else {
                state.preferred = index
            }
        }
    }

    /// The endpoint tried first next (the leader's, once found).
    public var preferredEndpoint: HostPort { endpoints[state.withLock { $0.preferred }] }

    static func reason(_ response: HTTPClientResponse) -> String {
        let object = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["error"] as? [String: Any]
        return "\(response.status.code) \(object?["code"] as? String ?? "")".trimmingCharacters(in: .whitespaces)
    }

    public func close() async {
        for pool in pools { await pool.closeAll() }
    }
}

/// Idempotency keys for a job's identity requests: one per attempt (a
/// `nonce` kept across the retries of one renewal) and per evidence
/// presented (the platform token, or the certificate renewed from). A
/// retry after an answer was lost (504 outcome_unknown, a timeout) is
/// given the identity already issued, so a platform token usable once is
/// not refused as spent; a new token or certificate gets a new key, never
/// a conflict with the answer kept for the old one.
public enum IdempotencyKey {
    public static func derive(nonce: String, evidence: String) -> String {
        // The nonce's length first: no two pairs hash the same text.
        AuthorityService.hash("\(nonce.utf8.count):\(nonce)\(evidence)")
    }
}
