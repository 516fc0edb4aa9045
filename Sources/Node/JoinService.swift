import Attestation
import Foundation
import Ledger
import NIOCore
import NIOPosix
import NIOSSL
import Policy
import Storage
import Synchronization

/// Fetches an issuer's keys over HTTPS: discovery, then its `jwks_uri`.
/// No redirects, bounded size and time, HTTPS only (plain HTTP only to a
/// loopback address, and only when the node's configuration allows it for
/// tests), the server's certificate checked against the issuer's `ca_pem`
/// or the system's roots, and its name against the URL's host.
public struct KeySetFetcher: Sendable {
    public var allowHTTPLoopback: Bool
    public var timeout: TimeAmount = .seconds(5)

    public init(allowHTTPLoopback: Bool) {
        self.allowHTTPLoopback = allowHTTPLoopback
    }

    public func fetch(_ issuer: IssuerConfig) async throws(AttestationError) -> PlatformKeySet {
        if let jwks = issuer.staticJWKS { return try PlatformKeySet(jwks: jwks, algorithms: issuer.requirements.algorithms) }
        let discovery = try await get(issuer.discoveryURL, issuer: issuer)
        let jwksURI = try PlatformKeySet.jwksURI(discovery: discovery, issuer: issuer.requirements.issuer)
        return try PlatformKeySet(jwks: try await get(jwksURI, issuer: issuer), algorithms: issuer.requirements.algorithms)
    }

    struct Target: Equatable {
        var secure: Bool
        var host: String
        var port: Int
        var path: String
    }

    /// Checks a URL before anything is sent to it.
    func target(_ text: String) throws(AttestationError) -> Target {
        guard let url = URLComponents(string: text), let scheme = url.scheme?.lowercased(), let host = url.host, !host.isEmpty,
              url.user == nil, url.password == nil, url.fragment == nil else {
            throw AttestationError("bad_url", "\(text.prefix(256)) is not a plain absolute URL")
        }
        let bareHost = host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host
        switch scheme {
        case "https": break
        case "http":
            guard allowHTTPLoopback, Self.isLoopback(bareHost) else {
                throw AttestationError("insecure_url", "\(text.prefix(256)) is plain HTTP; keys are fetched over HTTPS only (plain HTTP only to loopback, when the node's join.allow_http_loopback_issuers is set for tests)")
            }
        default:
            throw AttestationError("bad_url", "\(text.prefix(256)) is neither https nor http")
        }
        var path = url.percentEncodedPath.isEmpty ? "/" : url.percentEncodedPath
        if let query = url.percentEncodedQuery { path += "?" + query }
        return Target(secure: scheme == "https", host: bareHost, port: url.port ?? (scheme == "https" ? 443 : 80), path: path)
    }

    static func isLoopback(_ host: String) -> Bool {
        if host == "::1" || host == "localhost" { return true }
        let parts = host.split(separator: ".")
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }

    func get(_ text: String, issuer: IssuerConfig) async throws(AttestationError) -> [UInt8] {
        let target = try target(text)
        do {
            let timeout = self.timeout
            let address = try await NIOThreadPool.singleton.runIfActive {
                try SocketAddress.makeAddressResolvingHost(target.host == "localhost" ? "127.0.0.1" : target.host, port: target.port)
            }
            var tls: NIOSSLContext?
            if target.secure {
                var configuration = TLSConfiguration.makeClientConfiguration()
                configuration.minimumTLSVersion = .tlsv12
                if let pem = issuer.caPEM {
                    configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(pem.utf8)))
                }
                tls = try NIOSSLContext(configuration: configuration)
            }
            let isIP = (try? SocketAddress(ipAddress: target.host, port: 0)) != nil
            let connection = try await HTTPConnection.connect(to: address, tls: tls, serverHostname: isIP ? nil : target.host, timeout: timeout,
                                                              responseBytesMax: PlatformKeySet.bytesMax)
            defer { Task { await connection.close() } }
            let response = try await connection.request(.GET, target.path, headers: [("accept", "application/json")], timeout: timeout)
            if (300..<400).contains(Int(response.status.code)) {
                throw AttestationError("redirect_refused", "\(text.prefix(256)) answered with a redirect (\(response.status.code)); redirects are not followed")
            }
            guard response.status == .ok else {
                throw AttestationError("fetch_failed", "\(text.prefix(256)) answered \(response.status.code)")
            }
            return response.body
        } catch let error as AttestationError {
            throw error
        } catch {
            throw AttestationError("fetch_failed", "could not fetch \(text.prefix(256)): \(error)")
        }
    }
}

