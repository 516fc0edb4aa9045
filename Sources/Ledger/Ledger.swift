import Encoding
import Foundation
import Raft

public struct Document: Sendable, Hashable {
    public var name: String
    public var format: DocumentFormat
    public var content: [UInt8]
    /// 1 on creation, +1 on every replacement.
    public var version: UInt64
    /// The log index that wrote this version.
    public var logIndex: LogIndex

    public init(name: String, format: DocumentFormat, content: [UInt8], version: UInt64, logIndex: LogIndex) {
        self.name = name
        self.format = format
        self.content = content
        self.version = version
        self.logIndex = logIndex
    }
}

/// Where the ledger's state lives. `InMemoryLedgerTables` here; the SQLite
/// tables (same database as the Raft log) come with the node.
/// Its methods throw only for storage failures (a full disk, say), never
/// for the ledger's own refusals, which are outcomes.
public protocol LedgerTables {
    func document(named name: String) throws -> Document?
    mutating func put(_ document: Document) throws
    mutating func deleteDocument(named name: String) throws
    /// The last audit record's sequence and hash (0 and the genesis hash when empty).
    func auditHead() throws -> (sequence: UInt64, hash: [UInt8])
    mutating func append(_ record: AuditRecord) throws
    func appliedIndex() throws -> LogIndex
    mutating func setAppliedIndex(_ index: LogIndex) throws
    /// Names `from <= name < to`, in order (or from the end when `reverse`), at most `limit`.
    func documentNames(from: String, to: String, limit: Int, reverse: Bool) throws -> [String]
    /// `documentNames` in order, for a scan repeated from the same `from`
    /// on every command (what is due to be forgotten): tables may remember
    /// where it starts.
    mutating func namesFromRepeatedBound(_ from: String, to: String, limit: Int) throws -> [String]
    /// The first name that begins with `prefix` (nil: none), for the few
    /// prefixes every command asks (whether anything is due to be
    /// forgotten, which nearly always nothing is): tables may remember it.
    mutating func firstName(under prefix: String) throws -> String?
    /// The content of the active authority's document (its id, a JSON
    /// string), if there is one: every issuance asks, and tables may keep
    /// it at hand.
    func activeAuthority() throws -> [UInt8]?
}

extension LedgerTables {
    public func activeAuthority() throws -> [UInt8]? {
        try document(named: AuthorityDocuments.active)?.content
    }

    public mutating func namesFromRepeatedBound(_ from: String, to: String, limit: Int) throws -> [String] {
        try documentNames(from: from, to: to, limit: limit, reverse: false)
    }

    public mutating func firstName(under prefix: String) throws -> String? {
        try documentNames(from: prefix, to: prefix + "\u{10FFFF}", limit: 1, reverse: false).first.flatMap { $0.hasPrefix(prefix) ? $0 : nil }
    }
}

/// What applying one command did, for the caller waiting on it.
public struct LedgerOutcome: Sendable, Hashable {
    public enum Result: Sendable, Hashable {
        case written(version: UInt64)
        case deleted
        case rejected(String)
        /// The identity issued for this request, or (`replayed`) the one
        /// already issued for the same idempotency key.
        case issued(artifact: [UInt8], replayed: Bool)
    }

    public var logIndex: LogIndex
    public var requestID: String
    public var result: Result

    public init(logIndex: LogIndex, requestID: String, result: Result) {
        self.logIndex = logIndex
        self.requestID = requestID
        self.result = result
    }
}

/// The replicated state machine. `apply` is deterministic: it reads no
/// clock and draws no randomness; every node applying the same entries to
/// the same tables reaches the same documents and the same audit chain.
public enum Ledger {
    /// Applies one committed entry. Every change, accepted or refused,
    /// appends an audit record; a no-op changes nothing.
    @discardableResult
    /// `rulesKnown`: the newest rules (`LedgerRules`) the caller's build
    /// applies by; an entry adopting newer ones throws `LedgerRulesError`
    /// and changes nothing (the node must stop).
    public static func apply(_ entry: Entry, to tables: inout some LedgerTables, rulesKnown: UInt32 = LedgerRules.known) throws -> LedgerOutcome? {
        let applied = try tables.appliedIndex()
        precondition(entry.index > applied, "entry \(entry.index) applied twice (applied index \(applied))")
        let outcome = try outcome(of: entry, rulesKnown: rulesKnown, &tables)
        try tables.setAppliedIndex(entry.index)
        return outcome
    }

