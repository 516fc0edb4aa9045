import Foundation
import GRDB
import Ledger
import Raft

/// The ledger's tables inside one SQLite transaction. Statements are
/// prepared once per connection (cached); the audit head and the applied
/// index are read once and kept here while a batch applies, and the
/// applied index is written once at the end (`finish()`).
struct SQLiteLedgerTables: LedgerTables {
    let db: Database
    private var head: (sequence: UInt64, hash: [UInt8])?
    private var applied: LogIndex?
    private var appliedChanged = false

    /// Documents every issuance reads (the active authority's id), kept
    /// for the rest of the transaction once read; writes through.
    private final class HotDocuments {
        static let names: Set<String> = [AuthorityDocuments.active]
        var documents: [String: Document?] = [:]
    }
    private let hot = HotDocuments()

    init(db: Database) {
        self.db = db
    }

    func document(named name: String) throws -> Document? {
        guard HotDocuments.names.contains(name) else { return try read(name) }
        if let cached = hot.documents[name] { return cached }
        let document = try read(name)
        hot.documents[name] = .some(document)
        return document
    }

    private func read(_ name: String) throws -> Document? {
        let statement = try RawStatement(db, "SELECT format, content, version, log_index FROM ledger_document WHERE name = ?")
        try statement.bind(1, name)
        defer { statement.reset() }
        guard try statement.step() else { return nil }
        let rawFormat = UInt8(truncatingIfNeeded: statement.int64(0))
        guard let format = DocumentFormat(rawValue: rawFormat) else {
            throw StorageError(code: .corruptState, reason: "document '\(name)' has unknown format \(rawFormat)")
        }
        return Document(name: name, format: format, content: statement.bytes(1), version: UInt64(bitPattern: statement.int64(2)),
                        logIndex: UInt64(bitPattern: statement.int64(3)))
    }

    func put(_ document: Document) throws {
        let statement = try RawStatement(db, """
            INSERT INTO ledger_document (name, format, content, version, log_index) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT(name) DO UPDATE SET format = excluded.format, content = excluded.content,
                version = excluded.version, log_index = excluded.log_index
            """)
        try statement.bind(1, document.name)
        try statement.bind(2, Int64(document.format.rawValue))
        try statement.bind(3, document.content)
        try statement.bind(4, Int64(bitPattern: document.version))
        try statement.bind(5, Int64(bitPattern: document.logIndex))
        try statement.run()
        if HotDocuments.names.contains(document.name) { hot.documents[document.name] = .some(document) }
    }

    func deleteDocument(named name: String) throws {
        let statement = try RawStatement(db, "DELETE FROM ledger_document WHERE name = ?")
        try statement.bind(1, name)
        try statement.run()
        if HotDocuments.names.contains(name) { hot.documents[name] = .some(nil) }
    }

    func documentNames(from: String, to: String, limit: Int, reverse: Bool) throws -> [String] {
        let statement = try RawStatement(db, "SELECT name FROM ledger_document WHERE name >= ? AND name < ? ORDER BY name \(reverse ? "DESC" : "ASC") LIMIT ?")
        try statement.bind(1, from)
        try statement.bind(2, to)
        try statement.bind(3, Int64(limit))
        defer { statement.reset() }
        var names: [String] = []
        while try statement.step() { names.append(statement.text(0)) }
        return names
    }

    func auditHead() throws -> (sequence: UInt64, hash: [UInt8]) {
        if let head { return head }
        let statement = try db.cachedStatement(sql: "SELECT sequence, hash FROM ledger_audit ORDER BY sequence DESC LIMIT 1")
        guard let row = try Row.fetchOne(statement) else { return (0, AuditRecord.genesisHash) }
        return (UInt64(row["sequence"] as Int64), [UInt8](row["hash"] as Data))
    }

    mutating func append(_ record: AuditRecord) throws {
        let statement = try RawStatement(db, """
            INSERT INTO ledger_audit (sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            """)
        try statement.bind(1, Int64(bitPattern: record.sequence))
        try statement.bind(2, Int64(bitPattern: record.logIndex))
        try statement.bind(3, Int64(bitPattern: record.timeMillis))
        try statement.bind(4, record.actor)
        try statement.bind(5, record.action)
        try statement.bind(6, record.target)
        try statement.bind(7, record.result)
        try statement.bind(8, record.previousHash)
        try statement.bind(9, record.hash)
        try statement.run()
        head = (record.sequence, record.hash)
    }

    func appliedIndex() throws -> LogIndex {
        if let applied { return applied }
        return UInt64(try Int64.fetchOne(db.cachedStatement(sql: "SELECT applied_index FROM ledger_meta WHERE id = 1")) ?? 0)
    }