/// Each issuer's keys on this node. A request whose kid is known never
/// waits for the network; an unknown kid (or no keys yet) fetches at most
/// once per issuer per `refetchInterval`, concurrent requests sharing that
/// one fetch; a failed fetch keeps the last good keys; a new set replaces
/// the old one whole. Keys older than `refreshInterval` are refreshed in
/// the background while the old ones keep serving; keys older than
/// `maxAge` are not used at all (a key the issuer withdrew, leaked say,
/// stops being trusted within that time even if every refresh fails: an
/// attacker able to block the fetches cannot keep it alive).
public final class KeySetCache: Sendable {
    struct Entry {
        var issuer: IssuerConfig
        var keys: PlatformKeySet?
        var fetchedAt: ContinuousClock.Instant?
        var lastAttempt: ContinuousClock.Instant?
        var lastError: AttestationError?
        var inFlight: Task<Void, Never>?
        var fetches = 0
    }

    public let fetcher: KeySetFetcher
    public let refetchInterval: Duration
    public let refreshInterval: Duration
    public let maxAge: Duration
    private let entries = Mutex<[String: Entry]>([:])
    /// The clock the intervals and ages are measured by (a test's own, to
    /// step through them without sleeping).
    private let now: @Sendable () -> ContinuousClock.Instant

    public init(fetcher: KeySetFetcher, refetchInterval: Duration = .seconds(30), refreshInterval: Duration = .seconds(3_600),
                maxAge: Duration = .seconds(86_400), now: @escaping @Sendable () -> ContinuousClock.Instant = { .now }) {
        self.fetcher = fetcher
        self.refetchInterval = refetchInterval
        self.refreshInterval = refreshInterval
        self.maxAge = max(maxAge, refreshInterval)
        self.now = now
    }

    /// How many fetches (successful or not) this issuer has had.
    public func fetchCount(_ issuer: String) -> Int { entries.withLock { $0[issuer]?.fetches ?? 0 } }

    /// The keys to check a token with key id `kid` from `issuer`.
    public func keys(for issuer: IssuerConfig, kid: String) async throws(AttestationError) -> PlatformKeySet {
        enum Step { case ready(PlatformKeySet), wait(Task<Void, Never>), fail(AttestationError) }
        let now = self.now()
        let step: Step = entries.withLock { entries in
            var entry = entries[issuer.name] ?? Entry(issuer: issuer)
            if entry.issuer != issuer { entry = Entry(issuer: issuer) } // configuration changed: start over
            defer { entries[issuer.name] = entry }
            let stale = entry.fetchedAt.map { now - $0 > refreshInterval } ?? true
            let mayFetch = entry.lastAttempt.map { now - $0 >= refetchInterval } ?? true
            if let fetchedAt = entry.fetchedAt, now - fetchedAt > maxAge {
                // Too old to trust, whatever the refreshes say (once: fetchedAt goes too).
                entry.keys = nil
                entry.fetchedAt = nil
                entry.lastError = AttestationError("keys_unavailable", "the keys last fetched are over \(maxAge.components.seconds) s old and no longer used"
                                                   + (entry.lastError.map { "; refreshing them failed: \($0.message)" } ?? ""))
            }
            if let keys = entry.keys, keys.keys[kid] != nil {
                if stale && mayFetch && entry.inFlight == nil { entry.inFlight = startFetch(issuer, at: now, &entry) }
                return .ready(keys)
            }
            if let inFlight = entry.inFlight { return .wait(inFlight) }
            if mayFetch {
                let task = startFetch(issuer, at: now, &entry)
                entry.inFlight = task
                return .wait(task)
            }
            if let keys = entry.keys { return .ready(keys) } // unknown kid; the verifier says so
            return .fail(AttestationError("keys_unavailable", "no keys for issuer \(issuer.name) yet; the last fetch failed: "
                                          + (entry.lastError?.message ?? "unknown error") + " (retried at most every \(refetchInterval))"))
        }
        switch step {
        case .ready(let keys): return keys
        case .fail(let error): throw error
        case .wait(let task):
            await task.value
            let result = entries.withLock { ($0[issuer.name]?.keys, $0[issuer.name]?.lastError) }
            if let keys = result.0 { return keys }
            throw AttestationError("keys_unavailable", "the keys of issuer \(issuer.name) could not be fetched: \(result.1?.message ?? "unknown error")")
        }
    }

