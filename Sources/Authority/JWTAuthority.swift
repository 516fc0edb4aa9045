import Crypto
import Foundation

/// The trust domain's JWT-SVID signer (JWT-SVID.md): ES256 (or ES384,
/// RS256 for those key types) with a `kid`, `typ: JWT`, `sub` the SPIFFE
/// ID, `aud` and `exp` always present. The attested context goes in a
/// `warrant` claim.
public struct JWTAuthority: Sendable {
    public let trustDomain: String
    public let keyID: String
    public let publicKey: VerificationKey
    private let key: SigningKey

    public static let tokenBytesMax = 16 << 10
    public static let audiencesMax = 16

    public static func create(trustDomain: String, algorithm: KeyAlgorithm = .ecdsaP256) throws -> JWTAuthority {
        JWTAuthority(trustDomain: trustDomain, key: try SigningKey.generate(algorithm))
    }

    public init(trustDomain: String, key: SigningKey) {
        self.trustDomain = trustDomain
        self.key = key
        publicKey = key.publicKey
        keyID = publicKey.keyID
        headerPart = Base64URL.encode(Array(JSONText.object(["alg": publicKey.jwsAlgorithm, "kid": keyID, "typ": "JWT"]).utf8))
    }

    /// The encoded header, the same for every token of this key.
    private let headerPart: String

    public var privateKeyPEM: String { key.pemRepresentation }

    /// A JWT-SVID for `spiffeID`, for `audiences`, expiring `ttl` seconds
    /// after `now` (never past `notAfter`, the CA's end).
    public func issue(spiffeID: SpiffeID, audiences: [String], ttl: TimeInterval, attributes: Attributes, now: Date = Date(),
                      notAfter: Date? = nil) throws -> IssuedJWT {
        guard spiffeID.trustDomain == trustDomain else {
            throw AuthorityError("wrong_trust_domain", "\(spiffeID) is not in trust domain \(trustDomain)")
        }
        guard !audiences.isEmpty, audiences.count <= Self.audiencesMax, audiences.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 256 }) else {
            throw AuthorityError("bad_audience", "give 1 to \(Self.audiencesMax) audiences, each 1 to 256 bytes")
        }
        let issuedAt = Int(now.timeIntervalSince1970)
        var expiry = Int(now.addingTimeInterval(ttl).timeIntervalSince1970)
        if let notAfter { expiry = min(expiry, Int(notAfter.timeIntervalSince1970)) }
        guard expiry > issuedAt else { throw AuthorityError("bad_ttl", "the token would expire at once") }
        // Written by hand (keys sorted): JSONSerialization was most of the cost of issuing one.
        let audience = audiences.count == 1 ? JSONText.quote(audiences[0]) : "[" + audiences.map(JSONText.quote).joined(separator: ",") + "]"
        var claims = "{\"aud\":\(audience),\"exp\":\(expiry),\"iat\":\(issuedAt),\"sub\":\(JSONText.quote(spiffeID.description))"
        if !attributes.isEmpty { claims += ",\"warrant\":" + JSONText.object(attributes) }
        claims += "}"
        let signingInput = "\(headerPart).\(Base64URL.encode(Array(claims.utf8)))"
        let signature = try key.jwsSignature(for: Array(signingInput.utf8))
        let token = "\(signingInput).\(Base64URL.encode(signature))"
        return IssuedJWT(token: token, spiffeID: spiffeID, expiry: Date(timeIntervalSince1970: TimeInterval(expiry)))
    }
}

public struct IssuedJWT: Sendable {
    public let token: String
    public let spiffeID: SpiffeID
    public let expiry: Date
}

/// What verifying a JWT-SVID found.
public struct VerifiedJWT: Sendable {
    public let spiffeID: SpiffeID
    public let audiences: [String]
    public let expiry: Date
    public let issuedAt: Date?
    public let attributes: Attributes
    /// SHA-256 of the token, hex (what the audit records as its fingerprint).
    public let fingerprint: String
}

/// Checks JWT-SVIDs against a set of keys (by kid). Each key accepts only
/// the algorithm its type is pinned to, whatever the header asks for; only
/// `alg`, `kid` and `typ` may appear in the header; `aud` must hold the
/// expected audience; `exp` is required.
public struct JWTVerifier: Sendable {
    public let trustDomain: String
    public let keys: [String: VerificationKey]
    /// Signatures already checked under `keys` (see `SignatureMemo`).
    public let memo: SignatureMemo?

    public init(trustDomain: String, keys: [String: VerificationKey], memo: SignatureMemo? = nil) {
        self.trustDomain = trustDomain
        self.keys = keys
        self.memo = memo
    }

