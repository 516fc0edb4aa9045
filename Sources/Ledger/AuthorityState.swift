import Encoding
import Foundation
import Raft

/// A one-time join token as the ledger keeps it: only the SHA-256 of the
/// secret (hex), what it may be exchanged for, until when, and whether it
/// was used. Stored as the document `authority/tokens/<hash>`.
public struct JoinToken: Sendable, Hashable, Codable {
    public var hash: String
    public var spiffeID: String
    public var ttlMaxSeconds: UInt32
    public var expiresAtMillis: UInt64
    /// How long identities obtained with this token may be renewed, from
    /// the first issuance: no renewed identity outlives it.
    public var maxLifetimeSeconds: UInt32
    public var used: Bool
    public var usedBySerial: String?

    public init(hash: String, spiffeID: String, ttlMaxSeconds: UInt32, expiresAtMillis: UInt64, maxLifetimeSeconds: UInt32? = nil) {
        self.hash = hash
        self.spiffeID = spiffeID
        self.ttlMaxSeconds = ttlMaxSeconds
        self.expiresAtMillis = expiresAtMillis
        self.maxLifetimeSeconds = maxLifetimeSeconds ?? ttlMaxSeconds
        used = false
    }
}

/// One identity the leader signed, proposed with its audit facts. The
/// caller gets the identity only once this applied.
public struct Issuance: Sendable, Hashable {
    public enum Kind: UInt8, Sendable, Codable { case x509 = 1, jwt = 2 }
    public var kind: Kind
    public var spiffeID: String
    /// Hex certificate serial, or a JWT-SVID's `jti` (32 random hex digits;
    /// before `jti` was written, the first 32 hex digits of its SHA-256).
    public var serial: String
    /// SHA-256 of the certificate DER or of the JWT, hex.
    public var fingerprint: String
    /// When it was signed (an X509-SVID's notBefore is a little earlier;
    /// a JWT-SVID's iat is this, in seconds), and when it expires.
    public var issuedAtMillis: UInt64
    public var notAfterMillis: UInt64
    public var ttlSeconds: UInt32
    /// The evidence, exactly one of: a join token's hash (hex); for a
    /// renewal, `renewedFrom` naming the serial renewed,
    /// `renewedIssuedAtMillis` when that one was issued and
    /// `renewedNotAfterMillis` when it expires (with the serial, the name
    /// of its issuance record; 0 in older entries); for a platform
    /// token, `platformReplayKey` (hex SHA-256 of its issuer and jti) and
    /// `platformExpiresAtMillis` (its exp), consumed once.
    public var tokenHash: String
    public var renewedFrom: String
    public var renewedIssuedAtMillis: UInt64
    public var renewedNotAfterMillis: UInt64 = 0
    public var platformReplayKey: String = ""
    public var platformExpiresAtMillis: UInt64 = 0
    /// SHA-256 of the caller's idempotency key, hex, or "".
    public var idempotencyKey: String
    public var node: UInt64
    /// The id of the authority whose key signed it (`AuthorityKeyring.Entry.id`).
    public var authority: String
    /// The attested context embedded in the identity.
    public var attributes: [String: String]
    /// The certificate DER or JWT, carried only when an idempotency key
    /// asks for the answer to be kept (a retry gets it back); otherwise
    /// empty: the audit facts above name the identity (serial and
    /// fingerprint), and the leader answers with its own copy.
    public var artifact: [UInt8]

    public init(kind: Kind, spiffeID: String, serial: String, fingerprint: String, issuedAtMillis: UInt64, notAfterMillis: UInt64,
                ttlSeconds: UInt32, tokenHash: String, renewedFrom: String = "", renewedIssuedAtMillis: UInt64 = 0, idempotencyKey: String,
                node: UInt64, authority: String, attributes: [String: String], artifact: [UInt8]) {
        self.kind = kind
        self.spiffeID = spiffeID
        self.serial = serial
        self.fingerprint = fingerprint
        self.issuedAtMillis = issuedAtMillis
        self.notAfterMillis = notAfterMillis
        self.ttlSeconds = ttlSeconds
        self.tokenHash = tokenHash
        self.renewedFrom = renewedFrom
        self.renewedIssuedAtMillis = renewedIssuedAtMillis
        self.idempotencyKey = idempotencyKey
        self.node = node
        self.authority = authority
        self.attributes = attributes
        self.artifact = artifact
    }

