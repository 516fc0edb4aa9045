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
/// - the audit chain is appended to the audit log (`audit/`, see
///   `AuditLog`) in batches (every `auditBatchMax` records or
///   `auditBatchMillis`), without an fsync of its own: records after the
///   checkpoint are made again by the replay. Before a checkpoint counts,
///   the log is synced through it.
///
/// Reads from any thread see the applied state: documents from memory,
/// audit records from the log plus those not yet written.
public final class LedgerStore: Sendable {
    public let directory: String
    let audit: AuditLog
    private let memory: Mutex<LedgerMemory>
    /// When the oldest unwritten audit record was applied (driver thread).
    private let unwrittenSince = Mutex<ContinuousClock.Instant?>(nil)
    /// `LedgerMemory.issuedCount`, published after each applied batch.
    private let issuedRecords = Atomic<Int>(0)
    let batching: AuditBatching
    /// Where due audit records are written, one batch at a time and in
    /// order, off the driver's thread: a batch of 2,048 was tens of
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
    /// The newest ledger rules this node applies by (`LedgerRules.known`;
    /// tests lower it to stand for an older build).
    private let rulesKnown = Atomic<UInt32>(LedgerRules.known)
    /// The newest snapshot stream made for sending, while a transfer
    /// holds it (its file, unlinked, goes with the last holder).
    private struct WeakOutgoing { weak var snapshot: OutgoingSnapshot? }
    private let outgoing = Mutex(WeakOutgoing())
    /// The stream being received from the leader, if any, and the newest
    /// streams received whole, waiting for the core's Ready to install
    /// one (a later piece of another stream cannot touch them).
    private let incoming = Mutex<(staging: IncomingSnapshot?, whole: [IncomingSnapshot])>((nil, []))
    static let wholeStreamsKept = 2

    init(directory: String, batching: AuditBatching = AuditBatching()) throws {
        self.directory = directory
        self.batching = batching
        audit = try AuditLog.open(directory: "\(directory)/audit")
        try Self.migrateAuditTable(directory: directory, into: audit)
        memory = Mutex(LedgerMemory())
    }

    // MARK: - Opening

