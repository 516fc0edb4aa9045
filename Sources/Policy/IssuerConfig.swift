import Attestation
import Authority
import Crypto

/// A platform whose tokens the cluster accepts: the document
/// `policy/issuers/<name>`, in YAML or JSON.
///
/// ```yaml
/// method: github                      # github, gitlab, kubernetes or oidc
/// issuer: https://token.actions.githubusercontent.com   # the exact iss
/// audience: warrant.example.com       # default: the trust domain
/// algorithms: [RS256]                 # default per method
/// max_token_age_seconds: 1800         # the default for CI methods
/// max_token_lifetime_seconds: 3600
/// jwks: '{"keys": [...]}'             # instead of discovery (Kubernetes)
/// ca_pem: |                           # trust anchors for discovery/JWKS HTTPS
///   -----BEGIN CERTIFICATE-----
/// ```
public struct IssuerConfig: Sendable, Hashable {
    public static let documentPrefix = "policy/issuers/"
    static let keys: Set<String> = ["method", "issuer", "audience", "algorithms", "max_token_age_seconds", "max_token_lifetime_seconds",
                                    "jwks", "ca_pem", "profile"]
    public static let algorithms: Set<String> = ["RS256", "ES256", "ES384"]

    /// The document's last path segment.
    public var name: String
    public var method: JoinMethod
    public var requirements: TokenRequirements
    /// A JWKS given inline (no discovery); its bytes.
    public var staticJWKS: [UInt8]?
    /// PEM certificates trusted for the issuer's HTTPS endpoints instead of
    /// the system's (GitHub Enterprise Server, self-managed GitLab).
    public var caPEM: String?
    /// Whose tokens it takes and how it knows their keys, as 16 hex digits
    /// of a SHA-256 over its method, `iss`, inline JWKS and pinned CA (not
    /// the checks made on a token at its join: audience, algorithms, ages).
    public var fingerprint: String {
        var bytes = Array("warrant-issuer-v1".utf8)
        JoinRule.appendField(method.rawValue, to: &bytes)
        JoinRule.appendField(requirements.issuer, to: &bytes)
        JoinRule.appendField(staticJWKS.map { String(decoding: $0, as: UTF8.self) } ?? "-", to: &bytes)
        JoinRule.appendField(caPEM ?? "-", to: &bytes)
        return Hex.encode(Array(SHA256.hash(data: bytes).prefix(8)))
    }

    /// Where the discovery document is: `<issuer>/.well-known/openid-configuration`.
    public var discoveryURL: String {
        (requirements.issuer.hasSuffix("/") ? String(requirements.issuer.dropLast()) : requirements.issuer) + "/.well-known/openid-configuration"
    }

    /// Ready-made settings for platforms whose issuer is the same for
    /// everyone; the rest (GitHub Enterprise Server, self-managed GitLab,
    /// CircleCI, Bitbucket, Azure DevOps: issuers per instance or
    /// organization) name theirs.
    public static let profiles: [String: (method: JoinMethod, issuer: String, algorithms: Set<String>)] = [
        "github": (.github, "https://token.actions.githubusercontent.com", ["RS256"]),
        "gitlab": (.gitlab, "https://gitlab.com", ["RS256"]),
        "buildkite": (.oidc, "https://agent.buildkite.com", ["RS256"]),
        "terraform-cloud": (.oidc, "https://app.terraform.io", ["RS256"]),
    ]

    public init(name: String, method: JoinMethod, requirements: TokenRequirements, staticJWKS: [UInt8]? = nil, caPEM: String? = nil) {
        self.name = name
        self.method = method
        self.requirements = requirements
        self.staticJWKS = staticJWKS
        self.caPEM = caPEM
    }

    /// Reads a document; `defaultAudience` is the cluster's (its trust domain).
    public init(name: String, document: String, defaultAudience: String) throws(PolicyError) {
        let section = try YAMLSection.parse(document, keys: Self.keys)
        let profile = try section.optionalString("profile")
        let preset = try profile.map { (name) throws(PolicyError) in
            guard let preset = Self.profiles[name] else {
                throw PolicyError(path: "profile", problem: "unknown profile '\(name)' (known: \(Self.profiles.keys.sorted().joined(separator: ", ")))")
            }
            return preset
        }
        let methodName = try section.optionalString("method") ?? preset?.method.rawValue
        guard let methodName else { throw PolicyError(path: "method", problem: "is missing (github, gitlab, kubernetes or oidc)") }
        guard let method = JoinMethod(rawValue: methodName), method != .token else {
            throw PolicyError(path: "method", problem: "'\(methodName)' is not github, gitlab, kubernetes or oidc")
        }
        guard let issuer = try section.optionalString("issuer") ?? preset?.issuer else {
            throw PolicyError(path: "issuer", problem: "is missing: the exact 'iss' of the platform's tokens")
        }
        guard issuer.hasPrefix("https://") || issuer.hasPrefix("http://"), issuer.utf8.count <= 512, !issuer.contains("?"), !issuer.contains("#") else {
            throw PolicyError(path: "issuer", problem: "must be an https URL (http only for loopback test issuers) of at most 512 bytes, without query or fragment")
        }
        let audience = try section.optionalString("audience") ?? defaultAudience
        guard audience.utf8.count <= 256 else { throw PolicyError(path: "audience", problem: "is longer than 256 bytes") }
        let algorithms = Set(try section.strings("algorithms") ?? Array(preset?.algorithms ?? (method == .oidc ? ["RS256", "ES256"] : ["RS256"])))
        guard !algorithms.isEmpty else { throw PolicyError(path: "algorithms", problem: "must name at least one algorithm") }
        for algorithm in algorithms where !Self.algorithms.contains(algorithm) {
            throw PolicyError(path: "algorithms", problem: "'\(algorithm)' is not one of \(Self.algorithms.sorted().joined(separator: ", "))")
        }
        // CI tokens are minted at the start of a job step; Kubernetes
        // projected tokens live an hour and are refreshed at 80%.
        let ageDefault: Int64 = method == .kubernetes ? 3_600 : 1_800
        let lifetimeDefault: Int64 = method == .kubernetes ? 86_400 : 7_200
        let maxAge = try section.integer("max_token_age_seconds", in: 1...86_400, default: ageDefault)
        let maxLifetime = try section.integer("max_token_lifetime_seconds", in: 1...(7 * 86_400), default: lifetimeDefault)
        var staticJWKS: [UInt8]?
        if let jwks = try section.optionalString("jwks") {
            do {
                _ = try PlatformKeySet(jwks: Array(jwks.utf8), algorithms: algorithms)
            } catch {
                throw PolicyError(path: "jwks", problem: error.message)
            }
            staticJWKS = Array(jwks.utf8)
        }
        let caPEM = try section.optionalString("ca_pem")
        if let caPEM {
            guard caPEM.contains("-----BEGIN CERTIFICATE-----"), caPEM.utf8.count <= 64 << 10 else {
                throw PolicyError(path: "ca_pem", problem: "must be PEM certificates (at most 64 KiB)")
            }
        }
        self.init(name: name, method: method,
                  requirements: TokenRequirements(issuer: issuer, audience: audience, algorithms: algorithms, maxAgeSeconds: maxAge,
                                                  maxLifetimeSeconds: maxLifetime),
                  staticJWKS: staticJWKS, caPEM: caPEM)
    }
}
