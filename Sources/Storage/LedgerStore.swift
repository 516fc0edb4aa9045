import Foundation
import GRDB
import Ledger
import Raft
import Synchronization

/// The replicated ledger of one node. Applied state lives in memory
/// (`LedgerMemory`): applying an issuance is a few dictionary updates, not
/// B-tree writes. What makes it durable:
/// - the Raft log (`WriteAheadLog`) holds every entry after the newest
///   checkpoint, so a restart replays them;
/// - a checkpoint file (`checkpoint-<index>.ledger`) holds every document
///   at its index, written off the driver's thread at compaction time
///   (atomically: temporary file, fsync, rename);
/// - the audit chain is appended to the `ledger_audit` table of
///   `ledger.sqlite` in batches (every `auditBatchMax` records or
///   `auditBatchMillis`), without an fsync of its own: records after the
///   checkpoint are made again by the replay. Before a checkpoint counts,
///   the table is synced through it.
///
/// Reads from any thread see the applied state: documents from memory,
/// audit records from the table plus those not yet written.
public final class LedgerStore: Sendable {
    public let directory: String
    private let database: DatabasePool
    private let memory: Mutex<LedgerMemory>
    /// When the oldest unwritten audit record was applied (driver thread).
    private let unwrittenSince = Mutex<ContinuousClock.Instant?>(nil)
    let batching: AuditBatching
    /// Where due audit records are written, one batch at a time and in
    /// order, off the driver's thread: a batch of 2,048 is tens of
    /// milliseconds of SQLite work, and every request waiting on the
    /// driver waited with it (p99 issuance latency halved without it).
    private let auditWriter = DispatchQueue(label: "warrant.ledger.audit")
    /// Whether a batch is queued or being written, and the error of a
    /// batch that failed: the next apply throws it, and the node stops as
    /// on any storage failure.
    private let auditWrites = Mutex<(queued: Bool, failure: (any Error)?)>((false, nil))
    /// The index of the newest checkpoint written; held while a checkpoint
    /// file is written, by a checkpoint (on its own thread) or by an
    /// installed snapshot (the driver's): a checkpoint of the state before
    /// an install must not land after it.
    private let checkpointWriting = Mutex<LogIndex>(0)

    init(directory: String, batching: AuditBatching = AuditBatching()) throws {
        self.directory = directory
        self.batching = batching
        var configuration = GRDB.Configuration()
        configuration.label = "ledger"
        configuration.prepareDatabase { db in
            // Commits are not synced: the audit records after the last
            // checkpoint are made again from the Raft log after a crash.
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
        }
        configuration.maximumReaderCount = 4
        database = try DatabasePool(path: "\(directory)/ledger.sqlite", configuration: configuration)
        var migrator = DatabaseMigrator()
        migrator.registerMigration("audit-v1") { db in
            try db.execute(sql: """
                CREATE TABLE ledger_audit (
                    sequence INTEGER PRIMARY KEY,
                    log_index INTEGER NOT NULL,
                    time_millis INTEGER NOT NULL,
                    actor TEXT NOT NULL,
                    action TEXT NOT NULL,
                    target TEXT NOT NULL,
                    result TEXT NOT NULL,
                    previous_hash BLOB NOT NULL,
                    hash BLOB NOT NULL
                );
                """)
        }
        try migrator.migrate(database)
        memory = Mutex(LedgerMemory())
    }

    // MARK: - Opening

