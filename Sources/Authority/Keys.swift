import Crypto
import Foundation
import SwiftASN1
import X509
import _CryptoExtras

/// The key types a trust domain's authorities may use. P-256 is the
/// default; P-384 and RSA are for relying parties that require them.
public enum KeyAlgorithm: String, Sendable, Hashable, Codable, CaseIterable {
    case ecdsaP256 = "ecdsa-p256"
    case ecdsaP384 = "ecdsa-p384"
    case rsa2048 = "rsa-2048"
    case rsa3072 = "rsa-3072"
    case rsa4096 = "rsa-4096"

    public static let names = allCases.map(\.rawValue).joined(separator: ", ")
}

/// A private signing key of one of the supported types.
public enum SigningKey: Sendable {
    case p256(P256.Signing.PrivateKey)
    case p384(P384.Signing.PrivateKey)
    case rsa(_RSA.Signing.PrivateKey)

    public static func generate(_ algorithm: KeyAlgorithm) throws -> SigningKey {
        switch algorithm {
        case .ecdsaP256: return .p256(P256.Signing.PrivateKey(compactRepresentable: false))
        case .ecdsaP384: return .p384(P384.Signing.PrivateKey(compactRepresentable: false))
        case .rsa2048: return .rsa(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        case .rsa3072: return .rsa(try _RSA.Signing.PrivateKey(keySize: .bits3072))
        case .rsa4096: return .rsa(try _RSA.Signing.PrivateKey(keySize: .bits4096))
        }
    }

    /// Reads a PEM private key of any supported type.
    public init(pemRepresentation pem: String) throws {
        if let key = try? P256.Signing.PrivateKey(pemRepresentation: pem) {
            self = .p256(key)
        } else if let key = try? P384.Signing.PrivateKey(pemRepresentation: pem) {
            self = .p384(key)
        } else if let key = try? _RSA.Signing.PrivateKey(pemRepresentation: pem), key.keySizeInBits >= 2048 {
            self = .rsa(key)
        } else {
            throw AuthorityError("bad_key", "the private key is not ECDSA P-256, P-384, or RSA of at least 2048 bits")
        }
    }

    public var pemRepresentation: String {
        switch self {
        case .p256(let key): return key.pemRepresentation
        case .p384(let key): return key.pemRepresentation
        case .rsa(let key): return key.pemRepresentation
        }
    }

    public var algorithm: KeyAlgorithm {
        switch self {
        case .p256: return .ecdsaP256
        case .p384: return .ecdsaP384
        case .rsa(let key):
            switch key.keySizeInBits {
            case ..<3072: return .rsa2048
            case ..<4096: return .rsa3072
            default: return .rsa4096
            }
        }
    }

    public var publicKey: VerificationKey {
        switch self {
        case .p256(let key): return .p256(key.publicKey)
        case .p384(let key): return .p384(key.publicKey)
        case .rsa(let key): return .rsa(key.publicKey)
        }
    }

    var certificateKey: Certificate.PrivateKey {
        switch self {
        case .p256(let key): return .init(key)
        case .p384(let key): return .init(key)
        case .rsa(let key): return .init(key)
        }
    }

    /// The X.509 signature algorithm this key signs certificates and CRLs with.
    var certificateSignatureAlgorithm: Certificate.SignatureAlgorithm {
        switch self {
        case .p256: return .ecdsaWithSHA256
        case .p384: return .ecdsaWithSHA384
        case .rsa: return .sha256WithRSAEncryption
        }
    }

    /// The DER AlgorithmIdentifier of `certificateSignatureAlgorithm`.
    var algorithmIdentifierDER: [UInt8] {
        switch self {
        case .p256: return [0x30, 0x0A, 0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02]
        case .p384: return [0x30, 0x0A, 0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03]
        case .rsa: return [0x30, 0x0D, 0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B, 0x05, 0x00]
        }
    }

    /// An X.509 signature value over `message`: ECDSA in DER, or RSA
    /// PKCS#1 v1.5 with SHA-256.
    func x509Signature(for message: [UInt8]) throws -> [UInt8] {
        switch self {
        case .p256(let key): return Array(try key.signature(for: SHA256.digest(message)).derRepresentation)
        case .p384(let key): return Array(try key.signature(for: SHA384.digest(message)).derRepresentation)
        case .rsa(let key): return Array(try key.signature(for: SHA256.digest(message), padding: .insecurePKCS1v1_5).rawRepresentation)
        }
    }

    /// A JWS signature over `message` with `publicKey.jwsAlgorithm`:
    /// r || s for ECDSA (RFC 7518 3.4), PKCS#1 v1.5 for RS256.
    public func jwsSignature(for message: [UInt8]) throws -> [UInt8] {
        switch self {
        case .p256(let key): return Array(try key.signature(for: SHA256.digest(message)).rawRepresentation)
        case .p384(let key): return Array(try key.signature(for: SHA384.digest(message)).rawRepresentation)
        case .rsa(let key): return Array(try key.signature(for: SHA256.digest(message), padding: .insecurePKCS1v1_5).rawRepresentation)
        }
    }
}

/// A public key that verifies JWT-SVIDs (and appears in bundles), with the
/// one JWS algorithm it is pinned to: ES256 for P-256, ES384 for P-384,
/// RS256 for RSA. A token's header never chooses the algorithm.
public enum VerificationKey: Sendable {
    case p256(P256.Signing.PublicKey)
    case p384(P384.Signing.PublicKey)
    case rsa(_RSA.Signing.PublicKey)