    private func startFetch(_ issuer: IssuerConfig, at now: ContinuousClock.Instant, _ entry: inout Entry) -> Task<Void, Never> {
        entry.lastAttempt = now
        entry.fetches += 1
        let fetcher = self.fetcher
        return Task { [self] in
            let result: Result<PlatformKeySet, AttestationError>
            do throws(AttestationError) {
                result = .success(try await fetcher.fetch(issuer))
            } catch {
                result = .failure(error)
            }
            self.entries.withLock { entries in
                guard var entry = entries[issuer.name], entry.issuer == issuer else { return }
                switch result {
                case .success(let keys):
                    entry.keys = keys
                    entry.fetchedAt = self.now()
                    entry.lastError = nil
                case .failure(let error):
                    entry.lastError = error // the last good keys stay
                }
                entry.inFlight = nil
                entries[issuer.name] = entry
            }
        }
    }
}

/// The join path on this node: the issuers and rules from the ledger
/// (re-read at most once a second, parsed only when a document changed),
/// each issuer's keys, and the verification of a platform token.
public final class JoinService: Sendable {
    public let trustDomain: String
    public let keySets: KeySetCache
    private let store: RaftStore
    private let cache = Mutex<(checked: ContinuousClock.Instant, versions: [String: UInt64], policy: JoinPolicy)?>(nil)
    /// When a caller of `cachedPolicy()` began re-reading the policy: for
    /// up to 5 s the others keep using the one read a moment before,
    /// instead of all reading the same documents at once.
    private let refreshStarted = Mutex<ContinuousClock.Instant?>(nil)
    static let documentsMax = 1_000

    public init(trustDomain: String, store: RaftStore, fetcher: KeySetFetcher, refetchInterval: Duration = .seconds(30)) {
        self.trustDomain = trustDomain
        self.store = store
        keySets = KeySetCache(fetcher: fetcher, refetchInterval: refetchInterval)
    }

    /// The cached policy if it was read less than a second ago (no I/O).
    /// When it is older, one caller gets nil and re-reads it (`policy()`);
    /// until that is done, the others get the older one.
    public func cachedPolicy() -> JoinPolicy? {
        guard let cached = cache.withLock({ $0 }) else { return nil }
        let now = ContinuousClock.now
        if now - cached.checked < .seconds(1) { return cached.policy }
        let someoneElse = refreshStarted.withLock { started in
            if let started, now - started < .seconds(5) { return true }
            started = now
            return false
        }
        return someoneElse ? cached.policy : nil
    }

    /// The current policy, as read at most `maxAge` ago: a change to the
    /// issuers or rules takes effect on every node within a second.
    public func policy(maxAge: Duration = .seconds(1)) throws -> JoinPolicy {
        defer { refreshStarted.withLock { $0 = nil } }
        let now = ContinuousClock.now
        if let cached = cache.withLock({ $0 }), now - cached.checked < maxAge { return cached.policy }
        let issuerDocuments = try store.documents(prefix: IssuerConfig.documentPrefix, limit: Self.documentsMax)
        let ruleDocuments = try store.documents(prefix: JoinRule.documentPrefix, limit: Self.documentsMax)
        // By the entry that wrote each (a version starts again at 1 when a
        // document is deleted and made again).
        var versions: [String: UInt64] = [:]
        for document in issuerDocuments + ruleDocuments { versions[document.name] = document.logIndex }
        if let cached = cache.withLock({ $0 }), cached.versions == versions {
            cache.withLock { $0?.checked = now }
            return cached.policy
        }
        // Something changed: read the contents (the listing leaves them out).
        var issuers: [Document] = [], rules: [Document] = []
        try store.forEachDocument(prefix: IssuerConfig.documentPrefix) { if issuers.count < Self.documentsMax { issuers.append($0) } }
        try store.forEachDocument(prefix: JoinRule.documentPrefix) { if rules.count < Self.documentsMax { rules.append($0) } }
        let policy = Self.read(issuers: issuers, rules: rules, trustDomain: trustDomain)
        cache.withLock { $0 = (now, versions, policy) }
        return policy
    }

