import Foundation
import Ledger
import Raft
import Testing
import TestSupport
@testable import Storage

/// A mixed sequence of commands (creates, stale and fresh compare-and-sets,
/// deletes, bad names) drawn from a seed.
private func commands(seed: UInt64, count: Int, documents: Int = 6) -> [LedgerCommand] {
    var random = SeededGenerator(seed: seed)
    return (0..<count).map { i in
        let name = random.chance(0.05) ? "Bad Name" : "docs/\(random.below(documents))"
        let expected: UInt64? = random.chance(0.3) ? nil : UInt64(random.below(4))
        let operation: LedgerCommand.Operation = random.chance(0.2)
            ? .deleteDocument(name: name, expectedVersion: expected)
            : .putDocument(name: name, format: random.chance(0.5) ? .json : .yaml, content: Array("{\"i\":\(i)}".utf8), expectedVersion: expected)
        return LedgerCommand(timeMillis: UInt64(1_000 + i), actor: "actor-\(random.below(3))", requestID: "r\(i)", operation: operation)
    }
}

private func entries(_ commands: [LedgerCommand], term: Term = 2, from first: LogIndex = 1) -> [Entry] {
    commands.enumerated().map { Entry(term: term, index: first + LogIndex($0.offset), payload: .command($0.element.encoded)) }
}

/// A single-voter node on `store`, every Ready persisted and applied.
private func driveApplying(_ node: inout RaftNode, _ store: RaftStore) throws {
    while node.hasReady {
        let ready = node.ready()
        _ = try store.persistAndApply(ready)
        node.advance()
    }
}

/// A single-voter leader on a fresh store that applied `commands`.
private func leaderThatApplied(_ commands: [LedgerCommand]) throws -> (TemporaryStore, RaftStore, RaftNode) {
    let temporary = try TemporaryStore()
    let store = try temporary.open()
    try store.initialize(with: .bootstrap(voters: [1]))
    var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
    node.campaign()
    for command in commands { try node.propose(command.encoded) }
    try driveApplying(&node, store)
    return (temporary, store, node)
}

/// A leader's store checkpointed after 30 commands, then 10 more applied
/// and their audit records written: the store, the checkpoint's audit
/// head, and the whole chain.
private func checkpointedWithRecordsAfter(seed: UInt64) throws -> (TemporaryStore, head: AuditRecord, chain: [AuditRecord]) {
    var (temporary, store, node) = try leaderThatApplied(commands(seed: seed, count: 30))
    try checkpoint(&node, store)
    let head = try #require(try store.auditRecords(limit: 1_000).last)
    for command in commands(seed: seed + 1, count: 10) { try node.propose(command.encoded) }
    try driveApplying(&node, store)
    try store.ledger!.writeAudit()
    let chain = try store.auditRecords(limit: 1_000)
    #expect(chain.count > Int(head.sequence))
    return (temporary, head, chain)
}

/// Takes a checkpoint as the driver does: pinned, written, then the log compacted.
@discardableResult
private func checkpoint(_ node: inout RaftNode, _ store: RaftStore) throws -> (metadata: SnapshotMetadata, data: [UInt8]) {
    let metadata = try #require(node.snapshotMetadata(at: node.appliedIndex))
    _ = try store.beginCheckpoint(metadata).write()
    _ = try node.compactLog(through: metadata.index, snapshotData: [])
    try store.compact(through: metadata, data: [])
    return (metadata, try store.snapshotData(for: metadata))
}

@Suite("The ledger store", .onOwnThreads)
struct LedgerStoreTests {
    @Test("The store and in-memory tables reach the same documents, outcomes and audit chain")
    func sameAsInMemory() throws {
        let temporary = try TemporaryStore()
        let store = try RaftStore(directory: temporary.path, auditBatching: AuditBatching(records: 2_048, millis: 3_600_000))
        let ledger = try #require(store.ledger)
        var memory = InMemoryLedgerTables()
        let all = entries(commands(seed: 5, count: 3_000, documents: 40))
        var memoryOutcomes: [LedgerOutcome] = []
        for entry in all { if let outcome = try Ledger.apply(entry, to: &memory) { memoryOutcomes.append(outcome) } }
        var storeOutcomes: [LedgerOutcome] = []
        for batch in stride(from: 0, to: all.count, by: 37) {
            storeOutcomes += try ledger.apply(Array(all[batch..<min(all.count, batch + 37)]))
        }
        #expect(storeOutcomes == memoryOutcomes)
        #expect(storeOutcomes.contains { if case .rejected = $0.result { return true } else { return false } })
        for name in Set(memory.documents.keys).union((0..<40).map { "docs/\($0)" }) {
            #expect(try store.document(named: name) == memory.documents[name], "\(name)")
        }
        #expect(try store.documents(prefix: "docs/", limit: 1_000).map(\.name) == memory.documents.keys.filter { $0.hasPrefix("docs/") }.sorted())
        // Read a chunk at a time: every document under the prefix, in order, with its content, whatever the chunk size.
        let expected = memory.documents.filter { $0.key.hasPrefix("docs/") }.sorted { $0.key < $1.key }.map(\.value)
        for chunk in [1, 3, expected.count, expected.count + 1, 2_048] {
            var read: [Document] = []
            try store.forEachDocumentInChunks(prefix: "docs/", chunk: chunk) { read.append($0) }
            #expect(read == expected, "chunk \(chunk)")
        }
        var none = 0
        try store.forEachDocumentInChunks(prefix: "docs/none/", chunk: 3) { _ in none += 1 }
        #expect(none == 0 && expected.count > 5)
        // Part of the chain is still in memory, part in the table: readers see one chain.
        ledger.waitForAuditWrites()
        #expect(!ledger.auditRecordsInMemory.isEmpty)
        #expect(ledger.auditRecordsInMemory.count < 2_048, "the batch due at 2,048 went to the table")
        #expect(try store.auditRecords(limit: 100_000) == memory.audit)
        #expect(try store.auditRecords(after: 2_990, limit: 5).map(\.sequence) == [2_991, 2_992, 2_993, 2_994, 2_995])
        #expect(try store.verifyAudit() == AuditChain.verify(memory.audit))
        try ledger.writeAudit()
        #expect(ledger.auditRecordsInMemory.isEmpty)
        #expect(try store.auditRecords(limit: 100_000) == memory.audit)
        #expect(try store.ledgerAppliedIndex() == 3_000)
    }