    public init?(_ key: Certificate.PublicKey) {
        if let key = P256.Signing.PublicKey(key) {
            self = .p256(key)
        } else if let key = P384.Signing.PublicKey(key) {
            self = .p384(key)
        } else if let key = _RSA.Signing.PublicKey(key), key.keySizeInBits >= 2048 {
            self = .rsa(key)
        } else {
            return nil
        }
    }

    public var jwsAlgorithm: String {
        switch self {
        case .p256: return "ES256"
        case .p384: return "ES384"
        case .rsa: return "RS256"
        }
    }

    public var derRepresentation: [UInt8] {
        switch self {
        case .p256(let key): return Array(key.derRepresentation)
        case .p384(let key): return Array(key.derRepresentation)
        case .rsa(let key): return Array(key.derRepresentation)
        }
    }

    /// The first 16 bytes of the SHA-256 of the public key (DER), base64url.
    public var keyID: String { Base64URL.encode(Array(SHA256.hash(data: derRepresentation).prefix(16))) }

    /// The key's JWK members (kty and its parameters).
    public func jwk() -> [String: Any] {
        switch self {
        case .p256(let key):
            let raw = Array(key.x963Representation) // 0x04 | x | y
            return ["kty": "EC", "crv": "P-256", "x": Base64URL.encode(Array(raw[1...32])), "y": Base64URL.encode(Array(raw[33...64]))]
        case .p384(let key):
            let raw = Array(key.x963Representation)
            return ["kty": "EC", "crv": "P-384", "x": Base64URL.encode(Array(raw[1...48])), "y": Base64URL.encode(Array(raw[49...96]))]
        case .rsa(let key):
            guard let primitives = try? key.getKeyPrimitives() else { return ["kty": "RSA"] }
            return ["kty": "RSA", "n": Base64URL.encode(Array(primitives.modulus.drop { $0 == 0 })),
                    "e": Base64URL.encode(Array(primitives.publicExponent.drop { $0 == 0 }))]
        }
    }

    /// Whether `signature` is this key's JWS signature over `message`, with
    /// the key's own algorithm.
    public func isValidJWS(message: [UInt8], signature: [UInt8]) -> Bool {
        switch self {
        case .p256(let key):
            guard signature.count == 64, let parsed = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(parsed, for: SHA256.digest(message))
        case .p384(let key):
            guard signature.count == 96, let parsed = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(parsed, for: SHA384.digest(message))
        case .rsa(let key):
            // The modulus's length in whole bytes (a 3071-bit key signs in 384).
            guard signature.count == (key.keySizeInBits + 7) / 8 else { return false }
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: SHA256.digest(message),
                                        padding: .insecurePKCS1v1_5)
        }
    }

