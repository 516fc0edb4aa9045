import ArgumentParser
import Authority
import Client
import Crypto
import Foundation
import Node
import X509
import Yams

/// A one-line failure of a job-side command: printed to standard error,
/// exit status 1.
struct JobFailure: Error, CustomStringConvertible {
    var description: String
    /// The HTTP status of the cluster's refusal, if it answered.
    var status: UInt? = nil
}

/// How a job reaches the cluster and where its platform token comes from
/// (shared by `warrant join` and `warrant exec`).
struct JobOptions: ParsableArguments {
    @Option(name: .customLong("endpoint"), help: "A cluster API address host:port (repeat for more; or $WARRANT_ENDPOINTS, comma-separated).")
    var endpoints: [String] = []
    @Option(help: "The cluster's CA certificate (PEM), the only one trusted for its API (or $WARRANT_CA_FILE).") var caFile: String?
    @Option(help: "github, gitlab, kubernetes, file or env (or $WARRANT_TOKEN_SOURCE; default: detected from the CI environment).")
    var tokenSource: String?
    @Option(help: "The audience to request a GitHub token for: this cluster's (or $WARRANT_AUDIENCE).") var audience: String?
    @Option(help: "The token file for --token-source file or kubernetes.") var tokenFile: String?
    @Option(help: "The variable holding the token for gitlab (default WARRANT_ID_TOKEN) or env.") var tokenEnv: String?
    @Option(help: "Extra CA certificates (PEM) for the GitHub token request (GitHub Enterprise Server with a private CA).") var tokenRequestCa: String?
    @Option(help: "Seconds the identity should live (at most the rule's cap).") var ttl: UInt32?
    @Option(help: "A YAML file with any of: endpoints (a list), ca_file, token_source, audience, token_file, token_env, token_request_ca, ttl, out (or $WARRANT_CONFIG). Flags and the environment win over it.")
    var config: String?

    static let configKeys: Set<String> = ["endpoints", "ca_file", "token_source", "audience", "token_file", "token_env", "token_request_ca", "ttl", "out"]