    /// The newest checkpoint on disk, loaded into memory; the audit table
    /// cut back to it (later records are made again by the replay) and
    /// checked to end where the checkpoint says. Nil when there is none
    /// (the ledger starts empty, at index 0).
    func loadCheckpoint() throws -> Checkpoint? {
        let files = try FileSystem.list(directory).compactMap { name in Checkpoint.index(ofFile: name).map { ($0, name) } }.sorted { $0.0 < $1.0 }
        for (_, name) in files.dropLast() { try FileSystem.remove("\(directory)/\(name)") }
        var checkpoint: Checkpoint?
        if let (_, name) = files.last {
            let path = "\(directory)/\(name)"
            checkpoint = try Checkpoint.decode(try FileSystem.read(path), path: path)
        }
        let index = checkpoint?.metadata.index ?? 0
        checkpointWriting.withLock { $0 = index }
        let head: (sequence: UInt64, hash: [UInt8]) = checkpoint?.head ?? (0, AuditRecord.genesisHash)
        let stored = try database.write { db -> (UInt64, [UInt8])? in
            try db.execute(sql: "DELETE FROM ledger_audit WHERE log_index > ? OR sequence > ?", arguments: [Int64(index), Int64(head.sequence)])
            guard let row = try Row.fetchOne(db, sql: "SELECT sequence, hash FROM ledger_audit ORDER BY sequence DESC LIMIT 1") else { return nil }
            return (UInt64(row[0] as Int64), [UInt8](row[1] as Data))
        }
        let path = "\(directory)/ledger.sqlite"
        if let stored {
            guard stored.0 == head.sequence, stored.1 == head.hash else {
                throw StorageError(code: .corruptState, reason: "\(path): the audit chain ends at record \(stored.0), but the checkpoint at index \(index) was taken at record \(head.sequence) with another hash. \(StorageError.rejoinAdvice)")
            }
        } else if head.sequence != 0 {
            throw StorageError(code: .corruptState, reason: "\(path): the audit chain is missing the \(head.sequence) records the checkpoint at index \(index) follows. \(StorageError.rejoinAdvice)")
        }
        memory.withLock { $0 = LedgerMemory(documents: checkpoint?.documents ?? [], head: head, applied: index) }
        unwrittenSince.withLock { $0 = nil }
        return checkpoint
    }

    // MARK: - Applying (the driver's thread)

    /// Applies committed entries in order; their audit records are
    /// written to the table in batches.
    func apply(_ entries: [Entry]) throws -> [LedgerOutcome] {
        guard !entries.isEmpty else { return [] }
        // The lock is taken per entry, not per batch: readers on the API's
        // threads wait for one entry at most, instead of spinning for a
        // whole batch (a tenth of a millisecond or more on the leader).
        var outcomes: [LedgerOutcome] = []
        outcomes.reserveCapacity(entries.count)
        var unwritten = 0
        for entry in entries {
            let outcome = try memory.withLock { memory in
                defer { unwritten = memory.unwrittenAudit.count }
                return try Ledger.apply(entry, to: &memory)
            }
            if let outcome { outcomes.append(outcome) }
        }
        if unwritten > 0 { unwrittenSince.withLock { $0 = $0 ?? .now } }
        try writeAuditIfDue(unwritten: unwritten)
        return outcomes
    }

    /// Queues the unwritten audit records for the table once there are
    /// enough of them or the oldest has waited long enough (unless a batch
    /// is still being written), and throws the error of one that failed.
    func writeAuditIfDue(unwritten: Int? = nil) throws {
        if let failure = auditWrites.withLock({ $0.failure }) { throw failure }
        let count = unwritten ?? memory.withLock { $0.unwrittenAudit.count }
        guard count > 0 else { return }
        let due = count >= batching.records
            || unwrittenSince.withLock { $0 }.map { $0.duration(to: .now) >= .milliseconds(batching.millis) } ?? false
        guard due, auditWrites.withLock({ state in
            defer { state.queued = true }
            return !state.queued
        }) else { return }
        // The records due now; those applied meanwhile wait for the next batch.
        let through = memory.withLock { $0.unwrittenAudit.last?.sequence ?? 0 }
        unwrittenSince.withLock { $0 = nil }
        auditWriter.async { [self] in
            let result = Result { try write(through: through) }
            auditWrites.withLock { state in
                state.queued = false
                if case .failure(let error) = result { state.failure = state.failure ?? error }
            }
        }
    }

