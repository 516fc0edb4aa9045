import Foundation
import GRDB
import Ledger
import Raft

/// How hard SQLite syncs. `.full` (the default) fsyncs every commit, so an
/// acknowledged write survives power loss; `.normal` in WAL mode may lose
/// the last transactions on power loss (never on a process crash).
public enum SynchronousMode: String, Sendable {
    case full = "FULL"
    case normal = "NORMAL"
}

/// A storage failure with a code and a reason an operator can act on.
public struct StorageError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// An entry's checksum or encoding does not match what was written.
        case corruptEntry
        /// The log has a hole, or does not start right after the snapshot.
        case logGap
        /// The hard state or snapshot record is unreadable or inconsistent.
        case corruptState
        /// The data is from an incompatible schema version.
        case schemaMismatch
        /// A call the store refuses (it changes nothing).
        case invalidRequest
    }

    public var code: Code
    public var reason: String

    public var description: String { reason }

    static let rejoinAdvice = "This node must not run with a damaged log: remove it from the cluster, delete its data directory, and add it back as a new member (it will receive a snapshot)."
}

/// The Raft log, hard state and latest snapshot of one node, in SQLite
/// (WAL mode, synchronous FULL by default). One `persist(_:)` is one
/// transaction and one fsync, whatever the Ready holds: group commit.
/// Every entry carries a CRC-32C of its index, term and payload, verified
/// whenever the log is loaded.
public final class RaftStore: Sendable {
    public let path: String
    /// A pool: one writer, and readers (API reads, status) that see the
    /// last committed state without waiting for the writer's fsync.
    private let database: DatabasePool
    /// Whether snapshot data is a ledger snapshot to install into the
    /// ledger tables (a node), or opaque bytes (the simulator's tests).
    /// A ledger snapshot's bytes are not stored: the ledger tables are the
    /// snapshot, and its bytes are made again from them after a restart
    /// (storing them cost a copy of the whole ledger on the driver thread
    /// at every compaction).
    public let snapshotsHoldLedger: Bool

