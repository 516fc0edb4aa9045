import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization

/// The identity a Workload API serves, as its messages carry it (DER).
public struct WorkloadIdentity: Sendable {
    public var spiffeID: String
    public var trustDomain: String
    /// The X509-SVID's certificate chain, DER, concatenated.
    public var certificateChainDER: [UInt8]
    /// The private key, PKCS#8 DER.
    public var keyDER: [UInt8]
    /// The trust domain's X.509 authorities, DER, concatenated.
    public var bundleDER: [UInt8]
    /// The trust domain's JWT authorities, as a JWKS document.
    public var jwks: [UInt8]
    /// When the X509-SVID expires: after it, nothing is handed out.
    public var notAfter: Date

    public init(spiffeID: String, trustDomain: String, certificateChainDER: [UInt8], keyDER: [UInt8], bundleDER: [UInt8], jwks: [UInt8],
                notAfter: Date = .distantFuture) {
        self.notAfter = notAfter
        self.spiffeID = spiffeID
        self.trustDomain = trustDomain
        self.certificateChainDER = certificateChainDER
        self.keyDER = keyDER
        self.bundleDER = bundleDER
        self.jwks = jwks
    }
}

/// What the server asks of whoever holds the identity (the agent).
public protocol WorkloadIdentitySource: Sendable {
    /// A JWT-SVID for these audiences.
    func jwtSVID(audiences: [String]) async throws -> String
    /// The SPIFFE ID and claims (the token's own, a JSON object in UTF-8)
    /// of a JWT-SVID valid for `audience`, or an error.
    func validate(jwt: String, audience: String) async throws -> (spiffeID: String, claimsJSON: [UInt8])
}

/// Holds the current identity and hands every change to each open stream.
public final class WorkloadIdentityFeed: Sendable {
    private let state = Mutex<(identity: WorkloadIdentity?, subscribers: [UUID: AsyncStream<WorkloadIdentity>.Continuation])>((nil, [:]))

    public init() {}

    public var current: WorkloadIdentity? { state.withLock { $0.identity } }

    /// Yields under the lock (a yield only buffers), so that every stream
    /// gets the identities in the order they were published, and a new
    /// one never gets the identity before last after the last.
    public func publish(_ identity: WorkloadIdentity) {
        state.withLock { state in
            state.identity = identity
            for subscriber in state.subscribers.values { subscriber.yield(identity) }
        }
    }

    /// The current identity (if any) and every later one.
    func subscribe() -> AsyncStream<WorkloadIdentity> {
        let (stream, continuation) = AsyncStream<WorkloadIdentity>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let id = UUID()
        continuation.onTermination = { [weak self] _ in _ = self?.state.withLock { $0.subscribers.removeValue(forKey: id) } }
        state.withLock { state in
            state.subscribers[id] = continuation
            if let current = state.identity { continuation.yield(current) }
        }
        return stream
    }
}

/// Refuses any call without the `workload.spiffe.io: true` header
/// (SPIFFE Workload Endpoint, section 4.3) with InvalidArgument.
struct SecurityHeaderInterceptor: ServerInterceptor {
    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        guard request.metadata[stringValues: "workload.spiffe.io"].contains("true") else {
            throw RPCError(code: .invalidArgument, message: "the workload.spiffe.io: true header is required")
        }
        return try await next(request, context)
    }
}

/// The SPIFFE Workload API (workloadapi.proto): X.509 and JWT SVIDs and
/// bundles, streamed again on every renewal; the streams never end with OK.
final class WorkloadAPIService: SpiffeWorkloadAPI.SimpleServiceProtocol {
    let feed: WorkloadIdentityFeed
    let source: any WorkloadIdentitySource

    init(feed: WorkloadIdentityFeed, source: any WorkloadIdentitySource) {
        self.feed = feed
        self.source = source
    }

    private func identity() throws -> WorkloadIdentity {
        guard let identity = feed.current else { throw RPCError(code: .permissionDenied, message: "no identity is available to this caller") }
        guard identity.notAfter > Date() else { throw RPCError(code: .unavailable, message: "the identity expired and has not been renewed yet") }
        return identity
    }

