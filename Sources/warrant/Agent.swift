import ArgumentParser
import Authority
import Client
import Crypto
import Foundation
import Node
import Synchronization
import WorkloadAPI

/// What the Workload API serves, kept current by renewals.
final class AgentIdentity: WorkloadIdentitySource {
    let options: JobOptions.Resolved
    let feed = WorkloadIdentityFeed()
    /// JWT-SVIDs issued for the current identity, handed out again until
    /// half their lifetime has passed; emptied when the identity is replaced.
    private let jwtCache = JWTSVIDCache<JobIdentity>()
    /// The newest key set fetched, with its bundle sequence (0: not said).
    private let lastJWKS = Mutex<(jwks: [UInt8], sequence: UInt64)?>(nil)
    /// New JWT-SVIDs: 10 a second and 50 at once for the agent, and no
    /// calling process more than half of that, so one that asks for ever
    /// more audience sets leaves the others theirs.
    private let issuanceBudget = FairShareLimiter(perSecond: 10, burst: 50, callerPerSecond: 5, callerBurst: 25)
    /// Each ValidateJWTSVID asks the cluster: bounded too, so one workload
    /// cannot fill this host's share of a node's connections, nor take all of it from the others.
    private let validationBudget = FairShareLimiter(perSecond: 50, burst: 100, callerPerSecond: 25, callerBurst: 50)

    /// Whose part of a budget a call takes from: its process (by pid, as the
    /// kernel says). A caller in another pid namespace shows as pid 0: those
    /// cannot be told apart, and take from the shared budget alone. (A
    /// workload running many processes gets a part for each: this keeps one
    /// busy process from starving the others, not a workload set on it.)
    private static var caller: String? { WorkloadCaller.current.flatMap { $0.pid > 0 ? "pid:\($0.pid)" : nil } }
    /// What was published last (the identity, its key, the X.509 bundle in
    /// PEM) and how many times: a bundle refresh publishes only over the
    /// identity it read.
    /// `sequence`: the published bundle's `spiffe_sequence` (0: not said);
    /// a bundle or key set fetched from a node that is behind (a lower
    /// one) is not published over it.
    private let published = Mutex<(identity: JobIdentity, key: P256.Signing.PrivateKey, bundlePEM: String, jwks: [UInt8], generation: Int,
                                   sequence: UInt64)?>(nil)

    /// Without a client certificate, for the keys, the bundle and
    /// verification: one for the agent's life, its connections kept.
    private let plainClient: WarrantClient?

    /// Where the identity is also kept as files (`--out`, exec's
    /// directory): bundle.pem there follows the bundle published. Nil once
    /// `stopWritingFiles` (exec's directory is going).
    private let directory: Mutex<String?>
    private let say: @Sendable (String) -> Void

