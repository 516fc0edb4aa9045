import Authority
import Encoding
import Foundation
import NIOCore
import NIOPosix
import Node
import Synchronization
import Transport
import X509

public enum TestIssuerError: Error { case noKey(String) }

/// An OIDC provider of our own for tests and benchmarks: signing keys,
/// tokens with the claim sets GitHub Actions, GitLab CI and Kubernetes
/// document, and (once `serve()` is called) its discovery document and JWKS
/// over HTTPS on loopback, with a certificate from a CA of its own
/// (`caPEM`, for the issuer's `ca_pem`). It counts what it serves.
public final class TestIssuer: Sendable {
    public struct Key: Sendable {
        public let kid: String
        public let key: SigningKey
    }

    /// A claim's value as JSON text (`.string`, `.number`, `.raw`).
    public enum Claim: Sendable {
        case string(String)
        case number(Int64)
        case bool(Bool)
        /// Any JSON, as written.
        case raw(String)

        var json: String {
            switch self {
            case .string(let text): return JSONText.quote(text)
            case .number(let value): return String(value)
            case .bool(let flag): return flag ? "true" : "false"
            case .raw(let text): return text
            }
        }
    }

    private let state: Mutex<(keys: [Key], issuer: String, jwksOverride: [UInt8]?)>
    private let served = Mutex<(discovery: Int, jwks: Int)>((0, 0))
    private let server = Mutex<HTTPServer?>(nil)
    public let caPEM: String
    private let identity: NodeIdentity
    /// What a simulated GitHub runner's ACTIONS_ID_TOKEN_REQUEST_TOKEN is.
    public let actionsRequestToken = UUID().uuidString

    public init(keys: [KeyAlgorithm] = [.rsa2048]) throws {
        let made = try keys.enumerated().map { index, algorithm in Key(kid: "key-\(index + 1)", key: try SigningKey.generate(algorithm)) }
        state = Mutex((made, "https://127.0.0.1", nil))
        let ca = try ClusterCA.create(clusterID: "test-oidc-provider")
        caPEM = try ca.certificate.serializeAsPEM().pemString + "\n"
        identity = try ca.issueNodeIdentity(1, hosts: ["127.0.0.1"])
    }

    public var issuer: String { state.withLock { $0.issuer } }
    public var keys: [Key] { state.withLock { $0.keys } }
    public var discoveryFetches: Int { served.withLock { $0.discovery } }
    public var jwksFetches: Int { served.withLock { $0.jwks } }

    /// Adds a key (rotation at the provider); returns its kid.
    @discardableResult
    public func addKey(_ algorithm: KeyAlgorithm, kid: String? = nil) throws -> String {
        let key = try SigningKey.generate(algorithm)
        return state.withLock { state in
            let kid = kid ?? "key-\(state.keys.count + 1)"
            state.keys.append(Key(kid: kid, key: key))
            return kid
        }
    }

    /// Serves `bytes` as the JWKS instead of the real one (nil: the real one).
    public func overrideJWKS(_ bytes: [UInt8]?) { state.withLock { $0.jwksOverride = bytes } }

    /// The JWKS: every key with kid, alg and use.
    public func jwks() -> [UInt8] {
        let keys = state.withLock { $0.keys }
        let entries = keys.map { key -> String in
            var members = key.key.publicKey.jwk().compactMapValues { $0 as? String }
            members["kid"] = key.kid
            members["alg"] = key.key.publicKey.jwsAlgorithm
            members["use"] = "sig"
            return JSONText.object(members)
        }
        return Array("{\"keys\":[\(entries.joined(separator: ","))]}".utf8)
    }