    /// What the identity was obtained with, for idempotency checks.
    public var evidence: String {
        if !platformReplayKey.isEmpty { return "platform:\(platformReplayKey)" }
        return tokenHash.isEmpty ? "renew:\(renewedFrom)" : tokenHash
    }

    /// Which evidence it names; nil if not exactly one.
    var evidenceCount: Int { (tokenHash.isEmpty ? 0 : 1) + (renewedFrom.isEmpty ? 0 : 1) + (platformReplayKey.isEmpty ? 0 : 1) }

    static let attributesMax = 64

    // Binary, inside the command (JSON decoding was the largest cost of
    // applying an issuance).
    func encode(_ w: inout BinaryWriter) {
        w.write(kind.rawValue)
        w.writeBytes(spiffeID.utf8)
        w.writeBytes(serial.utf8)
        w.writeBytes(fingerprint.utf8)
        w.write(issuedAtMillis)
        w.write(notAfterMillis)
        w.write(ttlSeconds)
        w.writeBytes(tokenHash.utf8)
        w.writeBytes(renewedFrom.utf8)
        w.write(renewedIssuedAtMillis)
        w.writeBytes(idempotencyKey.utf8)
        w.write(node)
        w.writeBytes(authority.utf8)
        w.write(UInt32(attributes.count))
        for (key, value) in attributes.sorted(by: { $0.key < $1.key }) {
            w.writeBytes(key.utf8)
            w.writeBytes(value.utf8)
        }
        w.writeBytes(artifact)
    }

    init(decoding r: inout BinaryReader) throws(CodecError) {
        let rawKind = try r.readUInt8("issuance kind")
        guard let kind = Kind(rawValue: rawKind) else { throw .unknownTag(field: "issuance kind", tag: rawKind) }
        self.kind = kind
        spiffeID = try LedgerCommand.readString(&r, "spiffe id", 2048)
        serial = try LedgerCommand.readString(&r, "serial", 128)
        fingerprint = try LedgerCommand.readString(&r, "fingerprint", 128)
        issuedAtMillis = try r.readUInt64("issued at")
        notAfterMillis = try r.readUInt64("not after")
        ttlSeconds = try r.readUInt32("ttl")
        tokenHash = try LedgerCommand.readString(&r, "token hash", 128)
        renewedFrom = try LedgerCommand.readString(&r, "renewed from", 128)
        renewedIssuedAtMillis = try r.readUInt64("renewed issued at")
        idempotencyKey = try LedgerCommand.readString(&r, "idempotency key", 128)
        node = try r.readUInt64("node")
        authority = try LedgerCommand.readString(&r, "authority", 128)
        let count = Int(try r.readUInt32("attribute count"))
        guard count <= Self.attributesMax else { throw .invalid(field: "attribute count", reason: "\(count) is over \(Self.attributesMax)") }
        var attributes = [String: String](minimumCapacity: count) // no growing and rehashing as members arrive
        for _ in 0..<count {
            let key = try LedgerCommand.readString(&r, "attribute name", 256)
            attributes[key] = try LedgerCommand.readString(&r, "attribute value", 4096)
        }
        self.attributes = attributes
        artifact = try r.readBytes("artifact", limit: 64 << 10)
    }
}

/// The answer kept for an idempotency key (the document
/// `authority/idempotency/<sha256 of the key>`): the evidence it was used
/// with and the identity issued.
public struct IdempotentAnswer: Sendable, Hashable, Codable {
    public var evidence: String
    public var kind: Issuance.Kind
    public var artifact: Data
}

/// What the ledger remembers of an issued identity until it expires (the
/// document `authority/issued/<not after, 13 digits>/<serial>`): enough to
/// list it in a CRL when a rule revokes it, and, being ordered by expiry,
/// to know when the last identity an authority signed expires.
public struct IssuedRecord: Sendable, Hashable, Codable {
    public var kind: Issuance.Kind
    public var spiffeID: String
    public var serial: String
    public var authority: String
    /// SHA-256 of the certificate DER or the JWT, hex: a node that finds
    /// a presented identity's hash here knows its bytes are what the
    /// leader signed (see `IssuedRecord.fingerprint(in:)`). Nil in records
    /// written before it was kept.
    public var fingerprint: String?
    public var issuedAtMillis: UInt64
    public var notAfterMillis: UInt64
    public var attributes: [String: String]
}