    /// A stream: a message for the current identity at once and one for
    /// every renewal (never for an expired one); it never ends with OK.
    private func stream<Message: Sendable>(_ response: RPCWriter<Message>, _ message: (WorkloadIdentity) -> Message) async throws {
        _ = try identity()
        for await identity in feed.subscribe() where identity.notAfter > Date() {
            try await response.write(message(identity))
        }
        throw RPCError(code: .unavailable, message: "the agent is shutting down")
    }

    func fetchX509SVID(request: X509SVIDRequest, response: RPCWriter<X509SVIDResponse>, context: ServerContext) async throws {
        try await stream(response) { identity in
            var svid = X509SVID()
            svid.spiffeID = identity.spiffeID
            svid.x509Svid = Data(identity.certificateChainDER)
            svid.x509SvidKey = Data(identity.keyDER)
            svid.bundle = Data(identity.bundleDER)
            var message = X509SVIDResponse()
            message.svids = [svid]
            return message
        }
    }

    func fetchX509Bundles(request: X509BundlesRequest, response: RPCWriter<X509BundlesResponse>, context: ServerContext) async throws {
        try await stream(response) { identity in
            var message = X509BundlesResponse()
            message.bundles = [identity.trustDomain: Data(identity.bundleDER)]
            return message
        }
    }

    func fetchJWTBundles(request: JWTBundlesRequest, response: RPCWriter<JWTBundlesResponse>, context: ServerContext) async throws {
        try await stream(response) { identity in
            var message = JWTBundlesResponse()
            message.bundles = [identity.trustDomain: Data(identity.jwks)]
            return message
        }
    }

    func fetchJWTSVID(request: JWTSVIDRequest, context: ServerContext) async throws -> JWTSVIDResponse {
        let identity = try identity()
        guard !request.audience.isEmpty else { throw RPCError(code: .invalidArgument, message: "at least one audience is required") }
        if !request.spiffeID.isEmpty, request.spiffeID != identity.spiffeID {
            throw RPCError(code: .permissionDenied, message: "this caller has no identity \(request.spiffeID)")
        }
        let token: String
        do {
            token = try await source.jwtSVID(audiences: request.audience)
        } catch let limited as WorkloadRateLimited {
            throw RPCError(code: .resourceExhausted, message: limited.message)
        } catch {
            throw RPCError(code: .unavailable, message: "the cluster did not issue a JWT-SVID: \(error)")
        }
        var svid = JWTSVID()
        svid.spiffeID = identity.spiffeID
        svid.svid = token
        var message = JWTSVIDResponse()
        message.svids = [svid]
        return message
    }

    func validateJWTSVID(request: ValidateJWTSVIDRequest, context: ServerContext) async throws -> ValidateJWTSVIDResponse {
        _ = try identity()
        guard !request.audience.isEmpty, !request.svid.isEmpty else { throw RPCError(code: .invalidArgument, message: "audience and svid are required") }
        let (spiffeID, claims): (String, [UInt8])
        do {
            (spiffeID, claims) = try await source.validate(jwt: request.svid, audience: request.audience)
        } catch let limited as WorkloadRateLimited {
            throw RPCError(code: .resourceExhausted, message: limited.message)
        } catch {
            throw RPCError(code: .invalidArgument, message: "the JWT-SVID is not valid: \(error)")
        }
        var message = ValidateJWTSVIDResponse()
        message.spiffeID = spiffeID
        // The claims with their JWT types (exp a number, aud a string or a list).
        do {
            message.claims = try Google_Protobuf_Struct(jsonUTF8Bytes: claims)
        } catch {
            throw RPCError(code: .internalError, message: "the JWT-SVID's claims could not be read: \(error)")
        }
        return message
    }

    func fetchWITSVID(request: WITSVIDRequest, response: RPCWriter<WITSVIDResponse>, context: ServerContext) async throws {
        throw RPCError(code: .unimplemented, message: "WIT-SVIDs are not issued by Warrant")
    }

    func fetchWITBundles(request: WITBundlesRequest, response: RPCWriter<WITBundlesResponse>, context: ServerContext) async throws {
        throw RPCError(code: .unimplemented, message: "WIT-SVIDs are not issued by Warrant")
    }
}