    private static func outcome(of entry: Entry, rulesKnown: UInt32, _ tables: inout some LedgerTables) throws -> LedgerOutcome? {
        switch entry.payload {
        case .noop:
            return nil
        case .released:
            preconditionFailure("entry \(entry.index) reached the ledger without its payload (only applied entries are released)")
        case .configChange(let change):
            try audit(&tables, entry, timeMillis: 0, actor: "raft", action: "membership.change", target: describe(change), result: "ok")
            return nil
        case .command(let bytes):
            let command: LedgerCommand
            do {
                command = try LedgerCommand(decoding: bytes)
            } catch {
                try audit(&tables, entry, timeMillis: 0, actor: "unknown", action: "invalid", target: "", result: "rejected: \(error)")
                return LedgerOutcome(logIndex: entry.index, requestID: "", result: .rejected("malformed command: \(error)"))
            }
            // (An invalid one is refused alike by every build.)
            if case .adoptRules(let version) = command.operation, command.invalidReason == nil {
                try LedgerRules.check(version, known: rulesKnown, at: entry.index)
            }
            let result = try execute(command, entry.index, &tables)
            let (action, target): (String, String)
            switch command.operation {
            case .putDocument(let name, _, _, _): (action, target) = ("document.put", name)
            case .deleteDocument(let name, _): (action, target) = ("document.delete", name)
            case .createJoinToken(let token): (action, target) = ("token.create", token.spiffeID)
            case .initializeAuthority: (action, target) = ("authority.initialize", AuthorityDocuments.keyring)
            case .recordIssuance(let issuance): (action, target) = ("identity.issue", issuance.spiffeID)
            case .recordDenial(_, let count): (action, target) = ("identity.deny", count == 1 ? "" : "\(count) requests")
            case .prepareAuthority(let entry): (action, target) = ("authority.prepare", entry.id)
            case .activateAuthority(let id): (action, target) = ("authority.activate", id)
            case .revoke(let rule): (action, target) = ("identity.revoke", "\(rule.kind.rawValue)=\(rule.value)")
            case .closeStep(let spiffeID, _, _, _): (action, target) = ("step.close", spiffeID)
            case .adoptRules(let version): (action, target) = ("ledger.rules", "version \(version)")
            }
            var resultText: String
            switch result {
            case .written(let version): resultText = "ok: version \(version)"
            case .deleted: resultText = "ok: deleted"
            case .rejected(let reason): resultText = "rejected: \(reason)"
            case .issued(_, let replayed):
                guard case .recordIssuance(let i) = command.operation else { resultText = "ok"; break }
                resultText = issuedText(i, replayed: replayed, requestID: command.requestID)
            }
            if case .recordDenial(let reason, _) = command.operation { resultText = "denied: \(reason)" }
            if case .closeStep(_, let serial, let status, _) = command.operation, case .written = result { resultText = "ok: serial=\(serial) exit_status=\(status)" }
            if case .revoke(let rule) = command.operation, case .written = result { resultText = "ok: \(rule.reason)" }
            try audit(&tables, entry, timeMillis: command.timeMillis, actor: command.actor, action: action, target: target, result: resultText)
            return LedgerOutcome(logIndex: entry.index, requestID: command.requestID, result: result)
        }
    }