    @Test("The active authority the store keeps at hand follows rotations and restarts: issuances signed by a retired one are refused as in memory")
    func activeAuthorityFollowsRotations() throws {
        func keyring(_ entries: [(String, AuthorityKeyring.Entry.State)]) throws -> [UInt8] {
            Array(try JSONEncoder().encode(AuthorityKeyring(trustDomain: "example.org", kekID: "k", authorities: entries.map { id, state in
                AuthorityKeyring.Entry(id: id, state: state, algorithm: "ecdsa-p256", x509Certificate: "pem-\(id)", x509Key: "sealed",
                                       jwtKeyID: "kid-\(id)", jwtKey: "sealed", createdAtMillis: 0)
            })))
        }
        func token(_ n: Int) -> JoinToken {
            JoinToken(hash: String(repeating: String(n % 10), count: 64), spiffeID: "spiffe://example.org/job", ttlMaxSeconds: 600,
                      expiresAtMillis: 1_000_000_000)
        }
        func issue(_ n: Int, by authority: String) -> LedgerCommand.Operation {
            .recordIssuance(Issuance(kind: .jwt, spiffeID: "spiffe://example.org/job", serial: String(format: "%032x", n),
                                     fingerprint: String(repeating: "f", count: 64), issuedAtMillis: 2_000, notAfterMillis: 900_000, ttlSeconds: 60,
                                     tokenHash: token(n).hash, idempotencyKey: "", node: 1, authority: authority, attributes: [:], artifact: []))
        }
        let before: [LedgerCommand.Operation] = try [.initializeAuthority(keyring: keyring([("old", .active)]))]
            + (1...6).map { .createJoinToken(token($0)) }
            + [issue(1, by: "old"), issue(2, by: "new")]
        let rotation: [LedgerCommand.Operation] = try [.prepareAuthority(JSONDecoder().decode(AuthorityKeyring.self, from: Data(keyring([("new", .prepared)]))).authorities[0]),
                                                       issue(3, by: "new"), .activateAuthority(id: "new"), issue(4, by: "old"), issue(5, by: "new")]
        let commands = (before + rotation).enumerated().map { LedgerCommand(timeMillis: 2_000 + UInt64($0.offset), actor: "test", requestID: "r\($0.offset)", operation: $0.element) }
        var memory = InMemoryLedgerTables()
        let expected = try entries(commands).compactMap { try Ledger.apply($0, to: &memory)?.result }
        #expect(expected.filter { if case .rejected(let reason) = $0 { reason.hasPrefix("authority rotated") } else { false } }.count == 3,
                "new before it was active, old twice after: \(expected)")
        var (temporary, store, node) = try leaderThatApplied(Array(commands[..<before.count]))
        try checkpoint(&node, store)
        store = try temporary.open() // restarted from the checkpoint: the active authority comes back with the documents
        var restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: try store.loadDurableState())
        restarted.campaign()
        try driveApplying(&restarted, store)
        let ledger = try #require(store.ledger)
        let after = try ledger.apply(entries(Array(commands[before.count...]), term: restarted.term, from: restarted.lastIndex + 1)).map(\.result)
        let expectedAfter = Array(expected.suffix(rotation.count))
        #expect(after == expectedAfter)
        #expect(try store.document(named: AuthorityDocuments.active)?.content == Array("\"new\"".utf8))
    }

    @Test("The store counts the identity records it keeps through issuances, forgetting, a checkpoint and a restart, and knows when the first expires")
    func identityRecordsCounted() throws {
        let keyring = Array(try JSONEncoder().encode(AuthorityKeyring(trustDomain: "example.org", kekID: "k", authorities: [
            AuthorityKeyring.Entry(id: "a1", state: .active, algorithm: "ecdsa-p256", x509Certificate: "pem", x509Key: "sealed",
                                   jwtKeyID: "kid", jwtKey: "sealed", createdAtMillis: 0)])))
        func token(_ n: Int) -> JoinToken {
            JoinToken(hash: String(repeating: String(n % 10), count: 64), spiffeID: "spiffe://example.org/job", ttlMaxSeconds: 600,
                      expiresAtMillis: 1_000_000_000)
        }
        func issue(_ n: Int, notAfter: UInt64) -> LedgerCommand.Operation {
            .recordIssuance(Issuance(kind: .jwt, spiffeID: "spiffe://example.org/job", serial: String(format: "%032x", n),
                                     fingerprint: String(repeating: "f", count: 64), issuedAtMillis: 2_000, notAfterMillis: notAfter, ttlSeconds: 60,
                                     tokenHash: token(n).hash, idempotencyKey: "", node: 1, authority: "a1", attributes: [:], artifact: []))
        }
        func commands(_ operations: [LedgerCommand.Operation], at time: UInt64) -> [LedgerCommand] {
            operations.enumerated().map { LedgerCommand(timeMillis: time, actor: "test", requestID: "r\(time)-\($0.offset)", operation: $0.element) }
        }
        let first = commands([.initializeAuthority(keyring: keyring)] + (1...4).map { .createJoinToken(token($0)) }
            + [issue(1, notAfter: 5_000_000), issue(2, notAfter: 9_000_000), issue(3, notAfter: 7_000_000)], at: 2_000)
        var (temporary, store, node) = try leaderThatApplied(first)
        #expect(try store.issuedRecordCount() == 3, "tokens and the keyring are not identity records")
        #expect(try store.earliestIssuedExpiryMillis() == 5_000_000)
        try checkpoint(&node, store)

        store = try temporary.open()
        var restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: try store.loadDurableState())
        #expect(try store.issuedRecordCount() == 3, "counted again as the checkpoint loads")
        restarted.campaign()
        try driveApplying(&restarted, store)
        // Applied at 8,000 s: the records expiring at 5,000 s and 7,000 s
        // are forgotten as the new one is kept.
        let ledger = try #require(store.ledger)
        let later = commands([issue(4, notAfter: 20_000_000)], at: 8_000_000)
        let outcomes = try ledger.apply(entries(later, term: restarted.term, from: restarted.lastIndex + 1)).map(\.result)
        #expect(outcomes == [.issued(artifact: [], replayed: false)])
        #expect(try store.issuedRecordCount() == 2)
        #expect(try store.earliestIssuedExpiryMillis() == 9_000_000)
        #expect(AuthorityDocuments.time(inTimedName: AuthorityDocuments.issued(notAfterMillis: 42, serial: "ab"), prefix: AuthorityDocuments.issuedPrefix) == 42)
        #expect(AuthorityDocuments.time(inTimedName: "authority/issued/12/ab", prefix: AuthorityDocuments.issuedPrefix) == nil, "fewer than 13 digits")
    }

    @Test("Due audit batches are written off the applying thread, in order; one that fails stops the next apply with its error")
    func auditWrittenInBackground() throws {
        let temporary = try TemporaryStore()
        let store = try RaftStore(directory: temporary.path, auditBatching: AuditBatching(records: 10, millis: 3_600_000))
        let ledger = try #require(store.ledger)
        let all = entries(commands(seed: 3, count: 200, documents: 5))
        var memory = InMemoryLedgerTables()
        for entry in all[..<150] { _ = try Ledger.apply(entry, to: &memory) }
        for batch in stride(from: 0, to: 150, by: 7) { _ = try ledger.apply(Array(all[batch..<min(150, batch + 7)])) }
        ledger.waitForAuditWrites()
        try ledger.writeAuditIfDue() // as the driver's tick does (due while a batch was being written: waits for it)
        ledger.waitForAuditWrites()
        #expect(ledger.auditRecordsInMemory.count < 10, "fewer than a batch wait in memory")
        #expect(try store.auditRecords(limit: 10_000) == memory.audit)
        #expect(try store.verifyAudit() == AuditChain.verify(memory.audit))

        // The disk fails: the apply that makes the next batch due still
        // returns (the batch is written elsewhere, and fails there) ...
        ledger.audit.failWrites()
        _ = try ledger.apply(Array(all[150..<170]))
        ledger.waitForAuditWrites()
        // ... and the next one stops with its error, as a failed disk does.
        let error = try #require(throws: (any Error).self) { try ledger.apply(Array(all[170..<171])) }
        #expect("\(error)".contains("write \(temporary.auditDirectory)/"), "\(error)")
        #expect(throws: (any Error).self) { try ledger.writeAudit() }
    }

    @Test("A restarted node loads its checkpoint and replays the log after it to the same state")
    func restartReplaysFromCheckpoint() throws {
        var (temporary, store, node) = try leaderThatApplied(commands(seed: 9, count: 40))
        try checkpoint(&node, store)
        let checkpointIndex = node.snapshotIndex
        for command in commands(seed: 10, count: 25) {
            try node.propose(command.encoded)
            try driveApplying(&node, store)
        }
        let applied = try store.ledgerAppliedIndex()
        #expect(applied == node.commitIndex && applied > checkpointIndex)
        let documents = try store.documents(prefix: "", limit: 1_000).map { try store.document(named: $0.name) }
        let audit = try store.auditRecords(limit: 1_000)
        try store.ledger!.writeAudit() // some of the records after the checkpoint reach the table before the "crash"

        store = try temporary.open()
        let durable = try store.loadDurableState()
        #expect(durable.appliedIndex == checkpointIndex)
        #expect(durable.snapshot?.metadata.index == checkpointIndex)
        #expect(try store.ledgerAppliedIndex() == checkpointIndex)
        #expect(try store.auditRecords(limit: 1_000).count < audit.count, "records after the checkpoint are made again, not kept")
        var restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: durable)
        try driveApplying(&restarted, store)
        // The commit index may come back behind (commit-only Readys are not
        // synced); leading again commits the rest of the log.
        restarted.campaign()
        try driveApplying(&restarted, store)
        #expect(try store.ledgerAppliedIndex() == applied + 1, "everything, and the new leader's no-op")
        #expect(try store.documents(prefix: "", limit: 1_000).map { try store.document(named: $0.name) } == documents)
        #expect(try store.auditRecords(limit: 1_000) == audit, "each record once, identical")
        guard case .intact = try store.verifyAudit() else { Issue.record("the chain must verify"); return }
    }

    @Test("A tampered audit record in the audit log's files is found by verification")
    func tamperedAuditIsFound() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        _ = try store.ledger!.apply(entries(commands(seed: 1, count: 10), term: 1))
        try store.ledger!.writeAudit()
        guard case .intact(count: 10, _) = try store.verifyAudit() else {
            Issue.record("the untouched chain should verify")
            return
        }
        try temporary.tamperAudit(sequence: 6) { $0.actor = String(repeating: "m", count: $0.actor.utf8.count) }
        #expect(try store.verifyAudit() == .broken(sequence: 6, reason: "its contents do not match its hash"))
    }

    @Test("A checkpoint whose audit chain was changed underneath is refused at start")
    func checkpointAndAuditMustAgree() throws {
        var (temporary, store, node) = try leaderThatApplied(commands(seed: 2, count: 30))
        try checkpoint(&node, store)
        try temporary.rewriteAudit { $0.removeLast() }
        let error = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
        #expect(error.code == .corruptState)
        #expect(error.reason.contains("audit chain ends at record"))

        // The record at the checkpoint's head replaced, later ones there:
        // refused, and nothing cut.
        do {
            let (temporary, head, before) = try checkpointedWithRecordsAfter(seed: 4)
            try temporary.rewriteAudit { records in
                let old = records[Int(head.sequence) - 1]
                records[Int(head.sequence) - 1] = AuditRecord(sequence: old.sequence, logIndex: old.logIndex, timeMillis: old.timeMillis, actor: "someone else",
                                                              action: old.action, target: old.target, result: old.result, previousHash: old.previousHash)
            }
            let replaced = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
            #expect(replaced.code == .corruptState && replaced.reason.contains("record \(head.sequence) has another hash"), "\(replaced.reason)")
            let kept = try AuditLog.open(directory: temporary.auditDirectory).records(after: 0, limit: .max)
            #expect(kept.count == before.count, "the records after the head are still there")
        }

        let name = try #require(try FileManager.default.contentsOfDirectory(atPath: temporary.path).first { $0.hasPrefix("checkpoint-") })
        try temporary.modify("\(temporary.path)/\(name)") { $0[40] ^= 1 }
        let damaged = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
        #expect(damaged.code == .corruptState)
        #expect(damaged.reason.contains("checksum"))
    }

    @Test("A start stopped by a crash while cutting the audit chain back to the checkpoint (a batch across its head cut whole) starts the next time, the chain whole")
    func startAfterCutStopped() throws {
        let (temporary, head, before) = try checkpointedWithRecordsAfter(seed: 6)
        // One batch holds the whole chain, the head inside it; the start's
        // cut back to the head stops right after cutting that batch.
        try temporary.rewriteAudit { _ in }
        let kept = try AuditLog.open(directory: temporary.auditDirectory).cut(after: head.sequence)
        #expect(kept.count == Int(head.sequence))
        #expect(try AuditLog.open(directory: temporary.auditDirectory).records(after: 0, limit: .max) == Array(before.prefix(Int(head.sequence))),
                "opened, the log finishes the cut's work: the chain through the head")

        // The same state once more, now met by a node's start.
        try temporary.rewriteAudit { records in records = before }
        _ = try AuditLog.open(directory: temporary.auditDirectory).cut(after: head.sequence)
        let restarted = try temporary.open()
        var again = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: try restarted.loadDurableState())
        again.campaign()
        try driveApplying(&again, restarted)
        try restarted.ledger!.writeAudit()
        #expect(try restarted.auditRecords(limit: 1_000) == before, "the chain through the head kept, the rest made again by the replay")
    }

    @Test("A ledger snapshot installs on another node, and comes back the same after a restart")
    func ledgerSnapshotInstalls() throws {
        var (source, leader, node) = try leaderThatApplied(commands(seed: 3, count: 60))
        let (metadata, data) = try checkpoint(&node, leader)
        _ = source

        let target = try TemporaryStore()
        let follower = try target.open()
        let snapshot = Snapshot(metadata: metadata, data: data)
        try follower.initialize(with: DurableState(hardState: HardState(term: metadata.term, votedFor: 0, commitIndex: metadata.index), snapshot: snapshot, entries: []))
        #expect(try follower.ledgerAppliedIndex() == metadata.index)
        #expect(try follower.auditRecords(limit: 10_000) == leader.auditRecords(limit: 10_000))
        #expect(try follower.verifyAudit() == leader.verifyAudit())
        for name in (0..<6).map({ "docs/\($0)" }) { #expect(try follower.document(named: name) == leader.document(named: name)) }
        let reopened = try target.open()
        let reloaded = try reopened.loadDurableState()
        #expect(reloaded.appliedIndex == metadata.index)
        #expect(reloaded.snapshot?.metadata == snapshot.metadata)
        #expect(reloaded.snapshot?.data.isEmpty == true, "the core keeps it without its bytes")
        #expect(try reopened.snapshotData(for: metadata) == data, "made again from the checkpoint and the table, identical")
        let older = SnapshotMetadata(index: metadata.index - 1, term: metadata.term, membership: metadata.membership)
        #expect(throws: StorageError.self, "no checkpoint at another index") { try reopened.snapshotData(for: older) }
    }

    @Test("A snapshot's stream staged piece by piece (again, past a gap, from another node) installs the same ledger as its bytes, an audit chain of several pages")
    func streamedSnapshotInstalls() throws {
        // More audit records than one page of the stream holds.
        var (source, leader, node) = try leaderThatApplied(commands(seed: 8, count: SnapshotStream.pageRecordsMax + 50))
        let (metadata, data) = try checkpoint(&node, leader)
        _ = source
        let outgoing = try leader.outgoingSnapshot(for: metadata)
        #expect(try leader.outgoingSnapshot(for: metadata) === outgoing, "made once for every follower that needs it")

        let target = try TemporaryStore()
        let follower = try target.open()
        try follower.initialize(with: .empty)
        let piece = 4096
        func chunk(_ offset: Int) throws -> SnapshotChunk { try outgoing.chunk(at: UInt64(offset), count: piece) }
        #expect(try follower.receiveSnapshotChunk(chunk(0), from: 1) == SnapshotReceipt(received: 4096, complete: false, added: 4096))
        #expect(try follower.receiveSnapshotChunk(chunk(0), from: 1) == SnapshotReceipt(received: 4096, complete: false, added: 0), "held already")
        #expect(try follower.receiveSnapshotChunk(chunk(8192), from: 1).received == 4096, "past a gap: not taken")
        #expect(try follower.receiveSnapshotChunk(chunk(8192), from: 3).received == 0, "another node's stream starts only at its start")
        var offset = 4096
        var receipt = SnapshotReceipt(received: 0, complete: false)
        while offset < data.count {
            receipt = try follower.receiveSnapshotChunk(chunk(offset), from: 1)
            offset += piece
        }
        #expect(receipt == SnapshotReceipt(received: UInt64(data.count), complete: true, added: data.count - (offset - piece)))
        #expect(try follower.receiveSnapshotChunk(chunk(4096), from: 1) == SnapshotReceipt(received: UInt64(data.count), complete: true),
                "a piece of a whole stream again: whole")
        // Another stream starts before the core's Ready installs this one
        // (a new leader's, say): the whole one is kept for the install.
        var other = try chunk(0)
        other.checksum ^= 1
        #expect(try follower.receiveSnapshotChunk(other, from: 3).received == 4096)

        var followerNode = try RaftNode(configuration: Configuration(id: 2, randomSeed: 2), durable: try follower.loadDurableState())
        followerNode.step(Message(from: 1, to: 2, term: metadata.term, body: .installSnapshot(Snapshot(metadata: metadata, data: []))))
        try driveApplying(&followerNode, follower)
        #expect(try follower.ledgerAppliedIndex() == metadata.index)
        let records = try follower.auditRecords(limit: 20_000)
        #expect(records.count > SnapshotStream.pageRecordsMax)
        #expect(records == (try leader.auditRecords(limit: 20_000)))
        #expect(try follower.verifyAudit() == leader.verifyAudit())
        for name in (0..<6).map({ "docs/\($0)" }) { #expect(try follower.document(named: name) == leader.document(named: name)) }
        // What a restart finds.
        let reopened = try target.open()
        #expect(try reopened.loadDurableState().snapshot?.metadata == metadata)
        #expect(try reopened.auditRecords(limit: 20_000) == records)
    }

    @Test("A stream its disk has no room for is refused at its first piece, the sizes said, and nothing changes: the stream being staged is kept and takes its next piece")
    func streamWithoutRoomIsRefused() throws {
        var (source, leader, node) = try leaderThatApplied(commands(seed: 10, count: 300))
        let (metadata, data) = try checkpoint(&node, leader)
        _ = source
        let outgoing = try leader.outgoingSnapshot(for: metadata)
        try #require(data.count > 8192)
        let target = try TemporaryStore()
        let follower = try target.open()
        try follower.initialize(with: .empty)
        let first = try outgoing.chunk(at: 0, count: 4096)
        #expect(try follower.receiveSnapshotChunk(first, from: 1).received == 4096)
        // Another node's stream claiming a pebibyte, past any disk here
        // (needing twice that and the margin, less the 4096 bytes held).
        var huge = first
        huge.totalBytes = 1 << 50
        let error = #expect(throws: StorageError.self) { try follower.receiveSnapshotChunk(huge, from: 3) }
        #expect(error?.reason.contains("is 1125899906842624 bytes") == true && error?.reason.contains("2251799880790016 bytes free") == true
                    && error?.reason.contains("Nothing was staged") == true,
                "\(String(describing: error))")
        #expect(try follower.receiveSnapshotChunk(try outgoing.chunk(at: 4096, count: 4096), from: 1).received == 8192, "the staged stream was replaced")
        // Twice the stream (staged, then installed beside it) and the
        // margin, less what a stream it replaces holds; past any disk, none.
        let mebibyte: UInt64 = 1 << 20
        #expect(LedgerStore.bytesNeeded(forStream: 100 * mebibyte, reclaiming: 0) == 264 * mebibyte)
        #expect(LedgerStore.bytesNeeded(forStream: 100 * mebibyte, reclaiming: 50 * mebibyte) == 214 * mebibyte)
        #expect(LedgerStore.bytesNeeded(forStream: mebibyte, reclaiming: 500 * mebibyte) == 0)
        #expect(LedgerStore.bytesNeeded(forStream: 1 << 63, reclaiming: 0) == nil)
    }

    @Test("A streamed snapshot failing its checksum is dropped and taken again from the start; another node's stream from its start replaces the one staged; nothing is installed from a stream not received whole")
    func streamedSnapshotRefusals() throws {
        var (source, leader, node) = try leaderThatApplied(commands(seed: 9, count: 300))
        let (metadata, data) = try checkpoint(&node, leader)
        _ = source
        let outgoing = try leader.outgoingSnapshot(for: metadata)
        let target = try TemporaryStore()
        let follower = try target.open()
        try follower.initialize(with: .empty)
        let piece = 1024
        func chunk(_ offset: Int, checksum: UInt32? = nil) throws -> SnapshotChunk {
            var chunk = try outgoing.chunk(at: UInt64(offset), count: piece)
            if let checksum { chunk.checksum = checksum }
            return chunk
        }
        let wrong = outgoing.checksum ^ 1
        var offset = 0
        while offset + piece < data.count {
            #expect(try follower.receiveSnapshotChunk(chunk(offset, checksum: wrong), from: 1).received == UInt64(offset + piece))
            offset += piece
        }
        let error = try #require(throws: StorageError.self) { try follower.receiveSnapshotChunk(chunk(offset, checksum: wrong), from: 1) }
        #expect(error.reason.contains("fails its checksum"), "\(error.reason)")
        #expect(try follower.receiveSnapshotChunk(chunk(piece, checksum: wrong), from: 1).received == 0, "dropped")
        #expect(try follower.receiveSnapshotChunk(chunk(0, checksum: wrong), from: 1).received == UInt64(piece), "taken again from the start")

        // Node 3's stream (the right one) from its start replaces it.
        #expect(try follower.receiveSnapshotChunk(chunk(0), from: 3).received == UInt64(piece))
        #expect(try follower.receiveSnapshotChunk(chunk(piece, checksum: wrong), from: 1).received == 0, "node 1's stream is gone")
        #expect(try follower.receiveSnapshotChunk(chunk(piece), from: 3).received == UInt64(2 * piece))

        // Asked to install it before it arrived whole: refused, nothing changes.
        var followerNode = try RaftNode(configuration: Configuration(id: 2, randomSeed: 2), durable: try follower.loadDurableState())
        followerNode.step(Message(from: 3, to: 2, term: metadata.term, body: .installSnapshot(Snapshot(metadata: metadata, data: []))))
        let refused = try #require(throws: StorageError.self) { try driveApplying(&followerNode, follower) }
        #expect(refused.reason.contains("received whole"), "\(refused.reason)")
        #expect(try follower.ledgerAppliedIndex() == 0)
        #expect(try follower.auditRecords().isEmpty)
    }

    @Test("A snapshot in the encoding of builds before streams installs the same ledger, and a stream converts to it and back unchanged")
    func legacySnapshotInstalls() throws {
        var (source, leader, node) = try leaderThatApplied(commands(seed: 10, count: 120))
        let (metadata, stream) = try checkpoint(&node, leader)
        _ = source
        let legacy = try leader.legacySnapshotData(for: metadata)
        #expect(legacy.first == 1 && stream.first == 2)
        #expect(try SnapshotStream.fromLegacy(legacy, at: metadata.index, path: "test") == stream)
        let tooLarge = try #require(throws: StorageError.self) { try leader.legacySnapshotData(for: metadata, limit: legacy.count - 1) }
        #expect(tooLarge.reason.contains("over the \(legacy.count - 1) bytes"), "\(tooLarge.reason)")

        let target = try TemporaryStore()
        let follower = try target.open()
        try follower.initialize(with: DurableState(hardState: HardState(term: metadata.term, votedFor: 0, commitIndex: metadata.index),
                                                   snapshot: Snapshot(metadata: metadata, data: legacy), entries: []))
        #expect(try follower.ledgerAppliedIndex() == metadata.index)
        #expect(try follower.auditRecords(limit: 10_000) == leader.auditRecords(limit: 10_000))
        for name in (0..<6).map({ "docs/\($0)" }) { #expect(try follower.document(named: name) == leader.document(named: name)) }
        var damaged = legacy
        damaged[damaged.count - 1] ^= 0xFF // the last record's hash
        let other = try TemporaryStore()
        let refused = try #require(throws: StorageError.self) {
            try other.open().initialize(with: DurableState(hardState: HardState(term: metadata.term, votedFor: 0, commitIndex: metadata.index),
                                                           snapshot: Snapshot(metadata: metadata, data: damaged), entries: []))
        }
        #expect(refused.reason.contains("does not verify"), "\(refused.reason)")
    }

    @Test("A checkpoint begun before a snapshot was installed is refused when written; the installed state is what a restart finds")
    func checkpointAfterInstallIsRefused() throws {
        let (target, follower, followerNode) = try leaderThatApplied(commands(seed: 5, count: 30))
        var node = followerNode
        let pending = try follower.beginCheckpoint(try #require(node.snapshotMetadata(at: node.appliedIndex)))
        var (source, leader, leaderNode) = try leaderThatApplied(commands(seed: 6, count: 80))
        let (metadata, data) = try checkpoint(&leaderNode, leader)
        _ = source
        #expect(metadata.index > pending.metadata.index)
        // The leader's snapshot arrives while the checkpoint is still being made.
        node.step(Message(from: 2, to: 1, term: 10, body: .installSnapshot(Snapshot(metadata: metadata, data: data))))
        try driveApplying(&node, follower)
        #expect(try follower.ledgerAppliedIndex() == metadata.index)
        let error = try #require(throws: StorageError.self) { try pending.write() }
        #expect(error.reason.contains("replaced the one at \(pending.metadata.index)"), "\(error.reason)")
        let reopened = try target.open()
        let durable = try reopened.loadDurableState()
        #expect(durable.snapshot?.metadata == metadata)
        #expect(try reopened.auditRecords(limit: 10_000) == leader.auditRecords(limit: 10_000))
        for name in (0..<6).map({ "docs/\($0)" }) { #expect(try reopened.document(named: name) == leader.document(named: name)) }
    }

    @Test("A damaged ledger snapshot is refused and nothing of it is installed")
    func damagedLedgerSnapshotIsRefused() throws {
        var (source, leader, node) = try leaderThatApplied(commands(seed: 4, count: 20))
        var (metadata, data) = try checkpoint(&node, leader)
        _ = source
        data[data.count - 5] ^= 0xFF // inside the last audit record's hash
        let target = try TemporaryStore()
        let follower = try target.open()
        let snapshot = Snapshot(metadata: metadata, data: data)
        let error = try #require(throws: StorageError.self) {
            try follower.initialize(with: DurableState(hardState: HardState(term: 1, votedFor: 0, commitIndex: 20), snapshot: snapshot, entries: []))
        }
        #expect(error.reason.contains("does not verify"))
        #expect(try follower.ledgerAppliedIndex() == 0)
        #expect(try follower.auditRecords().isEmpty)
        #expect(!follower.hasState, "no log was started either")
    }

    /// Two streams of names in increasing order (as issued records and
    /// used platform tokens are made) interleaved with random names and
    /// removals, through many chunk splits: the places remembered from
    /// earlier inserts never put a name out of order.
    @Test("Sorted names stay in order when inserts follow earlier ones in time order")
    func sortedNamesInTimeOrder() {
        var random = SeededGenerator(seed: 78)
        var names = SortedNames()
        var reference: Set<String> = []
        var clocks = [0, 0]
        for step in 0..<12_000 {
            let roll = random.below(10)
            var candidate: String
            if roll < 6 {
                let stream = roll % 2
                clocks[stream] += 1 + random.below(3)
                candidate = "\(stream == 0 ? "a" : "j")/\(String(format: "%08d", clocks[stream]))"
            } else {
                candidate = "\(["a", "j", "m"][random.below(3)])/\(String(format: "%08d", random.below(20_000)))"
            }
            if roll == 9, let victim = reference.randomElement(using: &random) {
                let removed = names.remove(victim)
                #expect(removed)
                reference.remove(victim)
                continue
            }
            let inserted = names.insert(candidate), expected = reference.insert(candidate).inserted
            #expect(inserted == expected, "step \(step): \(candidate)")
            if step % 1_000 == 0 || step == 11_999 {
                var all: [String] = []
                names.forEach(from: "") { all.append($0); return true }
                #expect(all == reference.sorted(), "step \(step)")
            }
        }
        #expect(reference.count > 2 * SortedNames.chunkMax, "enough names for splits")
    }

    @Test("Sorted names agree with a sorted array under random inserts, removals and range scans, with and without the first-name memo")
    func sortedNamesMatchReference() async {
        var random = SeededGenerator(seed: 77)
        let reference = await Self.checkSortedNames(steps: 20_000, bounds: (0..<10).map { "n/\($0)" }, random: &random) { random in "n/\(random.below(4_000))" }
        #expect(reference > 1_000, "enough names for many chunks")
    }

    /// Names as issued records make them on a node: the expiry's
    /// millisecond advances every few names and serials within one are
    /// random, so a name often belongs a few places before the one
    /// inserted last, not right after it (the remembered place is then
    /// only a hint); now and then one of the last few again (already
    /// there) or one much older, among others.
    @Test("Sorted names agree with a sorted array when names arrive nearly, not exactly, in order, with repeats of recent ones")
    func sortedNamesNearlyInOrder() async {
        var random = SeededGenerator(seed: 81)
        var millis = 1_796_000_000_000
        var recent: [String] = []
        let reference = await Self.checkSortedNames(steps: 20_000, bounds: ["authority/issued/", "authority/tokens/", "authority/"], random: &random) { random in
            let roll = random.below(20)
            if roll < 2, !recent.isEmpty { return recent[random.below(recent.count)] }
            if roll == 2 { return "authority/tokens/\(String(random.below(1 << 20), radix: 16))" }
            if roll == 3 { return "authority/issued/\(millis - 1 - random.below(200))/\(String(random.below(1 << 16), radix: 16))" }
            if random.below(9) == 0 { millis += 1 }
            let name = "authority/issued/\(millis)/\(String(random.below(1 << 16), radix: 16))"
            recent = Array((recent + [name]).suffix(12))
            return name
        }
        #expect(reference > 2 * SortedNames.chunkMax, "enough names for splits")
    }

    /// Names as JWT-SVIDs' issued records make them: thousands share one
    /// expiry (in whole seconds) and arrive in random order; and names
    /// whose bytes after a long shared run differ only beyond the 8 a
    /// chunk keeps per name (keys tie, and the names decide).
    @Test("Sorted names agree with a sorted array when thousands of names share a long prefix, in random order, and when their keys tie")
    func sortedNamesSharingLongPrefixes() async {
        var random = SeededGenerator(seed: 83)
        var second = 1_796_000_000
        func hex(_ random: inout SeededGenerator, _ digits: Int) -> String {
            String((0..<digits).map { _ in "0123456789abcdef".randomElement(using: &random)! })
        }
        let issued = await Self.checkSortedNames(steps: 10_000, bounds: ["authority/issued/", "authority/"], random: &random) { random in
            if random.below(2_000) == 0 { second += 1 }
            return "authority/issued/\(second)000/\(hex(&random, 32))"
        }
        #expect(issued > 2 * SortedNames.chunkMax, "enough names for splits")
        let tied = await Self.checkSortedNames(steps: 10_000, bounds: ["p/", "p/a", "q"], random: &random) { random in
            "p/" + String(repeating: "a", count: random.below(20)) + hex(&random, random.below(3))
        }
        #expect(tied > 2 * SortedNames.chunkMax, "enough names for splits")
    }

    /// Names of every shape: prefixes shared for a few bytes or for many,
    /// names that are prefixes of others, NUL bytes, and names that are not
    /// ASCII (none canonically equivalent to another: String's == takes
    /// "é" and "e\u{301}" as one name, and the first-name memo can then
    /// answer for the other spelling; document names are ASCII).
    @Test("Sorted names agree with a sorted array for names of every shape: long shared prefixes, prefixes of each other, NUL bytes, non-ASCII")
    func sortedNamesOfEveryShape() async {
        var random = SeededGenerator(seed: 79)
        let stems = ["authority/issued/1796000000000/", "authority/issued/179600000", "authority/tokens/", "a", "", "ab\u{0}", "é/", "ü", "z"]
        let reference = await Self.checkSortedNames(steps: 20_000, bounds: stems + ["authority/", "b"], random: &random) { random in
            let stem = stems[random.below(stems.count)]
            let tail = random.below(4) == 0 ? "" : String(random.below(3_000), radix: 16)
            return stem + (random.below(5) == 0 ? String(tail.prefix(1)) : tail)
        }
        #expect(reference > 2 * SortedNames.chunkMax, "enough names for splits")
    }

    /// Random inserts and removals of `name()`s checked against a sorted
    /// array, with lookups, range scans (from a few repeated `bounds`,
    /// which the first-name memo keeps, and from any name) and full walks
    /// along the way; returns how many names were left.
    static func checkSortedNames(steps: Int, bounds: [String], random: inout SeededGenerator, _ name: (inout SeededGenerator) -> String) async -> Int {
        var names = SortedNames()
        // The model: a sorted array, searched by bisection (a linear
        // search and a sort per insert made these tests 30 s of CPU in a
        // debug build, holding the test pool's threads from every other test).
        var reference: [String] = []
        /// Where `name` is in `reference`, or would be inserted.
        func place(_ name: String) -> (index: Int, found: Bool) {
            var low = 0, high = reference.count
            while low < high {
                let middle = (low + high) / 2
                if reference[middle] < name { low = middle + 1 } else { high = middle }
            }
            return (low, low < reference.count && reference[low] == name)
        }
        /// The names in [from, to), in order.
        func range(_ from: String, _ to: String) -> ArraySlice<String> {
            let low = place(from).index, high = place(to).index
            return low < high ? reference[low..<high] : []
        }
        for step in 0..<steps {
            // CPU-bound: other tests' tasks (timers, network) run on this thread too.
            if step % 250 == 0 { await Task.yield() }
            let candidate = name(&random)
            let (index, found) = place(candidate)
            if random.chance(0.35) {
                let removed = names.remove(candidate)
                #expect(removed == found)
                if found { reference.remove(at: index) }
            } else {
                let inserted = names.insert(candidate)
                #expect(inserted == !found)
                if !found { reference.insert(candidate, at: index) }
            }
            if step % 5 == 0 {
                let probe = name(&random)
                let present = place(probe).found
                #expect(names.contains(probe) == present, "step \(step): \(probe)")
            }
            if step % 20 == 0 {
                // Scans from a few repeated bounds (more than the memo
                // keeps), answered from the memo once it has them.
                let from = bounds[random.below(bounds.count)], to = name(&random)
                let expected = Array(range(from, to).prefix(2))
                #expect(names.namesRemembering(from: from, to: to, limit: 2) == expected, "step \(step) from \(from)")
            }
            if step % 500 == 0 {
                #expect(names.count == reference.count)
                let from = name(&random), to = name(&random), limit = Int(random.below(50)) + 1
                let expected = range(from, to)
                #expect(names.names(from: from, to: to, limit: limit) == Array(expected.prefix(limit)), "step \(step)")
                #expect(names.names(from: from, to: to, limit: limit, reverse: true) == Array(expected.reversed().prefix(limit)), "step \(step)")
                var all: [String] = []
                names.forEach(from: "") { all.append($0); return true }
                #expect(all == reference)
                #expect(reference == reference.sorted(), "the model itself stays sorted")
                for probe in reference.prefix(50) { #expect(names.contains(probe), "\(probe)") }
            }
        }
        return reference.count
    }
}
