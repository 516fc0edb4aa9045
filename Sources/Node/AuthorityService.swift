import Authority
import Crypto
import Foundation
import Ledger
import Storage
import Synchronization
import X509

/// The trust domain's keys as the ledger holds them: the X.509 CA
/// certificate and JWT public key in the clear, both private keys sealed
/// with the key-encryption key (whose id is recorded), in the document
/// `authority/keyring`. Every node can unseal them; the leader signs.
struct Keyring: Codable {
    var trustDomain: String
    var kekID: String
    var x509Certificate: String
    var x509Key: String
    var jwtKeyID: String
    var jwtKey: String
}

public final class AuthorityService: Sendable {
    public struct Keys: Sendable {
        public let x509: X509Authority
        public let jwt: JWTAuthority
        public let bundle: TrustBundle
    }

    public let trustDomain: String
    private let kek: SymmetricKey
    private let store: RaftStore
    private let cache = Mutex<(version: UInt64, keys: Keys, checked: ContinuousClock.Instant)?>(nil)
    /// How long unsealed keys are used before the keyring is read again
    /// (rotation will change it; every request re-reading it was the
    /// largest cost of verification).
    static let recheckInterval: Duration = .seconds(1)

    /// The most any identity may live, whatever a token allows.
    public static let ttlMaxSeconds: UInt32 = 86_400
    public static let tokenLifetimeMaxSeconds: UInt32 = 7 * 86_400

    public init(trustDomain: String, kek: SymmetricKey, store: RaftStore) {
        self.trustDomain = trustDomain
        self.kek = kek
        self.store = store
    }

    /// The first 8 bytes of the KEK's SHA-256, hex: names the KEK without revealing it.
    var kekID: String { Hex.encode(kek.withUnsafeBytes { SHA256.hash(data: Array($0)) }.prefix(8)) }

    /// New keys for the trust domain, sealed, as the keyring document.
    public func makeKeyring() throws -> [UInt8] {
        let x509 = try X509Authority.create(trustDomain: trustDomain)
        let jwt = JWTAuthority.create(trustDomain: trustDomain)
        let keyring = Keyring(
            trustDomain: trustDomain, kekID: kekID,
            x509Certificate: try x509.certificate.serializeAsPEM().pemString,
            x509Key: try SealedKey.seal(x509.privateKeyPEM, purpose: "warrant trust domain x509 key", with: kek),
            jwtKeyID: jwt.keyID,
            jwtKey: try SealedKey.seal(jwt.privateKeyPEM, purpose: "warrant trust domain jwt key", with: kek))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(keyring))
    }

    /// The keys in the ledger, unsealed (cached until the keyring changes);
    /// nil before the first leader made them.
    public func keys() throws -> Keys? {
        if let cached = cache.withLock({ $0 }), cached.checked.duration(to: .now) < Self.recheckInterval { return cached.keys }
        guard let document = try store.document(named: AuthorityDocuments.keyring) else { return nil }
        if let cached = cache.withLock({ $0 }), cached.version == document.version {
            cache.withLock { $0?.checked = .now }
            return cached.keys
        }
        let keyring = try JSONDecoder().decode(Keyring.self, from: Data(document.content))
        guard keyring.kekID == kekID else {
            throw AuthorityError("wrong_kek", "the keyring was sealed with key-encryption key \(keyring.kekID), not this node's \(kekID)")
        }
        let certificate = try Certificate(pemEncoded: keyring.x509Certificate)
        let x509Key = try SealedKey.open(keyring.x509Key, purpose: "warrant trust domain x509 key", with: kek, path: AuthorityDocuments.keyring)
        let jwtKey = try SealedKey.open(keyring.jwtKey, purpose: "warrant trust domain jwt key", with: kek, path: AuthorityDocuments.keyring)
        let x509 = try X509Authority(trustDomain: keyring.trustDomain, certificate: certificate,
                                     privateKey: P256.Signing.PrivateKey(pemRepresentation: x509Key))
        let jwt = JWTAuthority(trustDomain: keyring.trustDomain, key: try P256.Signing.PrivateKey(pemRepresentation: jwtKey))
        let bundle = TrustBundle(trustDomain: keyring.trustDomain, x509Authorities: [certificate], jwtKeys: [jwt.keyID: jwt.publicKey],
                                 sequence: document.version)
        let keys = Keys(x509: x509, jwt: jwt, bundle: bundle)
        cache.withLock { $0 = (document.version, keys, .now) }
        return keys
    }

    /// The join token a secret names, as the ledger has it now.
    public func token(secret: String) throws -> (hash: String, token: JoinToken?) {
        let hash = Self.hash(secret)
        guard let document = try store.document(named: AuthorityDocuments.token(hash)) else { return (hash, nil) }
        return (hash, try? JSONDecoder().decode(JoinToken.self, from: Data(document.content)))
    }

    /// The issuance already recorded for an idempotency key, if any.
    public func earlierIssuance(idempotencyKey: String) throws -> Issuance? {
        guard let document = try store.document(named: AuthorityDocuments.idempotency(Self.hash(idempotencyKey))) else { return nil }
        return try? JSONDecoder().decode(Issuance.self, from: Data(document.content))
    }

    /// SHA-256, lower-case hex.
    public static func hash(_ text: String) -> String {
        Hex.encode(SHA256.hash(data: Array(text.utf8)))
    }

    /// A new join token secret: "wjt." and 32 random bytes in base64url.
    public static func newTokenSecret() -> String {
        "wjt." + Base64URL.encode((0..<32).map { _ in UInt8.random(in: 0...255) })
    }
}
