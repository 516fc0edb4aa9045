import Foundation
import GRDB
import Ledger
import Raft

/// A consistent copy of the ledger's tables (documents, the audit chain,
/// the applied index), taken inside one read transaction and encoded with
/// the `Raft` codec; installing it replaces the tables in the caller's
/// transaction.
enum LedgerSnapshot {
    static let encodingVersion: UInt8 = 1

    static func take(_ db: Database) throws -> (index: LogIndex, data: [UInt8]) {
        let (index, data, _) = try takeCounting(db)
        return (index, data)
    }

    /// Also says how many rows (documents and audit records) it holds.
    static func takeCounting(_ db: Database) throws -> (index: LogIndex, data: [UInt8], records: Int) {
        let tables = SQLiteLedgerTables(db: db)
        let applied = try tables.appliedIndex()
        var w = BinaryWriter(capacity: 4096)
        w.write(encodingVersion)
        w.write(applied)
        // Sized up front, read through cursors with columns by position:
        // a snapshot copies the whole ledger, so this loop is the cost.
        let size = try Int.fetchOne(db, sql: """
            SELECT (SELECT COALESCE(SUM(LENGTH(name) + LENGTH(content) + 32), 0) FROM ledger_document)
                 + (SELECT COALESCE(SUM(LENGTH(actor) + LENGTH(action) + LENGTH(target) + LENGTH(result) + 100), 0) FROM ledger_audit)
            """) ?? 0
        w.reserve(size + 64)
        let documentCount = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM ledger_document") ?? 0
        w.write(UInt32(documentCount))
        var written = 0
        let documents = try Row.fetchCursor(db, sql: "SELECT name, format, content, version, log_index FROM ledger_document ORDER BY name")
        while let row = try documents.next() {
            try row.withUnsafeData(atIndex: 0) { w.writeBytes($0 ?? Data()) }
            w.write(UInt8(truncatingIfNeeded: row[1] as Int64))
            try row.withUnsafeData(atIndex: 2) { w.writeBytes($0 ?? Data()) }
            w.write(UInt64(row[3] as Int64))
            w.write(UInt64(row[4] as Int64))
            written += 1
        }
        precondition(written == documentCount, "the document count changed inside one read transaction")
        let auditCount = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM ledger_audit") ?? 0
        w.write(UInt32(auditCount))
        let audit = try Row.fetchCursor(db, sql: """
            SELECT sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash FROM ledger_audit ORDER BY sequence
            """)
        while let row = try audit.next() {
            w.write(UInt64(row[0] as Int64))
            w.write(UInt64(row[1] as Int64))
            w.write(UInt64(row[2] as Int64))
            for column in 3...8 { try row.withUnsafeData(atIndex: column) { w.writeBytes($0 ?? Data()) } }
        }
        return (applied, w.bytes, documentCount + auditCount)
    }

    static func install(_ data: [UInt8], at index: LogIndex, _ db: Database, path: String) throws {
        func damaged(_ reason: String) -> StorageError {
            StorageError(code: .corruptState, reason: "\(path): the ledger snapshot at index \(index) is unusable (\(reason)); nothing was installed")
        }
        var r = BinaryReader(data)
        do {
            guard try r.readUInt8("version") == encodingVersion else { throw damaged("unknown version") }
            let applied = try r.readUInt64("applied index")
            guard applied == index else { throw damaged("it was taken at \(applied), not \(index)") }
            try db.execute(sql: "DELETE FROM ledger_document")
            try db.execute(sql: "DELETE FROM ledger_audit")
            var tables = SQLiteLedgerTables(db: db)
            let documentCount = Int(try r.readUInt32("document count"))
            guard documentCount <= r.remaining else { throw damaged("impossible document count") }
            for _ in 0..<documentCount {
                let name = try text(&r, "name")
                let rawFormat = try r.readUInt8("format")
                guard let format = DocumentFormat(rawValue: rawFormat) else { throw damaged("unknown document format \(rawFormat)") }
                let content = try r.readBytes("content", limit: LedgerLimits.documentContentBytesMax)
                let version = try r.readUInt64("version")
                let logIndex = try r.readUInt64("log index")
                try tables.put(Document(name: name, format: format, content: content, version: version, logIndex: logIndex))
            }
            let auditCount = Int(try r.readUInt32("audit count"))
            guard auditCount <= r.remaining else { throw damaged("impossible audit count") }
            var previous = AuditRecord.genesisHash
            for _ in 0..<auditCount {
                let sequence = try r.readUInt64("sequence")
                let logIndex = try r.readUInt64("log index")
                let time = try r.readUInt64("time")
                let actor = try text(&r, "actor"), action = try text(&r, "action"), target = try text(&r, "target"), result = try text(&r, "result")
                let previousHash = try r.readBytes("previous hash", limit: 64)
                let hash = try r.readBytes("hash", limit: 64)
                var record = AuditRecord(sequence: sequence, logIndex: logIndex, timeMillis: time, actor: actor, action: action,
                                         target: target, result: result, previousHash: previousHash)
                // A snapshot must carry an intact chain: check every link.
                guard previousHash == previous, record.hash == hash else { throw damaged("audit record \(sequence) does not verify") }
                record.hash = hash
                try tables.append(record)
                previous = hash
            }
            try r.expectEnd()
            try tables.setAppliedIndex(index)
            try tables.finish()
        } catch let error as CodecError {
            throw damaged("\(error)")
        }
    }

    private static func text(_ r: inout BinaryReader, _ field: String) throws -> String {
        let bytes = try r.readBytes(field, limit: 1 << 20)
        guard let value = String(validating: bytes, as: UTF8.self) else { throw CodecError.invalid(field: field, reason: "not UTF-8") }
        return value
    }
}

extension RaftStore {
    /// A consistent copy of the ledger at its applied index.
    public func takeLedgerSnapshot() throws -> (index: LogIndex, data: [UInt8]) {
        try read { db in try LedgerSnapshot.take(db) }
    }
}

/// A ledger snapshot being taken away from the writer: the read view is
/// pinned when this is made (so it holds exactly what was applied then),
/// and `take()` may run on any thread while the node keeps writing.
public final class LedgerSnapshotCapture: Sendable {
    private let snapshot: DatabaseSnapshot

    init(_ snapshot: DatabaseSnapshot) {
        self.snapshot = snapshot
    }

    /// The snapshot, and how many rows it holds.
    public func take() throws -> (index: LogIndex, data: [UInt8], records: Int) {
        try snapshot.read { db in try LedgerSnapshot.takeCounting(db) }
    }
}

extension RaftStore {
    /// Pins the current committed state for a snapshot taken later.
    public func beginLedgerSnapshot() throws -> LedgerSnapshotCapture {
        LedgerSnapshotCapture(try makeSnapshot())
    }
}
