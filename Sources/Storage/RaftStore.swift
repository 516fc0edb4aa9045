import Foundation
import Ledger
import Raft
import Synchronization

/// How hard the log syncs. `.full` (the default) fdatasyncs every write a
/// Ready needs durable, so an acknowledged write survives power loss;
/// `.none` never syncs (tests and simulations that kill no machines).
public enum SynchronousMode: String, Sendable {
    case full = "FULL"
    case none = "NONE"
}

/// A storage failure with a code and a reason an operator can act on.
public struct StorageError: Error, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// An entry's checksum or encoding does not match what was written.
        case corruptEntry
        /// The log has a hole, or does not start right after the snapshot.
        case logGap
        /// The hard state, snapshot or checkpoint is unreadable or inconsistent.
        case corruptState
        /// The data is from an incompatible format.
        case schemaMismatch
        /// A call the store refuses (it changes nothing).
        case invalidRequest
        /// The operating system refused a file operation (a full disk, say).
        case ioFailure
    }

    public var code: Code
    public var reason: String

    public var description: String { reason }

    static let rejoinAdvice = "This node must not run with a damaged log: remove it from the cluster, delete its data directory, and add it back as a new member (it will receive a snapshot)."
}

/// One node's durable state in a directory:
/// - `wal/`: the Raft log and hard state (`WriteAheadLog`): one write and
///   one fdatasync per Ready that needs durability (new entries, a new
///   term or vote, a snapshot); a Ready that only advances the commit
///   index writes nothing until the next one that syncs;
/// - the ledger (`LedgerStore`): applied state in memory, checkpoint files,
///   the audit chain in `audit/` (`AuditLog`);
/// - `snapshot.raft` instead of a ledger when snapshots are opaque bytes
///   (the simulator's tests).
///
/// Loading verifies every checksum, that the log is contiguous after the
/// snapshot and that terms never decrease; any damage is a `StorageError`
/// naming the file and what to do, and nothing is repaired silently but a
/// torn tail (a write a crash cut short, never acknowledged).
public final class RaftStore: @unchecked Sendable {
    public let directory: String
    /// Whether snapshot data is a ledger snapshot to install into the
    /// ledger (a node), or opaque bytes to keep (the simulator's tests).
    public let snapshotsHoldLedger: Bool
    public let synchronous: SynchronousMode
    /// The ledger (nil when snapshots are opaque).
    public let ledger: LedgerStore?
    private let lock = NSLock()
    private var log: WriteAheadLog?
    /// Writes made durable (one write and one fdatasync each) so far.
    public private(set) var syncedWrites = 0
    private var durableHardState = HardState()

    /// Opens (creating if needed) the store in `directory`.
    public init(directory: String, synchronous: SynchronousMode = .full, snapshotsHoldLedger: Bool = true,
                segmentBytesMax: Int = 64 << 20, auditBatching: AuditBatching = AuditBatching()) throws {
        self.directory = directory
        self.synchronous = synchronous
        self.snapshotsHoldLedger = snapshotsHoldLedger
        self.segmentBytesMax = segmentBytesMax
        try FileSystem.makeDirectory(directory)
        // Before anything is read or changed: opening trims torn tails and
        // old files, which would cut the files of a node already running here.
        let lockDescriptor = try Self.lockDirectory(directory)
        self.lockDescriptor = lockDescriptor
        do {
            if FileSystem.exists("\(directory)/raft.sqlite") {
                throw StorageError(code: .schemaMismatch, reason: "\(directory) was written by an older Warrant that kept its log in SQLite (raft.sqlite); this one keeps it in \(directory)/wal. Remove the node from the cluster, delete its data directory and add it back (for the local cluster: bash cluster/down --wipe, then bash cluster/up).")
            }
            ledger = snapshotsHoldLedger ? try LedgerStore(directory: directory, batching: auditBatching) : nil
        } catch {
            // deinit does not run for an initializer that failed: the lock
            // (and its descriptor) would be held for the process's life.
            close(lockDescriptor)
            throw error
        }
    }

    private let segmentBytesMax: Int
    private var walDirectory: String { "\(directory)/wal" }

    /// Held (a POSIX record lock on `LOCK`) while the store is open, so a
    /// second process cannot open the same directory; released by the
    /// kernel if the process dies.
    private let lockDescriptor: Int32

    deinit { close(lockDescriptor) }