/// A source refusing a request for now because callers ask too fast
/// (RESOURCE_EXHAUSTED to the caller).
public struct WorkloadRateLimited: Error, Sendable {
    public var message: String
    public init(message: String) { self.message = message }
}

/// The Workload API on a Unix socket the server makes itself. Each caller
/// is identified by the kernel (pid, uid, gid from SO_PEERCRED, and the
/// executable's path and SHA-256) and must match one of the rules (default:
/// the agent's own user). The socket is mode 0666 when a rule admits
/// other users, else 0600. A path already in use is refused.
public final class WorkloadAPIServer: Sendable {
    public struct Problem: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    public let path: String
    private let server: GRPCServer<HTTP2ServerTransport.Posix>
    private let task: Task<Void, Never>

    /// Connections open at once, at most (see `PeerStamper`).
    public static let connectionsMax = 256
    /// Streams open at once on one connection (watches of X509-SVIDs or bundles included).
    public static let streamsPerConnectionMax = 32
    /// A connection with no call under way this long is closed (a watch is a call under way).
    public static let idleConnectionTimeout: Duration = .seconds(300)

    /// `rules`: which local processes may fetch the identity (default: this user's).
    public init(path: String, feed: WorkloadIdentityFeed, source: any WorkloadIdentitySource, rules: [PeerRule] = [.ownUser],
                connectionsMax: Int = WorkloadAPIServer.connectionsMax) throws {
        // Bound under a temporary name, given its mode, then linked to
        // `path`: the socket never stands at `path` with the umask's mode
        // (a caller connecting in that moment would pass the file's check),
        // and the link fails if the path is taken meanwhile.
        let temporary = path + "~" + String(UInt16.random(in: 0x1000...0xFFFF), radix: 16) // 5 bytes more
        guard temporary.utf8.count < 104 else {
            throw Problem(description: "the socket path \(path) is too long for a Unix socket (at most 98 bytes)")
        }
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw Problem(description: "cannot make a Unix socket: \(String(cString: strerror(errno)))") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in temporary.utf8.enumerated() { buffer[index] = byte }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let reason = String(cString: strerror(errno))
            close(descriptor)
            throw Problem(description: "cannot bind the socket \(path): \(reason)")
        }
        defer { unlink(temporary) }
        guard chmod(temporary, rules.allSatisfy { $0 == .ownUser } ? 0o600 : 0o666) == 0, listen(descriptor, 128) == 0 else {
            let reason = String(cString: strerror(errno))
            close(descriptor)
            throw Problem(description: "cannot listen on \(path): \(reason)")
        }
        guard link(temporary, path) == 0 else {
            let reason = errno == EEXIST ? "it is already in use (another agent? remove it if it is stale)" : String(cString: strerror(errno))
            close(descriptor)
            throw Problem(description: "cannot make the socket \(path): \(reason)")
        }
        self.path = path
        // The kernel's word on each caller (SO_PEERCRED), stamped on its streams for the rules.
        let stamper = PeerStamper(hashing: rules.contains { $0.sha256 != nil }, connectionsMax: connectionsMax)
        var config = HTTP2ServerTransport.Posix.Config.defaults
        config.http2.maxConcurrentStreams = Self.streamsPerConnectionMax
        config.connection.maxIdleTime = Self.idleConnectionTimeout
        config.channelDebuggingCallbacks = .init(onBindTCPListener: nil, onAcceptTCPConnection: { stamper.accepted($0) },
                                                 onAcceptHTTP2Stream: { stamper.stream($0) })
        let transport = HTTP2ServerTransport.Posix(listeningSocketDescriptor: Int(descriptor), transportSecurity: .plaintext, config: config)
        let server = GRPCServer(transport: transport, services: [WorkloadAPIService(feed: feed, source: source)],
                                interceptors: [SecurityHeaderInterceptor(), PeerRuleInterceptor(rules: rules)])
        self.server = server
        task = Task { try? await server.serve() }
    }

    public func stop() async {
        server.beginGracefulShutdown()
        task.cancel()
        try? FileManager.default.removeItem(atPath: path)
    }
}