    init(options: JobOptions.Resolved, directory: String? = nil, say: @escaping @Sendable (String) -> Void = { _ in }) {
        self.options = options
        self.directory = Mutex(directory)
        self.say = say
        plainClient = try? WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM)
    }

    /// Puts a bundle published in bundle.pem, when the identity is kept as
    /// files; called with `published` locked, so two writes cannot land
    /// out of order (an older bundle last).
    private func writeBundleFile(_ bundlePEM: String) {
        guard let directory = directory.withLock({ $0 }) else { return }
        do {
            try IdentityFiles.writeBundle(directory: directory, bundlePEM: bundlePEM)
        } catch {
            say("could not write the refreshed trust bundle to \(directory)/bundle.pem: \(error)")
        }
    }

    /// Writes bundle.pem again if it does not hold the bundle published (a
    /// write that failed; the directory made again by a renewal, which
    /// leaves bundle.pem to this).
    private func repairBundleFile() {
        published.withLock { published in
            guard let current = published, let directory = directory.withLock({ $0 }), FileManager.default.fileExists(atPath: directory),
                  (try? String(contentsOfFile: "\(directory)/bundle.pem", encoding: .utf8)) != current.bundlePEM else { return }
            writeBundleFile(current.bundlePEM)
        }
    }

    /// No file is written from now on; a write under way has finished.
    func stopWritingFiles() {
        published.withLock { _ in directory.withLock { $0 = nil } }
    }

    /// Takes a new identity: the Workload API streams push it.
    func update(_ identity: JobIdentity, key: P256.Signing.PrivateKey) async {
        // Tokens of the identity before (another line, after a join again)
        // are not handed out for this one.
        jwtCache.replaceIdentity(identity)
        let jwks = await fetchJWKS()
        published.withLock { published in
            // A bundle fetched since from a node ahead of the one that
            // answered the renewal stays; one that says no sequence (an older
            // build) is taken, as a refresh takes it, under the sequence held.
            var (bundlePEM, sequence) = (identity.bundlePEM, identity.bundleSequence ?? published?.sequence ?? 0)
            if let held = published, let said = identity.bundleSequence, held.sequence > said { (bundlePEM, sequence) = (held.bundlePEM, held.sequence) }
            published = (identity, key, bundlePEM, jwks, (published?.generation ?? 0) + 1, sequence)
            publish(identity, key: key, bundlePEM: bundlePEM, jwks: jwks)
            writeBundleFile(bundlePEM)
        }
    }

    /// The sequence a bundle or key set answer says it has (nil: not said).
    private static func sequence(of response: HTTPClientResponse) -> UInt64? {
        response.headers.first(name: NodeAPI.bundleSequenceHeader).flatMap { UInt64($0) }
    }

    /// The trust domain's keys as the cluster serves them now; if it
    /// cannot say (an empty or error body would make every workload refuse
    /// every JWT-SVID until the next renewal), or says an older set (a node
    /// that is behind: `BundleSequence`), the last ones it said.
    private func fetchJWKS() async -> [UInt8] {
        if let response = try? await plainClient?.request(.GET, "/v1/keys"), response.status == .ok,
           (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["keys"] is [Any] {
            let said = Self.sequence(of: response)
            // Not older than the key set held, nor than the bundle published
            // (whose keys it must have: a prepared authority's among them).
            let bundleSequence = published.withLock { $0?.sequence ?? 0 }
            lastJWKS.withLock { last in
                let held = last?.sequence ?? 0
                if BundleSequence.takes(said, over: max(held, bundleSequence)) { last = (response.body, said ?? held) }
            }
        }
        return lastJWKS.withLock { $0?.jwks } ?? Array(#"{"keys":[]}"#.utf8)
    }

    private func publish(_ identity: JobIdentity, key: P256.Signing.PrivateKey, bundlePEM: String, jwks: [UInt8]) {
        let trustDomain = identity.spiffeID.dropFirst("spiffe://".count).split(separator: "/").first.map(String.init) ?? ""
        feed.publish(WorkloadIdentity(spiffeID: identity.spiffeID, trustDomain: trustDomain,
                                      certificateChainDER: Self.certificates(identity.certificatePEM), keyDER: Array(key.derRepresentation),
                                      bundleDER: Self.certificates(bundlePEM), jwks: jwks, notAfter: identity.expiresAt))
    }

    /// Asks the cluster for the trust bundle (PEM) and the JWT keys and,
    /// if either changed, publishes them with the identity held: a CA
    /// prepared or retired reaches the Workload API's streams, and
    /// bundle.pem when the identity is kept as files, within `interval`,
    /// not at the next renewal. Until cancelled.
    func keepBundlesFresh(every interval: Duration) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            guard let held = published.withLock({ $0 }) else { continue }
            let jwks = await fetchJWKS()
            var (bundlePEM, sequence) = (held.bundlePEM, held.sequence)
            if let response = try? await plainClient?.request(.GET, "/v1/bundle.pem"), response.status == .ok,
               !Self.certificates(response.text).isEmpty {
                let said = Self.sequence(of: response)
                if BundleSequence.takes(said, over: held.sequence) { (bundlePEM, sequence) = (response.text, said ?? held.sequence) }
            }
            // Compared with what was published (not with the last fetched:
            // an update publishing older keys after this loop fetched newer
            // ones is then corrected at the next round).
            guard bundlePEM != held.bundlePEM || jwks != held.jwks else {
                repairBundleFile()
                continue
            }
            published.withLock { published in
                guard let current = published, current.generation == held.generation else { return } // renewed meanwhile
                published = (current.identity, current.key, bundlePEM, jwks, current.generation + 1, sequence)
                publish(current.identity, key: current.key, bundlePEM: bundlePEM, jwks: jwks)
                if bundlePEM != current.bundlePEM { writeBundleFile(bundlePEM) }
            }
        }
    }

    /// exp - iat of a JWT's claims.
    static func lifetime(ofJWT token: String) -> TimeInterval? {
        let parts = token.split(separator: ".")
        guard parts.count == 3, let payload = Base64URL.decode(parts[1]),
              let claims = try? JSONSerialization.jsonObject(with: Data(payload)) as? [String: Any],
              let exp = (claims["exp"] as? NSNumber)?.doubleValue, let iat = (claims["iat"] as? NSNumber)?.doubleValue, exp > iat else { return nil }
        return exp - iat
    }

    /// Every CERTIFICATE block of a PEM text, DER, concatenated.
    static func certificates(_ pem: String) -> [UInt8] {
        pem.components(separatedBy: "-----END CERTIFICATE-----").compactMap { block -> [UInt8]? in
            guard block.contains("-----BEGIN CERTIFICATE-----") else { return nil }
            return PEMText.decode(block + "-----END CERTIFICATE-----", label: "CERTIFICATE")
        }.flatMap { $0 }
    }

    func jwtSVID(audiences: [String]) async throws -> String {
        // Read together: a replacement after this point makes `keep` drop the answer.
        let (held, generation) = jwtCache.current
        guard let current = held else { throw JobFailure(description: "no identity yet") }
        if let cached = jwtCache.token(for: audiences, at: Date()) { return cached }
        // New JWT-SVIDs take half the identity line's budget at most (the
        // cluster allows 20 a second, 100 at once), so workloads asking for
        // ever more audience sets cannot starve the renewals.
        if let wait = issuanceBudget.admit(Self.caller, now: ProcessInfo.processInfo.systemUptime) {
            throw WorkloadRateLimited(message: "more JWT-SVIDs asked for than this agent asks the cluster for (10 a second and 50 at once, at most half of it for one process); "
                + "retry in \(String(format: "%.1f", wait)) s")
        }
        let client = try WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM, certificatePEM: current.certificatePEM, keyPEM: current.keyPEM)
        defer { Task { await client.close() } }
        // With an idempotency key: the client resends the same body to the
        // next endpoint when an answer is lost, and gets the same token.
        let response = try await client.request(.POST, "/v1/svid/jwt/workload",
                                                 json: Array(try JSONSerialization.data(withJSONObject: ["audience": audiences,
                                                                                                         "idempotency_key": UUID().uuidString])))
        let body = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
        guard response.status == .ok, let token = body["token"] as? String else {
            throw JobFailure(description: "\(response.status.code) \(response.text)")
        }
        // Kept for half its lifetime by this machine's clock: the lifetime
        // from the token's own iat and exp (the cluster's clock).
        if let lifetime = Self.lifetime(ofJWT: token) {
            let now = Date()
            jwtCache.keep(token, for: audiences, expiresAt: now.addingTimeInterval(lifetime), now: now, generation: generation)
        }
        return token
    }

    func validate(jwt: String, audience: String) async throws -> (spiffeID: String, claimsJSON: [UInt8]) {
        guard let client = plainClient else { throw JobFailure(description: "no client for the cluster's endpoints (bad CA file?)") }
        if let wait = validationBudget.admit(Self.caller, now: ProcessInfo.processInfo.systemUptime) {
            throw WorkloadRateLimited(message: "more JWT-SVIDs to validate than this agent asks the cluster about (50 a second and 100 at once, at most half of it for one process); "
                + "retry in \(String(format: "%.1f", wait)) s")
        }
        let response = try await client.request(.POST, "/v1/verify", json: Array(try JSONSerialization.data(withJSONObject: ["jwt": jwt, "audience": audience])))
        let body = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
        guard body["valid"] as? Bool == true, let spiffeID = body["spiffe_id"] as? String else {
            throw JobFailure(description: "\(body["code"] as? String ?? "invalid"): \(body["reason"] as? String ?? response.text)")
        }
        // The cluster found it valid: its claims are the token's own.
        let parts = jwt.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let payload = Base64URL.decode(parts[1]),
              (try? JSONSerialization.jsonObject(with: Data(payload))) is [String: Any] else {
            throw JobFailure(description: "the JWT-SVID's claims are not a JSON object")
        }
        return (spiffeID, payload)
    }
}