    /// The result of an `identity.issue` record: `ok: x509 serial=... sha256=...
    /// ttl=...s not_after=... token=... authority=... node=... request=...
    /// context=k=v,...`, written piece by piece as bytes (from each
    /// string's contiguous UTF-8, numbers' digits in place) and made a
    /// string once: interpolation was a tenth of applying an issuance, and
    /// appending to a String, or a String's UTF8View to an array, half
    /// as much again.
    static func issuedText(_ i: Issuance, replayed: Bool, requestID: String) -> String {
        var text = JSONText.Builder(capacity: 320 + i.attributes.count * 48)
        text.raw(replayed ? "replayed: " : "ok: ")
        text.raw(i.kind == .x509 ? "x509" : "jwt")
        text.raw(" serial=")
        text.unescaped(i.serial)
        text.raw(" sha256=")
        text.unescaped(i.fingerprint)
        text.raw(" ttl=")
        text.integer(UInt64(i.ttlSeconds))
        text.raw("s not_after=")
        text.integer(i.notAfterMillis)
        if !i.platformReplayKey.isEmpty {
            text.raw(" platform_token=")
            text.unescaped(i.platformReplayKey, bytes: 16)
        } else if i.tokenHash.isEmpty {
            text.raw(" renewed_from=")
            text.unescaped(i.renewedFrom)
        } else {
            text.raw(" token=")
            text.unescaped(i.tokenHash, bytes: 16)
        }
        text.raw(" authority=")
        text.unescaped(i.authority)
        text.raw(" node=")
        text.integer(i.node)
        text.raw(" request=")
        text.unescaped(requestID)
        if !i.attributes.isEmpty {
            text.raw(" context=")
            for (position, attribute) in i.attributes.sorted(by: { $0.key < $1.key }).enumerated() {
                if position > 0 { text.raw(",") }
                contextField(attribute.key, &text)
                text.raw("=")
                contextField(attribute.value, &text)
            }
        }
        return String(decoding: text.bytes, as: UTF8.self)
    }

    /// A context name or value in the audit text: a space, ',', '=', '%'
    /// or control character is written as '%' and two hex digits, so that
    /// a value (a platform claim, say a workflow's name) cannot pass for
    /// more fields of the record.
    static func contextField(_ field: String, _ text: inout JSONText.Builder) {
        func plain(_ byte: UInt8) -> Bool { byte > 0x20 && byte != 0x7F && byte != 0x2C && byte != 0x3D && byte != 0x25 }
        guard !field.utf8.allSatisfy(plain) else { return text.unescaped(field) }
        var escaped: [UInt8] = []
        for byte in field.utf8 {
            if plain(byte) {
                escaped.append(byte)
            } else {
                escaped += [0x25, hexDigit(byte >> 4), hexDigit(byte & 0x0F)]
            }
        }
        text.unescaped(String(decoding: escaped, as: UTF8.self))
    }

    private static func hexDigit(_ value: UInt8) -> UInt8 { value < 10 ? 0x30 + value : 0x41 + value - 10 }