/// The trust domain's authorities as the ledger holds them (the document
/// `authority/keyring`): each an X.509 CA certificate and JWT key in the
/// clear, with both private keys sealed under the key-encryption key (its
/// id recorded), moving through prepared (published in bundles, not
/// signing), active (the one that signs) and retired (still published
/// until `keepUntilMillis`, when the last identity it signed expires).
public struct AuthorityKeyring: Sendable, Hashable, Codable {
    public struct Entry: Sendable, Hashable, Codable {
        public enum State: String, Sendable, Codable { case prepared, active, retired }
        public var id: String
        public var state: State
        public var algorithm: String
        public var x509Certificate: String
        public var x509Key: String
        public var jwtKeyID: String
        public var jwtKey: String
        public var createdAtMillis: UInt64
        public var activatedAtMillis: UInt64?
        public var retiredAtMillis: UInt64?
        public var keepUntilMillis: UInt64?

        public init(id: String, state: State, algorithm: String, x509Certificate: String, x509Key: String, jwtKeyID: String, jwtKey: String,
                    createdAtMillis: UInt64) {
            self.id = id
            self.state = state
            self.algorithm = algorithm
            self.x509Certificate = x509Certificate
            self.x509Key = x509Key
            self.jwtKeyID = jwtKeyID
            self.jwtKey = jwtKey
            self.createdAtMillis = createdAtMillis
        }

        /// Whether bundles publish it at `millis`.
        public func isPublished(at millis: UInt64) -> Bool {
            state != .retired || (keepUntilMillis ?? 0) > millis
        }
    }

    public var trustDomain: String
    public var kekID: String
    public var authorities: [Entry]

    public init(trustDomain: String, kekID: String, authorities: [Entry]) {
        self.trustDomain = trustDomain
        self.kekID = kekID
        self.authorities = authorities
    }

    public var active: Entry? { authorities.first { $0.state == .active } }
    public var prepared: Entry? { authorities.first { $0.state == .prepared } }
    public static let authoritiesMax = 8
}