    /// Parses the documents; one that does not parse admits nothing and is
    /// listed in `broken` (saving checks them, so this is for documents
    /// written before an upgrade tightened the rules).
    static func read(issuers issuerDocuments: [Document], rules ruleDocuments: [Document], trustDomain: String) -> JoinPolicy {
        var issuers: [String: IssuerConfig] = [:]
        var broken: [String: String] = [:]
        for document in issuerDocuments {
            let name = String(document.name.dropFirst(IssuerConfig.documentPrefix.count))
            do {
                issuers[name] = try IssuerConfig(name: name, document: String(decoding: document.content, as: UTF8.self), defaultAudience: trustDomain)
            } catch {
                broken[document.name] = error.description
            }
        }
        // Issuers sharing one `iss`: tokens go to the first by name, so the
        // others' rules never apply. Listed, as a document that did not read is.
        // (Grouped by bytes, as tokens are matched: two spellings of one
        // Unicode text are two issuers.)
        let byIssuer = Dictionary(grouping: issuers.values, by: { Array($0.requirements.issuer.utf8) })
        for shared in byIssuer.values where shared.count > 1 {
            let sorted = shared.sorted { $0.name < $1.name }
            for shadowed in sorted.dropFirst() {
                broken[IssuerConfig.documentPrefix + shadowed.name] = "its issuer \(shadowed.requirements.issuer) is also issuer \(sorted[0].name)'s, which takes its tokens: rules naming \(shadowed.name) admit nothing"
            }
        }
        if issuerDocuments.count >= documentsMax || ruleDocuments.count >= documentsMax {
            broken["policy"] = "at least \(documentsMax) issuer or rule documents: any past the first \(documentsMax) by name are not read"
        }
        var rules: [JoinRule] = []
        for document in ruleDocuments {
            let name = String(document.name.dropFirst(JoinRule.documentPrefix.count))
            do {
                let text = String(decoding: document.content, as: UTF8.self)
                let method = try? JoinRule.issuerName(in: text).flatMap { issuers[$0]?.method }
                rules.append(try JoinRule(name: name, document: text, method: method, trustDomain: trustDomain))
            } catch {
                broken[document.name] = error.description
            }
        }
        return JoinPolicy(issuers: issuers, rules: rules, broken: broken)
    }

    /// Parses and verifies a platform token against its issuer's
    /// configuration and keys; the issuer is chosen by exact `iss` before
    /// anything is fetched.
    public func verify(_ text: String, policy: JoinPolicy, now: Int64) async throws(AttestationError) -> (IssuerConfig, VerifiedToken) {
        let token = try PlatformToken(parsing: text)
        guard let issuer = policy.issuer(for: token.issuer) else {
            throw AttestationError("unknown_issuer", "no issuer is configured for iss \"\(PlatformToken.printable(token.issuer))\"")
        }
        // Settle what configuration alone can refuse before any fetch.
        guard issuer.requirements.algorithms.contains(token.algorithm) else {
            throw AttestationError("algorithm_not_allowed", "\(PlatformToken.printable(token.algorithm)) is not allowed for issuer \(issuer.name)")
        }
        let keys = try await keySets.keys(for: issuer, kid: token.keyID)
        return (issuer, try TokenVerifier.verify(token, method: issuer.method, requirements: issuer.requirements, keys: keys, now: now))
    }
}