    /// Writes the unwritten audit records (through sequence `through`) to
    /// the table now, after any batch already queued.
    func writeAudit(through: UInt64 = .max) throws {
        try auditWriter.sync {
            if let failure = auditWrites.withLock({ $0.failure }) { throw failure }
            try write(through: through)
        }
        if through == .max { unwrittenSince.withLock { $0 = nil } }
    }

    /// Waits for the batch being written, if any (tests).
    func waitForAuditWrites() {
        auditWriter.sync {}
    }

    /// Writes the unwritten records through sequence `through` to the
    /// table (one transaction). They stay readable from memory until the
    /// transaction has committed. They are copied out here, on the
    /// writer's thread, into an array of their own.
    private func write(through: UInt64) throws {
        // A new buffer, not `Array(prefix)`: that shares the whole array's
        // buffer when every record is due, and then the driver's next
        // append copied every record while this batch was being written.
        var records: [AuditRecord] = []
        memory.withLock { memory in
            let due = memory.unwrittenAudit.prefix { $0.sequence <= through }
            records.reserveCapacity(due.count)
            records.append(contentsOf: due)
        }
        guard let last = records.last else { return }
        try database.write { db in try Self.insert(records, db) }
        memory.withLock { memory in memory.unwrittenAudit.removeFirst(memory.unwrittenAudit.prefix { $0.sequence <= last.sequence }.count) }
    }

    private static func insert(_ records: [AuditRecord], _ db: Database) throws {
        let statement = try RawStatement(db, """
            INSERT INTO ledger_audit (sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
            """)
        for record in records {
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
        }
    }

    /// Makes every audit record written so far durable (an fsync of the
    /// table's log).
    func syncAudit() throws {
        try database.writeWithoutTransaction { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
            defer { try? db.execute(sql: "PRAGMA synchronous = NORMAL") }
            try db.inTransaction {
                try db.execute(sql: "CREATE TABLE IF NOT EXISTS ledger_sync (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL)")
                try db.execute(sql: "INSERT INTO ledger_sync (id, at) VALUES (1, 1) ON CONFLICT(id) DO UPDATE SET at = at + 1")
                return .commit
            }
        }
    }

    // MARK: - Checkpoints and snapshots

    /// Pins the applied state at `metadata.index` (which must be the
    /// applied index) for a checkpoint written later on another thread
    /// (which also writes the audit records it needs in the table: here,
    /// on the driver's thread, that took up to 6 ms).
    func beginCheckpoint(_ metadata: SnapshotMetadata) throws -> LedgerCheckpoint {
        let copy = memory.withLock { $0 }
        precondition(copy.applied == metadata.index, "a checkpoint at \(metadata.index) of a ledger applied to \(copy.applied)")
        return LedgerCheckpoint(store: self, memory: copy, metadata: metadata)
    }

    /// The ledger snapshot for a Raft snapshot: `memory`'s documents and
    /// the audit chain through its head (from the table).
    func snapshotBytes(of memory: LedgerMemory) throws -> [UInt8] {
        let head = memory.head.sequence
        return try database.read { db in
            let auditBytes = try Int.fetchOne(db, sql: """
                SELECT COALESCE(SUM(LENGTH(actor) + LENGTH(action) + LENGTH(target) + LENGTH(result) + 120), 0) FROM ledger_audit WHERE sequence <= ?
                """, arguments: [Int64(head)]) ?? 0
            var w = BinaryWriter(capacity: memory.contentBytes + memory.documents.count * 96 + auditBytes + 64)
            w.write(LedgerSnapshot.encodingVersion)
            w.write(memory.applied)
            LedgerSnapshot.encodeDocuments(memory, into: &w)
            w.write(UInt32(head))
            var count: UInt64 = 0
            let rows = try Row.fetchCursor(db, sql: """
                SELECT sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash
                FROM ledger_audit WHERE sequence <= ? ORDER BY sequence
                """, arguments: [Int64(head)])
            while let row = try rows.next() {
                w.write(UInt64(row[0] as Int64))
                w.write(UInt64(row[1] as Int64))
                w.write(UInt64(row[2] as Int64))
                for column in 3...8 { try row.withUnsafeData(atIndex: column) { w.writeBytes($0 ?? Data()) } }
                count += 1
            }
            guard count == head else {
                throw StorageError(code: .corruptState, reason: "\(directory)/ledger.sqlite: the audit table holds \(count) records, not the \(head) of the chain")
            }
            return w.bytes
        }
    }

