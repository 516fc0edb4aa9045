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

    private enum CodingKeys: String, CodingKey {
        case kind, spiffeID, serial, fingerprint, notAfterMillis, ttlSeconds, tokenHash, idempotencyKey, node, artifact
    }

    // The artifact travels as base64 (JSON arrays of numbers tripled its size).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        kind = try c.decode(Kind.self, forKey: .kind)
        spiffeID = try c.decode(String.self, forKey: .spiffeID)
        serial = try c.decode(String.self, forKey: .serial)
        fingerprint = try c.decode(String.self, forKey: .fingerprint)
        notAfterMillis = try c.decode(UInt64.self, forKey: .notAfterMillis)
        ttlSeconds = try c.decode(UInt32.self, forKey: .ttlSeconds)
        tokenHash = try c.decode(String.self, forKey: .tokenHash)
        idempotencyKey = try c.decode(String.self, forKey: .idempotencyKey)
        node = try c.decode(UInt64.self, forKey: .node)
        artifact = Array(try c.decode(Data.self, forKey: .artifact))
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(kind, forKey: .kind)
        try c.encode(spiffeID, forKey: .spiffeID)
        try c.encode(serial, forKey: .serial)
        try c.encode(fingerprint, forKey: .fingerprint)
        try c.encode(notAfterMillis, forKey: .notAfterMillis)
        try c.encode(ttlSeconds, forKey: .ttlSeconds)
        try c.encode(tokenHash, forKey: .tokenHash)
        try c.encode(idempotencyKey, forKey: .idempotencyKey)
        try c.encode(node, forKey: .node)
        try c.encode(Data(artifact), forKey: .artifact)
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
