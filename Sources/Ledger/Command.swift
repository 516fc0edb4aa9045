import Raft

/// Limits on what a command may carry, checked before proposing and again
/// when applying (so a log holding a bad command still applies the same way
/// everywhere).
public enum LedgerLimits {
    public static let documentNameBytesMax = 256
    public static let documentContentBytesMax = 256 << 10
    public static let actorBytesMax = 256
    public static let requestIDBytesMax = 128
}

public enum DocumentFormat: UInt8, Sendable, Hashable {
    case json = 1
    case yaml = 2
}

/// One change to the replicated state, as the leader proposes it: stamped
/// with the leader's time and the caller's identity, so applying it reads
/// no clock and everyone applies the same thing.
public struct LedgerCommand: Sendable, Hashable {
    public enum Operation: Sendable, Hashable {
        /// Creates (expectedVersion 0), replaces if the version matches
        /// (expectedVersion > 0), or writes unconditionally (nil).
        case putDocument(name: String, format: DocumentFormat, content: [UInt8], expectedVersion: UInt64?)
        case deleteDocument(name: String, expectedVersion: UInt64?)
        /// Records a join token (its hash) that one issuance may consume.
        case createJoinToken(JoinToken)
        /// Stores the trust domain's keyring (keys sealed with the KEK) once.
        case initializeAuthority(keyring: [UInt8])
        /// An identity the leader signed: consumes its token (or replays the
        /// identity already issued for the same idempotency key).
        case recordIssuance(Issuance)
        /// A refused request for an identity, for the audit chain only:
        /// `reason` says why, `count` how many refusals it stands for (the
        /// node rate-limits them and folds the excess into one record).
        case recordDenial(reason: String, count: UInt32)
        /// Adds a new authority in the prepared state (published, not signing).
        case prepareAuthority(AuthorityKeyring.Entry)
        /// Makes the prepared authority `id` the one that signs; the active
        /// one retires, kept in bundles until what it signed has expired.
        case activateAuthority(id: String)
        /// Records a revocation rule (stamped with the command's time).
        case revoke(Revocation)
        /// A per-step identity's command ended, with its exit status in the
        /// audit chain. `serial` names the step (its line's first serial).
        /// With the step's end (`notAfterMillis`, its evidence's expiry: no
        /// renewal of it outlives that; tag 13), a step closes once: a
        /// marker kept until then refuses a second close (entries of tag 11,
        /// without it, only write the audit record).
        case closeStep(spiffeID: String, serial: String, exitStatus: Int32, notAfterMillis: UInt64 = 0)
        /// From this entry on, entries apply by rules `version`
        /// (`LedgerRules`; tag 14). A node whose build does not know it
        /// stops here.
        case adoptRules(version: UInt32)
    }

    public var timeMillis: UInt64
    public var actor: String
    public var requestID: String
    public var operation: Operation

    public init(timeMillis: UInt64, actor: String, requestID: String, operation: Operation) {
        self.timeMillis = timeMillis
        self.actor = actor
        self.requestID = requestID
        self.operation = operation
    }

    /// Documents under `authority/` are written only by the authority's
    /// own operations, as they check them: a node trusts an issued
    /// record's SHA-256 in place of a signature, so no plain document
    /// write may make or change one, even one a node proposes.
    static func reservedReason(_ name: String) -> String? {
        name.utf8.starts(with: AuthorityDocuments.prefix.utf8)
            ? "names under '\(AuthorityDocuments.prefix)' are written only by the authority's operations" : nil
    }