    /// A signed token. `header` replaces the default header's members
    /// (alg, kid, typ) or adds to them; `claims` are written in order.
    public func mint(_ claims: [(String, Claim)], kid: String? = nil, header: [(String, Claim)] = []) throws -> String {
        let keys = state.withLock { $0.keys }
        guard let key = keys.first(where: { $0.kid == (kid ?? keys[0].kid) }) else { throw TestIssuerError.noKey(kid ?? "") }
        var headerMembers: [(String, Claim)] = [("alg", .string(key.key.publicKey.jwsAlgorithm)), ("kid", .string(key.kid)), ("typ", .string("JWT"))]
        for (name, value) in header {
            if let index = headerMembers.firstIndex(where: { $0.0 == name }) { headerMembers[index].1 = value } else { headerMembers.append((name, value)) }
        }
        let encodedHeader = Base64URL.encode(Array(Self.object(headerMembers).utf8))
        let encodedClaims = Base64URL.encode(Array(Self.object(claims).utf8))
        let input = "\(encodedHeader).\(encodedClaims)"
        return input + "." + Base64URL.encode(try key.key.jwsSignature(for: Array(input.utf8)))
    }

    public static func object(_ members: [(String, Claim)]) -> String {
        "{" + members.map { JSONText.quote($0.0) + ":" + $0.1.json }.joined(separator: ",") + "}"
    }

    /// Standard claims: iss, aud, iat, nbf, exp (lifetime), jti.
    public func standardClaims(audience: String, now: Int64 = Int64(Date().timeIntervalSince1970), lifetime: Int64 = 300,
                               jti: String = UUID().uuidString) -> [(String, Claim)] {
        [("iss", .string(issuer)), ("aud", .string(audience)), ("iat", .number(now)), ("nbf", .number(now - 5)), ("exp", .number(now + lifetime)),
         ("jti", .string(jti))]
    }

    /// A GitHub Actions job's claims (docs.github.com, "About security
    /// hardening with OpenID Connect"), for `repository` at `sha`.
    public func githubClaims(audience: String, repository: String = "acme/api", ownerID: String = "1342004", ref: String = "refs/heads/main",
                             sha: String = "0123456789abcdef0123456789abcdef01234567", workflow: String = "deploy",
                             eventName: String = "push", environment: String? = "production", now: Int64 = Int64(Date().timeIntervalSince1970),
                             lifetime: Int64 = 300, extra: [(String, Claim)] = []) -> [(String, Claim)] {
        let owner = String(repository.split(separator: "/").first ?? "")
        var claims = standardClaims(audience: audience, now: now, lifetime: lifetime)
        claims += [
            ("sub", .string("repo:\(repository):" + (environment.map { "environment:\($0)" } ?? "ref:\(ref)"))),
            ("ref", .string(ref)), ("sha", .string(sha)), ("repository", .string(repository)), ("repository_owner", .string(owner)),
            ("repository_owner_id", .string(ownerID)), ("run_id", .string("8110447001")), ("run_number", .string("42")), ("run_attempt", .string("1")),
            ("repository_visibility", .string("private")), ("repository_id", .string("72855771")), ("actor_id", .string("12345")),
            ("actor", .string("octocat")), ("workflow", .string(workflow)), ("head_ref", .string("")), ("base_ref", .string("")),
            ("event_name", .string(eventName)), ("ref_type", .string("branch")), ("ref_protected", .string("true")),
            ("workflow_ref", .string("\(repository)/.github/workflows/\(workflow).yml@\(ref)")), ("workflow_sha", .string(sha)),
            ("job_workflow_ref", .string("\(repository)/.github/workflows/\(workflow).yml@\(ref)")), ("job_workflow_sha", .string(sha)),
            ("runner_environment", .string("github-hosted")),
        ]
        if let environment { claims.append(("environment", .string(environment))) }
        return claims + extra
    }