    /// The newest checkpoint on disk, loaded into memory; the audit log
    /// checked to hold the checkpoint's head record, then cut back to it
    /// (later records are made again by the replay). Nil when there is none
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
        // The chain must hold the checkpoint's head, checked before anything
        // is cut: a chain that disagrees is left whole, for whoever looks
        // into it.
        let path = audit.directory
        if head.sequence > 0, let atHead = try audit.records(after: head.sequence - 1, limit: 1).first, atHead.sequence == head.sequence {
            guard atHead.hash == head.hash else {
                throw StorageError(code: .corruptState, reason: "\(path): the audit chain's record \(head.sequence) has another hash than the checkpoint at index \(index) was taken at. \(StorageError.rejoinAdvice)")
            }
        } else if head.sequence > 0 {
            guard let stored = try audit.lastRecord() else {
                throw StorageError(code: .corruptState, reason: "\(path): the audit chain is missing the \(head.sequence) records the checkpoint at index \(index) follows. \(StorageError.rejoinAdvice)")
            }
            throw StorageError(code: .corruptState, reason: "\(path): the audit chain ends at record \(stored.sequence), but the checkpoint at index \(index) was taken at record \(head.sequence). \(StorageError.rejoinAdvice)")
        }
        // Records after the head (they belong to entries after the
        // checkpoint) are made again by the replay.
        try audit.truncate(after: head.sequence)
        if let stored = try audit.lastRecord(), stored.sequence != head.sequence || stored.hash != head.hash {
            throw StorageError(code: .corruptState, reason: "\(path): the audit chain ends at record \(stored.sequence) once cut, not at the checkpoint's record \(head.sequence) (index \(index)). \(StorageError.rejoinAdvice)")
        }
        let loaded = LedgerMemory(documents: checkpoint?.documents ?? [], head: head, applied: index)
        try LedgerRules.check(try LedgerRules.version(in: loaded), known: rulesKnown.load(ordering: .relaxed), at: index)
        memory.withLock { $0 = loaded }
        issuedRecords.store(loaded.issuedCount, ordering: .relaxed)
        unwrittenSince.withLock { $0 = nil }
        return checkpoint
    }

    /// The newest ledger rules this node applies by, and the rules in force.
    public var rules: (known: UInt32, inForce: UInt32) {
        get throws { (rulesKnown.load(ordering: .relaxed), try memory.withLock { try LedgerRules.version(in: $0) }) }
    }

    /// Makes this node apply as a build that knows rules up to `version`
    /// would (tests: an older build in the same process).
    package func setRulesKnownForTesting(_ version: UInt32) { rulesKnown.store(version, ordering: .relaxed) }

    // MARK: - Applying (the driver's thread)

    /// Applies committed entries in order; their audit records are
    /// written to the audit log in batches.
    func apply(_ entries: [Entry]) throws -> [LedgerOutcome] {
        guard !entries.isEmpty else { return [] }
        // The lock is taken per entry, not per batch: readers on the API's
        // threads wait for one entry at most, instead of spinning for a
        // whole batch (a tenth of a millisecond or more on the leader).
        var outcomes: [LedgerOutcome] = []
        outcomes.reserveCapacity(entries.count)
        var unwritten = 0, issued = 0
        for entry in entries {
            let outcome = try memory.withLock { memory in
                defer { (unwritten, issued) = (memory.unwrittenAudit.count, memory.issuedCount) }
                return try Ledger.apply(entry, to: &memory, rulesKnown: rulesKnown.load(ordering: .relaxed))
            }
            if let outcome { outcomes.append(outcome) }
        }
        issuedRecords.store(issued, ordering: .relaxed)
        if unwritten > 0 { unwrittenSince.withLock { $0 = $0 ?? .now } }
        try writeAuditIfDue(unwritten: unwritten)
        return outcomes
    }

    /// Queues the unwritten audit records for the audit log once there are
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
    /// the audit log now, after any batch already queued.
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
    /// audit log (one batch). They stay readable from memory until that
    /// write returned. They are copied out here, on the
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
        try audit.append(records)
        memory.withLock { memory in memory.unwrittenAudit.removeFirst(memory.unwrittenAudit.prefix { $0.sequence <= last.sequence }.count) }
    }

    /// Makes every audit record written so far durable.
    func syncAudit() throws {
        try audit.sync()
    }

    /// Moves the audit chain of a node made before the audit log (an
    /// SQLite table, `ledger_audit` in `ledger.sqlite`) into the log, once:
    /// the database goes only after the log holds every record durably.
    private static func migrateAuditTable(directory: String, into audit: AuditLog) throws {
        let path = "\(directory)/ledger.sqlite"
        guard FileSystem.exists(path) else { return }
        if audit.lastSequence == 0 {
            let queue = try DatabaseQueue(path: path)
            let records = try queue.read { db -> [AuditRecord] in
                guard try db.tableExists("ledger_audit") else { return [] }
                return try Row.fetchAll(db, sql: """
                    SELECT sequence, log_index, time_millis, actor, action, target, result, previous_hash, hash
                    FROM ledger_audit ORDER BY sequence
                    """).map { row in
                    var record = AuditRecord(sequence: UInt64(row[0] as Int64), logIndex: UInt64(row[1] as Int64),
                                             timeMillis: UInt64(row[2] as Int64), actor: row[3], action: row[4],
                                             target: row[5], result: row[6], previousHash: [UInt8](row[7] as Data))
                    record.hash = [UInt8](row[8] as Data)
                    return record
                }
            }
            try queue.close()
            if !records.isEmpty { try audit.replaceAll(records) }
        }
        for suffix in ["", "-wal", "-shm"] { try FileSystem.remove(path + suffix) }
    }

    // MARK: - Checkpoints and snapshots

    /// Pins the applied state at `metadata.index` (which must be the
    /// applied index) for a checkpoint written later on another thread
    /// (which also writes the audit records it needs in the audit log: here,
    /// on the driver's thread, that took up to 6 ms).
    func beginCheckpoint(_ metadata: SnapshotMetadata) throws -> LedgerCheckpoint {
        let copy = memory.withLock { $0 }
        precondition(copy.applied == metadata.index, "a checkpoint at \(metadata.index) of a ledger applied to \(copy.applied)")
        return LedgerCheckpoint(store: self, memory: copy, metadata: metadata)
    }

    /// The stream of the ledger snapshot at `metadata`, written to a file
    /// of its own from the checkpoint file and the audit log (when a
    /// follower needs one: the core keeps snapshots without their bytes),
    /// or the one made already. Fails if a newer checkpoint replaced that
    /// one meanwhile. Any thread; one is made at a time.
    func outgoingSnapshot(for metadata: SnapshotMetadata) throws -> OutgoingSnapshot {
        try outgoing.withLock { cached in
            if let made = cached.snapshot, made.metadata == metadata { return made }
            let path = "\(directory)/\(Checkpoint.fileName(metadata.index))"
            guard FileSystem.exists(path) else {
                throw StorageError(code: .invalidRequest, reason: "\(directory) holds no checkpoint at index \(metadata.index) any more (a newer one replaced it)")
            }
            let checkpoint = try Checkpoint.decode(try FileSystem.read(path), path: path)
            guard checkpoint.metadata == metadata else {
                throw StorageError(code: .corruptState, reason: "\(path): the checkpoint records \(checkpoint.metadata), not \(metadata)")
            }
            let memory = LedgerMemory(documents: checkpoint.documents, head: checkpoint.head, applied: metadata.index)
            let file = try SnapshotFile(creating: "\(directory)/\(Self.outgoingFileName)")
            var (length, crc, buffer) = (UInt64(0), CRC32C(), [UInt8]())
            func flush() throws {
                try file.write(buffer, at: length)
                crc.update(buffer)
                length += UInt64(buffer.count)
                buffer.removeAll(keepingCapacity: true)
            }
            try SnapshotStream.write(memory, audit: audit) { bytes in
                buffer.append(contentsOf: bytes)
                if buffer.count >= 1 << 20 { try flush() }
            }
            try flush()
            let made = OutgoingSnapshot(metadata: metadata, byteCount: length, checksum: crc.value, file: file)
            cached.snapshot = made
            return made
        }
    }

    /// The snapshot at `metadata` in the encoding of builds before streams,
    /// for a follower of such a build (see `RaftDriver`): one message, so
    /// at most `limit` bytes.
    func legacySnapshotBytes(for metadata: SnapshotMetadata, limit: Int) throws -> [UInt8] {
        let stream = try outgoingSnapshot(for: metadata)
        return try SnapshotStream.legacyBytes(of: FileSource(file: stream.file, length: stream.byteCount), at: metadata.index,
                                              path: directory, limit: limit)
    }

    static let outgoingFileName = "snapshot-outgoing.tmp"
    static let incomingFileName = "snapshot-incoming.tmp"

    /// Room kept free beyond what a stream needs.
    static let stagingMarginBytes: UInt64 = 64 << 20

    /// Free bytes a stream of `bytes` needs on its disk: staged, then
    /// installed beside it (the new audit file and checkpoint are about
    /// as large again, written before the old ones and the staged file
    /// go), with `stagingMarginBytes` to spare, less the `reclaimed` bytes
    /// of a stream it replaces (staged in a file already unlinked, which
    /// no listing shows); nil past any disk.
    static func bytesNeeded(forStream bytes: UInt64, reclaiming reclaimed: UInt64) -> UInt64? {
        let (twice, overflow) = bytes.multipliedReportingOverflow(by: 2)
        let (needed, overflowAgain) = twice.addingReportingOverflow(stagingMarginBytes)
        guard !overflow, !overflowAgain else { return nil }
        return needed > reclaimed ? needed - reclaimed : 0
    }

    /// Refuses a stream the disk holding `directory` cannot take (see
    /// `bytesNeeded`), before anything is written: it would fail part-way,
    /// or stop the node at its install, round after round. A disk whose
    /// free space cannot be read is not refused here.
    static func requireRoom(forStream bytes: UInt64, reclaiming reclaimed: UInt64, from leader: NodeID, in directory: String) throws {
        var info = statvfs()
        guard statvfs(directory, &info) == 0 else { return }
        let free = UInt64(info.f_bavail) &* UInt64(info.f_frsize)
        let needed = bytesNeeded(forStream: bytes, reclaiming: reclaimed)
        if let needed, free >= needed { return }
        throw StorageError(code: .ioFailure, reason: "\(directory): the snapshot stream from node \(leader) is \(bytes) bytes; staging and installing it needs \(needed.map { "\($0) bytes free (twice the stream and \(stagingMarginBytes >> 20) MiB)" } ?? "more than any disk has"), and the disk has \(free) bytes free. Nothing was staged: free some space on it and the leader's next round is taken")
    }

    /// Stages a piece of the snapshot stream `leader` is sending (the
    /// driver's thread). A piece at offset 0 of another stream starts
    /// that one over the one staged, if its disk has room for it.
    func receive(_ chunk: SnapshotChunk, from leader: NodeID) throws -> SnapshotReceipt {
        try incoming.withLock { incoming in
            if let whole = incoming.whole.first(where: { $0.isSame(chunk, from: leader) }) {
                return SnapshotReceipt(received: whole.totalBytes, complete: true)
            }
            if incoming.staging.map({ !$0.isSame(chunk, from: leader) }) ?? true {
                guard chunk.offset == 0 else { return SnapshotReceipt(received: 0, complete: false) }
                try Self.requireRoom(forStream: chunk.totalBytes, reclaiming: incoming.staging?.received ?? 0, from: leader, in: directory)
                incoming.staging = nil
                incoming.staging = IncomingSnapshot(leader: leader, metadata: chunk.metadata, totalBytes: chunk.totalBytes, checksum: chunk.checksum,
                                                    file: try SnapshotFile(creating: "\(directory)/\(Self.incomingFileName)"))
            }
            let receipt = try incoming.staging!.take(chunk)
            if receipt.complete {
                incoming.whole.append(incoming.staging!)
                incoming.whole.removeFirst(max(0, incoming.whole.count - Self.wholeStreamsKept))
                incoming.staging = nil
            }
            return receipt
        }
    }

    /// Replaces the whole ledger with a snapshot from the leader: its
    /// bytes, or (none given) the stream staged whole for these metadata.
    /// Checked entirely first (nothing changes if it is damaged), then the
    /// audit log replaced and synced, then the checkpoint file written,
    /// then memory.
    func install(_ snapshot: Snapshot) throws {
        let metadata = snapshot.metadata
        if !snapshot.data.isEmpty {
            let stream = try SnapshotStream.fromLegacy(snapshot.data, at: metadata.index, path: audit.directory)
            return try install(metadata, from: BytesSource(bytes: stream))
        }
        let staged = incoming.withLock { incoming in
            defer { incoming.whole.removeAll() }
            return incoming.whole.last { $0.metadata == metadata }
        }
        guard let staged, staged.complete else {
            throw StorageError(code: .corruptState, reason: "\(directory): no snapshot at index \(metadata.index) was received whole; nothing was installed")
        }
        try install(metadata, from: FileSource(file: staged.file, length: staged.totalBytes))
    }

    private func install<Source: SnapshotSource>(_ metadata: SnapshotMetadata, from source: Source) throws {
        var reader = try SnapshotStreamReader(source, at: metadata.index, path: audit.directory)
        let documents = try reader.documents()
        let head = try reader.checkChain()
        let installed = LedgerMemory(documents: documents, head: head, applied: metadata.index)
        try LedgerRules.check(try LedgerRules.version(in: installed), known: rulesKnown.load(ordering: .relaxed), at: metadata.index)
        // After a checkpoint being written, if any; one begun before this
        // is refused afterwards.
        try checkpointWriting.withLock { newest in
            // The chain again, a page at a time (checked above).
            var again = try SnapshotStreamReader(source, at: metadata.index, path: audit.directory)
            try again.skipDocuments()
            // On the writer's queue: no batch of the old chain lands after this.
            try auditWriter.sync { try audit.replaceAll(pages: { try again.nextPage() }) }
            try writeCheckpoint(installed, metadata: metadata, newest: &newest)
            memory.withLock { $0 = installed }
            issuedRecords.store(installed.issuedCount, ordering: .relaxed)
        }
        unwrittenSince.withLock { $0 = nil }
    }

    /// Writes the checkpoint file for `memory` (atomically) and removes
    /// older ones. The audit log must already be durable through it.
    /// Holding `checkpointWriting` (its value is `newest`).
    private func writeCheckpoint(_ memory: LedgerMemory, metadata: SnapshotMetadata, newest: inout LogIndex) throws {
        let name = Checkpoint.fileName(metadata.index)
        try Checkpoint.write(memory, metadata: metadata, to: "\(directory)/\(name)", directory: directory)
        newest = metadata.index
        for other in try FileSystem.list(directory) where other != name && (Checkpoint.index(ofFile: other).map { $0 < metadata.index } ?? other.hasSuffix(".ledger.tmp")) {
            try FileSystem.remove("\(directory)/\(other)")
        }
    }

    /// Writes the audit log through `memory`'s head, syncs it, and writes
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

    /// Identity records kept (`authority/issued/`) as of the last batch
    /// applied, read without the ledger's lock (every issuance asks).
    public var issuedRecordCount: Int { issuedRecords.load(ordering: .relaxed) }

    /// When the first identity record kept expires (its name's time):
    /// the next issuance after it forgets it. Nil when none is kept.
    public func earliestIssuedExpiryMillis() -> UInt64? {
        let prefix = AuthorityDocuments.issuedPrefix
        let first = memory.withLock { memory in
            var first: String?
            memory.names.forEach(from: prefix) { name in
                if name.hasPrefix(prefix) { first = name }
                return false
            }
            return first
        }
        return first.flatMap { AuthorityDocuments.time(inTimedName: $0, prefix: prefix) }
    }

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

    /// The first name under `prefix` that `matches`, names only, in order:
    /// for rare scans (a revocation looking for a serial's record), which
    /// hold applying up for a few milliseconds per hundred thousand names.
    public func firstName(under prefix: String, where matches: (String) -> Bool) -> String? {
        memory.withLock { memory in
            var found: String?
            memory.names.forEach(from: prefix) { name in
                guard name.hasPrefix(prefix) else { return false }
                if matches(name) { found = name }
                return found == nil
            }
            return found
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

    /// Every document under `prefix` with its content, in name order, read
    /// `chunk` at a time under the lock and handed to `body` outside it: a
    /// long scan (the CRL's, of every issued record) holds applying up for
    /// one chunk at a time, not for all of it (a few hundred thousand
    /// lookups, a tenth of a second). Not one snapshot: each document is as
    /// it was when its chunk was read.
    public func forEachDocumentInChunks(prefix: String, chunk: Int = 2_048, _ body: (Document) throws -> Void) rethrows {
        precondition(chunk > 0)
        var after: String?
        while true {
            let documents = memory.withLock { memory in
                var documents: [Document] = []
                memory.names.forEach(from: after ?? prefix) { name in
                    guard name.hasPrefix(prefix) else { return false }
                    if let after, name <= after { return true }
                    if let document = memory.documents[name] { documents.append(document) }
                    return documents.count < chunk
                }
                return documents
            }
            for document in documents { try body(document) }
            guard documents.count == chunk, let last = documents.last, last.name != after else { return }
            after = last.name
        }
    }

    /// Audit records after `sequence`, oldest first, at most `limit`.
    public func auditRecords(after sequence: UInt64 = 0, limit: Int = 1000) throws -> [AuditRecord] {
        let limit = min(max(limit, 0), 100_000)
        // Memory first, then the log: a record leaves memory only after
        // it was written there, so nothing falls between the two.
        let unwritten = memory.withLock { $0.unwrittenAudit.filter { $0.sequence > sequence }.prefix(limit) }
        // Hashes as stored, so verification sees tampering.
        let stored = try audit.records(after: sequence, limit: limit)
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

    /// Audit records applied and not yet in the audit log (tests).
    var auditRecordsInMemory: [AuditRecord] { memory.withLock { $0.unwrittenAudit } }
}

/// When the ledger writes the audit records it applied to its audit log: once
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

    /// Writes the audit log through the checkpoint's head and syncs it,
    /// then writes the checkpoint file; returns how many documents and
    /// audit records the ledger holds.
    public func write() throws -> Int {
        try store.checkpoint(memory, metadata: metadata)
        return memory.documents.count + Int(memory.head.sequence)
    }
}