    public init(path: String, synchronous: SynchronousMode = .full, snapshotsHoldLedger: Bool = true) throws {
        self.path = path
        self.snapshotsHoldLedger = snapshotsHoldLedger
        var configuration = GRDB.Configuration()
        configuration.label = "raft-store"
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = \(synchronous.rawValue)")
            // A 16 MiB page cache per connection (the default is 2 MiB):
            // join tokens and issued records are looked up all over the
            // ledger. (Rarer WAL checkpoints were tried: the checkpoint
            // runs in the committing writer, and 8,000 pages of it stalled
            // commits for ~90 ms.)
            try db.execute(sql: "PRAGMA cache_size = -16384")
        }
        configuration.maximumReaderCount = 4
        database = try DatabasePool(path: path, configuration: configuration) // WAL mode
        try Self.migrator.migrate(database)
    }

    private static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("raft-v1") { db in
            try db.execute(sql: """
                CREATE TABLE raft_entry (
                    log_index INTEGER PRIMARY KEY,
                    term INTEGER NOT NULL,
                    payload BLOB NOT NULL,
                    checksum INTEGER NOT NULL
                );
                CREATE TABLE raft_hard_state (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    term INTEGER NOT NULL,
                    voted_for INTEGER NOT NULL,
                    commit_index INTEGER NOT NULL
                );
                CREATE TABLE raft_snapshot (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    log_index INTEGER NOT NULL,
                    term INTEGER NOT NULL,
                    membership BLOB NOT NULL,
                    data BLOB NOT NULL,
                    checksum INTEGER NOT NULL
                );
                """)
        }
        migrator.registerMigration("ledger-v1") { db in
            try db.execute(sql: """
                CREATE TABLE ledger_document (
                    name TEXT PRIMARY KEY,
                    format INTEGER NOT NULL,
                    content BLOB NOT NULL,
                    version INTEGER NOT NULL,
                    log_index INTEGER NOT NULL
                );
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
                CREATE TABLE ledger_meta (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    applied_index INTEGER NOT NULL
                );
                INSERT INTO ledger_meta (id, applied_index) VALUES (1, 0);
                """)
        }
        return migrator
    }

    // MARK: - Writing

    /// Makes durable everything `ready` asks to persist, in one transaction:
    /// the snapshot (replacing the log), then the entries (replacing any
    /// stored suffix from the first new index on), then the hard state.
    public func persist(_ ready: Ready) throws {
        try persist(snapshot: ready.snapshot, entries: ready.entries, hardState: ready.hardState)
    }

    /// `persist(_:)` and then `apply(_:)` of the Ready's committed entries,
    /// in one transaction and so one fsync. The entries to apply are
    /// committed, so applying them before the transaction's end is safe;
    /// a crash loses both or neither.
    public func persistAndApply(_ ready: Ready) throws -> [LedgerOutcome] {
        guard ready.snapshot != nil || !ready.entries.isEmpty || ready.hardState != nil || !ready.committedEntries.isEmpty else { return [] }
        return try database.write { db in
            try persist(snapshot: ready.snapshot, entries: ready.entries, hardState: ready.hardState, db)
            return try Self.apply(ready.committedEntries, db)
        }
    }

    private func persist(snapshot: Snapshot?, entries: [Entry], hardState: HardState?) throws {
        guard snapshot != nil || !entries.isEmpty || hardState != nil else { return }
        try database.write { db in try persist(snapshot: snapshot, entries: entries, hardState: hardState, db) }
    }

    private func persist(snapshot: Snapshot?, entries: [Entry], hardState: HardState?, _ db: Database) throws {
        if let snapshot {
            try db.execute(sql: "DELETE FROM raft_entry")
            try writeSnapshot(snapshot, db)
            // The state machine is replaced in the same transaction, so
            // a crash never leaves a snapshot without its ledger.
            if snapshotsHoldLedger && snapshot.metadata.index > 0 {
                try LedgerSnapshot.install(snapshot.data, at: snapshot.metadata.index, db, path: path)
            }
        }
        if let first = entries.first {
            try db.execute(sql: "DELETE FROM raft_entry WHERE log_index >= ?", arguments: [Int64(first.index)])
            let statement = try RawStatement(db, "INSERT INTO raft_entry (log_index, term, payload, checksum) VALUES (?, ?, ?, ?)")
            for entry in entries {
                let payload = entry.payload.encoded
                try statement.bind(1, Int64(entry.index))
                try statement.bind(2, Int64(entry.term))
                try statement.bind(3, payload)
                try statement.bind(4, Int64(Self.checksum(index: entry.index, term: entry.term, payload: payload)))
                try statement.run()
            }
        }
        if let hardState {
            try db.execute(sql: """
                INSERT INTO raft_hard_state (id, term, voted_for, commit_index) VALUES (1, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET term = excluded.term, voted_for = excluded.voted_for, commit_index = excluded.commit_index
                """, arguments: [Int64(hardState.term), Int64(bitPattern: hardState.votedFor), Int64(hardState.commitIndex)])
        }
    }

    /// Whether this store was initialized (holds a hard state).
    public var hasState: Bool {
        get throws { try database.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM raft_hard_state") ?? 0 } > 0 }
    }

    /// Writes a brand-new node's starting state (bootstrap or empty).
    public func initialize(with state: DurableState) throws {
        let existing = try database.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM raft_hard_state") ?? 0 }
        guard existing == 0 else {
            throw StorageError(code: .invalidRequest, reason: "\(path) already holds Raft state; refusing to overwrite it")
        }
        try persist(snapshot: state.snapshot, entries: state.entries, hardState: state.hardState)
    }

    /// Records a snapshot the node took at `metadata.index` and drops the
    /// entries it covers, in one transaction.
    public func compact(through metadata: SnapshotMetadata, data: [UInt8]) throws {
        try database.write { db in
            try writeSnapshot(Snapshot(metadata: metadata, data: data), db)
            try db.execute(sql: "DELETE FROM raft_entry WHERE log_index <= ?", arguments: [Int64(metadata.index)])
        }
    }

    private func writeSnapshot(_ snapshot: Snapshot, _ db: Database) throws {
        let membership = snapshot.metadata.membership.encoded
        let data = snapshotsHoldLedger ? [] : snapshot.data
        try db.execute(sql: """
            INSERT INTO raft_snapshot (id, log_index, term, membership, data, checksum) VALUES (1, ?, ?, ?, ?, ?)
            ON CONFLICT(id) DO UPDATE SET log_index = excluded.log_index, term = excluded.term,
                membership = excluded.membership, data = excluded.data, checksum = excluded.checksum
            """, arguments: [Int64(snapshot.metadata.index), Int64(snapshot.metadata.term), Data(membership), Data(data),
                             Int64(Self.snapshotChecksum(snapshot.metadata, membership: membership, data: data))])
    }

    // MARK: - Reading

    /// Everything a node needs to restart, verified: every checksum, the
    /// log contiguous after the snapshot, terms never decreasing, and the
    /// commit index within the log. Any damage is a `StorageError` naming
    /// the file, the index and what to do; nothing is repaired silently.
    public func loadDurableState() throws -> DurableState {
        try database.read { db in
            var hardState = HardState()
            if let row = try Row.fetchOne(db, sql: "SELECT term, voted_for, commit_index FROM raft_hard_state WHERE id = 1") {
                hardState = HardState(term: UInt64(row["term"] as Int64), votedFor: UInt64(bitPattern: row["voted_for"] as Int64),
                                      commitIndex: UInt64(row["commit_index"] as Int64))
            }
            let snapshot = try loadSnapshot(db)
            var entries: [Entry] = []
            var expected = (snapshot?.metadata.index ?? 0) + 1
            var previousTerm = snapshot?.metadata.term ?? 0
            let rows = try Row.fetchCursor(db, sql: "SELECT log_index, term, payload, checksum FROM raft_entry ORDER BY log_index")
            while let row = try rows.next() {
                let index = UInt64(row["log_index"] as Int64)
                let term = UInt64(row["term"] as Int64)
                let payloadBytes = [UInt8](row["payload"] as Data)
                let stored = UInt32(truncatingIfNeeded: row["checksum"] as Int64)
                guard index == expected else {
                    throw StorageError(code: .logGap, reason: "\(path): the Raft log jumps from index \(expected - 1) to \(index) (truncated or damaged). \(StorageError.rejoinAdvice)")
                }
                guard Self.checksum(index: index, term: term, payload: payloadBytes) == stored else {
                    throw StorageError(code: .corruptEntry, reason: "\(path): Raft log entry \(index) fails its checksum (the file is damaged). \(StorageError.rejoinAdvice)")
                }
                guard term >= previousTerm else {
                    throw StorageError(code: .corruptEntry, reason: "\(path): Raft log entry \(index) has term \(term), below the term \(previousTerm) before it. \(StorageError.rejoinAdvice)")
                }
                let payload: EntryPayload
                do {
                    payload = try EntryPayload(decoding: payloadBytes)
                } catch {
                    throw StorageError(code: .corruptEntry, reason: "\(path): Raft log entry \(index) cannot be decoded (\(error)). \(StorageError.rejoinAdvice)")
                }
                entries.append(Entry(term: term, index: index, payload: payload))
                expected += 1
                previousTerm = term
            }
            let lastIndex = expected - 1
            guard hardState.commitIndex <= lastIndex else {
                throw StorageError(code: .logGap, reason: "\(path): the commit index \(hardState.commitIndex) is past the last stored entry \(lastIndex) (entries were lost). \(StorageError.rejoinAdvice)")
            }
            // The ledger applied committed entries durably up to here: a
            // restart resumes after it instead of replaying from zero.
            let applied = UInt64(try Int64.fetchOne(db, sql: "SELECT applied_index FROM ledger_meta WHERE id = 1") ?? 0)
            return DurableState(hardState: hardState, snapshot: snapshot, entries: entries,
                                appliedIndex: max(applied, snapshot?.metadata.index ?? 0))
        }
    }

    private func loadSnapshot(_ db: Database) throws -> Snapshot? {
        guard let row = try Row.fetchOne(db, sql: "SELECT log_index, term, membership, data, checksum FROM raft_snapshot WHERE id = 1") else {
            return nil
        }
        let index = UInt64(row["log_index"] as Int64)
        let term = UInt64(row["term"] as Int64)
        let membershipBytes = [UInt8](row["membership"] as Data)
        let data = [UInt8](row["data"] as Data)
        let stored = UInt32(truncatingIfNeeded: row["checksum"] as Int64)
        let membership: Membership
        do {
            membership = try Membership(decoding: membershipBytes)
        } catch {
            throw StorageError(code: .corruptState, reason: "\(path): the snapshot record at index \(index) cannot be decoded (\(error)). \(StorageError.rejoinAdvice)")
        }
        let metadata = SnapshotMetadata(index: index, term: term, membership: membership)
        guard Self.snapshotChecksum(metadata, membership: membershipBytes, data: data) == stored else {
            throw StorageError(code: .corruptState, reason: "\(path): the snapshot record at index \(index) fails its checksum. \(StorageError.rejoinAdvice)")
        }
        // The ledger's bytes are made from its tables when they hold
        // exactly the snapshot's state; when more was applied since, they
        // stay empty and the driver compacts at the applied index at once.
        if snapshotsHoldLedger, index > 0, try SQLiteLedgerTables(db: db).appliedIndex() == index {
            return Snapshot(metadata: metadata, data: try LedgerSnapshot.take(db).data)
        }
        return Snapshot(metadata: metadata, data: data)
    }

    func write<T>(_ body: (Database) throws -> T) throws -> T { try database.write(body) }
    func read<T>(_ body: (Database) throws -> T) throws -> T { try database.read(body) }
    func makeSnapshot() throws -> DatabaseSnapshot { try database.makeSnapshot() }

    /// Entries stored now (for tests and status).
    public func storedEntryCount() throws -> Int {
        try database.read { db in try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM raft_entry") ?? 0 }
    }

    // MARK: - Checksums

    static func checksum(index: LogIndex, term: Term, payload: [UInt8]) -> UInt32 {
        var crc = CRC32C()
        crc.update(index)
        crc.update(term)
        crc.update(payload)
        return crc.value
    }

    static func snapshotChecksum(_ metadata: SnapshotMetadata, membership: [UInt8], data: [UInt8]) -> UInt32 {
        var crc = CRC32C()
        crc.update(metadata.index)
        crc.update(metadata.term)
        crc.update(membership)
        crc.update(data)
        return crc.value
    }
}