    /// The ledger snapshot for a Raft snapshot at `metadata`, made from
    /// its checkpoint file and the audit table (when a follower needs one:
    /// the core keeps snapshots without their bytes). Fails if a newer
    /// checkpoint replaced that one meanwhile.
    func snapshotBytes(for metadata: SnapshotMetadata) throws -> [UInt8] {
        let path = "\(directory)/\(Checkpoint.fileName(metadata.index))"
        guard FileSystem.exists(path) else {
            throw StorageError(code: .invalidRequest, reason: "\(directory) holds no checkpoint at index \(metadata.index) any more (a newer one replaced it)")
        }
        let checkpoint = try Checkpoint.decode(try FileSystem.read(path), path: path)
        guard checkpoint.metadata == metadata else {
            throw StorageError(code: .corruptState, reason: "\(path): the checkpoint records \(checkpoint.metadata), not \(metadata)")
        }
        return try snapshotBytes(of: LedgerMemory(documents: checkpoint.documents, head: checkpoint.head, applied: metadata.index))
    }

    /// Replaces the whole ledger with a snapshot from the leader: checked
    /// entirely first (nothing changes if it is damaged), then the audit
    /// table replaced and synced, then the checkpoint file written, then
    /// memory.
    func install(_ snapshot: Snapshot) throws {
        let path = "\(directory)/ledger.sqlite"
        let (documents, audit) = try LedgerSnapshot.decode(snapshot.data, at: snapshot.metadata.index, path: path)
        let head: (sequence: UInt64, hash: [UInt8]) = audit.last.map { ($0.sequence, $0.hash) } ?? (0, AuditRecord.genesisHash)
        let installed = LedgerMemory(documents: documents, head: head, applied: snapshot.metadata.index)
        // After a checkpoint being written, if any; one begun before this
        // is refused afterwards.
        try checkpointWriting.withLock { newest in
            // On the writer's queue: no batch of the old chain lands after this.
            try auditWriter.sync {
                try database.write { db in
                    try db.execute(sql: "DELETE FROM ledger_audit")
                    try Self.insert(audit, db)
                }
                try syncAudit()
            }
            try writeCheckpoint(installed, metadata: snapshot.metadata, newest: &newest)
            memory.withLock { $0 = installed }
        }
        unwrittenSince.withLock { $0 = nil }
    }

    /// Writes the checkpoint file for `memory` (atomically) and removes
    /// older ones. The audit table must already be durable through it.
    /// Holding `checkpointWriting` (its value is `newest`).
    private func writeCheckpoint(_ memory: LedgerMemory, metadata: SnapshotMetadata, newest: inout LogIndex) throws {
        let name = Checkpoint.fileName(metadata.index)
        try Checkpoint.write(memory, metadata: metadata, to: "\(directory)/\(name)", directory: directory)
        newest = metadata.index
        for other in try FileSystem.list(directory) where other != name && (Checkpoint.index(ofFile: other).map { $0 < metadata.index } ?? other.hasSuffix(".ledger.tmp")) {
            try FileSystem.remove("\(directory)/\(other)")
        }
    }

    /// Writes the audit table through `memory`'s head, syncs it, and writes
    /// the checkpoint, unless a snapshot installed meanwhile made one at
    /// `metadata.index` or later (then it throws and nothing is written).
    fileprivate func checkpoint(_ memory: LedgerMemory, metadata: SnapshotMetadata) throws {
        try checkpointWriting.withLock { newest in
            guard newest < metadata.index else {
                throw StorageError(code: .invalidRequest, reason: "\(directory): a checkpoint at \(newest) replaced the one at \(metadata.index) being written")
            }
            try writeAudit(through: memory.head.sequence)
            try syncAudit()
            try writeCheckpoint(memory, metadata: metadata, newest: &newest)
        }
    }