    /// A compact JWS checked with this key's pinned algorithm: the header
    /// must name it and the signature must verify. (What a JWT-SVID check
    /// does before its claims; the Wycheproof JWS vectors run through it.)
    public func isValidCompactJWS(_ jws: String) -> Bool {
        let parts = jws.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerBytes = Base64URL.decode(parts[0]), Base64URL.decode(parts[1]) != nil,
              let signature = Base64URL.decode(parts[2]),
              let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any],
              header["alg"] as? String == jwsAlgorithm else { return false }
        return isValidJWS(message: Array("\(parts[0]).\(parts[1])".utf8), signature: signature)
    }

    /// A verification key from a JWK: EC P-256 or P-384, or RSA of at least
    /// 2048 bits; only if the JWK allows signature checks (`use` absent,
    /// `sig` or `jwt-svid`; `key_ops`, if present, holding `verify`) and,
    /// when it names an `alg`, only the one this key type is pinned to.
    public static func fromJWK(_ jwk: [String: Any]) throws(AuthorityError) -> VerificationKey {
        if let use = jwk["use"] { guard ["sig", "jwt-svid"].contains(use as? String ?? "") else { throw AuthorityError("wrong_key_use", "the key is for '\(use)', not signatures") } }
        if let ops = jwk["key_ops"] { guard (ops as? [String])?.contains("verify") == true else { throw AuthorityError("wrong_key_use", "the key's key_ops do not allow verify") } }
        let key: VerificationKey
        switch (jwk["kty"] as? String, jwk["crv"] as? String) {
        case ("EC", "P-256"):
            guard let x = (jwk["x"] as? String).flatMap(Base64URL.decode), let y = (jwk["y"] as? String).flatMap(Base64URL.decode),
                  x.count == 32, y.count == 32, let point = try? P256.Signing.PublicKey(x963Representation: [0x04] + x + y) else {
                throw AuthorityError("bad_key", "x and y are not a point on P-256")
            }
            key = .p256(point)
        case ("EC", "P-384"):
            guard let x = (jwk["x"] as? String).flatMap(Base64URL.decode), let y = (jwk["y"] as? String).flatMap(Base64URL.decode),
                  x.count == 48, y.count == 48, let point = try? P384.Signing.PublicKey(x963Representation: [0x04] + x + y) else {
                throw AuthorityError("bad_key", "x and y are not a point on P-384")
            }
            key = .p384(point)
        case ("RSA", _):
            guard let n = (jwk["n"] as? String).flatMap(Base64URL.decode), let e = (jwk["e"] as? String).flatMap(Base64URL.decode),
                  !e.isEmpty, e.count <= 8, let rsa = try? _RSA.Signing.PublicKey(n: n, e: e) else {
                throw AuthorityError("bad_key", "n and e are not an RSA public key")
            }
            guard rsa.keySizeInBits >= 2048 else { throw AuthorityError("weak_key", "RSA keys must have at least 2048 bits; this one has \(rsa.keySizeInBits)") }
            guard !RSAFingerprint.isROCA(modulus: n) else {
                throw AuthorityError("weak_key", "the RSA key has the ROCA fingerprint (CVE-2017-15361): its private key can be computed from it")
            }
            key = .rsa(rsa)
        default:
            throw AuthorityError("unsupported_key", "only EC P-256, EC P-384 and RSA keys are accepted")
        }
        if let alg = jwk["alg"] {
            guard alg as? String == key.jwsAlgorithm else { throw AuthorityError("bad_algorithm", "the key is for \(alg), but a key of this type is pinned to \(key.jwsAlgorithm)") }
        }
        return key
    }
}

extension HashFunction {
    /// The digest of `bytes` in one pass: `hash(data:)` of an array walks it
    /// through the generic DataProtocol path (regions, closures), which
    /// cost about as much as hashing a JWT's signing input.
    public static func digest(_ bytes: UnsafeRawBufferPointer) -> Digest {
        var hasher = Self()
        hasher.update(bufferPointer: bytes)
        return hasher.finalize()
    }

    public static func digest(_ bytes: [UInt8]) -> Digest {
        bytes.withUnsafeBytes { digest($0) }
    }
}

/// Keys made by the flawed RSA generator of CVE-2017-15361 (ROCA, Infineon
/// RSALib): their modulus is, modulo each small prime p below, a power of
/// 65537, which a random modulus is for all of them with a chance of
/// about 2^-155. Such keys' private halves can be computed.
enum RSAFingerprint {
    static let primes: [UInt32] = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107,
                                   109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167]

    /// For each prime, the residues 65537^k mod p.
    static let powers: [Set<UInt32>] = primes.map { p in
        var seen: Set<UInt32> = [], value: UInt32 = 1
        repeat {
            seen.insert(value)
            value = value * (65_537 % p) % p
        } while !seen.contains(value)
        return seen
    }

    static func isROCA(modulus: [UInt8]) -> Bool {
        for (index, p) in primes.enumerated() {
            var remainder: UInt32 = 0
            for byte in modulus { remainder = (remainder << 8 | UInt32(byte)) % p }
            if !powers[index].contains(remainder) { return false }
        }
        return true
    }
}
