import Foundation
import Ledger
import Raft
import Testing
@testable import Storage

/// A mixed sequence of commands (creates, stale and fresh compare-and-sets,
/// deletes, bad names) drawn from a seed.
private func commands(seed: UInt64, count: Int) -> [LedgerCommand] {
    var random = SeededGenerator(seed: seed)
    return (0..<count).map { i in
        let name = random.chance(0.05) ? "Bad Name" : "docs/\(random.below(6))"
        let expected: UInt64? = random.chance(0.3) ? nil : UInt64(random.below(4))
        let operation: LedgerCommand.Operation = random.chance(0.2)
            ? .deleteDocument(name: name, expectedVersion: expected)
            : .putDocument(name: name, format: random.chance(0.5) ? .json : .yaml, content: Array("{\"i\":\(i)}".utf8), expectedVersion: expected)
        return LedgerCommand(timeMillis: UInt64(1_000 + i), actor: "actor-\(random.below(3))", requestID: "r\(i)", operation: operation)
    }
}

@Suite("Ledger tables in SQLite")
struct LedgerStoreTests {
    @Test("SQLite and in-memory tables reach the same documents, outcomes and audit chain")
    func sameAsInMemory() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        var memory = InMemoryLedgerTables()
        let entries = commands(seed: 5, count: 300).enumerated().map { Entry(term: 2, index: LogIndex($0.offset + 1), payload: .command($0.element.encoded)) }
        var memoryOutcomes: [LedgerOutcome] = []
        for entry in entries { if let outcome = try Ledger.apply(entry, to: &memory) { memoryOutcomes.append(outcome) } }
        var storeOutcomes: [LedgerOutcome] = []
        for batch in stride(from: 0, to: entries.count, by: 37) {
            storeOutcomes += try store.apply(Array(entries[batch..<min(entries.count, batch + 37)]))
        }
        #expect(storeOutcomes == memoryOutcomes)
        #expect(storeOutcomes.contains { if case .rejected = $0.result { return true } else { return false } })
        for name in Set(memory.documents.keys).union((0..<6).map { "docs/\($0)" }) {
            #expect(try store.document(named: name) == memory.documents[name], "\(name)")
        }
        #expect(try store.auditRecords(limit: 10_000) == memory.audit)
        #expect(try store.verifyAudit() == AuditChain.verify(memory.audit))
        #expect(try store.ledgerAppliedIndex() == 300)
    }

    @Test("A restarted node resumes after the last applied entry instead of replaying")
    func restartResumes() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        try store.initialize(with: .bootstrap(voters: [1]))
        var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
        node.campaign()
        for command in commands(seed: 9, count: 40) { try node.propose(command.encoded) }
        while node.hasReady {
            let ready = node.ready()
            try store.persist(ready)
            _ = try store.apply(ready.committedEntries)
            node.advance()
        }
        let applied = try store.ledgerAppliedIndex()
        #expect(applied == node.commitIndex)

        let reopened = try temporary.open()
        let durable = try reopened.loadDurableState()
        #expect(durable.appliedIndex == applied)
        var restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: durable)
        let ready = restarted.ready()
        #expect(ready.committedEntries.isEmpty, "nothing already applied is handed out again")
        restarted.advance()
        #expect(try reopened.auditRecords(limit: 1000).count == 41, "the bootstrap membership and forty commands, each once")
    }

    @Test("A tampered audit record in the database is found by verification")
    func tamperedAuditIsFound() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        let entries = commands(seed: 1, count: 10).enumerated().map { Entry(term: 1, index: LogIndex($0.offset + 1), payload: .command($0.element.encoded)) }
        _ = try store.apply(entries)
        guard case .intact(count: 10, _) = try store.verifyAudit() else {
            Issue.record("the untouched chain should verify")
            return
        }
        try temporary.tamper("UPDATE ledger_audit SET actor = 'mallory' WHERE sequence = 6")
        #expect(try temporary.open().verifyAudit() == .broken(sequence: 6, reason: "its contents do not match its hash"))
    }

    @Test("A ledger snapshot installs on another node atomically with the Raft snapshot")
    func ledgerSnapshotInstalls() throws {
        let source = try TemporaryStore()
        let leader = try source.open()
        let entries = commands(seed: 3, count: 60).enumerated().map { Entry(term: 2, index: LogIndex($0.offset + 1), payload: .command($0.element.encoded)) }
        _ = try leader.apply(entries)
        let (index, data) = try leader.takeLedgerSnapshot()
        #expect(index == 60)

        let target = try TemporaryStore()
        let follower = try target.open()
        let snapshot = Snapshot(metadata: SnapshotMetadata(index: 60, term: 2, membership: Membership(voters: [1, 2, 3])), data: data)
        try follower.initialize(with: DurableState(hardState: HardState(term: 2, votedFor: 0, commitIndex: 60), snapshot: snapshot, entries: []))
        #expect(try follower.ledgerAppliedIndex() == 60)
        #expect(try follower.auditRecords(limit: 10_000) == leader.auditRecords(limit: 10_000))
        #expect(try follower.verifyAudit() == leader.verifyAudit())
        for name in (0..<6).map({ "docs/\($0)" }) { #expect(try follower.document(named: name) == leader.document(named: name)) }
        #expect(try follower.loadDurableState().appliedIndex == 60)
        // Its bytes are not stored: after a restart they are made again
        // from the tables, identical to what was installed.
        let reloaded = try target.open().loadDurableState().snapshot
        #expect(reloaded?.metadata == snapshot.metadata)
        #expect(reloaded?.data == data)
    }

    @Test("A damaged ledger snapshot is refused and nothing of it is installed")
    func damagedLedgerSnapshotIsRefused() throws {
        let source = try TemporaryStore()
        let leader = try source.open()
        _ = try leader.apply(commands(seed: 4, count: 20).enumerated().map { Entry(term: 1, index: LogIndex($0.offset + 1), payload: .command($0.element.encoded)) })
        var (_, data) = try leader.takeLedgerSnapshot()
        data[data.count - 5] ^= 0xFF // inside the last audit record's hash
        let target = try TemporaryStore()
        let follower = try target.open()
        let snapshot = Snapshot(metadata: SnapshotMetadata(index: 20, term: 1, membership: Membership(voters: [1])), data: data)
        let error = try #require(throws: StorageError.self) {
            try follower.initialize(with: DurableState(hardState: HardState(term: 1, votedFor: 0, commitIndex: 20), snapshot: snapshot, entries: []))
        }
        #expect(error.reason.contains("does not verify"))
        #expect(try follower.ledgerAppliedIndex() == 0)
        #expect(try follower.auditRecords().isEmpty)
        #expect(try follower.loadDurableState().snapshot == nil, "the Raft snapshot rolled back with it")
    }
}