    private static func lockDirectory(_ directory: String) throws -> Int32 {
        let path = "\(directory)/LOCK"
        let descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard descriptor >= 0 else { throw FileSystem.error("open", path) }
        var request = flock()
        request.l_type = Int16(F_WRLCK)
        request.l_whence = Int16(SEEK_SET)
        guard fcntl(descriptor, F_SETLK, &request) == 0 else {
            let code = errno
            var holder = flock()
            holder.l_type = Int16(F_WRLCK)
            holder.l_whence = Int16(SEEK_SET)
            let pid = fcntl(descriptor, F_GETLK, &holder) == 0 && holder.l_type != Int16(F_UNLCK) ? " (process \(holder.l_pid))" : ""
            close(descriptor)
            guard code == EAGAIN || code == EACCES else {
                errno = code
                throw FileSystem.error("lock", path)
            }
            throw StorageError(code: .invalidRequest, reason: "\(directory) is in use by another process\(pid); two nodes must never share a data directory. Nothing was read or changed")
        }
        return descriptor
    }
    private var snapshotPath: String { "\(directory)/snapshot.raft" }

    /// Called by `initialize` once the new log's first file exists and
    /// before anything is written to it (tests: a failure there).
    var afterStagedLogStarted: (() throws -> Void)?

    /// Whether this store was initialized (holds a log).
    public var hasState: Bool { WriteAheadLog.exists(in: walDirectory) }

    /// Writes a brand-new node's starting state (bootstrap or empty).
    public func initialize(with state: DurableState) throws {
        try lock.withLock {
            guard !hasState else {
                throw StorageError(code: .invalidRequest, reason: "\(directory) already holds Raft state; refusing to overwrite it")
            }
            // A snapshot is checked and installed before the log exists, so
            // a damaged one leaves the store as it was: uninitialized.
            if let snapshot = state.snapshot { try installSnapshot(snapshot) }
            // The log is written in a directory of its own inside `wal` and
            // its file renamed into `wal` whole: a crash or failure part-way
            // leaves the store uninitialized (and initialized again at the
            // next start), never a log without its first state (a founder
            // with no voters). `wal` itself is never replaced: it may be a
            // mount point or a symbolic link to another disk.
            try FileSystem.makeDirectory(walDirectory)
            let staging = "\(walDirectory)/.new"
            try FileSystem.removeFlatDirectory(staging)
            try FileSystem.removeFlatDirectory("\(walDirectory).new") // an older build's staging, beside `wal`
            let (staged, _) = try WriteAheadLog.open(directory: staging, segmentBytesMax: segmentBytesMax, fdatasyncs: synchronous == .full, create: true)
            try afterStagedLogStarted?()
            var records: [WriteAheadLog.Record] = state.snapshot.map { [.reset(index: $0.metadata.index, term: $0.metadata.term)] } ?? []
            records.append(.hardState(state.hardState))
            try staged.append(records + state.entries.map { .entry($0) }, sync: true)
            try staged.closeFile()
            let files = try WriteAheadLog.segmentFiles(in: staging)
            // A starting state is a membership and a few entries; a log file holds 64 MiB.
            guard files.count == 1, let file = files.first else {
                throw StorageError(code: .invalidRequest, reason: "\(directory): the starting state does not fit in one write-ahead log file (\(files.count) files); nothing was initialized")
            }
            // Nothing of a log is in `wal` (`hasState` was false) but
            // perhaps a file with no whole header an older build's crash
            // left: it goes, so that the file moved in is the only one.
            for stray in try WriteAheadLog.segmentFiles(in: walDirectory) { try FileSystem.remove(stray.path) }
            let name = String(file.path.split(separator: "/").last!)
            guard rename(file.path, "\(walDirectory)/\(name)") == 0 else { throw FileSystem.error("rename", file.path) }
            try FileSystem.syncDirectory(walDirectory)
            try FileSystem.removeFlatDirectory(staging)
            let (log, _) = try WriteAheadLog.open(directory: walDirectory, segmentBytesMax: segmentBytesMax, fdatasyncs: synchronous == .full, create: false)
            self.log = log
            durableHardState = state.hardState
        }
    }

    // MARK: - Reading back