    /// The configuration file's settings, as text (endpoints joined by commas).
    func fileSettings(_ environment: [String: String]) throws -> [String: String] {
        guard let path = config ?? environment["WARRANT_CONFIG"] else { return [:] }
        guard let text = try? ClusterFiles.read(path, bytesMax: 64 << 10) else {
            throw JobFailure(description: "cannot read the configuration file \(path) (missing, unreadable, or over 64 KiB)")
        }
        let root: Yams.Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            throw JobFailure(description: "the configuration file \(path) is not valid YAML: \(error)")
        }
        guard let mapping = root?.mapping else { throw JobFailure(description: "the configuration file \(path) must be a mapping of keys to values") }
        var settings: [String: String] = [:]
        for (key, value) in mapping {
            guard let name = key.string, Self.configKeys.contains(name) else {
                throw JobFailure(description: "\(path): unknown key '\(key.string ?? "?")' (expected one of: \(Self.configKeys.sorted().joined(separator: ", ")))")
            }
            if name == "endpoints" {
                guard let list = value.sequence?.compactMap(\.string), !list.isEmpty else { throw JobFailure(description: "\(path): endpoints must be a list of host:port") }
                settings[name] = list.joined(separator: ",")
            } else {
                guard let text = value.string else { throw JobFailure(description: "\(path): \(name) must be a single value") }
                settings[name] = text
            }
        }
        return settings
    }

    /// The parts of the options, checked, with one clear line for what is wrong.
    struct Resolved {
        var endpoints: [HostPort]
        var caPEM: String
        var source: TokenSource
        var extraRootsPEM: String?
        var ttl: UInt32?
        /// The configuration file's output directory, if it names one.
        var out: String?
    }

    func resolve(_ environment: [String: String]) throws -> Resolved {
        let file = try fileSettings(environment)
        let texts = endpoints.isEmpty ? (environment["WARRANT_ENDPOINTS"] ?? file["endpoints"] ?? "").split(separator: ",").map(String.init) : endpoints
        guard !texts.isEmpty else { throw JobFailure(description: "say where the cluster is: --endpoint host:port (or WARRANT_ENDPOINTS)") }
        let hostPorts: [HostPort]
        do {
            hostPorts = try texts.map { try HostPort(parsing: $0.trimmingCharacters(in: .whitespaces), at: "--endpoint") }
        } catch {
            throw JobFailure(description: "\(error)")
        }
        guard let caPath = caFile ?? environment["WARRANT_CA_FILE"] ?? file["ca_file"] else {
            throw JobFailure(description: "give the cluster's CA certificate: --ca-file FILE (or WARRANT_CA_FILE)")
        }
        guard let caPEM = try? ClusterFiles.read(caPath), caPEM.contains("BEGIN CERTIFICATE") else {
            throw JobFailure(description: "cannot read a PEM certificate from the CA file \(caPath)")
        }
        let source: TokenSource
        let tokenFile = self.tokenFile ?? file["token_file"], tokenEnv = self.tokenEnv ?? file["token_env"]
        switch tokenSource ?? environment["WARRANT_TOKEN_SOURCE"] ?? file["token_source"] ?? Self.detect(environment) {
        case "github":
            guard let audience = audience ?? environment["WARRANT_AUDIENCE"] ?? file["audience"] else {
                throw JobFailure(description: "a GitHub token is requested for an audience: --audience (this cluster's, or WARRANT_AUDIENCE)")
            }
            source = .github(audience: audience)
        case "gitlab": source = .gitlab(variable: tokenEnv ?? "WARRANT_ID_TOKEN")
        case "kubernetes": source = .kubernetes(path: tokenFile ?? TokenSource.kubernetesDefaultPath)
        case "file":
            guard let tokenFile else { throw JobFailure(description: "--token-source file needs --token-file PATH") }
            source = .file(path: tokenFile)
        case "env":
            guard let tokenEnv else { throw JobFailure(description: "--token-source env needs --token-env NAME") }
            source = .environment(variable: tokenEnv)
        case "":
            throw JobFailure(description: "no token source: not in a GitHub Actions or GitLab CI job; say --token-source github|gitlab|kubernetes|file|env")
        case let other:
            throw JobFailure(description: "unknown token source '\(other)' (github, gitlab, kubernetes, file or env)")
        }
        var extraRoots: String?
        if let tokenRequestCa = tokenRequestCa ?? file["token_request_ca"] {
            guard let text = try? ClusterFiles.read(tokenRequestCa) else { throw JobFailure(description: "cannot read \(tokenRequestCa) (missing, unreadable, or over 1 MiB)") }
            extraRoots = text
        }
        var ttl = self.ttl
        if ttl == nil, let text = file["ttl"] {
            guard let value = UInt32(text), value > 0 else { throw JobFailure(description: "ttl in the configuration file must be a positive number of seconds") }
            ttl = value
        }
        return Resolved(endpoints: hostPorts, caPEM: caPEM, source: source, extraRootsPEM: extraRoots, ttl: ttl, out: file["out"])
    }

    static func detect(_ environment: [String: String]) -> String {
        if environment["GITHUB_ACTIONS"] == "true" { return "github" }
        if environment["GITLAB_CI"] == "true" { return "gitlab" }
        if FileManager.default.fileExists(atPath: TokenSource.kubernetesDefaultPath) { return "kubernetes" }
        return ""
    }
}

/// A job's identity as the cluster issued it.
struct JobIdentity {
    var certificatePEM: String
    var keyPEM: String
    var bundlePEM: String
    /// The bundle's `spiffe_sequence` (nil from a cluster that does not say).
    var bundleSequence: UInt64? = nil
    var spiffeID: String
    var expiresAt: Date
    /// When this machine received it.
    var issuedAt: Date
    /// How long it lives from then, by the certificate's own times (the
    /// cluster's clock, never compared with this machine's, which may be off).
    var lifetime: TimeInterval
    /// When it expires, by this machine's clock.
    var localExpiry: Date { issuedAt.addingTimeInterval(lifetime) }
    /// JWT-SVIDs by audience, obtained with this X509-SVID.
    var jwts: [String: String] = [:]
    /// When this machine received `jwts`.
    var jwtsReceived: Date?