/// A revocation rule (kept in the document `authority/revocations`). It
/// covers one serial (whenever issued), or the identities issued before
/// it of one SPIFFE ID or whose attested context has `name=value` (say,
/// every identity of one repository): identities of those issued later
/// are not affected.
///
/// "Before" is the log's order where it is known: the rule's index
/// (`revokedAtIndex`, set when it is applied) against the index of the
/// identity's issuance record. Both are exact, whichever leaders' clocks
/// stamped them: by time alone, an identity signed by a leader whose
/// clock ran a few seconds ahead could escape a rule made after it, and
/// one issued just after a rule, within its second, would start out
/// revoked. Where either index is unknown (rules from before it was
/// kept; a record forgotten, or not yet applied on a node behind), the
/// times decide: issued at or before `revokedAtMillis`.
public struct Revocation: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Codable { case serial, spiffeID = "spiffe_id", attribute }
    public var kind: Kind
    public var value: String
    public var reason: String
    public var revokedAtMillis: UInt64
    /// The log index of the command that added the rule.
    public var revokedAtIndex: UInt64?
    /// A serial rule naming an X.509 renewal: its line (the first serial),
    /// and where the renewal stands in it (its issuance record's log index,
    /// and its issue time where an index is unknown). What its line issued
    /// from then until the rule is covered too: the renewals after it,
    /// their steps and the JWT-SVIDs they minted. Not what the line issues
    /// after the rule: the ledger lets the line renew again only from an
    /// identity the rule does not cover (one from before the renewal), and
    /// judges it as verification does, so the two agree, and what a rule
    /// covers is settled when it is applied (as the CRL's cache assumes).
    /// Set by the leader from the renewal's record.
    public var lineage: String?
    public var lineageFromIndex: UInt64?
    public var lineageFromMillis: UInt64?

    public init(kind: Kind, value: String, reason: String, revokedAtMillis: UInt64 = 0, revokedAtIndex: UInt64? = nil) {
        self.kind = kind
        self.value = value
        self.reason = reason
        self.revokedAtMillis = revokedAtMillis
        self.revokedAtIndex = revokedAtIndex
    }

    /// A serial rule also covers every renewal of that serial's line
    /// (renewals carry the first serial as the `lineage` attribute), and
    /// the steps of a job it names: a step's identity carries the job's
    /// line as `job_lineage` and the job SVID it was made from as `parent`
    /// (so revoking the job's first serial reaches its steps, and revoking
    /// one of its SVIDs reaches the steps made from that one).
    ///
    /// A serial rule naming a renewal also covers what its line issued from
    /// that renewal until the rule (`lineage`): a renewal made from it, then
    /// renewed again before the rule, carries only the line's first serial.
    ///
    /// A serial rule has no time condition otherwise: it names identities
    /// that exist, and their descendants cannot be made once it is in
    /// (renewals and steps of a revoked identity are refused), so a rule
    /// stamped by a clock a little behind the one that signed still covers
    /// what it names.
    ///
    /// `recordIndex` gives the log index of the identity's issuance record,
    /// if known; it is asked only when an ID or attribute rule, or a serial
    /// rule's line, names the identity.
    public func matches(serial: String, spiffeID: String, attributes: [String: String], issuedAtMillis: UInt64,
                        recordIndex: () -> UInt64? = { nil }) -> Bool {
        switch kind {
        case .serial:
            let wanted = Self.canonicalSerial(value)
            if Self.canonicalSerial(serial) == wanted || Self.serialAttributes.contains(where: { attributes[$0].map(Self.canonicalSerial) == wanted }) {
                return true
            }
            guard let lineage, let lineageFromMillis else { return false }
            let line = Self.canonicalSerial(lineage)
            guard attributes["lineage"].map(Self.canonicalSerial) == line || attributes["job_lineage"].map(Self.canonicalSerial) == line else { return false }
            if let lineageFromIndex, let revokedAtIndex, let issued = recordIndex() { return issued >= lineageFromIndex && issued < revokedAtIndex }
            return issuedAtMillis >= lineageFromMillis && issuedAtMillis <= revokedAtMillis
        case .spiffeID:
            guard spiffeID == value || Self.isStep(spiffeID, attributes, of: value) else { return false }
        case .attribute:
            guard let equals = value.firstIndex(of: "="),
                  attributes[String(value[..<equals])] == String(value[value.index(after: equals)...]) else { return false }
        }
        if let revokedAtIndex, let issued = recordIndex() { return issued < revokedAtIndex }
        return issuedAtMillis <= revokedAtMillis
    }

    /// Whether the identity is a step of the job `jobID`: steps are named
    /// `<job>/step/<name>` and carry `step=<name>` (both set by the node
    /// that signs, never by the caller), so an ID rule for a job reaches
    /// its steps, their renewals and the JWT-SVIDs they mint. (The ledger
    /// checks a step's issuance with the job SVID's times and record, so a
    /// step of a job revoked by ID is refused even where a node's cached
    /// rules are a second old.)
    static func isStep(_ spiffeID: String, _ attributes: [String: String], of jobID: String) -> Bool {
        guard let step = attributes["step"], spiffeID.utf8.count == jobID.utf8.count + 6 + step.utf8.count else { return false }
        return spiffeID.hasPrefix(jobID) && spiffeID.hasSuffix("/step/" + step)
    }

    /// The attributes naming serials an identity descends from.
    static let serialAttributes = ["lineage", "job_lineage", "parent"]

    /// A serial as an operator gives it (hex, either case, colons allowed
    /// between bytes as openssl prints them), canonical; nil unless it is
    /// 1 to 64 hex digits.
    public static func serial(parsing text: String) -> String? {
        let digits = text.replacingOccurrences(of: ":", with: "")
        guard (1...64).contains(digits.utf8.count), digits.utf8.allSatisfy({ $0 < 0x80 && Character(Unicode.Scalar($0)).isHexDigit }) else { return nil }
        return canonicalSerial(digits)
    }

    public static let serialParsingMessage = "a serial is 1 to 64 hex digits (colons allowed between bytes)"

    /// Hex digits without leading zeros, lower case: "0A1B", "a1b" and
    /// "00a1b" name the same serial.
    public static func canonicalSerial(_ text: String) -> String {
        let digits = text.lowercased().drop { $0 == "0" }
        return digits.isEmpty ? "0" : String(digits)
    }

    /// Why the rule may not be recorded, or nil.
    public var invalidReason: String? {
        guard !value.isEmpty, value.utf8.count <= 2048 else { return "the revoked value must be 1 to 2048 bytes" }
        if let lineage {
            guard kind == .serial, lineageFromMillis != nil, !lineage.isEmpty, lineage.utf8.count <= 64,
                  lineage.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
                return "a rule's line is a serial rule's, lower-case hex, with the time it starts from"
            }
        }
        guard reason.utf8.count <= 512 else { return "the reason is longer than 512 bytes" }
        switch kind {
        case .serial:
            guard value.utf8.count <= 64, value.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }) else {
                return "a serial is lower-case hex, at most 64 digits"
            }
        case .spiffeID:
            guard value.hasPrefix("spiffe://") else { return "a SPIFFE ID starts with spiffe://" }
        case .attribute:
            guard let equals = value.firstIndex(of: "="), equals != value.startIndex else { return "an attribute rule is name=value" }
        }
        return nil
    }
}