    public func verify(_ token: String, audience: String, now: Date = Date()) throws(AuthorityError) -> VerifiedJWT {
        guard token.utf8.count <= JWTAuthority.tokenBytesMax else {
            throw AuthorityError("token_too_large", "the token is larger than \(JWTAuthority.tokenBytesMax) bytes")
        }
        // Split as bytes (splitting the String walks grapheme clusters: a
        // tenth of verifying a token).
        let bytes = Array(token.utf8)
        let parts = bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 3 else { throw AuthorityError("malformed_token", "a JWT has exactly three dot-separated parts") }
        guard let headerBytes = Base64URL.decode(parts[0]), let claimBytes = Base64URL.decode(parts[1]),
              let signatureBytes = Base64URL.decode(parts[2]) else {
            throw AuthorityError("malformed_token", "a part is not base64url")
        }
        guard let header = Self.jsonObject(headerBytes) else {
            throw AuthorityError("malformed_token", "the header is not a JSON object")
        }
        guard Set(header.keys).isSubset(of: ["alg", "kid", "typ"]) else {
            throw AuthorityError("bad_header", "the header may hold only alg, kid and typ")
        }
        if let typ = header["typ"] { guard typ as? String == "JWT" || typ as? String == "JOSE" else { throw AuthorityError("bad_header", "typ must be JWT or JOSE") } }
        guard let kid = header["kid"] as? String else { throw AuthorityError("missing_kid", "the header has no kid") }
        guard let key = keys[kid] else { throw AuthorityError("unknown_key", "no key with kid '\(kid)' in the bundle") }
        guard header["alg"] as? String == key.jwsAlgorithm else {
            throw AuthorityError("bad_algorithm", "the key '\(kid)' accepts only \(key.jwsAlgorithm)")
        }
        let digest = SHA256.hash(data: bytes)
        let memoized = MemoDigest(digest)
        if memo?.value(for: memoized) != true {
            guard key.isValidJWS(message: Array(bytes[..<parts[2].startIndex].dropLast()), signature: signatureBytes) else {
                throw AuthorityError("bad_signature", "the signature does not verify")
            }
            memo?.remember(true, for: memoized)
        }
        guard let claims = Self.jsonObject(claimBytes) else {
            throw AuthorityError("malformed_token", "the claims are not a JSON object")
        }
        guard let sub = claims["sub"] as? String else { throw AuthorityError("bad_subject", "sub is missing") }
        let spiffeID: SpiffeID
        do {
            spiffeID = try SpiffeID(parsing: sub)
        } catch {
            throw AuthorityError("bad_subject", "sub is not a SPIFFE ID: \(error)")
        }
        guard spiffeID.trustDomain == trustDomain else { throw AuthorityError("wrong_trust_domain", "\(sub) is not in \(trustDomain)") }
        let audiences: [String]
        if let one = claims["aud"] as? String { audiences = [one] } else if let many = claims["aud"] as? [String] { audiences = many } else {
            throw AuthorityError("bad_audience", "aud is missing")
        }
        guard audiences.contains(audience) else { throw AuthorityError("wrong_audience", "the token is not for '\(audience)'") }
        guard let exp = (claims["exp"] as? NSNumber)?.doubleValue else { throw AuthorityError("missing_expiry", "exp is missing") }
        guard exp > now.timeIntervalSince1970 else { throw AuthorityError("expired", "the token expired at \(Date(timeIntervalSince1970: exp))") }
        return VerifiedJWT(spiffeID: spiffeID, audiences: audiences, expiry: Date(timeIntervalSince1970: exp),
                           issuedAt: (claims["iat"] as? NSNumber).map { Date(timeIntervalSince1970: $0.doubleValue) },
                           attributes: claims["warrant"] as? [String: String] ?? [:],
                           fingerprint: Hex.encode(digest))
    }
}

extension JWTVerifier {
    /// A JSON object as JSONSerialization gives it, read by the hand parser
    /// when it can (JWTs Warrant writes always are) and by JSONSerialization
    /// otherwise.
    static func jsonObject(_ bytes: [UInt8]) -> [String: Any]? {
        guard let flat = JSONText.parseFlatObject(bytes, membersMax: 128) else {
            return try? JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any]
        }
        var object: [String: Any] = [:]
        for (key, value) in flat {
            switch value {
            case .string(let text): object[key] = text
            case .integer(let number): object[key] = NSNumber(value: number)
            case .bool(let flag): object[key] = NSNumber(value: flag)
            case .null: object[key] = NSNull()
            case .strings(let members): object[key] = members
            case .stringArray(let items): object[key] = items
            }
        }
        return object
    }

    /// ES256 as JWS uses it: r and s, 32 bytes each (IEEE P1363), over
    /// SHA-256 of the message. Anything else is invalid.
    public static func isValidES256(publicKey: P256.Signing.PublicKey, message: [UInt8], signature: [UInt8]) -> Bool {
        VerificationKey.p256(publicKey).isValidJWS(message: message, signature: signature)
    }

    /// An ES256 verification key from a JWK (see `VerificationKey.fromJWK`):
    /// anything but EC P-256 is refused.
    public static func verificationKey(fromJWK jwk: [String: Any]) throws(AuthorityError) -> P256.Signing.PublicKey {
        guard jwk["kty"] as? String == "EC", jwk["crv"] as? String == "P-256" else {
            throw AuthorityError("unsupported_key", "only EC P-256 keys are accepted")
        }
        guard case .p256(let key) = try VerificationKey.fromJWK(jwk) else { throw AuthorityError("unsupported_key", "only EC P-256 keys are accepted") }
        return key
    }

    /// A compact JWS checked with ES256 pinned: the header must say ES256
    /// and the signature must verify with `key`. (What a JWT-SVID check does
    /// before its claims; the Wycheproof JWS vectors run through it.)
    public static func isValidCompactES256(_ jws: String, key: P256.Signing.PublicKey) -> Bool {
        let parts = jws.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerBytes = Base64URL.decode(parts[0]), Base64URL.decode(parts[1]) != nil,
              let signature = Base64URL.decode(parts[2]),
              let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any],
              header["alg"] as? String == "ES256" else { return false }
        return isValidES256(publicKey: key, message: Array("\(parts[0]).\(parts[1])".utf8), signature: signature)
    }
}