    /// Everything a node needs to restart, verified. In a node, this also
    /// loads the ledger from its checkpoint (call it once, before applying
    /// anything): committed entries after the checkpoint are handed out
    /// again and applied anew; the snapshot comes back without its bytes
    /// (`snapshotData(for:)` makes them when a follower needs them).
    public func loadDurableState() throws -> DurableState {
        try lock.withLock {
            // Initializing's staging directory, left empty by a crash after its file moved out.
            try FileSystem.removeFlatDirectory("\(walDirectory)/.new")
            let (log, contents) = try WriteAheadLog.open(directory: walDirectory, segmentBytesMax: segmentBytesMax, fdatasyncs: synchronous == .full, create: false)
            self.log = log
            var snapshot: Snapshot?
            if let ledger {
                if let checkpoint = try ledger.loadCheckpoint(), checkpoint.metadata.index > 0 {
                    snapshot = Snapshot(metadata: checkpoint.metadata, data: [])
                }
            } else if FileSystem.exists(snapshotPath) {
                snapshot = try Self.decodeSnapshotFile(try FileSystem.read(snapshotPath), path: snapshotPath)
            }
            if let reset = contents.lastReset, reset.index > (snapshot?.metadata.index ?? 0) {
                throw StorageError(code: .corruptState, reason: "\(walDirectory): the log was reset for a snapshot at index \(reset.index), but the newest snapshot kept is at \(snapshot?.metadata.index ?? 0). \(StorageError.rejoinAdvice)")
            }
            var entries = contents.entries
            let snapshotIndex = snapshot?.metadata.index ?? 0
            if let snapshot, let first = entries.first {
                let position = snapshot.metadata.index >= first.index ? Int(snapshot.metadata.index - first.index) : -1
                if position >= entries.count || (position >= 0 && entries[position].term != snapshot.metadata.term) {
                    // The snapshot replaced this log (a crash came before the
                    // log recorded it): nothing of the old log stays.
                    entries.removeAll()
                } else if position >= 0 {
                    entries.removeFirst(position + 1)
                }
            }
            var previousTerm = snapshot?.metadata.term ?? 0
            if let first = entries.first, first.index != snapshotIndex + 1 {
                throw StorageError(code: .logGap, reason: "\(walDirectory): the Raft log starts at index \(first.index), not right after the snapshot at \(snapshotIndex) (entries were lost). \(StorageError.rejoinAdvice)")
            }
            for entry in entries {
                guard entry.term >= previousTerm else {
                    throw StorageError(code: .corruptEntry, reason: "\(walDirectory): Raft log entry \(entry.index) has term \(entry.term), below the term \(previousTerm) before it. \(StorageError.rejoinAdvice)")
                }
                previousTerm = entry.term
            }
            var hardState = contents.hardState ?? HardState()
            guard previousTerm <= hardState.term else {
                throw StorageError(code: .corruptState, reason: "\(walDirectory): the log holds entries of term \(previousTerm), past the stored term \(hardState.term). \(StorageError.rejoinAdvice)")
            }
            let lastIndex = entries.last?.index ?? snapshotIndex
            // Commit-only changes are not synced: the stored commit index
            // may be behind, never ahead of what a torn tail left.
            hardState.commitIndex = max(min(hardState.commitIndex, lastIndex), snapshotIndex)
            durableHardState = hardState
            return DurableState(hardState: hardState, snapshot: snapshot, entries: entries, appliedIndex: snapshotIndex)
        }
    }

    // MARK: - Writing

    /// Makes durable everything `ready` asks to persist: the snapshot
    /// (replacing the log and, in a node, the ledger), then the hard state
    /// and the entries (replacing any stored suffix from the first new
    /// index on), in one write and one fdatasync.
    public func persist(_ ready: Ready) throws {
        try lock.withLock { try persistLocked(ready) }
    }

    /// `persist(_:)`, then `apply(_:)` of the Ready's committed entries.
    public func persistAndApply(_ ready: Ready) throws -> [LedgerOutcome] {
        try persist(ready)
        return try apply(ready.committedEntries)
    }

    /// Applies committed entries to the ledger (in memory) and returns
    /// their outcomes; none without a ledger. They must be persisted
    /// already (an earlier or the same Ready's `persist(_:)`).
    public func apply(_ committed: [Entry]) throws -> [LedgerOutcome] {
        guard !committed.isEmpty else { return [] }
        return try lock.withLock {
            guard let ledger else { return [] }
            return try ledger.apply(committed)
        }
    }

    /// Makes every later write fail, as a failing disk would (tests of
    /// the driver's fail-stop).
    package func breakForTesting() { lock.withLock { broken = true } }
    private var broken = false