public struct RevocationList: Sendable, Hashable, Codable {
    public var rules: [Revocation]
    public init(rules: [Revocation] = []) { self.rules = rules }

    public func revoking(serial: String, spiffeID: String, attributes: [String: String], issuedAtMillis: UInt64,
                         recordIndex: () -> UInt64? = { nil }) -> Revocation? {
        // Asked once, however many rules name the identity.
        var known: UInt64??
        func once() -> UInt64? {
            if known == nil { known = .some(recordIndex()) }
            return known!
        }
        return rules.first { $0.matches(serial: serial, spiffeID: spiffeID, attributes: attributes, issuedAtMillis: issuedAtMillis, recordIndex: once) }
    }

    public static let rulesMax = 10_000
}

/// Where the authority's state lives among the documents. Names under
/// `authority/` are written only through these operations.
public enum AuthorityDocuments {
    public static let prefix = "authority/"
    public static let keyring = "authority/keyring"
    /// The id of the active authority alone (read on every issuance).
    public static let active = "authority/active"
    public static let revocations = "authority/revocations"
    public static let issuedPrefix = "authority/issued/"
    public static func token(_ hash: String) -> String { "authority/tokens/\(hash)" }
    public static func idempotency(_ key: String) -> String { idempotencyPrefix + key }
    /// Idempotency answers: the artifact kept for a retry, a live JWT-SVID
    /// (a bearer token) among them.
    public static let idempotencyPrefix = "authority/idempotency/"
    /// When a join token (`<time>/<hash>`) or an idempotency answer
    /// (`<time>/<key>`) is forgotten, in time order: a day after the token
    /// expires or the identity it answered with does. Each command that
    /// creates one forgets up to two whose time has passed, so the ledger
    /// (held in memory) keeps only what is still of use, and a token that
    /// just expired is still refused as expired rather than unknown.
    public static let tokenForgetPrefix = "authority/forget/tokens/"
    public static let idempotencyForgetPrefix = "authority/forget/idempotency/"
    public static let forgetAfterMillis: UInt64 = 86_400_000
    /// How long a used platform token's record outlives the token: six
    /// times the clock bound (10 s) a leader may be off by and still sign.
    public static let platformTokenKeptMillis: UInt64 = 60_000
    /// Times in names have 13 digits: later ones count as this (in 2286).
    static let latestMillis: UInt64 = 9_999_999_999_999 - 86_400_000
    public static func tokenForget(atMillis: UInt64, hash: String) -> String { timed(tokenForgetPrefix, atMillis, hash) }
    public static func idempotencyForget(atMillis: UInt64, key: String) -> String { timed(idempotencyForgetPrefix, atMillis, key) }
    /// Platform tokens already used, by expiry then replay key: a token
    /// always maps to the same name (its exp is signed), and names whose
    /// time has passed are forgotten, since an expired token cannot join.
    public static let platformTokensPrefix = "authority/joins/"
    public static func platformToken(expiresAtMillis: UInt64, replayKey: String) -> String {
        timed(platformTokensPrefix, expiresAtMillis, replayKey)
    }

