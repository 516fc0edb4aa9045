import Authority
import Crypto
import Encoding

/// How a job proves what it is.
public enum JoinMethod: String, Sendable, Hashable, CaseIterable, Codable {
    case github, gitlab, kubernetes, oidc, token
}

/// What a platform token must satisfy for one configured issuer.
public struct TokenRequirements: Sendable, Hashable {
    /// The `iss` value, compared as bytes.
    public var issuer: String
    /// This cluster's audience; `aud` (a string or an array) must hold it.
    public var audience: String
    /// JWS algorithms allowed for this issuer (RS256, ES256 and the like).
    public var algorithms: Set<String>
    /// How old (`now - iat`) a token may be.
    public var maxAgeSeconds: Int64
    /// How long (`exp - iat`) a token may live.
    public var maxLifetimeSeconds: Int64
    /// Clock skew allowed for `iat` and `nbf` (at most 60 s).
    public var leewaySeconds: Int64

    public static let leewayMax: Int64 = 60

    public init(issuer: String, audience: String, algorithms: Set<String>, maxAgeSeconds: Int64, maxLifetimeSeconds: Int64, leewaySeconds: Int64 = 60) {
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.maxAgeSeconds = maxAgeSeconds
        self.maxLifetimeSeconds = maxLifetimeSeconds
        self.leewaySeconds = min(max(0, leewaySeconds), Self.leewayMax)
    }
}

/// A platform token whose signature, issuer, audience and times checked out.
public struct VerifiedToken: Sendable, Hashable {
    /// Every claim as text (see `TokenVerifier.flatten`), for rules,
    /// templates and the identity's context.
    public var claims: [String: String]
    /// SHA-256 (hex) of the issuer and `jti`, or of the whole token when it
    /// has no `jti`: consumed once in the ledger, so a token joins once.
    public var replayKey: String
    public var issuedAt: Int64
    public var expiresAt: Int64
}

public enum TokenVerifier {
    /// Checks `token` against `requirements` with the issuer's `keys`, at
    /// `now` (seconds). The order matters: the algorithm and key are
    /// settled from configuration before any signature math, and claims are
    /// trusted only after the signature verifies.
    public static func verify(_ token: PlatformToken, method: JoinMethod, requirements: TokenRequirements, keys: PlatformKeySet,
                              now: Int64) throws(AttestationError) -> VerifiedToken {
        guard token.issuer.utf8.elementsEqual(requirements.issuer.utf8) else {
            throw AttestationError("wrong_issuer", "the token's issuer is not \(requirements.issuer)")
        }
        try checkSignature(token.jws, algorithms: requirements.algorithms, keys: keys)
        let claims = token.claims
        switch claims["aud"] {
        case .string(let audience)? where audience.utf8.elementsEqual(requirements.audience.utf8): break
        case .array(let audiences)? where audiences.contains(where: { $0.stringValue?.utf8.elementsEqual(requirements.audience.utf8) == true }): break
        case nil: throw AttestationError("wrong_audience", "the token has no 'aud'; it must name \(requirements.audience)")
        default: throw AttestationError("wrong_audience", "the token's audience does not include \(requirements.audience)")
        }
        let exp = try time(claims, "exp", required: true)!
        let iat = try time(claims, "iat", required: true)!
        let nbf = try time(claims, "nbf", required: false)
        let leeway = requirements.leewaySeconds
        guard now < exp else { throw AttestationError("token_expired", "the token expired \(now - exp) s ago") }
        guard iat <= now + leeway else { throw AttestationError("issued_in_future", "the token's iat is \(iat - now) s in the future") }
        if let nbf { guard nbf <= now + leeway else { throw AttestationError("not_yet_valid", "the token's nbf is \(nbf - now) s in the future") } }
        guard now - iat <= requirements.maxAgeSeconds else {
            throw AttestationError("token_too_old", "the token was issued \(now - iat) s ago; this issuer allows \(requirements.maxAgeSeconds) s")
        }
        guard exp - iat <= requirements.maxLifetimeSeconds, exp > iat else {
            throw AttestationError("lifetime_too_long", "the token lives \(exp - iat) s; this issuer allows \(requirements.maxLifetimeSeconds) s")
        }
        var replaySource = Array("warrant-join-replay\0".utf8)
        if let jti = claims["jti"] {
            guard let text = jti.stringValue, (1...256).contains(text.utf8.count) else { throw AttestationError("bad_claim", "'jti' must be a string of 1 to 256 bytes") }
            replaySource += Array("jti\0".utf8) + Array(token.issuer.utf8) + [0] + Array(text.utf8)
        } else {
            // What was signed, not the signature: an ECDSA signature (r, s)
            // has a twin (r, n - s) that verifies too, which anyone can
            // make from a used token.
            replaySource += Array("token\0".utf8) + token.signingInput
        }
        // Names that differ in bytes but that String takes as one (a
        // look-alike of another claim's name) would collapse when flattened,
        // the last one winning, and a rule on one would match the other.
        if case .object(let members) = claims, Set(members.map(\.0)).count != members.count {
            throw AttestationError("bad_claim", "two claims have names that differ only in Unicode spelling; the token is refused")
        }
        return VerifiedToken(claims: flatten(claims, method: method), replayKey: Hex.encode(Array(SHA256.hash(data: replaySource))),
                             issuedAt: iat, expiresAt: exp)
    }