    // MARK: - Reading (any thread)

    public var appliedIndex: LogIndex { memory.withLock { $0.applied } }

    public func document(named name: String) -> Document? {
        memory.withLock { $0.documents[name] }
    }

    /// Documents whose names start with `prefix` and come after `after`,
    /// by name, at most `limit` (content left out).
    public func documents(prefix: String, after: String = "", limit: Int) -> [Document] {
        let limit = min(max(limit, 0), 10_000)
        return memory.withLock { memory in
            var result: [Document] = []
            memory.names.forEach(from: max(prefix, after)) { name in
                guard name.hasPrefix(prefix) else { return false }
                if name > after, var document = memory.documents[name] {
                    document.content = []
                    result.append(document)
                }
                return result.count < limit
            }
            return result
        }
    }

    /// Every document under `prefix` with its content, in name order, as
    /// they were at one moment.
    public func forEachDocument(prefix: String, _ body: (Document) throws -> Void) rethrows {
        let documents = memory.withLock { memory in
            var documents: [Document] = []
            memory.names.forEach(from: prefix) { name in
                guard name.hasPrefix(prefix) else { return false }
                documents.append(memory.documents[name]!)
                return true
            }
            return documents
        }
        for document in documents { try body(document) }
    }

    /// Audit records after `sequence`, oldest first, at most `limit`.
    public func auditRecords(after sequence: UInt64 = 0, limit: Int = 1000) throws -> [AuditRecord] {
        let limit = min(max(limit, 0), 100_000)
        // Memory first, then the table: a record leaves memory only after
        // its transaction committed, so nothing falls between the two.
        let unwritten = memory.withLock { $0.unwrittenAudit.filter { $0.sequence > sequence }.prefix(limit) }
        let stored = try database.read { db in
            try Row.fetchAll(db, sql: """
                SELECT sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash
                FROM ledger_audit WHERE sequence > ? ORDER BY sequence LIMIT ?
                """, arguments: [Int64(sequence), limit]).map { row in
                var record = AuditRecord(sequence: UInt64(row["sequence"] as Int64), logIndex: UInt64(row["log_index"] as Int64),
                                         timeMillis: UInt64(row["time_millis"] as Int64), actor: row["actor"], action: row["action"],
                                         target: row["target"], result: row["result"], previousHash: [UInt8](row["previous_hash"] as Data))
                record.hash = [UInt8](row["hash"] as Data) // as stored, so verification sees tampering
                return record
            }
        }
        var records = stored
        let storedThrough = stored.last?.sequence ?? sequence
        records.append(contentsOf: unwritten.filter { $0.sequence > storedThrough })
        return Array(records.prefix(limit))
    }

    /// Recomputes the whole audit chain.
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

    /// Audit records applied and not yet in the table (tests).
    var auditRecordsInMemory: [AuditRecord] { memory.withLock { $0.unwrittenAudit } }
}

/// When the ledger writes the audit records it applied to its table: once
/// this many wait, or the oldest has waited this long.
public struct AuditBatching: Sendable {
    public var records: Int
    public var millis: Int
    public init(records: Int = 2_048, millis: Int = 200) {
        self.records = records
        self.millis = millis
    }
}

/// The ledger as it was at one applied index, being made into a
/// checkpoint away from the driver's thread.
public final class LedgerCheckpoint: Sendable {
    private let store: LedgerStore
    private let memory: LedgerMemory
    public let metadata: SnapshotMetadata

    init(store: LedgerStore, memory: LedgerMemory, metadata: SnapshotMetadata) {
        self.store = store
        self.memory = memory
        self.metadata = metadata
    }

    /// Writes the audit table through the checkpoint's head and syncs it,
    /// then writes the checkpoint file; returns how many documents and
    /// audit records the ledger holds.
    public func write() throws -> Int {
        try store.checkpoint(memory, metadata: metadata)
        return memory.documents.count + Int(memory.head.sequence)
    }
}