    /// `<prefix><time in 13 digits>/<id>` (zero-padded, so names sort by
    /// time; a later time keeps all its digits), made in one allocation:
    /// several are made for every issuance, and each forget scan bounds
    /// its range with one (`id` empty).
    static func timed(_ prefix: String, _ millis: UInt64, _ id: String) -> String {
        let width = timeWidth(millis)
        let prefixBytes = prefix.utf8.count
        let total = prefixBytes + width + 1 + id.utf8.count
        return String(unsafeUninitializedCapacity: total) { out in
            _ = UnsafeMutableBufferPointer(rebasing: out[0..<prefixBytes]).initialize(from: prefix.utf8)
            writeTime(millis, width: width, into: UnsafeMutableBufferPointer(rebasing: out[prefixBytes...]))
            _ = UnsafeMutableBufferPointer(rebasing: out[(prefixBytes + width + 1)...]).initialize(from: id.utf8)
            return total
        }
    }

    /// Digits a time takes in a name: 13, or all of a later one's.
    private static func timeWidth(_ millis: UInt64) -> Int {
        var width = 1
        var rest = millis
        while rest >= 10 { rest /= 10; width += 1 }
        return max(13, width)
    }

    /// The time's `width` digits, zero-padded, then '/', at the start of `out`.
    private static func writeTime(_ millis: UInt64, width: Int, into out: UnsafeMutableBufferPointer<UInt8>) {
        var value = millis
        for k in stride(from: width - 1, through: 0, by: -1) {
            out[k] = 0x30 + UInt8(value % 10)
            value /= 10
        }
        out[width] = 0x2F
    }

    /// The time in a name made by `timed` under `prefix` (the digits up to
    /// the next `/`), or nil when it holds none.
    public static func time(inTimedName name: String, prefix: String) -> UInt64? {
        guard name.hasPrefix(prefix) else { return nil }
        let start = prefix.utf8.count
        return UTF8Text.withBytes(of: name) { bytes -> UInt64? in
            var value: UInt64 = 0, digits = 0
            for byte in bytes[start...] {
                if byte == 0x2F { break }
                guard byte >= 0x30 && byte <= 0x39, digits < 19 else { return nil }
                value = value * 10 + UInt64(byte - 0x30)
                digits += 1
            }
            return digits >= 13 ? value : nil
        }
    }

    /// Whether `name` (which begins with `prefix`) sorts before
    /// `timed(prefix, millis, "")`, the bound of a scan for what is due,
    /// compared byte by byte without making the bound.
    static func timedName(_ name: String, prefix: String, isBefore millis: UInt64) -> Bool {
        let width = timeWidth(millis)
        let start = prefix.utf8.count
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: width + 1) { bound in
            writeTime(millis, width: width, into: bound)
            return UTF8Text.withBytes(of: name) { bytes in
                for k in 0...width {
                    guard start + k < bytes.count else { return true } // a proper prefix of the bound
                    if bytes[start + k] != bound[k] { return bytes[start + k] < bound[k] }
                }
                return false // the bound itself begins it: not before
            }
        }
    }

    public static func issued(notAfterMillis: UInt64, serial: String) -> String {
        timed(issuedPrefix, notAfterMillis, serial)
    }

    /// Steps closed, by the step SVID's expiry then serial: a step closes
    /// once (see `LedgerCommand.Operation.closeStep`).
    public static let closedStepsPrefix = "authority/closed/"
    public static func closedStep(notAfterMillis: UInt64, serial: String) -> String {
        timed(closedStepsPrefix, notAfterMillis, serial)
    }

    /// The longest any identity may live, whatever a token allows; a
    /// revocation rule is kept this long, since nothing it covers outlives it.
    public static let identityLifetimeMaxSeconds: UInt32 = 86_400

    static func isHex(_ text: String, count: Int) -> Bool {
        guard text.utf8.count == count else { return false }
        return UTF8Text.withBytes(of: text) { $0.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) } }
    }
}