    private static func execute(_ command: LedgerCommand, _ index: LogIndex, _ tables: inout some LedgerTables) throws -> LedgerOutcome.Result {
        if let reason = command.invalidReason { return .rejected(reason) }
        switch command.operation {
        case .putDocument(let name, let format, let content, let expected):
            let current = try tables.document(named: name)
            if let expected, expected != (current?.version ?? 0) {
                return .rejected(current == nil
                    ? "version conflict: '\(name)' does not exist (expected version \(expected))"
                    : "version conflict: '\(name)' is at version \(current!.version), not \(expected)")
            }
            let version = (current?.version ?? 0) + 1
            try tables.put(Document(name: name, format: format, content: content, version: version, logIndex: index))
            return .written(version: version)
        case .deleteDocument(let name, let expected):
            guard let current = try tables.document(named: name) else { return .rejected("'\(name)' does not exist") }
            if let expected, expected != current.version {
                return .rejected("version conflict: '\(name)' is at version \(current.version), not \(expected)")
            }
            try tables.deleteDocument(named: name)
            return .deleted
        case .createJoinToken(let token):
            let name = AuthorityDocuments.token(token.hash)
            guard try tables.document(named: name) == nil else { return .rejected("a token with this hash already exists") }
            try tables.put(Document(name: name, format: .json, content: token.canonicalJSON, version: 1, logIndex: index))
            let forgetAt = min(token.expiresAtMillis, AuthorityDocuments.latestMillis) + AuthorityDocuments.forgetAfterMillis
            try tables.put(Document(name: AuthorityDocuments.tokenForget(atMillis: forgetAt, hash: token.hash),
                                    format: .json, content: Self.emptyObject, version: 1, logIndex: index))
            try forget(AuthorityDocuments.tokenForgetPrefix, before: command.timeMillis, record: AuthorityDocuments.token, &tables)
            return .written(version: 1)
        case .initializeAuthority(let keyring):
            guard try tables.document(named: AuthorityDocuments.keyring) == nil else { return .rejected("the authority is already initialized") }
            guard let decoded = CanonicalJSON.decode(AuthorityKeyring.self, keyring), decoded.authorities.count == 1, let active = decoded.active else {
                return .rejected("a new keyring holds exactly one authority, active")
            }
            try tables.put(Document(name: AuthorityDocuments.keyring, format: .json, content: keyring, version: 1, logIndex: index))
            try tables.put(Document(name: AuthorityDocuments.active, format: .json, content: Array(JSONText.quote(active.id).utf8), version: 1, logIndex: index))
            return .written(version: 1)
        case .recordIssuance(let issuance):
            return try issue(issuance, command.timeMillis, index, &tables)
        case .recordDenial, .closeStep(_, _, _, 0):
            return .written(version: 0) // only the audit record
        case .adoptRules(let version):
            // (A version this build does not know stopped the node before.)
            let current = try tables.document(named: LedgerRules.document)
            let inForce = try LedgerRules.version(of: current)
            guard version > inForce else { return .rejected("the ledger applies rules version \(inForce) already; versions only move forward") }
            let next = (current?.version ?? 0) + 1
            try tables.put(Document(name: LedgerRules.document, format: .json, content: LedgerRules.content(version), version: next, logIndex: index))
            return .written(version: next)
        case .closeStep(_, let serial, let exitStatus, let notAfterMillis):
            let name = AuthorityDocuments.closedStep(notAfterMillis: notAfterMillis, serial: serial)
            guard try tables.document(named: name) == nil else { return .rejected("the step was closed already") }
            try tables.put(Document(name: name, format: .json, content: Array(JSONText.object(["exit_status": String(exitStatus)]).utf8), version: 1,
                                    logIndex: index))
            // Kept while the step's SVID lives (a close needs it); up to two gone ones forgotten per close.
            try forget(AuthorityDocuments.closedStepsPrefix, before: command.timeMillis, &tables)
            return .written(version: 1)
        case .prepareAuthority(var entry):
            guard let (document, current) = try keyring(&tables) else { return .rejected("the authority is not initialized") }
            var keyring = current
            keyring.authorities.removeAll { !$0.isPublished(at: command.timeMillis) }
            guard keyring.prepared == nil else { return .rejected("authority \(keyring.prepared!.id) is already prepared; activate it first") }
            guard !keyring.authorities.contains(where: { $0.id == entry.id }) else { return .rejected("an authority with id \(entry.id) exists") }
            guard keyring.authorities.count < AuthorityKeyring.authoritiesMax else {
                return .rejected("\(keyring.authorities.count) authorities are published; wait until a retired one's identities expire")
            }
            entry.createdAtMillis = command.timeMillis
            keyring.authorities.append(entry)
            return try store(keyring, replacing: document, index, &tables)
        case .activateAuthority(let id):
            guard let (document, current) = try keyring(&tables) else { return .rejected("the authority is not initialized") }
            var keyring = current
            guard let position = keyring.authorities.firstIndex(where: { $0.id == id && $0.state == .prepared }) else {
                return .rejected("no prepared authority has id \(id)")
            }
            // The retiring authority stays published until the last
            // identity issued so far expires (the issued records are
            // ordered by expiry, so that is the last one's).
            var keepUntil = command.timeMillis
            if let last = try tables.documentNames(from: AuthorityDocuments.issuedPrefix, to: AuthorityDocuments.issuedPrefix + "~",
                                                   limit: 1, reverse: true).first,
               let notAfter = UInt64(last.dropFirst(AuthorityDocuments.issuedPrefix.count).prefix(13)) {
                keepUntil = max(keepUntil, notAfter)
            }
            for i in keyring.authorities.indices where keyring.authorities[i].state == .active {
                keyring.authorities[i].state = .retired
                keyring.authorities[i].retiredAtMillis = command.timeMillis
                keyring.authorities[i].keepUntilMillis = keepUntil
            }
            keyring.authorities[position].state = .active
            keyring.authorities[position].activatedAtMillis = command.timeMillis
            let active = try tables.document(named: AuthorityDocuments.active)
            try tables.put(Document(name: AuthorityDocuments.active, format: .json, content: Array(JSONText.quote(id).utf8),
                                    version: (active?.version ?? 0) + 1, logIndex: index))
            return try store(keyring, replacing: document, index, &tables)
        case .revoke(var rule):
            let document = try tables.document(named: AuthorityDocuments.revocations)
            var list = RevocationList()
            if let document {
                guard let decoded = CanonicalJSON.decode(RevocationList.self, document.content) else {
                    return .rejected("the revocation list in the ledger does not decode; nothing was changed")
                }
                list = decoded
            }
            // A rule outlives everything it covers by then.
            let keepMillis = UInt64(AuthorityDocuments.identityLifetimeMaxSeconds) * 1000 + 60_000
            // The same thing revoked again replaces its rule, keeping the
            // line the first found (the renewal's record may be gone since).
            if rule.lineage == nil, let earlier = list.rules.first(where: { $0.kind == rule.kind && $0.value == rule.value }), earlier.lineage != nil {
                (rule.lineage, rule.lineageFromIndex, rule.lineageFromMillis) = (earlier.lineage, earlier.lineageFromIndex, earlier.lineageFromMillis)
            }
            list.rules.removeAll { $0.revokedAtMillis + keepMillis < command.timeMillis || ($0.kind == rule.kind && $0.value == rule.value) }
            guard list.rules.count < RevocationList.rulesMax else { return .rejected("\(list.rules.count) revocation rules are in force; the limit is \(RevocationList.rulesMax)") }
            rule.revokedAtMillis = command.timeMillis
            rule.revokedAtIndex = index
            list.rules.append(rule)
            let content = try CanonicalJSON.encode(list)
            // Every document must fit what a snapshot may carry.
            guard content.count <= LedgerLimits.documentContentBytesMax else {
                return .rejected("the revocation rules would take \(content.count) bytes; at most \(LedgerLimits.documentContentBytesMax) (revoke by attribute or SPIFFE ID to cover many identities with one rule)")
            }
            let version = (document?.version ?? 0) + 1
            try tables.put(Document(name: AuthorityDocuments.revocations, format: .json, content: content, version: version, logIndex: index))
            return .written(version: version)
        }
    }

