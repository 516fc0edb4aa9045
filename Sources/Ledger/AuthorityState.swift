import Foundation

/// A one-time join token as the ledger keeps it: only the SHA-256 of the
/// secret (hex), what it may be exchanged for, until when, and whether it
/// was used. Stored as the document `authority/tokens/<hash>`.
public struct JoinToken: Sendable, Hashable, Codable {
    public var hash: String
    public var spiffeID: String
    public var ttlMaxSeconds: UInt32
    public var expiresAtMillis: UInt64
    public var used: Bool
    public var usedBySerial: String?

    public init(hash: String, spiffeID: String, ttlMaxSeconds: UInt32, expiresAtMillis: UInt64) {
        self.hash = hash
        self.spiffeID = spiffeID
        self.ttlMaxSeconds = ttlMaxSeconds
        self.expiresAtMillis = expiresAtMillis
        used = false
    }
}

/// One identity the leader signed, proposed with its audit facts. The
/// caller gets `artifact` (certificate DER or JWT) only once this applied.
public struct Issuance: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Codable { case x509, jwt }
    public var kind: Kind
    public var spiffeID: String
    /// Hex certificate serial, or the JWT's hash for a JWT-SVID.
    public var serial: String
    /// SHA-256 of the certificate DER or of the JWT, hex.
    public var fingerprint: String
    public var notAfterMillis: UInt64
    public var ttlSeconds: UInt32
    /// The join token's hash (the evidence), hex.
    public var tokenHash: String
    /// SHA-256 of the caller's idempotency key, hex, or "".
    public var idempotencyKey: String
    public var node: UInt64
    public var artifact: [UInt8]

    public init(kind: Kind, spiffeID: String, serial: String, fingerprint: String, notAfterMillis: UInt64, ttlSeconds: UInt32,
                tokenHash: String, idempotencyKey: String, node: UInt64, artifact: [UInt8]) {
        self.kind = kind
        self.spiffeID = spiffeID
        self.serial = serial
        self.fingerprint = fingerprint
        self.notAfterMillis = notAfterMillis
        self.ttlSeconds = ttlSeconds
        self.tokenHash = tokenHash
        self.idempotencyKey = idempotencyKey
        self.node = node
        self.artifact = artifact
    }
}

/// Where the authority's state lives among the documents. Names under
/// `authority/` are written only through these operations.
public enum AuthorityDocuments {
    public static let prefix = "authority/"
    public static let keyring = "authority/keyring"
    public static func token(_ hash: String) -> String { "authority/tokens/\(hash)" }
    public static func idempotency(_ key: String) -> String { "authority/idempotency/\(key)" }

    static func isHex(_ text: String, count: Int) -> Bool {
        text.utf8.count == count && text.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }
}

/// JSON with sorted keys: the same bytes on every node.
enum CanonicalJSON {
    static func encode(_ value: some Encodable) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try encoder.encode(value))
    }

    static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) -> T? {
        try? JSONDecoder().decode(type, from: Data(bytes))
    }
}