    /// The signature step alone: the algorithm must be allowed, the kid
    /// known, the key pinned to that algorithm, and the signature valid.
    public static func checkSignature(_ token: CompactJWS, algorithms: Set<String>, keys: PlatformKeySet) throws(AttestationError) {
        guard algorithms.contains(token.algorithm) else {
            throw AttestationError("algorithm_not_allowed", "\(PlatformToken.printable(token.algorithm)) is not allowed for this issuer (allowed: \(algorithms.sorted().joined(separator: ", ")))")
        }
        guard let key = keys.keys[token.keyID] else {
            throw AttestationError("unknown_key", "the issuer's JWKS has no usable key '\(token.keyID)'")
        }
        guard key.jwsAlgorithm == token.algorithm else {
            throw AttestationError("algorithm_mismatch", "the key '\(token.keyID)' is a \(key.jwsAlgorithm) key; the token claims \(PlatformToken.printable(token.algorithm))")
        }
        guard key.isValidJWS(message: token.signingInput, signature: token.signature) else {
            throw AttestationError("bad_signature", "the token's signature does not verify")
        }
    }

    static func time(_ claims: JSONValue, _ name: String, required: Bool) throws(AttestationError) -> Int64? {
        switch claims[name] {
        case .integer(let value)?:
            guard value > 0, value < 1 << 40 else { throw AttestationError("bad_claim", "'\(name)' is not a plausible time") }
            return value
        case nil:
            if required { throw AttestationError("missing_claim", "the token has no '\(name)'") }
            return nil
        default:
            throw AttestationError("bad_claim", "'\(name)' must be an integer number of seconds")
        }
    }

    /// Claims as text: strings as they are, integers in decimal, booleans
    /// as true/false; arrays and objects are left out, except what a method
    /// defines (Kubernetes: `namespace`, `service_account`,
    /// `service_account_uid`, `pod`, `pod_uid`, `node`, `node_uid` from
    /// `kubernetes.io`).
    public static func flatten(_ claims: JSONValue, method: JoinMethod) -> [String: String] {
        guard case .object(let members) = claims else { return [:] }
        var flat: [String: String] = [:]
        for (name, value) in members {
            switch value {
            case .string(let text): flat[name] = text
            case .integer(let number): flat[name] = String(number)
            case .bool(let flag): flat[name] = flag ? "true" : "false"
            default: break
            }
        }
        if method == .kubernetes, let k8s = claims["kubernetes.io"] {
            if let namespace = k8s["namespace"]?.stringValue { flat["namespace"] = namespace }
            for (object, prefix) in [("serviceaccount", "service_account"), ("pod", "pod"), ("node", "node")] {
                if let name = k8s[object]?["name"]?.stringValue { flat[prefix] = name }
                if let uid = k8s[object]?["uid"]?.stringValue { flat[prefix + "_uid"] = uid }
            }
        }
        return flat
    }
}