    private static func keyring(_ tables: inout some LedgerTables) throws -> (Document, AuthorityKeyring)? {
        guard let document = try tables.document(named: AuthorityDocuments.keyring),
              let keyring = CanonicalJSON.decode(AuthorityKeyring.self, document.content) else { return nil }
        return (document, keyring)
    }

    private static func store(_ keyring: AuthorityKeyring, replacing document: Document, _ index: LogIndex,
                              _ tables: inout some LedgerTables) throws -> LedgerOutcome.Result {
        try tables.put(Document(name: AuthorityDocuments.keyring, format: .json, content: try CanonicalJSON.encode(keyring),
                                version: document.version + 1, logIndex: index))
        return .written(version: document.version + 1)
    }

    /// Replays the identity already issued for the idempotency key, or
    /// checks the evidence (consumes the join token: once, unexpired, for
    /// this SPIFFE ID; or, for a renewal, the renewed identity is not
    /// revoked) and that the signing authority is still the active one,
    /// then records the issuance.
    private static func issue(_ issuance: Issuance, _ now: UInt64, _ index: LogIndex, _ tables: inout some LedgerTables) throws -> LedgerOutcome.Result {
        if !issuance.idempotencyKey.isEmpty, let earlier = try tables.document(named: AuthorityDocuments.idempotency(issuance.idempotencyKey)),
           let recorded = CanonicalJSON.decode(IdempotentAnswer.self, earlier.content) {
            guard recorded.evidence == issuance.evidence, recorded.kind == issuance.kind else {
                return .rejected("the idempotency key was used with other evidence or for the other kind of identity")
            }
            return .issued(artifact: Array(recorded.artifact), replayed: true)
        }
        guard let active = try tables.activeAuthority(), JSONText.isQuoted(active, issuance.authority) else {
            return .rejected("authority rotated: \(issuance.authority) is no longer the active authority")
        }
        if !issuance.platformReplayKey.isEmpty {
            // The platform token was verified by the leader; here it is
            // consumed, once, cluster-wide, while it is still valid.
            guard issuance.platformExpiresAtMillis > now else { return .rejected("the platform token expired") }
            let name = AuthorityDocuments.platformToken(expiresAtMillis: issuance.platformExpiresAtMillis, replayKey: issuance.platformReplayKey)
            guard try tables.document(named: name) == nil else { return .rejected("the platform token was already used") }
            try tables.put(Document(name: name, format: .json, content: Array(JSONText.object(["serial": issuance.serial]).utf8), version: 1,
                                    logIndex: index))
            // Kept a while past their expiry: commands' times come from
            // whichever node leads, and one whose clock is behind would
            // take a token forgotten at a later time for unexpired.
            try forget(AuthorityDocuments.platformTokensPrefix, before: now > AuthorityDocuments.platformTokenKeptMillis ? now - AuthorityDocuments.platformTokenKeptMillis : 0,
                       &tables)
        } else if issuance.tokenHash.isEmpty {
            let document = try tables.document(named: AuthorityDocuments.revocations)
            let rules = document.flatMap { CanonicalJSON.decode(RevocationList.self, $0.content) }
            if document != nil && rules == nil { return .rejected("the revocation list in the ledger does not decode; renewal refused") }
            // By the log where the renewed identity's record is at hand (see
            // `Revocation`): looked up only once a rule names the identity.
            let recordName = issuance.renewedNotAfterMillis == 0 ? nil
                : AuthorityDocuments.issued(notAfterMillis: issuance.renewedNotAfterMillis, serial: issuance.renewedFrom)
            var lookupError: (any Error)?
            let rule = rules?.revoking(serial: issuance.renewedFrom, spiffeID: issuance.spiffeID, attributes: issuance.attributes,
                                       issuedAtMillis: issuance.renewedIssuedAtMillis) {
                guard let recordName else { return nil }
                do { return try tables.document(named: recordName)?.logIndex } catch { lookupError = error; return nil }
            }
            if let lookupError { throw lookupError }
            if let rule { return .rejected("revoked: the identity being renewed was revoked (\(rule.kind.rawValue) \(rule.value))") }
        } else {
            let tokenName = AuthorityDocuments.token(issuance.tokenHash)
            guard let document = try tables.document(named: tokenName) else { return .rejected("unknown join token") }
            let canonical = JoinToken(exactlyCanonical: document.content)
            guard var token = canonical ?? JoinToken(canonical: document.content) else { return .rejected("unknown join token") }
            guard !token.used else { return .rejected("the join token was already used") }
            guard token.expiresAtMillis > now else { return .rejected("the join token expired") }
            guard token.spiffeID == issuance.spiffeID else { return .rejected("the join token is for another SPIFFE ID") }
            token.used = true
            token.usedBySerial = issuance.serial
            // A canonical document changes only at its end.
            let content = (canonical == nil ? nil : JoinToken.markingUsed(document.content, serial: issuance.serial)) ?? token.canonicalJSON
            try tables.put(Document(name: tokenName, format: .json, content: content, version: document.version + 1, logIndex: index))
        }
        if !issuance.idempotencyKey.isEmpty {
            let answer = IdempotentAnswer(evidence: issuance.evidence, kind: issuance.kind, artifact: Data(issuance.artifact))
            try tables.put(Document(name: AuthorityDocuments.idempotency(issuance.idempotencyKey), format: .json,
                                    content: try CanonicalJSON.encode(answer), version: 1, logIndex: index))
            let forgetAt = min(issuance.notAfterMillis, AuthorityDocuments.latestMillis) + AuthorityDocuments.forgetAfterMillis
            try tables.put(Document(name: AuthorityDocuments.idempotencyForget(atMillis: forgetAt, key: issuance.idempotencyKey),
                                    format: .json, content: Self.emptyObject, version: 1, logIndex: index))
        }
        try forget(AuthorityDocuments.tokenForgetPrefix, before: now, record: AuthorityDocuments.token, &tables)
        try forget(AuthorityDocuments.idempotencyForgetPrefix, before: now, record: AuthorityDocuments.idempotency, &tables)
        let record = IssuedRecord(kind: issuance.kind, spiffeID: issuance.spiffeID, serial: issuance.serial, authority: issuance.authority,
                                  fingerprint: issuance.fingerprint.isEmpty ? nil : issuance.fingerprint,
                                  issuedAtMillis: issuance.issuedAtMillis, notAfterMillis: issuance.notAfterMillis, attributes: issuance.attributes)
        try tables.put(Document(name: AuthorityDocuments.issued(notAfterMillis: issuance.notAfterMillis, serial: issuance.serial), format: .json,
                                content: record.canonicalJSON, version: 1, logIndex: index))
        // Forget up to two identities that have expired (as many as are
        // issued, so the records stay bounded by what is alive).
        try forget(AuthorityDocuments.issuedPrefix, before: now, &tables)
        return .issued(artifact: issuance.artifact, replayed: false)
    }

