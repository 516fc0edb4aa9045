import Crypto
import Foundation

/// The trust domain's JWT-SVID signer (JWT-SVID.md): ES256 (or ES384,
/// RS256 for those key types) with a `kid`, `typ: JWT`, `sub` the SPIFFE
/// ID, `aud` and `exp` always present, and `jti` its serial: 32 hex digits
/// chosen at random before signing, so that the serial (what revocation
/// and the issuance records name it by) does not hang on the signature's
/// bytes, which anyone may rewrite (an ECDSA signature (r, s) verifies
/// as (r, n - s) too). The attested context goes in a `warrant` claim.
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
        headerPart = Array(Base64URL.encode(Array(JSONText.object(["alg": publicKey.jwsAlgorithm, "kid": keyID, "typ": "JWT"]).utf8)).utf8)
    }

    /// The encoded header, the same for every token of this key.
    private let headerPart: [UInt8]

    public var privateKeyPEM: String { key.pemRepresentation }

    /// A JWT-SVID for `spiffeID`, for `audiences`, expiring `ttl` seconds
    /// after `now` (never past `notAfter`, the CA's end), with `serial` (32
    /// lower-case hex digits; by default a random one) as its `jti` and
    /// `issuer`, if given, as its `iss`.
    public func issue(spiffeID: SpiffeID, audiences: [String], ttl: TimeInterval, attributes: Attributes, now: Date = Date(),
                      notAfter: Date? = nil, serial: String = JWTAuthority.randomSerial(), issuer: String? = nil) throws -> IssuedJWT {
        guard spiffeID.trustDomain == trustDomain else {
            throw AuthorityError("wrong_trust_domain", "\(spiffeID) is not in trust domain \(trustDomain)")
        }
        guard spiffeID.namesWorkload else { throw AuthorityError("bad_spiffe_id", SpiffeID.workloadPathMessage) }
        guard !audiences.isEmpty, audiences.count <= Self.audiencesMax, audiences.allSatisfy({ !$0.isEmpty && $0.utf8.count <= 256 }) else {
            throw AuthorityError("bad_audience", "give 1 to \(Self.audiencesMax) audiences, each 1 to 256 bytes")
        }
        let issuedAt = Int(now.timeIntervalSince1970)
        var expiry = Int(now.addingTimeInterval(ttl).timeIntervalSince1970)
        if let notAfter { expiry = min(expiry, Int(notAfter.timeIntervalSince1970)) }
        guard expiry > issuedAt else { throw AuthorityError("bad_ttl", "the token would expire at once") }
        guard Self.isSerial(serial) else { throw AuthorityError("bad_serial", "a JWT-SVID's serial is 32 lower-case hex digits") }
        // Written by hand (keys sorted): JSONSerialization was most of the cost of issuing one.
        var claims = JSONText.Builder(capacity: 200 + spiffeID.description.utf8.count + (issuer?.utf8.count ?? 0) + attributes.count * 48)
        claims.raw("{\"aud\":")
        if audiences.count == 1 {
            claims.quoted(audiences[0])
        } else {
            claims.raw("[")
            for (position, audience) in audiences.enumerated() {
                if position > 0 { claims.raw(",") }
                claims.quoted(audience)
            }
            claims.raw("]")
        }
        claims.raw(",\"exp\":")
        claims.number(expiry)
        claims.raw(",\"iat\":")
        claims.number(issuedAt)
        if let issuer {
            claims.raw(",\"iss\":")
            claims.quoted(issuer)
        }
        claims.raw(",\"jti\":")
        claims.quoted(serial)
        claims.raw(",\"sub\":")
        claims.quoted(spiffeID.description)
        if !attributes.isEmpty {
            claims.raw(",\"warrant\":")
            claims.object(attributes)
        }
        claims.raw("}")
        // The token is built in one buffer: header, claims, then the
        // signature over what precedes it.
        var token: [UInt8] = []
        token.reserveCapacity(headerPart.count + (claims.bytes.count + 2) / 3 * 4 + 2 + 2 * 128)
        token.append(contentsOf: headerPart)
        token.append(UInt8(ascii: "."))
        Base64URL.encode(claims.bytes, into: &token)
        let signature = try key.jwsSignature(for: token)
        token.append(UInt8(ascii: "."))
        Base64URL.encode(signature, into: &token)
        return IssuedJWT(bytes: token, serial: serial, spiffeID: spiffeID, expiry: Date(timeIntervalSince1970: TimeInterval(expiry)))
    }

    /// 128 random bits (the first cleared, as in X.509 serials), as 32 hex digits.
    public static func randomSerial() -> String {
        Hex.encode(X509Authority.randomSerialBytes())
    }

    /// Whether `text` is a JWT-SVID serial: 32 lower-case hex digits.
    public static func isSerial(_ text: String) -> Bool {
        text.utf8.count == 32 && text.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }

    /// The serial of a JWT-SVID made before `jti` was written: the first
    /// 32 hex digits of its SHA-256 (hex).
    public static func legacySerial(fingerprint: String) -> String { String(fingerprint.prefix(32)) }
}