    /// The shortest JWT-SVID lifetime (exp - iat, the cluster's clock).
    private var jwtLifetime: TimeInterval? { jwts.values.compactMap(AgentIdentity.lifetime(ofJWT:)).min() }
    /// When the first of `jwts` expires, by this machine's clock.
    var jwtLocalExpiry: Date? { jwtLifetime.flatMap { lifetime in jwtsReceived.map { $0.addingTimeInterval(lifetime) } } }
    /// When `jwts` are fetched again: at half the shortest one's lifetime.
    var jwtRefreshDue: Date? { jwtLifetime.flatMap { lifetime in jwtsReceived.map { $0.addingTimeInterval(max(1, lifetime) / 2) } } }

    /// Gets the platform token and exchanges it for an X509-SVID for `key`.
    /// `attempt`: the same across the retries of one join (`IdempotencyKey`).
    static func obtain(_ options: JobOptions.Resolved, key: P256.Signing.PrivateKey, environment: [String: String], attempt: String = UUID().uuidString,
                       say: (String) -> Void) async throws -> JobIdentity {
        say("getting the job's token from \(options.source.name)")
        let token: String
        do {
            token = try await options.source.token(environment: environment, extraRootsPEM: options.extraRootsPEM)
        } catch {
            throw JobFailure(description: "\(error)")
        }
        var request: [String: Any] = ["token": token, "csr": try csr(key), "idempotency_key": IdempotencyKey.derive(nonce: attempt, evidence: token)]
        if let ttl = options.ttl { request["ttl_seconds"] = ttl }
        let client = try WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM)
        defer { Task { await client.close() } }
        say("asking the cluster (\(options.endpoints.count) endpoint\(options.endpoints.count == 1 ? "" : "s")) for an identity")
        return try await exchange(client, "/v1/join", request, key: key)
    }

    /// Renews over mutual TLS, presenting this identity, for `key`.
    /// `attempt`: the same across the retries of one renewal (`IdempotencyKey`).
    func renew(_ options: JobOptions.Resolved, key: P256.Signing.PrivateKey, attempt: String = UUID().uuidString) async throws -> JobIdentity {
        let client = try WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM, certificatePEM: certificatePEM, keyPEM: keyPEM)
        defer { Task { await client.close() } }
        var request: [String: Any] = ["csr": try Self.csr(key), "idempotency_key": IdempotencyKey.derive(nonce: attempt, evidence: certificatePEM)]
        if let ttl = options.ttl { request["ttl_seconds"] = ttl }
        return try await Self.exchange(client, "/v1/svid/x509/renew", request, key: key)
    }

    /// An identity for one step of the job, asked for with the job's.
    func step(_ name: String, _ options: JobOptions.Resolved, key: P256.Signing.PrivateKey, attempt: String = UUID().uuidString) async throws -> JobIdentity {
        let client = try WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM, certificatePEM: certificatePEM, keyPEM: keyPEM)
        defer { Task { await client.close() } }
        var request: [String: Any] = ["step": name, "csr": try Self.csr(key), "idempotency_key": IdempotencyKey.derive(nonce: attempt, evidence: certificatePEM)]
        if let ttl = options.ttl { request["ttl_seconds"] = ttl }
        return try await Self.exchange(client, "/v1/svid/x509/step", request, key: key)
    }

    /// Closes this step's identity in the audit chain with the command's exit status.
    func closeStep(exitStatus: Int32, _ options: JobOptions.Resolved) async throws {
        let client = try WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM, certificatePEM: certificatePEM, keyPEM: keyPEM)
        defer { Task { await client.close() } }
        let response = try await client.request(.POST, "/v1/steps/close", json: Array(try JSONSerialization.data(withJSONObject: ["exit_status": exitStatus])))
        // Closed already: a retry whose first answer was lost.
        guard response.status == .ok || (response.status == .conflict && response.text.contains("already_closed")) else {
            throw JobFailure(description: "closing the step failed: \(response.status.code) \(response.text)")
        }
    }

    static func csr(_ key: P256.Signing.PrivateKey) throws -> String {
        try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName("warrant job") }, privateKey: .init(key),
                                      attributes: CertificateSigningRequest.Attributes()).serializeAsPEM().pemString
    }

    /// Retried on the next endpoint with the same idempotency key: a retry returns the same identity.
    static func exchange(_ client: WarrantClient, _ path: String, _ request: [String: Any], key: P256.Signing.PrivateKey) async throws -> JobIdentity {
        let response: HTTPClientResponse
        do {
            response = try await client.request(.POST, path, json: Array(try JSONSerialization.data(withJSONObject: request)))
        } catch {
            throw JobFailure(description: "\(error)")
        }
        let body = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
        guard response.status == .ok, let certificate = body["certificate"] as? String, let bundle = body["bundle"] as? String else {
            let error = body["error"] as? [String: Any]
            throw JobFailure(description: "the cluster refused: \(error?["code"] as? String ?? String(response.status.code)): \(error?["message"] as? String ?? response.text)"
                             + (path == "/v1/join" ? " (an operator can run 'warrant join explain' on the token to see why)" : ""), status: response.status.code)
        }
        // An answer replayed for an idempotency key is the one first given:
        // for another key than this one, it is of no use (and never written).
        guard let parsed = try? Certificate(pemEncoded: certificate), parsed.publicKey == Certificate.PublicKey(key.publicKey) else {
            throw JobFailure(description: "the cluster answered with a certificate that is not for this request's key (an earlier answer replayed for its idempotency key?)")
        }
        let received = Date()
        let expires = (body["expires_at"] as? String).flatMap { try? Date($0, strategy: .iso8601) } ?? received
        return JobIdentity(certificatePEM: certificate, keyPEM: key.pemRepresentation, bundlePEM: bundle,
                           bundleSequence: (body["bundle_sequence"] as? NSNumber)?.uint64Value, spiffeID: body["spiffe_id"] as? String ?? "?",
                           expiresAt: expires, issuedAt: received, lifetime: lifetime(ofCertificate: certificate) ?? expires.timeIntervalSince(received))
    }

    /// From signing to notAfter: the certificate's notBefore is set
    /// `X509Authority.backdate` before it was signed.
    static func lifetime(ofCertificate pem: String) -> TimeInterval? {
        guard let certificate = try? Certificate(pemEncoded: pem) else { return nil }
        return max(0, certificate.notValidAfter.timeIntervalSince(certificate.notValidBefore) - X509Authority.backdate)
    }

    /// Adds a JWT-SVID per audience, asked for over mutual TLS with this
    /// X509-SVID (same SPIFFE ID and context, never outliving it).
    /// `ttl`: their lifetime in seconds (default: the cluster's, at most an
    /// hour and never past the X509-SVID).
    func withJWTs(_ audiences: [String], _ options: JobOptions.Resolved, ttl: UInt32? = nil) async throws -> JobIdentity {
        guard !audiences.isEmpty else { return self }
        let client = try WarrantClient(endpoints: options.endpoints, caPEM: options.caPEM, certificatePEM: certificatePEM, keyPEM: keyPEM)
        defer { Task { await client.close() } }
        var copy = self
        for audience in audiences {
            var request: [String: Any] = ["audience": [audience], "idempotency_key": UUID().uuidString]
            // Never asked past the X509-SVID (the cluster would refuse).
            if let ttl { request["ttl_seconds"] = min(ttl, UInt32(max(1, localExpiry.timeIntervalSinceNow.rounded(.down) - 1))) }
            let body = Array(try JSONSerialization.data(withJSONObject: request))
            let response: HTTPClientResponse
            do {
                response = try await client.request(.POST, "/v1/svid/jwt/workload", json: body)
            } catch {
                throw JobFailure(description: "\(error)")
            }
            let object = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
            guard response.status == .ok, let token = object["token"] as? String else {
                let error = object["error"] as? [String: Any]
                throw JobFailure(description: "the cluster refused a JWT-SVID for \(audience): \(error?["code"] as? String ?? String(response.status.code)): \(error?["message"] as? String ?? "")",
                                 status: response.status.code)
            }
            copy.jwts[audience] = token
        }
        copy.jwtsReceived = Date()
        return copy
    }

    static func jwtFileName(_ audience: String) -> String { IdentityFiles.jwtFileName(audience) }

    /// `createDirectory` false: the directory must still be there (a
    /// renewal's write after `exec` removed it leaves nothing behind).
    /// `bundle` false: bundle.pem is left to `AgentIdentity`, which keeps
    /// the newest the cluster said (a renewal's answer may be older).
    func write(to directory: String, createDirectory: Bool = true, bundle: Bool = true) throws {
        do {
            try IdentityFiles.write(directory: directory, certificatePEM: certificatePEM, keyPEM: keyPEM, bundlePEM: bundle ? bundlePEM : nil, jwts: jwts,
                                    createDirectory: createDirectory)
        } catch {
            throw JobFailure(description: "\(error)")
        }
    }
}