    private static let emptyObject: [UInt8] = Array("{}".utf8)

    /// Forgets up to two documents named `<prefix><13-digit time>/<id>`
    /// whose time is before `now` (as many as one command adds, so they
    /// stay bounded by what is still of use), and with each the record
    /// `record(id)` it stands for, if any.
    private static func forget(_ prefix: String, before now: UInt64, record: ((String) -> String)? = nil, _ tables: inout some LedgerTables) throws {
        // Names sort by time: none is due unless the first is (asked
        // without making the scan's bound, on every command).
        guard let first = try tables.firstName(under: prefix), AuthorityDocuments.timedName(first, prefix: prefix, isBefore: now) else { return }
        for name in try tables.namesFromRepeatedBound(prefix, to: AuthorityDocuments.timed(prefix, now, ""), limit: 2) {
            if let record { try tables.deleteDocument(named: record(String(name.dropFirst(prefix.count + 14)))) }
            try tables.deleteDocument(named: name)
        }
    }

    private static func audit(_ tables: inout some LedgerTables, _ entry: Entry, timeMillis: UInt64, actor: String,
                              action: String, target: String, result: String) throws {
        let head = try tables.auditHead()
        try tables.append(AuditRecord(sequence: head.sequence + 1, logIndex: entry.index, timeMillis: timeMillis, actor: actor,
                                  action: action, target: target, result: result, previousHash: head.hash))
    }