    private func persistLocked(_ ready: Ready) throws {
        guard let log else { throw StorageError(code: .invalidRequest, reason: "\(directory): the store was not loaded or initialized") }
        if broken { throw StorageError(code: .ioFailure, reason: "write \(walDirectory): input/output error (broken for a test)") }
        if let snapshot = ready.snapshot { try persistSnapshot(snapshot, log) }
        guard ready.hardState != nil || !ready.entries.isEmpty || ready.snapshot != nil else { return }
        var records: [WriteAheadLog.Record] = []
        records.reserveCapacity(ready.entries.count + 1)
        // The hard state goes first: whatever part of this write survives
        // a crash, a newer term never lands after entries of that term.
        var sync = ready.snapshot != nil || !ready.entries.isEmpty
        if let hardState = ready.hardState {
            records.append(.hardState(hardState))
            if hardState.term != durableHardState.term || hardState.votedFor != durableHardState.votedFor { sync = true }
            durableHardState = hardState
        }
        for entry in ready.entries { records.append(.entry(entry)) }
        try log.append(records, sync: sync)
        if sync { syncedWrites += 1 }
    }

    /// A snapshot from the leader replaces the ledger (checkpoint first)
    /// or the kept snapshot file, then the log records the reset.
    private func persistSnapshot(_ snapshot: Snapshot, _ log: WriteAheadLog) throws {
        try installSnapshot(snapshot)
        try log.append([.reset(index: snapshot.metadata.index, term: snapshot.metadata.term)], sync: true)
        log.removeSegments(through: snapshot.metadata.index)
    }

    private func installSnapshot(_ snapshot: Snapshot) throws {
        if let ledger {
            try ledger.install(snapshot)
        } else {
            try writeSnapshotFile(snapshot)
        }
    }

    /// Records a snapshot the node took at `metadata.index` and drops the
    /// log files it covers. In a node the checkpoint was written already
    /// (`LedgerCheckpoint.write()`); with opaque snapshots the bytes are
    /// kept in the snapshot file.
    public func compact(through metadata: SnapshotMetadata, data: [UInt8]) throws {
        try lock.withLock {
            guard let log else { throw StorageError(code: .invalidRequest, reason: "\(directory): the store was not loaded or initialized") }
            if ledger == nil {
                try writeSnapshotFile(Snapshot(metadata: metadata, data: data))
            }
            log.removeSegments(through: metadata.index)
        }
    }

    /// Waits until the log files compaction let go of are unlinked (they
    /// go on a queue of their own).
    package func waitForLogFileRemovals() {
        WriteAheadLog.waitForRemovals()
    }

    /// Pins the ledger at the applied index for a checkpoint (the driver's
    /// thread); `write()` it on another.
    public func beginCheckpoint(_ metadata: SnapshotMetadata) throws -> LedgerCheckpoint {
        guard let ledger else { throw StorageError(code: .invalidRequest, reason: "\(directory): opaque snapshots have no ledger checkpoint") }
        return try lock.withLock { try ledger.beginCheckpoint(metadata) }
    }

    /// The bytes of a snapshot the core keeps without them (in a node, its
    /// snapshots are the checkpoints: made from the checkpoint file and
    /// the audit table when a follower needs one).
    public func snapshotData(for metadata: SnapshotMetadata) throws -> [UInt8] {
        try requireLedger().outgoingSnapshot(for: metadata).bytes()
    }

    /// The stream of the snapshot at `metadata`, to send in pieces (see
    /// `SnapshotStream`); any thread.
    public func outgoingSnapshot(for metadata: SnapshotMetadata) throws -> OutgoingSnapshot {
        try requireLedger().outgoingSnapshot(for: metadata)
    }

    /// The snapshot at `metadata` encoded as builds before streams sent
    /// it, one message of at most `limit` bytes (for a follower that
    /// does not take streams).
    public func legacySnapshotData(for metadata: SnapshotMetadata, limit: Int = CodecLimits.snapshotBytesMax - 4096) throws -> [UInt8] {
        try requireLedger().legacySnapshotBytes(for: metadata, limit: limit)
    }

    /// Stages a piece of the snapshot stream the leader is sending. Once
    /// the receipt says complete, the core is handed the snapshot without
    /// its bytes, and its Ready installs the staged stream.
    public func receiveSnapshotChunk(_ chunk: SnapshotChunk, from leader: NodeID) throws -> SnapshotReceipt {
        try requireLedger().receive(chunk, from: leader)
    }