    /// A GitLab CI job's claims (docs.gitlab.com, "ID token authentication").
    public func gitlabClaims(audience: String, projectPath: String = "acme/platform/api", namespaceID: String = "72", ref: String = "main",
                             sha: String = "fedcba9876543210fedcba9876543210fedcba98", pipelineSource: String = "push",
                             now: Int64 = Int64(Date().timeIntervalSince1970), lifetime: Int64 = 3_600) -> [(String, Claim)] {
        let namespace = projectPath.split(separator: "/").dropLast().joined(separator: "/")
        return standardClaims(audience: audience, now: now, lifetime: lifetime) + [
            ("sub", .string("project_path:\(projectPath):ref_type:branch:ref:\(ref)")), ("namespace_id", .string(namespaceID)),
            ("namespace_path", .string(namespace)), ("project_id", .string("22")), ("project_path", .string(projectPath)),
            ("user_id", .string("42")), ("user_login", .string("deployer")), ("user_email", .string("deployer@example.com")),
            ("user_access_level", .string("maintainer")), ("pipeline_id", .string("1212")), ("pipeline_source", .string(pipelineSource)),
            ("job_id", .string("3434")), ("ref", .string(ref)), ("ref_type", .string("branch")), ("ref_path", .string("refs/heads/\(ref)")),
            ("ref_protected", .string("true")), ("environment", .string("production")), ("environment_protected", .string("true")),
            ("deployment_tier", .string("production")), ("runner_id", .string("1")), ("runner_environment", .string("gitlab-hosted")),
            ("sha", .string(sha)), ("project_visibility", .string("private")),
            ("ci_config_ref_uri", .string("gitlab.example.com/\(projectPath)//.gitlab-ci.yml@refs/heads/\(ref)")), ("ci_config_sha", .string(sha)),
        ]
    }

    /// A projected Kubernetes service-account token's claims.
    public func kubernetesClaims(audience: String, namespace: String = "payments", serviceAccount: String = "api",
                                 now: Int64 = Int64(Date().timeIntervalSince1970), lifetime: Int64 = 3_600) -> [(String, Claim)] {
        [("aud", .raw("[\(JSONText.quote(audience))]")), ("exp", .number(now + lifetime)), ("iat", .number(now)), ("iss", .string(issuer)),
         ("jti", .string(UUID().uuidString)),
         ("kubernetes.io", .raw("""
            {"namespace":\(JSONText.quote(namespace)),"node":{"name":"node-1","uid":"6a5b"},"pod":{"name":"api-7d9f","uid":"c0ffee"},\
            "serviceaccount":{"name":\(JSONText.quote(serviceAccount)),"uid":"5e7a"},"warnafter":\(now + lifetime / 2)}
            """)),
         ("nbf", .number(now)), ("sub", .string("system:serviceaccount:\(namespace):\(serviceAccount)"))]
    }

    /// Serves discovery and the JWKS over HTTPS on 127.0.0.1 (a free
    /// port); the issuer becomes `https://127.0.0.1:<port>`.
    public func serve() async throws {
        let http = try HTTPServer(group: MultiThreadedEventLoopGroup.singleton, identity: identity) { [self] request in
            switch request.path {
            case "/.well-known/openid-configuration":
                served.withLock { $0.discovery += 1 }
                let issuer = self.issuer
                let body = JSONText.object(["issuer": issuer, "jwks_uri": issuer + "/jwks"])
                return HTTPResponse(status: .ok, headers: [("content-type", "application/json")], body: Array(body.utf8))
            case "/jwks":
                served.withLock { $0.jwks += 1 }
                let body = state.withLock { $0.jwksOverride } ?? jwks()
                return HTTPResponse(status: .ok, headers: [("content-type", "application/json")], body: body)
            case "/actions/token":
                // A simulated GitHub runner's token endpoint: bearer request token, ?audience=.
                guard request.headers.first(name: "authorization") == "bearer \(actionsRequestToken)" else { return HTTPResponse(status: .unauthorized) }
                let audience = request.query["audience"] ?? "https://github.com/acme"
                // A simulated runner's token carries GitHub's claims for its audience.
                let claims = githubClaims(audience: audience)
                guard let token = try? mint(claims) else { return HTTPResponse(status: .internalServerError) }
                return HTTPResponse(status: .ok, headers: [("content-type", "application/json")],
                                    body: Array(JSONText.object(["value": token, "count": "1"]).utf8))
            case "/redirect/.well-known/openid-configuration":
                return HTTPResponse(status: .found, headers: [("location", self.issuer + "/.well-known/openid-configuration")])
            default:
                return HTTPResponse(status: .notFound)
            }
        }
        let address = try await http.start(at: try SocketAddress(ipAddress: "127.0.0.1", port: 0))
        server.withLock { $0 = http }
        state.withLock { $0.issuer = "https://127.0.0.1:\(address.port ?? 0)" }
    }

    public func stop() async {
        await server.withLock { $0 }?.stop()
    }
}