// The ledger's own records on the issuance path, written and read by hand
// (JSONEncoder/JSONDecoder were most of the cost of applying an issuance);
// the members are those Codable gives, so JSONDecoder reads them too.
extension JoinToken {
    var canonicalJSON: [UInt8] {
        var json = JSONText.Builder(capacity: 160 + spiffeID.utf8.count)
        json.raw("{\"expiresAtMillis\":")
        json.integer(expiresAtMillis)
        json.raw(",\"hash\":")
        json.quoted(hash)
        json.raw(",\"maxLifetimeSeconds\":")
        json.integer(UInt64(maxLifetimeSeconds))
        json.raw(",\"spiffeID\":")
        json.quoted(spiffeID)
        json.raw(",\"ttlMaxSeconds\":")
        json.integer(UInt64(ttlMaxSeconds))
        json.raw(",\"used\":")
        json.bool(used)
        if let usedBySerial {
            json.raw(",\"usedBySerial\":")
            json.quoted(usedBySerial)
        }
        json.raw("}")
        return json.bytes
    }

    /// Reads the ledger's token document (written by `canonicalJSON`, or
    /// by JSONEncoder before it).
    public init?(canonical bytes: [UInt8]) {
        if let token = Self(exactlyCanonical: bytes) {
            self = token
            return
        }
        guard let object = JSONText.parseFlatObject(bytes, membersMax: 16) else {
            guard let decoded = CanonicalJSON.decode(JoinToken.self, bytes) else { return nil }
            self = decoded
            return
        }
        guard case .string(let hash)? = object["hash"], case .string(let spiffeID)? = object["spiffeID"],
              case .integer(let ttl)? = object["ttlMaxSeconds"], let ttlMax = UInt32(exactly: ttl),
              case .integer(let expires)? = object["expiresAtMillis"], let expiresAt = UInt64(exactly: expires),
              case .bool(let used)? = object["used"] else { return nil }
        var maxLifetime: UInt32?
        if case .integer(let value)? = object["maxLifetimeSeconds"] { maxLifetime = UInt32(exactly: value) }
        self.init(hash: hash, spiffeID: spiffeID, ttlMaxSeconds: ttlMax, expiresAtMillis: expiresAt, maxLifetimeSeconds: maxLifetime)
        self.used = used
        if case .string(let serial)? = object["usedBySerial"] { usedBySerial = serial }
    }
}

extension JoinToken {
    /// The document of a token once `serial` used it, made from its unused
    /// document exactly as `canonicalJSON` wrote it (`used` is its last
    /// member): the same bytes `canonicalJSON` writes for the used token,
    /// without writing the rest again. Nil when `canonical` does not end
    /// as an unused token's does.
    static func markingUsed(_ canonical: [UInt8], serial: String) -> [UInt8]? {
        let unused: StaticString = ",\"used\":false}"
        let kept = canonical.count - unused.utf8CodeUnitCount
        guard kept > 0 else { return nil }
        return canonical.withUnsafeBufferPointer { bytes -> [UInt8]? in
            let ending = unused.withUTF8Buffer { UnsafeBufferPointer(rebasing: bytes[kept...]).elementsEqual($0) }
            guard ending else { return nil }
            var json = JSONText.Builder(capacity: canonical.count + serial.utf8.count + 24)
            json.raw(UnsafeBufferPointer(rebasing: bytes[..<kept]))
            json.raw(",\"used\":true,\"usedBySerial\":")
            json.quoted(serial)
            json.raw("}")
            return json.bytes
        }
    }