    private static func describe(_ change: ConfigChange) -> String {
        switch change {
        case .bootstrap(let voters): return "bootstrap voters \(voters.map(String.init).joined(separator: ","))"
        case .addLearner(let id): return "add learner \(id)"
        case .promoteLearner(let id): return "promote \(id)"
        case .removeNode(let id): return "remove \(id)"
        }
    }
}

/// The ledger's tables in memory (tests, the simulator).
public struct InMemoryLedgerTables: LedgerTables, Sendable {
    public private(set) var documents: [String: Document] = [:]
    public private(set) var audit: [AuditRecord] = []
    public private(set) var applied: LogIndex = 0

    public init() {}

    public func document(named name: String) -> Document? { documents[name] }
    public mutating func put(_ document: Document) { documents[document.name] = document }
    public mutating func deleteDocument(named name: String) { documents[name] = nil }
    public func auditHead() -> (sequence: UInt64, hash: [UInt8]) { (audit.last?.sequence ?? 0, audit.last?.hash ?? AuditRecord.genesisHash) }
    public mutating func append(_ record: AuditRecord) { audit.append(record) }
    public func appliedIndex() -> LogIndex { applied }
    public mutating func setAppliedIndex(_ index: LogIndex) { applied = index }
    public func documentNames(from: String, to: String, limit: Int, reverse: Bool) -> [String] {
        let names = documents.keys.filter { $0 >= from && $0 < to }.sorted()
        return Array((reverse ? names.reversed() : names).prefix(limit))
    }
}