public struct IssuedJWT: Sendable {
    /// The compact JWS, as bytes (what is hashed for its fingerprint and kept as the artifact).
    public let bytes: [UInt8]
    /// Its `jti`: 32 hex digits.
    public let serial: String
    public let spiffeID: SpiffeID
    public let expiry: Date

    public var token: String { String(decoding: bytes, as: UTF8.self) }
}

/// What verifying a JWT-SVID found.
public struct VerifiedJWT: Sendable {
    public let spiffeID: SpiffeID
    public let audiences: [String]
    public let expiry: Date
    public let issuedAt: Date?
    public let attributes: Attributes
    /// Its `jti` (or, for a token made before `jti` was written, the first
    /// 32 hex digits of its SHA-256): what revocation names it by.
    public let serial: String
    /// SHA-256 of the token, hex (what the audit records as its fingerprint).
    public let fingerprint: String
    /// How its signature was known to be good.
    public let signature: SignatureCheck
}

/// How a verification knew an identity's signature was good.
public enum SignatureCheck: String, Sendable {
    /// Checked (ECDSA or RSA) just now.
    case checked
    /// Checked before under the same keys (`VerificationMemo`).
    case remembered
    /// Its SHA-256 is in the replicated issuance records: these are the
    /// bytes the leader signed, so checking the signature would only
    /// repeat what the leader did (see `IssuedLookup`).
    case recorded
}

/// Whether the trust domain's issuance records, which every node holds
/// (replicated through the log), name an identity of this kind with this
/// serial, expiry (milliseconds) and SHA-256 (hex). A yes must come only
/// from records the leader committed: it stands in for the signature.
public typealias IssuedLookup = @Sendable (_ kind: IssuedKind, _ serial: String, _ notAfterMillis: UInt64, _ fingerprint: String) -> Bool

public enum IssuedKind: Sendable { case x509, jwt }

/// Checks JWT-SVIDs against a set of keys (by kid). Each key accepts only
/// the algorithm its type is pinned to, whatever the header asks for; only
/// `alg`, `kid` and `typ` may appear in the header; `aud` must hold the
/// expected audience; `exp` is required.
public struct JWTVerifier: Sendable {
    public let trustDomain: String
    public let keys: [String: VerificationKey]
    /// Signatures already checked under `keys` (see `SignatureMemo`).
    public let memo: SignatureMemo?
    /// The issuance records, consulted before a signature is checked: a
    /// JWT-SVID's record is under its serial (`jti`) and expires with it.
    public let issued: IssuedLookup?