    mutating func setAppliedIndex(_ index: LogIndex) throws {
        applied = index
        appliedChanged = true
    }

    /// Writes what was kept in memory; call before the transaction ends.
    mutating func finish() throws {
        guard appliedChanged, let applied else { return }
        try db.cachedStatement(sql: "UPDATE ledger_meta SET applied_index = ? WHERE id = 1").execute(arguments: [Int64(applied)])
        appliedChanged = false
    }
}

extension RaftStore {
    /// Applies committed entries to the ledger and records the applied
    /// index, all in one transaction: after a crash either all of them or
    /// none are applied, and a restart resumes right after the last.
    public func apply(_ entries: [Entry]) throws -> [LedgerOutcome] {
        guard !entries.isEmpty else { return [] }
        return try write { db in try Self.apply(entries, db) }
    }

    static func apply(_ entries: [Entry], _ db: Database) throws -> [LedgerOutcome] {
        var tables = SQLiteLedgerTables(db: db)
        var outcomes: [LedgerOutcome] = []
        for entry in entries {
            if let outcome = try Ledger.apply(entry, to: &tables) { outcomes.append(outcome) }
        }
        try tables.finish()
        return outcomes
    }

    public func document(named name: String) throws -> Document? {
        try read { db in try SQLiteLedgerTables(db: db).document(named: name) }
    }

    public func ledgerAppliedIndex() throws -> LogIndex {
        try read { db in try SQLiteLedgerTables(db: db).appliedIndex() }
    }

    /// Audit records after `sequence`, oldest first, at most `limit`.
    public func auditRecords(after sequence: UInt64 = 0, limit: Int = 1000) throws -> [AuditRecord] {
        try read { db in
            try Row.fetchAll(db, sql: """
                SELECT sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash
                FROM ledger_audit WHERE sequence > ? ORDER BY sequence LIMIT ?
                """, arguments: [Int64(sequence), min(max(limit, 0), 100_000)]).map { row in
                var record = AuditRecord(sequence: UInt64(row["sequence"] as Int64), logIndex: UInt64(row["log_index"] as Int64),
                                         timeMillis: UInt64(row["time_millis"] as Int64), actor: row["actor"], action: row["action"],
                                         target: row["target"], result: row["result"], previousHash: [UInt8](row["previous_hash"] as Data))
                record.hash = [UInt8](row["hash"] as Data) // as stored, so verification sees tampering
                return record
            }
        }
    }

    /// Recomputes the whole stored audit chain.
    public func verifyAudit() throws -> AuditVerification {
        var records: [AuditRecord] = []
        var after: UInt64 = 0
        while true {
            let page = try auditRecords(after: after, limit: 10_000)
            guard let last = page.last else { break }
            records.append(contentsOf: page)
            after = last.sequence
        }
        return AuditChain.verify(records)
    }
}

extension RaftStore {
    /// Documents whose names start with `prefix`, by name, at most `limit`
    /// (content left out).
    public func documents(prefix: String, after: String = "", limit: Int) throws -> [Document] {
        try read { db in
            try Row.fetchAll(db, sql: """
                SELECT name, format, version, log_index FROM ledger_document
                WHERE substr(name, 1, ?) = ? AND name > ? AND name >= ? ORDER BY name LIMIT ?
                """, arguments: [prefix.utf8.count, prefix, after, prefix, min(max(limit, 0), 10_000)]).map { row in
                Document(name: row["name"], format: DocumentFormat(rawValue: UInt8(truncatingIfNeeded: row["format"] as Int64)) ?? .json,
                         content: [], version: UInt64(row["version"] as Int64), logIndex: UInt64(row["log_index"] as Int64))
            }
        }
    }
}

extension RaftStore {
    /// Every document under `prefix` with its content, in name order, read
    /// in one transaction and handed to `body` one at a time (for scans
    /// such as building a CRL; nothing is held in memory but one row).
    public func forEachDocument(prefix: String, _ body: (Document) throws -> Void) throws {
        try read { db in
            let rows = try Row.fetchCursor(db, sql: """
                SELECT name, format, content, version, log_index FROM ledger_document WHERE name >= ? AND substr(name, 1, ?) = ? ORDER BY name
                """, arguments: [prefix, prefix.utf8.count, prefix])
            while let row = try rows.next() {
                try body(Document(name: row["name"], format: DocumentFormat(rawValue: UInt8(truncatingIfNeeded: row["format"] as Int64)) ?? .json,
                                  content: [UInt8](row["content"] as Data), version: UInt64(row["version"] as Int64),
                                  logIndex: UInt64(row["log_index"] as Int64)))
            }
        }
    }
}