/// `warrant agent`: keeps an identity fresh and serves it over the SPIFFE
/// Workload API until SIGINT or SIGTERM.
struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Keep this machine's or job's identity fresh and serve it over the SPIFFE Workload API (a Unix socket) until stopped.",
        discussion: """
            The socket is made with mode 0600: only this user (and root) can fetch the identity. Workloads find it through \
            SPIFFE_ENDPOINT_SOCKET=unix://PATH. Renewal works as for 'warrant exec'.

            Example (a service's unit runs): warrant agent --endpoint warrant.example.com:8443 --ca-file /etc/warrant/ca.pem \\
                --token-source kubernetes --socket /run/warrant/agent.sock
            """)

    @OptionGroup var job: JobOptions
    @Option(help: "The Workload API socket (or $WARRANT_AGENT_SOCKET; default $XDG_RUNTIME_DIR/warrant-agent.sock, or /run/warrant-agent.sock for root).")
    var socket: String?
    @Option(help: "Also keep the identity as files in this directory.") var out: String?
    @Option(help: "Stop after this many seconds (for tests and one-off use).") var exitAfter: Double?
    @Option(help: "How often to ask the cluster for its trust bundle and JWT keys, in seconds, 1 to 3600 (streams, and bundle.pem with --out, are updated when they change).")
    var bundleRefresh: Double = 60
    @Option(name: .customLong("allow"), help: "Which local processes may fetch the identity: uid=N, gid=N, exe=PATH, sha256=HEX, combined with commas (repeat for more rules; default: this user).")
    var allow: [String] = []

    /// Where the socket goes unless told: in a directory only this user
    /// can write, so no other user can put a socket of their own there
    /// first for workloads to trust.
    static func defaultSocket(_ environment: [String: String]) -> String? {
        if let runtime = environment["XDG_RUNTIME_DIR"], runtime.hasPrefix("/") { return runtime + "/warrant-agent.sock" }
        return getuid() == 0 ? "/run/warrant-agent.sock" : nil
    }

    func run() async throws {
        try await failingAsOneLine("agent") {
            let environment = ProcessInfo.processInfo.environment
            let options = try job.resolve(environment)
            guard let path = socket ?? environment["WARRANT_AGENT_SOCKET"] ?? Self.defaultSocket(environment) else {
                throw JobFailure(description: "give the socket's path with --socket or $WARRANT_AGENT_SOCKET: without $XDG_RUNTIME_DIR, "
                    + "a user other than root has no directory only it can write, and a socket in a shared one (/tmp) could be put there first by another user")
            }
            let say: @Sendable (String) -> Void = { FileHandle.standardError.write(Data("warrant agent: \($0)\n".utf8)) }
            try checkBundleRefresh(bundleRefresh)
            var rules: [PeerRule] = []
            for text in allow {
                do {
                    rules.append(try PeerRule(parsing: text))
                } catch {
                    throw JobFailure(description: "--allow \(text): \(error)")
                }
            }
            if rules.isEmpty { rules = [.ownUser] }
            // Before spending a token: is the socket path free?
            if FileManager.default.fileExists(atPath: path) {
                throw JobFailure(description: "the socket path \(path) is already in use (another agent? remove it if it is stale)")
            }
            let key = P256.Signing.PrivateKey(compactRepresentable: false)
            let identity = try await JobIdentity.obtain(options, key: key, environment: environment, say: say)
            if let out { try identity.write(to: out) }
            let agent = AgentIdentity(options: options, directory: out, say: say)
            await agent.update(identity, key: key)
            let server: WorkloadAPIServer
            do {
                server = try WorkloadAPIServer(path: path, feed: agent.feed, source: agent, rules: rules)
            } catch {
                throw JobFailure(description: "\(error)")
            }
            say("serving \(identity.spiffeID) at unix://\(path) to processes matching \(rules.map(\.description).joined(separator: " or "))")
            let stop = AsyncStream<Void>.makeStream()
            var sources: [any DispatchSourceSignal] = []
            for signalNumber in [SIGINT, SIGTERM] {
                signal(signalNumber, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: signalNumber)
                source.setEventHandler { stop.continuation.finish() }
                source.resume()
                sources.append(source)
            }
            if let exitAfter {
                Task {
                    try? await Task.sleep(for: .milliseconds(Int(exitAfter * 1000)))
                    stop.continuation.finish()
                }
            }
            let acquire: @Sendable (P256.Signing.PrivateKey, String) async throws -> JobIdentity = { key, attempt in
                try await JobIdentity.obtain(options, key: key, environment: environment, attempt: attempt, say: say)
            }
            let renewal = Task {
                await ExecCommand.keepFresh(identity, key: key, options: options, audiences: [], directory: out, rejoin: acquire, say: say) { renewed, key in
                    await agent.update(renewed, key: key)
                }
            }
            let bundles = Task { [bundleRefresh] in await agent.keepBundlesFresh(every: .milliseconds(Int(bundleRefresh * 1000))) }
            for await _ in stop.stream {}
            bundles.cancel()
            renewal.cancel()
            for source in sources { source.cancel() }
            await server.stop()
            say("stopped")
        }
    }
}

/// `--bundle-refresh`: 1 s to an hour.
func checkBundleRefresh(_ seconds: Double) throws {
    guard seconds >= 1, seconds <= 3_600 else {
        throw JobFailure(description: "--bundle-refresh must be between 1 and 3600 seconds, not \(seconds)")
    }
}