    public init(trustDomain: String, keys: [String: VerificationKey], memo: SignatureMemo? = nil, issued: IssuedLookup? = nil) {
        self.trustDomain = trustDomain
        self.keys = keys
        self.memo = memo
        self.issued = issued
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
        guard let header = Self.claims(headerBytes) else {
            throw AuthorityError("malformed_token", "the header is not a JSON object")
        }
        guard header.keys.allSatisfy({ $0 == "alg" || $0 == "kid" || $0 == "typ" }) else {
            throw AuthorityError("bad_header", "the header may hold only alg, kid and typ")
        }
        if let typ = header["typ"] { guard typ.string == "JWT" || typ.string == "JOSE" else { throw AuthorityError("bad_header", "typ must be JWT or JOSE") } }
        guard let kid = header["kid"]?.string else { throw AuthorityError("missing_kid", "the header has no kid") }
        guard let key = keys[kid] else { throw AuthorityError("unknown_key", "no key with kid '\(kid)' in the bundle") }
        guard header["alg"]?.string == key.jwsAlgorithm else {
            throw AuthorityError("bad_algorithm", "the key '\(kid)' accepts only \(key.jwsAlgorithm)")
        }
        let digest = SHA256.digest(bytes)
        let fingerprint = Hex.encode(digest)
        let memoized = MemoDigest(digest)
        // Parsed here, refused (if it does not parse) only once the signature is known good.
        let parsedClaims = Self.claims(claimBytes)
        // A jti that is not a serial is refused below, once the signature is known good.
        let serial = parsedClaims?["jti"] == nil ? JWTAuthority.legacySerial(fingerprint: fingerprint) : parsedClaims?["jti"]?.string ?? ""
        var signature = SignatureCheck.remembered
        if memo?.value(for: memoized) != true {
            if let issued, let exp = parsedClaims?["exp"]?.number, exp > 0, exp < 1e12, exp.rounded(.down) == exp, JWTAuthority.isSerial(serial),
               issued(.jwt, serial, UInt64(exp) * 1000, fingerprint) {
                signature = .recorded
            } else {
                guard key.isValidJWS(message: Array(bytes[..<parts[2].startIndex].dropLast()), signature: signatureBytes) else {
                    throw AuthorityError("bad_signature", "the signature does not verify")
                }
                memo?.remember(true, for: memoized)
                signature = .checked
            }
        }
        guard let claims = parsedClaims else {
            throw AuthorityError("malformed_token", "the claims are not a JSON object")
        }
        guard JWTAuthority.isSerial(serial) else { throw AuthorityError("malformed_token", "jti is not a serial (32 lower-case hex digits)") }
        guard let sub = claims["sub"]?.string else { throw AuthorityError("bad_subject", "sub is missing") }
        let spiffeID: SpiffeID
        do {
            spiffeID = try SpiffeID(parsing: sub)
        } catch {
            throw AuthorityError("bad_subject", "sub is not a SPIFFE ID: \(error)")
        }
        guard spiffeID.trustDomain == trustDomain else { throw AuthorityError("wrong_trust_domain", "\(sub) is not in \(trustDomain)") }
        // A workload's ID, as X.509 verification requires of a leaf.
        guard spiffeID.namesWorkload else { throw AuthorityError("bad_subject", "sub is the bare trust domain ID; \(SpiffeID.workloadPathMessage)") }
        let audiences: [String]
        switch claims["aud"] {
        case .string(let one): audiences = [one]
        case .strings(let many): audiences = many
        default: throw AuthorityError("bad_audience", "aud is missing")
        }
        // Byte for byte: String's == takes canonically equivalent spellings
        // (é and e with a combining accent, the Kelvin sign and K) as one.
        guard audiences.contains(where: { $0.utf8.elementsEqual(audience.utf8) }) else {
            throw AuthorityError("wrong_audience", "the token is not for '\(audience)'")
        }
        guard let exp = claims["exp"]?.number else { throw AuthorityError("missing_expiry", "exp is missing") }
        guard Self.isTime(exp) else { throw AuthorityError("malformed_token", "exp is not a time (seconds since 1970, below 2^40)") }
        guard exp > now.timeIntervalSince1970 else { throw AuthorityError("expired", "the token expired at \(Date(timeIntervalSince1970: exp))") }
        // Warrant writes no nbf; a token that has one is not taken before it
        // (RFC 7519 4.1.5), with the leeway X.509 notBefore gets (`backdate`).
        if let nbf = claims["nbf"] {
            guard case .number(let at) = nbf, Self.isTime(at) else { throw AuthorityError("malformed_token", "nbf is not a time (seconds since 1970, below 2^40)") }
            guard at <= now.timeIntervalSince1970 + X509Authority.backdate else {
                throw AuthorityError("not_yet_valid", "the token is not valid until \(Date(timeIntervalSince1970: at))")
            }
        }
        let iat = claims["iat"]?.number
        if let iat, !Self.isTime(iat) { throw AuthorityError("malformed_token", "iat is not a time (seconds since 1970, below 2^40)") }
        return VerifiedJWT(spiffeID: spiffeID, audiences: audiences, expiry: Date(timeIntervalSince1970: exp),
                           issuedAt: iat.map { Date(timeIntervalSince1970: $0) },
                           attributes: claims["warrant"]?.map ?? [:],
                           serial: serial, fingerprint: fingerprint, signature: signature)
    }
}