    /// Log entries `from...through` read back from the write-ahead log.
    public func logEntries(from: LogIndex, through: LogIndex) throws -> [Entry] {
        try lock.withLock {
            guard let log else { throw StorageError(code: .invalidRequest, reason: "\(directory): the log is not open") }
            return try log.entries(from: from, through: through)
        }
    }

    /// `entries` (contiguous) with the payloads the core released from
    /// memory read back from the write-ahead log, for a peer that lags
    /// (see `RaftNode.releasePayloads`). What is read must match each
    /// entry's index, term and size. Returns how many were filled.
    public func fillReleased(_ entries: inout [Entry]) throws -> Int {
        // Read only through the last released entry: the entries after it
        // are in memory, and may not be written yet (a leader sends its new
        // entries before its own write).
        guard let first = entries.first?.index, let last = entries.last(where: { $0.payload.isReleased })?.index else { return 0 }
        let stored = try logEntries(from: first, through: last)
        do {
            return try Entry.fillReleased(&entries, from: stored)
        } catch {
            throw StorageError(code: .corruptEntry, reason: "\(directory): \(error). \(StorageError.rejoinAdvice)")
        }
    }

    /// Writes the ledger's audit records waiting in memory if they are due
    /// (the driver calls this on every tick).
    /// Waits until no audit batch is being written (a node that stops
    /// leaves nothing writing to its files).
    public func finishAuditWrites() {
        ledger?.waitForAuditWrites()
    }

    public func writeAuditIfDue() throws {
        guard let ledger else { return }
        try lock.withLock { try ledger.writeAuditIfDue() }
    }

    /// How many files the log spans (tests, status).
    public var logFileCount: Int { lock.withLock { log?.segmentCount ?? 0 } }

    // MARK: - Opaque snapshot file

    private static let snapshotMagic: [UInt8] = Array("WRNTSNP1".utf8)

    private func writeSnapshotFile(_ snapshot: Snapshot) throws {
        try FileSystem.writeSealed(to: snapshotPath, directory: directory, magic: Self.snapshotMagic) { file in
            file.buffer.write(snapshot.metadata)
            file.buffer.writeBytes(snapshot.data)
        }
    }

    static func decodeSnapshotFile(_ bytes: [UInt8], path: String) throws -> Snapshot {
        try FileSystem.unseal(bytes, magic: snapshotMagic, damaged: { reason in
            StorageError(code: .corruptState, reason: "\(path): the snapshot record is unusable (\(reason)). \(StorageError.rejoinAdvice)")
        }) { r in
            Snapshot(metadata: try r.readSnapshotMetadata(), data: try r.readBytes("data", limit: Int(UInt32.max)))
        }
    }

    // MARK: - The ledger, for readers

    private func requireLedger() throws -> LedgerStore {
        guard let ledger else { throw StorageError(code: .invalidRequest, reason: "\(directory): this store keeps no ledger") }
        return ledger
    }

    public func document(named name: String) throws -> Document? { try requireLedger().document(named: name) }
    public func documents(prefix: String, after: String = "", limit: Int) throws -> [Document] {
        try requireLedger().documents(prefix: prefix, after: after, limit: limit)
    }
    public func firstName(under prefix: String, where matches: (String) -> Bool) throws -> String? {
        try requireLedger().firstName(under: prefix, where: matches)
    }
    public func forEachDocumentInChunks(prefix: String, chunk: Int = 2_048, _ body: (Document) throws -> Void) throws {
        try requireLedger().forEachDocumentInChunks(prefix: prefix, chunk: chunk, body)
    }
    public func forEachDocument(prefix: String, _ body: (Document) throws -> Void) throws {
        try requireLedger().forEachDocument(prefix: prefix, body)
    }
    public func auditRecords(after sequence: UInt64 = 0, limit: Int = 1000) throws -> [AuditRecord] {
        try requireLedger().auditRecords(after: sequence, limit: limit)
    }
    public func verifyAudit() throws -> AuditVerification { try requireLedger().verifyAudit() }
    public func ledgerAppliedIndex() throws -> LogIndex { try requireLedger().appliedIndex }
    public func issuedRecordCount() throws -> Int { try requireLedger().issuedRecordCount }
    public func earliestIssuedExpiryMillis() throws -> UInt64? { try requireLedger().earliestIssuedExpiryMillis() }
}