/// Prints a job-side failure as one line and exits 1.
func failingAsOneLine(_ command: String, _ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let failure as JobFailure {
        FileHandle.standardError.write(Data("warrant \(command): \(failure.description)\n".utf8))
        throw ExitCode.failure
    }
}

/// `warrant join` (the default of `warrant join ...`): inside a job, get
/// the job's platform token, exchange it for an X509-SVID, write it to a
/// directory, exit.
struct JoinObtain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "obtain",
        abstract: "Inside a CI job: exchange the job's platform token for an identity and write it to a directory (the default of 'warrant join').",
        discussion: """
            Writes svid.pem, svid.key (mode 0600) and bundle.pem into --out, all replaced together (links through --out/..data). Every option can also come from the environment.

            Examples:
              # GitHub Actions (the workflow has `permissions: id-token: write`):
              warrant join --endpoint warrant-1.example.com:8443 --endpoint warrant-2.example.com:8443 --ca-file warrant-ca.pem \\
                           --token-source github --audience warrant.example.com --out "$RUNNER_TEMP/identity"
              # GitLab CI (id_tokens: { WARRANT_ID_TOKEN: { aud: warrant.example.com } }):
              warrant join --endpoint warrant.example.com:8443 --ca-file warrant-ca.pem --token-source gitlab
              # Kubernetes (a projected token with the cluster's audience):
              warrant join --endpoint warrant:8443 --ca-file /etc/warrant/ca.pem --token-source kubernetes
            """)

    @OptionGroup var job: JobOptions
    @Option(help: "Where to write the identity (or $WARRANT_OUT).") var out: String?
    @Option(name: .customLong("jwt-audience"), help: "Also write a JWT-SVID for this audience (repeat for more): jwt-<audience>.token, mode 0600.")
    var jwtAudiences: [String] = []

    func run() async throws {
        try await failingAsOneLine("join") {
            let environment = ProcessInfo.processInfo.environment
            let options = try job.resolve(environment)
            let directory = out ?? environment["WARRANT_OUT"] ?? options.out ?? "warrant-identity"
            // Check the output directory before asking for anything.
            do {
                try IdentityFiles.checkWritable(directory: directory)
            } catch {
                throw JobFailure(description: "\(error)")
            }
            let identity = try await JobIdentity.obtain(options, key: P256.Signing.PrivateKey(compactRepresentable: false), environment: environment) { print($0) }
                .withJWTs(jwtAudiences, options)
            try identity.write(to: directory)
            let jwtFiles = jwtAudiences.map { ", " + JobIdentity.jwtFileName($0) }.joined()
            print("wrote \(directory)/svid.pem, svid.key, bundle.pem\(jwtFiles): \(identity.spiffeID), expires \(identity.expiresAt.formatted(.iso8601))")
        }
    }
}
