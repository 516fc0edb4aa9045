import ArgumentParser
import Client
import Crypto
import Foundation
import Node
import X509

/// `warrant join` (the default of `warrant join ...`): inside a job, get
/// the job's platform token, exchange it for an X509-SVID, write it to a
/// directory, exit.
struct JoinObtain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "obtain",
        abstract: "Inside a CI job: exchange the job's platform token for an identity and write it to a directory (the default of 'warrant join').",
        discussion: """
            Writes svid.pem, svid.key (mode 0600) and bundle.pem into --out, each atomically. Every option can also come from the environment.

            Examples:
              # GitHub Actions (the workflow has `permissions: id-token: write`):
              warrant join --endpoint warrant-1.example.com:8443 --endpoint warrant-2.example.com:8443 --ca-file warrant-ca.pem \\
                           --token-source github --audience warrant.example.com --out "$RUNNER_TEMP/identity"
              # GitLab CI (id_tokens: { WARRANT_ID_TOKEN: { aud: warrant.example.com } }):
              warrant join --endpoint warrant.example.com:8443 --ca-file warrant-ca.pem --token-source gitlab
              # Kubernetes (a projected token with the cluster's audience):
              warrant join --endpoint warrant:8443 --ca-file /etc/warrant/ca.pem --token-source kubernetes
            """)

    @Option(name: .customLong("endpoint"), help: "A cluster API address host:port (repeat for more; or $WARRANT_ENDPOINTS, comma-separated).")
    var endpoints: [String] = []
    @Option(help: "The cluster's CA certificate (PEM), the only one trusted for its API (or $WARRANT_CA_FILE).") var caFile: String?
    @Option(help: "github, gitlab, kubernetes, file or env (or $WARRANT_TOKEN_SOURCE; default: detected from the CI environment).")
    var tokenSource: String?
    @Option(help: "The audience to request a GitHub token for: this cluster's (or $WARRANT_AUDIENCE).") var audience: String?
    @Option(help: "The token file for --token-source file or kubernetes.") var tokenFile: String?
    @Option(help: "The variable holding the token for gitlab (default WARRANT_ID_TOKEN) or env.") var tokenEnv: String?
    @Option(help: "Extra CA certificates (PEM) for the GitHub token request (GitHub Enterprise Server with a private CA).") var tokenRequestCa: String?
    @Option(help: "Where to write the identity (or $WARRANT_OUT).") var out: String?
    @Option(help: "Seconds the identity should live (at most the rule's cap).") var ttl: UInt32?

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        func fail(_ message: String) -> ExitCode {
            FileHandle.standardError.write(Data("warrant join: \(message)\n".utf8))
            return ExitCode.failure
        }
        let endpointTexts = endpoints.isEmpty ? (environment["WARRANT_ENDPOINTS"] ?? "").split(separator: ",").map(String.init) : endpoints
        guard !endpointTexts.isEmpty else { throw fail("say where the cluster is: --endpoint host:port (or WARRANT_ENDPOINTS)") }
        let hostPorts: [HostPort]
        do {
            hostPorts = try endpointTexts.map { try HostPort(parsing: $0.trimmingCharacters(in: .whitespaces), at: "--endpoint") }
        } catch {
            throw fail("\(error)")
        }
        guard let caPath = caFile ?? environment["WARRANT_CA_FILE"] else { throw fail("give the cluster's CA certificate: --ca-file FILE (or WARRANT_CA_FILE)") }
        guard let caPEM = try? String(contentsOfFile: caPath, encoding: .utf8), caPEM.contains("BEGIN CERTIFICATE") else {
            throw fail("cannot read a PEM certificate from the CA file \(caPath)")
        }
        let directory = out ?? environment["WARRANT_OUT"] ?? "warrant-identity"
        let source: TokenSource
        switch tokenSource ?? environment["WARRANT_TOKEN_SOURCE"] ?? Self.detect(environment) {
        case "github":
            guard let audience = audience ?? environment["WARRANT_AUDIENCE"] else { throw fail("a GitHub token is requested for an audience: --audience (this cluster's, or WARRANT_AUDIENCE)") }
            source = .github(audience: audience)
        case "gitlab": source = .gitlab(variable: tokenEnv ?? "WARRANT_ID_TOKEN")
        case "kubernetes": source = .kubernetes(path: tokenFile ?? TokenSource.kubernetesDefaultPath)
        case "file":
            guard let tokenFile else { throw fail("--token-source file needs --token-file PATH") }
            source = .file(path: tokenFile)
        case "env":
            guard let tokenEnv else { throw fail("--token-source env needs --token-env NAME") }
            source = .environment(variable: tokenEnv)
        case "":
            throw fail("no token source: not in a GitHub Actions or GitLab CI job; say --token-source github|gitlab|kubernetes|file|env")
        case let other:
            throw fail("unknown token source '\(other)' (github, gitlab, kubernetes, file or env)")
        }
        var extraRoots: String?
        if let tokenRequestCa {
            guard let text = try? String(contentsOfFile: tokenRequestCa, encoding: .utf8) else { throw fail("cannot read \(tokenRequestCa)") }
            extraRoots = text
        }

        print("getting the job's token from \(source.name)")
        let token: String
        do {
            token = try await source.token(environment: environment, extraRootsPEM: extraRoots)
        } catch {
            throw fail("\(error)")
        }
        // Check the output directory before asking for anything.
        do {
            try IdentityFiles.checkWritable(directory: directory)
        } catch {
            throw fail("\(error)")
        }
        let key = P256.Signing.PrivateKey(compactRepresentable: false)
        let csr = try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName("warrant join") }, privateKey: .init(key),
                                                attributes: CertificateSigningRequest.Attributes()).serializeAsPEM().pemString
        var request: [String: Any] = ["token": token, "csr": csr, "idempotency_key": UUID().uuidString]
        if let ttl { request["ttl_seconds"] = ttl }
        let client = try WarrantClient(endpoints: hostPorts, caPEM: caPEM)
        defer { Task { await client.close() } }
        print("asking the cluster (\(hostPorts.count) endpoint\(hostPorts.count == 1 ? "" : "s")) for an identity")
        let response: HTTPClientResponse
        do {
            // Retried on the next endpoint with the same idempotency key: a retry returns the same identity.
            response = try await client.request(.POST, "/v1/join", json: Array(try JSONSerialization.data(withJSONObject: request)))
        } catch {
            throw fail("\(error)")
        }
        let body = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
        guard response.status == .ok, let certificate = body["certificate"] as? String, let bundle = body["bundle"] as? String else {
            let error = body["error"] as? [String: Any]
            throw fail("the cluster refused: \(error?["code"] as? String ?? String(response.status.code)): \(error?["message"] as? String ?? response.text)"
                       + " (an operator can run 'warrant join explain' on the token to see why)")
        }
        do {
            try IdentityFiles.write(directory: directory, certificatePEM: certificate, keyPEM: key.pemRepresentation, bundlePEM: bundle)
        } catch {
            throw fail("\(error)")
        }
        print("wrote \(directory)/svid.pem, svid.key and bundle.pem: \(body["spiffe_id"] as? String ?? "?"), expires \(body["expires_at"] as? String ?? "?")")
    }

    static func detect(_ environment: [String: String]) -> String {
        if environment["GITHUB_ACTIONS"] == "true" { return "github" }
        if environment["GITLAB_CI"] == "true" { return "gitlab" }
        if FileManager.default.fileExists(atPath: TokenSource.kubernetesDefaultPath) { return "kubernetes" }
        return ""
    }
}