    /// The fast path for what `canonicalJSON` writes, member by member in
    /// its order, strings without escapes; nil for anything else (the
    /// general parser reads that).
    init?(exactlyCanonical bytes: [UInt8]) {
        var scan = CanonicalScan(bytes)
        guard scan.expect("{\"expiresAtMillis\":"), let expires = scan.integer(),
              scan.expect(",\"hash\":"), let hash = scan.plainString(),
              scan.expect(",\"maxLifetimeSeconds\":"), let lifetime = scan.integer(), let maxLifetime = UInt32(exactly: lifetime),
              scan.expect(",\"spiffeID\":"), let spiffeID = scan.plainString(),
              scan.expect(",\"ttlMaxSeconds\":"), let ttl = scan.integer(), let ttlMax = UInt32(exactly: ttl),
              scan.expect(",\"used\":") else { return nil }
        let used: Bool
        if scan.expect("true") { used = true } else if scan.expect("false") { used = false } else { return nil }
        var serial: String?
        if scan.expect(",\"usedBySerial\":") {
            guard let text = scan.plainString() else { return nil }
            serial = text
        }
        guard scan.expect("}"), scan.atEnd else { return nil }
        self.init(hash: hash, spiffeID: spiffeID, ttlMaxSeconds: ttlMax, expiresAtMillis: expires, maxLifetimeSeconds: maxLifetime)
        self.used = used
        usedBySerial = serial
    }
}

/// Reads JSON the ledger wrote itself, in its exact layout.
private struct CanonicalScan {
    let bytes: [UInt8]
    var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var atEnd: Bool { position == bytes.count }

    mutating func expect(_ literal: StaticString) -> Bool {
        let count = literal.utf8CodeUnitCount
        guard bytes.count - position >= count else { return false }
        let matches = literal.withUTF8Buffer { expected in
            bytes.withUnsafeBufferPointer { all in
                memcmp(all.baseAddress! + position, expected.baseAddress!, count) == 0
            }
        }
        if matches { position += count }
        return matches
    }

    /// A non-negative integer without leading zeros (as written).
    mutating func integer() -> UInt64? {
        let start = position
        var value: UInt64 = 0
        while position < bytes.count, bytes[position] >= 0x30, bytes[position] <= 0x39 {
            let (times, overflow) = value.multipliedReportingOverflow(by: 10)
            guard !overflow else { return nil }
            let (sum, carry) = times.addingReportingOverflow(UInt64(bytes[position] - 0x30))
            guard !carry else { return nil }
            value = sum
            position += 1
        }
        guard position > start, position - start == 1 || bytes[start] != 0x30 else { return nil }
        return value
    }

    /// A string with no escapes and no control characters.
    mutating func plainString() -> String? {
        guard position < bytes.count, bytes[position] == 0x22 else { return nil }
        let start = position + 1
        var end = start
        while end < bytes.count, bytes[end] != 0x22 {
            guard bytes[end] >= 0x20, bytes[end] != 0x5C else { return nil }
            end += 1
        }
        guard end < bytes.count else { return nil }
        position = end + 1
        return bytes.withUnsafeBufferPointer { UTF8Text.string(UnsafeBufferPointer(rebasing: $0[start..<end])) }
    }
}

extension IssuedRecord {
    /// The kind and fingerprint in a record's stored form, read without
    /// decoding the rest; nil if it has no fingerprint or does not parse.
    public static func fingerprint(in content: [UInt8]) -> (kind: Issuance.Kind, fingerprint: String)? {
        guard let members = JSONText.parseFlatObject(content, membersMax: Issuance.attributesMax + 16),
              case .string(let fingerprint) = members["fingerprint"], case .integer(let rawKind) = members["kind"],
              let kind = UInt8(exactly: rawKind).flatMap(Issuance.Kind.init(rawValue:)) else { return nil }
        return (kind, fingerprint)
    }

    var canonicalJSON: [UInt8] {
        var json = JSONText.Builder(capacity: 256 + spiffeID.utf8.count)
        json.raw("{\"attributes\":")
        json.object(attributes)
        json.raw(",\"authority\":")
        json.quoted(authority)
        if let fingerprint {
            json.raw(",\"fingerprint\":")
            json.quoted(fingerprint)
        }
        json.raw(",\"issuedAtMillis\":")
        json.integer(issuedAtMillis)
        json.raw(",\"kind\":")
        json.integer(UInt64(kind.rawValue))
        json.raw(",\"notAfterMillis\":")
        json.integer(notAfterMillis)
        json.raw(",\"serial\":")
        json.quoted(serial)
        json.raw(",\"spiffeID\":")
        json.quoted(spiffeID)
        json.raw("}")
        return json.bytes
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