    /// Why the command may not be proposed, or nil if it may.
    public var invalidReason: String? {
        if actor.utf8.count > LedgerLimits.actorBytesMax { return "actor is longer than \(LedgerLimits.actorBytesMax) bytes" }
        if requestID.utf8.count > LedgerLimits.requestIDBytesMax { return "request id is longer than \(LedgerLimits.requestIDBytesMax) bytes" }
        switch operation {
        case .putDocument(let name, _, let content, _):
            if let reason = Self.invalidName(name) ?? Self.reservedReason(name) { return reason }
            if content.count > LedgerLimits.documentContentBytesMax {
                return "document content is \(content.count) bytes; the limit is \(LedgerLimits.documentContentBytesMax)"
            }
        case .deleteDocument(let name, _):
            if let reason = Self.invalidName(name) ?? Self.reservedReason(name) { return reason }
        case .createJoinToken(let token):
            guard AuthorityDocuments.isHex(token.hash, count: 64) else { return "a token hash is 64 lower-case hex digits" }
            guard token.spiffeID.utf8.count <= 2048 else { return "the SPIFFE ID is longer than 2048 bytes" }
        case .initializeAuthority(let keyring):
            guard keyring.count <= LedgerLimits.documentContentBytesMax else { return "the keyring is too large" }
        case .recordIssuance(let issuance):
            guard issuance.evidenceCount == 1 else { return "an issuance names exactly one of a join token, the serial it renews, or a platform token" }
            guard issuance.tokenHash.isEmpty || AuthorityDocuments.isHex(issuance.tokenHash, count: 64) else {
                return "a token hash is 64 lower-case hex digits"
            }
            guard issuance.platformReplayKey.isEmpty || AuthorityDocuments.isHex(issuance.platformReplayKey, count: 64) else {
                return "a platform token key is 64 lower-case hex digits"
            }
            guard issuance.idempotencyKey.isEmpty || AuthorityDocuments.isHex(issuance.idempotencyKey, count: 64) else {
                return "an idempotency key hash is 64 lower-case hex digits"
            }
            guard issuance.artifact.count <= 64 << 10 else { return "the issued artifact is larger than 64 KiB" }
            guard issuance.attributes.count <= Issuance.attributesMax else { return "an identity carries at most \(Issuance.attributesMax) attributes" }
        case .recordDenial(let reason, let count):
            guard reason.utf8.count <= 1024, count > 0 else { return "a denial has a reason of at most 1024 bytes and a count above zero" }
        case .prepareAuthority(let entry):
            guard entry.state == .prepared, !entry.id.isEmpty, entry.id.utf8.count <= 64 else { return "a new authority is prepared and has an id of 1 to 64 bytes" }
        case .activateAuthority(let id):
            guard !id.isEmpty, id.utf8.count <= 64 else { return "an authority id is 1 to 64 bytes" }
        case .revoke(let revocation):
            if let reason = revocation.invalidReason { return reason }
        case .closeStep(let spiffeID, let serial, _, _):
            guard spiffeID.utf8.count <= 2048, !serial.isEmpty, serial.utf8.count <= 64 else { return "a step is named by its SPIFFE ID and serial" }
        case .adoptRules(let version):
            guard version > LedgerRules.initial else { return "a rules version to adopt is above \(LedgerRules.initial)" }
        }
        return nil
    }

    /// Names are lower-case paths: letters, digits, '.', '_', '-' and '/',
    /// no empty or dot segments, at most `documentNameBytesMax` bytes.
    public static func invalidName(_ name: String) -> String? {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty else { return "document name is empty" }
        guard bytes.count <= LedgerLimits.documentNameBytesMax else { return "document name is longer than \(LedgerLimits.documentNameBytesMax) bytes" }
        for byte in bytes where !isNameByte(byte) {
            return "document name '\(name)' may hold only a-z, 0-9, '.', '_', '-' and '/'"
        }
        for segment in name.split(separator: "/", omittingEmptySubsequences: false) where segment.isEmpty || segment == "." || segment == ".." {
            return "document name '\(name)' has an empty, '.' or '..' segment"
        }
        return nil
    }

