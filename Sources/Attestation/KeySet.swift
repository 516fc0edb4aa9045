import Authority
import Encoding

/// An issuer's signing keys, by kid, each pinned to one algorithm the
/// issuer's configuration allows. Made only from a JWKS document; a set is
/// replaced whole, never edited.
public struct PlatformKeySet: Sendable {
    public static let bytesMax = 64 << 10
    public static let keysMax = 100
    /// JWK members that must be strings when present (RFC 7517, 7518).
    static let stringMembers: Set<String> = ["kty", "use", "alg", "kid", "crv", "x", "y", "n", "e"]
    static let limits = StrictJSON.Limits(bytesMax: bytesMax, depthMax: 4, valuesMax: 4_096)

    public let keys: [String: VerificationKey]
    /// Keys left out and why (wrong use, unsupported type, an algorithm the
    /// issuer is not allowed): for operators, never for trust.
    public let skipped: [String]

    public init(keys: [String: VerificationKey], skipped: [String] = []) {
        self.keys = keys
        self.skipped = skipped
    }

    /// Reads a JWKS (`{"keys": [...]}`). Refused whole: more than
    /// `bytesMax` bytes or `keysMax` keys, JSON that is not strict, a key
    /// without a plain `kid`, two keys with the same kid, or no key usable
    /// with `algorithms`.
    public init(jwks bytes: [UInt8], algorithms: Set<String>) throws(AttestationError) {
        let document: JSONValue
        do {
            document = try StrictJSON.parseObject(bytes, limits: Self.limits)
        } catch {
            throw AttestationError("bad_jwks", "the JWKS is not a plain JSON object: \(error)")
        }
        guard case .array(let entries)? = document["keys"] else { throw AttestationError("bad_jwks", "the JWKS has no 'keys' array") }
        guard entries.count <= Self.keysMax else { throw AttestationError("bad_jwks", "the JWKS has \(entries.count) keys; at most \(Self.keysMax) are read") }
        var keys: [String: VerificationKey] = [:]
        var skipped: [String] = []
        var seen = Set<[UInt8]>()
        for entry in entries {
            guard case .object(let members) = entry else { throw AttestationError("bad_jwks", "a JWKS entry is not an object") }
            guard let kid = entry["kid"]?.stringValue, PlatformToken.isPlainKeyID(kid) else {
                throw AttestationError("bad_jwks", "every key needs a kid of 1 to 128 letters, digits, '-', '_' or '.'")
            }
            guard seen.insert(Array(kid.utf8)).inserted else {
                throw AttestationError("duplicate_kid", "two keys share the kid '\(kid)'; the set is refused rather than guessing")
            }
            // RFC 7517: these members are strings (key_ops a list of
            // strings); one of another type is a malformed key, left out
            // with a reason, not read as absent (a "use": 1 skipped the
            // check on use).
            var jwk: [String: Any] = [:]
            var malformed: String?
            for (name, value) in members {
                switch value {
                case .string(let text) where name != "key_ops": jwk[name] = text
                case .array(let items) where name == "key_ops" && items.allSatisfy({ $0.stringValue != nil }): jwk[name] = items.compactMap(\.stringValue)
                default:
                    if name == "key_ops" || Self.stringMembers.contains(name) {
                        malformed = name == "key_ops" ? "key_ops is not a list of strings" : "'\(name)' is not a string"
                    } else if case .array(let items) = value {
                        jwk[name] = items.compactMap(\.stringValue)
                    }
                }
            }
            if let malformed {
                skipped.append("\(kid): \(malformed)")
                continue
            }
            let key: VerificationKey
            do {
                key = try VerificationKey.fromJWK(jwk)
            } catch {
                skipped.append("\(kid): \(error.message)")
                continue
            }
            guard algorithms.contains(key.jwsAlgorithm) else {
                skipped.append("\(kid): its algorithm \(key.jwsAlgorithm) is not allowed for this issuer")
                continue
            }
            keys[kid] = key
        }
        guard !keys.isEmpty else {
            throw AttestationError("no_usable_keys", "the JWKS has no key usable with \(algorithms.sorted().joined(separator: ", "))"
                                   + (skipped.isEmpty ? "" : " (\(skipped.prefix(3).joined(separator: "; ")))"))
        }
        self.keys = keys
        self.skipped = skipped
    }

    /// The `jwks_uri` of an OpenID discovery document whose `issuer` is
    /// exactly `issuer` (OpenID Connect Discovery 1.0, section 4.3).
    public static func jwksURI(discovery bytes: [UInt8], issuer: String) throws(AttestationError) -> String {
        let document: JSONValue
        do {
            document = try StrictJSON.parseObject(bytes, limits: Self.limits)
        } catch {
            throw AttestationError("bad_discovery", "the discovery document is not a plain JSON object: \(error)")
        }
        guard let named = document["issuer"]?.stringValue, named.utf8.elementsEqual(issuer.utf8) else {
            throw AttestationError("bad_discovery", "the discovery document names another issuer than \(issuer)")
        }
        guard let uri = document["jwks_uri"]?.stringValue, !uri.isEmpty, uri.utf8.count <= 2048 else {
            throw AttestationError("bad_discovery", "the discovery document has no jwks_uri")
        }
        return uri
    }
}
