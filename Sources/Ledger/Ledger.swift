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
    public static func apply(_ entry: Entry, to tables: inout some LedgerTables) throws -> LedgerOutcome? {
        let applied = try tables.appliedIndex()
        precondition(entry.index > applied, "entry \(entry.index) applied twice (applied index \(applied))")
        let outcome = try outcome(of: entry, &tables)
        try tables.setAppliedIndex(entry.index)
        return outcome
    }

    private static func outcome(of entry: Entry, _ tables: inout some LedgerTables) throws -> LedgerOutcome? {
        switch entry.payload {
        case .noop:
            return nil
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
            let result = try execute(command, entry.index, &tables)
            let (action, target): (String, String)
            switch command.operation {
            case .putDocument(let name, _, _, _): (action, target) = ("document.put", name)
            case .deleteDocument(let name, _): (action, target) = ("document.delete", name)
            case .createJoinToken(let token): (action, target) = ("token.create", token.spiffeID)
            case .initializeAuthority: (action, target) = ("authority.initialize", AuthorityDocuments.keyring)
            case .recordIssuance(let issuance): (action, target) = ("identity.issue", issuance.spiffeID)
            case .recordDenial(_, let count): (action, target) = ("identity.deny", count == 1 ? "" : "\(count) requests")
            }
            var resultText: String
            switch result {
            case .written(let version): resultText = "ok: version \(version)"
            case .deleted: resultText = "ok: deleted"
            case .rejected(let reason): resultText = "rejected: \(reason)"
            case .issued(_, let replayed):
                guard case .recordIssuance(let i) = command.operation else { resultText = "ok"; break }
                resultText = (replayed ? "replayed" : "ok") + ": \(i.kind.rawValue) serial=\(i.serial) sha256=\(i.fingerprint) ttl=\(i.ttlSeconds)s"
                    + " not_after=\(i.notAfterMillis) token=\(i.tokenHash.prefix(16)) node=\(i.node) request=\(command.requestID)"
            }
            if case .recordDenial(let reason, _) = command.operation { resultText = "denied: \(reason)" }
            try audit(&tables, entry, timeMillis: command.timeMillis, actor: command.actor, action: action, target: target, result: resultText)
            return LedgerOutcome(logIndex: entry.index, requestID: command.requestID, result: result)
        }
    }

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
            try tables.put(Document(name: name, format: .json, content: try CanonicalJSON.encode(token), version: 1, logIndex: index))
            return .written(version: 1)
        case .initializeAuthority(let keyring):
            guard try tables.document(named: AuthorityDocuments.keyring) == nil else { return .rejected("the authority is already initialized") }
            try tables.put(Document(name: AuthorityDocuments.keyring, format: .json, content: keyring, version: 1, logIndex: index))
            return .written(version: 1)
        case .recordIssuance(let issuance):
            return try issue(issuance, command.timeMillis, index, &tables)
        case .recordDenial:
            return .written(version: 0) // only the audit record
        }
    }

    /// Replays the identity already issued for the idempotency key, or
    /// consumes the join token (once, unexpired, for this SPIFFE ID) and
    /// records the issuance.
    private static func issue(_ issuance: Issuance, _ now: UInt64, _ index: LogIndex, _ tables: inout some LedgerTables) throws -> LedgerOutcome.Result {
        if !issuance.idempotencyKey.isEmpty, let earlier = try tables.document(named: AuthorityDocuments.idempotency(issuance.idempotencyKey)),
           let recorded = CanonicalJSON.decode(Issuance.self, earlier.content) {
            guard recorded.tokenHash == issuance.tokenHash else { return .rejected("the idempotency key was used with another token") }
            return .issued(artifact: recorded.artifact, replayed: true)
        }
        let tokenName = AuthorityDocuments.token(issuance.tokenHash)
        guard let document = try tables.document(named: tokenName), var token = CanonicalJSON.decode(JoinToken.self, document.content) else {
            return .rejected("unknown join token")
        }
        guard !token.used else { return .rejected("the join token was already used") }
        guard token.expiresAtMillis > now else { return .rejected("the join token expired") }
        guard token.spiffeID == issuance.spiffeID else { return .rejected("the join token is for another SPIFFE ID") }
        token.used = true
        token.usedBySerial = issuance.serial
        try tables.put(Document(name: tokenName, format: .json, content: try CanonicalJSON.encode(token), version: document.version + 1, logIndex: index))
        if !issuance.idempotencyKey.isEmpty {
            try tables.put(Document(name: AuthorityDocuments.idempotency(issuance.idempotencyKey), format: .json,
                                    content: try CanonicalJSON.encode(issuance), version: 1, logIndex: index))
        }
        return .issued(artifact: issuance.artifact, replayed: false)
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
}