    /// a-z, 0-9, '.', '_', '-', '/'.
    public static func isNameByte(_ byte: UInt8) -> Bool {
        (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || byte == 0x2E || byte == 0x5F || byte == 0x2D || byte == 0x2F
    }

    // MARK: - Encoding (inside an entry's command bytes)

    static let encodingVersion: UInt8 = 2

    public var encoded: [UInt8] {
        var w = BinaryWriter()
        w.write(Self.encodingVersion)
        w.write(timeMillis)
        w.writeBytes(actor.utf8)
        w.writeBytes(requestID.utf8)
        switch operation {
        case .putDocument(let name, let format, let content, let expected):
            w.write(UInt8(1))
            w.writeBytes(name.utf8)
            w.write(format.rawValue)
            w.writeBytes(content)
            Self.write(expected, &w)
        case .deleteDocument(let name, let expected):
            w.write(UInt8(2))
            w.writeBytes(name.utf8)
            Self.write(expected, &w)
        case .createJoinToken(let token):
            w.write(UInt8(3))
            w.writeBytes(token.canonicalJSON)
        case .initializeAuthority(let keyring):
            w.write(UInt8(4))
            w.writeBytes(keyring)
        case .recordIssuance(let issuance):
            // Tag 10 adds the platform token's evidence, tag 12 a renewal's
            // expiry of what it renews; older entries keep tag 5.
            if !issuance.platformReplayKey.isEmpty {
                w.write(UInt8(10))
                issuance.encode(&w)
                w.writeBytes(issuance.platformReplayKey.utf8)
                w.write(issuance.platformExpiresAtMillis)
            } else if issuance.renewedNotAfterMillis != 0 {
                w.write(UInt8(12))
                issuance.encode(&w)
                w.write(issuance.renewedNotAfterMillis)
            } else {
                w.write(UInt8(5))
                issuance.encode(&w)
            }
        case .recordDenial(let reason, let count):
            w.write(UInt8(6))
            w.writeBytes(reason.utf8)
            w.write(count)
        case .prepareAuthority(let entry):
            w.write(UInt8(7))
            w.writeBytes((try? CanonicalJSON.encode(entry)) ?? [])
        case .activateAuthority(let id):
            w.write(UInt8(8))
            w.writeBytes(id.utf8)
        case .revoke(let revocation):
            w.write(UInt8(9))
            w.writeBytes((try? CanonicalJSON.encode(revocation)) ?? [])
        case .closeStep(let spiffeID, let serial, let exitStatus, let notAfterMillis):
            w.write(UInt8(notAfterMillis == 0 ? 11 : 13))
            w.writeBytes(spiffeID.utf8)
            w.writeBytes(serial.utf8)
            w.write(UInt32(bitPattern: exitStatus))
            if notAfterMillis != 0 { w.write(notAfterMillis) }
        case .adoptRules(let version):
            w.write(UInt8(14))
            w.write(version)
        }
        return w.bytes
    }

    private static func write(_ version: UInt64?, _ w: inout BinaryWriter) {
        w.write(UInt8(version == nil ? 0 : 1))
        w.write(version ?? 0)
    }

    /// The operation's tag in encoded command bytes, without decoding the
    /// rest (1: put a document); nil if the bytes are too short.
    public static func operationTag(in bytes: [UInt8]) -> UInt8? {
        var position = 1 + 8 // version, time
        for _ in 0..<2 { // actor, request id: a 32-bit length, then the bytes
            guard position + 4 <= bytes.count else { return nil }
            let length = Int(bytes[position]) | Int(bytes[position + 1]) << 8 | Int(bytes[position + 2]) << 16 | Int(bytes[position + 3]) << 24
            position += 4 + length
        }
        return position < bytes.count ? bytes[position] : nil
    }

    public init(decoding bytes: [UInt8]) throws(CodecError) {
        var r = BinaryReader(bytes)
        let version = try r.readUInt8("ledger command version")
        guard version == Self.encodingVersion else {
            throw .invalid(field: "ledger command version", reason: "version \(version) is not supported")
        }
        timeMillis = try r.readUInt64("time")
        actor = try Self.readString(&r, "actor", LedgerLimits.actorBytesMax)
        requestID = try Self.readString(&r, "request id", LedgerLimits.requestIDBytesMax)
        let operationTag = try r.readUInt8("operation")
        switch operationTag {
        case 1:
            let name = try Self.readString(&r, "document name", LedgerLimits.documentNameBytesMax)
            let rawFormat = try r.readUInt8("format")
            guard let format = DocumentFormat(rawValue: rawFormat) else { throw .unknownTag(field: "format", tag: rawFormat) }
            let content = try r.readBytes("content", limit: LedgerLimits.documentContentBytesMax)
            operation = .putDocument(name: name, format: format, content: content, expectedVersion: try Self.readVersion(&r))
        case 2:
            let name = try Self.readString(&r, "document name", LedgerLimits.documentNameBytesMax)
            operation = .deleteDocument(name: name, expectedVersion: try Self.readVersion(&r))
        case 3:
            guard let token = JoinToken(canonical: try r.readBytes("join token", limit: 16 << 10)) else {
                throw .invalid(field: "join token", reason: "not a join token")
            }
            operation = .createJoinToken(token)
        case 4:
            operation = .initializeAuthority(keyring: try r.readBytes("keyring", limit: LedgerLimits.documentContentBytesMax))
        case 5:
            operation = .recordIssuance(try Issuance(decoding: &r))
        case 10:
            var issuance = try Issuance(decoding: &r)
            issuance.platformReplayKey = try Self.readString(&r, "platform token key", 64)
            issuance.platformExpiresAtMillis = try r.readUInt64("platform token expiry")
            guard !issuance.platformReplayKey.isEmpty else { throw .invalid(field: "platform token key", reason: "empty") }
            operation = .recordIssuance(issuance)
        case 12:
            var issuance = try Issuance(decoding: &r)
            issuance.renewedNotAfterMillis = try r.readUInt64("renewed not after")
            guard !issuance.renewedFrom.isEmpty, issuance.renewedNotAfterMillis != 0 else {
                throw .invalid(field: "renewed not after", reason: "given without a renewal, or zero")
            }
            operation = .recordIssuance(issuance)
        case 6:
            let reason = try Self.readString(&r, "denial reason", 1024)
            operation = .recordDenial(reason: reason, count: try r.readUInt32("denial count"))
        case 7:
            guard let entry = CanonicalJSON.decode(AuthorityKeyring.Entry.self, try r.readBytes("authority", limit: LedgerLimits.documentContentBytesMax)) else {
                throw .invalid(field: "authority", reason: "not an authority entry")
            }
            operation = .prepareAuthority(entry)
        case 8:
            operation = .activateAuthority(id: try Self.readString(&r, "authority id", 64))
        case 9:
            guard let revocation = CanonicalJSON.decode(Revocation.self, try r.readBytes("revocation", limit: 8 << 10)) else {
                throw .invalid(field: "revocation", reason: "not a revocation")
            }
            operation = .revoke(revocation)
        case 11, 13:
            let spiffeID = try Self.readString(&r, "spiffe id", 2048)
            let serial = try Self.readString(&r, "serial", 64)
            let exitStatus = Int32(bitPattern: try r.readUInt32("exit status"))
            let notAfterMillis = operationTag == 13 ? try r.readUInt64("step expiry") : 0
            if operationTag == 13 && notAfterMillis == 0 { throw .invalid(field: "step expiry", reason: "zero") }
            operation = .closeStep(spiffeID: spiffeID, serial: serial, exitStatus: exitStatus, notAfterMillis: notAfterMillis)
        case 14:
            operation = .adoptRules(version: try r.readUInt32("rules version"))
        case let tag:
            throw .unknownTag(field: "operation", tag: tag)
        }
        try r.expectEnd()
    }

    static func readString(_ r: inout BinaryReader, _ field: String, _ limit: Int) throws(CodecError) -> String {
        try r.readString(field, limit: limit)
    }

    private static func readVersion(_ r: inout BinaryReader) throws(CodecError) -> UInt64? {
        let present = try r.readUInt8("expected version flag")
        let value = try r.readUInt64("expected version")
        switch present {
        case 0: return nil
        case 1: return value
        default: throw .invalid(field: "expected version flag", reason: "\(present) is neither 0 nor 1")
        }
    }
}