extension JWTVerifier {
    /// A NumericDate this verifier takes: finite, from 1970 on, below 2^40
    /// seconds (as platform tokens' times are bounded); fractions allowed
    /// (RFC 7519 section 2). Beyond it (1e400 reads as infinity) a time
    /// could not be written as a date.
    static func isTime(_ seconds: Double) -> Bool { seconds.isFinite && seconds >= 0 && seconds < 1_099_511_627_776 }

    /// A header's or claim's value, as verification reads it.
    enum ClaimValue {
        case string(String)
        /// A JSON number (true and false read as 1 and 0, as NSNumber has them).
        case number(Double)
        case strings([String])
        case map([String: String])
        case other

        var string: String? { if case .string(let text) = self { text } else { nil } }
        var number: Double? { if case .number(let value) = self { value } else { nil } }
        var map: [String: String]? { if case .map(let members) = self { members } else { nil } }
    }

    /// A JSON object's members, read by the hand parser when it can (JWTs
    /// Warrant writes always are) and by the strict parser otherwise, which
    /// refuses a duplicate member instead of letting the last one win.
    static func claims(_ bytes: [UInt8]) -> [String: ClaimValue]? {
        if let flat = JSONText.parseFlatObject(bytes, membersMax: 128) {
            return flat.mapValues { value in
                switch value {
                case .string(let text): .string(text)
                case .integer(let number): .number(Double(number))
                case .bool(let flag): .number(flag ? 1 : 0)
                case .null: .other
                case .strings(let members): .map(members)
                case .stringArray(let items): .strings(items)
                }
            }
        }
        guard case .object(let members)? = try? StrictJSON.parseObject(bytes, limits: .init(bytesMax: JWTAuthority.tokenBytesMax)) else { return nil }
        var claims: [String: ClaimValue] = [:]
        for (name, value) in members {
            switch value {
            case .string(let text): claims[name] = .string(text)
            case .integer(let number): claims[name] = .number(Double(number))
            case .number(let text): claims[name] = Double(text).map(ClaimValue.number) ?? .other
            case .bool(let flag): claims[name] = .number(flag ? 1 : 0)
            case .array(let items):
                let texts = items.compactMap(\.stringValue)
                claims[name] = texts.count == items.count ? .strings(texts) : .other
            case .object(let inner):
                let texts = inner.compactMap { member in member.1.stringValue.map { (member.0, $0) } }
                claims[name] = texts.count == inner.count ? .map(Dictionary(texts, uniquingKeysWith: { first, _ in first })) : .other
            case .null: claims[name] = .other
            }
        }
        return claims
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
