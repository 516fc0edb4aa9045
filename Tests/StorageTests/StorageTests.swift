import Foundation
import GRDB
import Raft
import Testing
@testable import Storage

/// A fresh database file in a directory of its own, removed afterwards.
final class TemporaryStore {
    let directory: URL
    let path: String

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-storage-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        path = directory.appendingPathComponent("raft.sqlite").path
    }

    func open(snapshotsHoldLedger: Bool = true) throws -> RaftStore { try RaftStore(path: path, snapshotsHoldLedger: snapshotsHoldLedger) }

    /// Runs raw SQL against the file, as damage from outside would.
    func tamper(_ sql: String) throws {
        let queue = try DatabaseQueue(path: path)
        try queue.write { db in try db.execute(sql: sql) }
    }

    deinit { try? FileManager.default.removeItem(at: directory) }
}

/// Drives a single-voter core, persisting every Ready into `store`.
func drive(_ node: inout RaftNode, _ store: RaftStore) throws {
    while node.hasReady {
        let ready = node.ready()
        try store.persist(ready)
        node.advance()
    }
}

/// A fresh store holding a single-voter node that led and wrote `commands`.
func storeWithCommands(_ commands: [[UInt8]], snapshotsHoldLedger: Bool = true) throws -> (TemporaryStore, RaftStore, RaftNode) {
    let temporary = try TemporaryStore()
    let store = try temporary.open(snapshotsHoldLedger: snapshotsHoldLedger)
    try store.initialize(with: .bootstrap(voters: [1]))
    var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
    node.campaign()
    for command in commands { try node.propose(command) }
    try drive(&node, store)
    return (temporary, store, node)
}

@Suite("SQLite Raft store")
struct RaftStoreTests {
    @Test("A node restarts from the store exactly where it stopped")
    func restartFromStore() throws {
        let temporary = try TemporaryStore()
        var store = try temporary.open()
        try store.initialize(with: .bootstrap(voters: [1]))
        var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
        node.campaign()
        try drive(&node, store)
        for i in 0..<50 { try node.propose(Array("value-\(i)".utf8)) }
        try drive(&node, store)
        let before = (node.term, node.lastIndex, node.commitIndex)
        #expect(before.1 == 52)

        store = try temporary.open() // as after a crash: only the file remains
        let durable = try store.loadDurableState()
        #expect(durable.entries.count == 52)
        #expect(durable.hardState.term == before.0)
        #expect(durable.hardState.votedFor == 1)
        var restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: durable)
        #expect((restarted.term, restarted.lastIndex, restarted.commitIndex) == before)
        #expect(restarted.entries(from: 1, through: 52) == node.entries(from: 1, through: 52))
        restarted.campaign()
        try drive(&restarted, store)
        try restarted.propose(Array("after".utf8))
        try drive(&restarted, store)
        #expect(try store.loadDurableState().entries.last?.payload == .command(Array("after".utf8)))
    }

    @Test("Entries from a new leader replace the stored suffix from their first index on")
    func conflictingSuffixIsReplaced() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        try store.initialize(with: .bootstrap(voters: [1, 2, 3]))
        var follower = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
        let old = (2...5).map { Entry(term: 2, index: $0, payload: .command([UInt8($0)])) }
        follower.step(Message(from: 2, to: 1, term: 2, body: .appendEntries(AppendEntries(prevLogIndex: 1, prevLogTerm: 1, entries: old, leaderCommit: 1))))
        try drive(&follower, store)
        let replacement = [Entry(term: 3, index: 3, payload: .command([33]))]
        follower.step(Message(from: 3, to: 1, term: 3, body: .appendEntries(AppendEntries(prevLogIndex: 2, prevLogTerm: 2, entries: replacement, leaderCommit: 1))))
        try drive(&follower, store)
        let stored = try store.loadDurableState().entries
        #expect(stored.map(\.index) == [1, 2, 3])
        #expect(stored.last == replacement.first)
    }

    @Test("Compaction keeps the entries after the snapshot and the snapshot itself")
    func compaction() throws {
        let (temporary, store, written) = try storeWithCommands((0..<10).map { i in [UInt8(i)] }, snapshotsHoldLedger: false)
        var node = written
        let metadata = try node.compactLog(through: 7, snapshotData: Array("state at 7".utf8))
        try store.compact(through: metadata, data: Array("state at 7".utf8))
        let durable = try temporary.open(snapshotsHoldLedger: false).loadDurableState()
        #expect(durable.snapshot?.metadata == metadata)
        #expect(durable.snapshot?.data == Array("state at 7".utf8))
        #expect(durable.entries.map(\.index) == Array(8...12))
        let restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 3), durable: durable)
        #expect(restarted.snapshotIndex == 7)
        #expect(restarted.lastIndex == 12)
        #expect(restarted.membership.voters == [1])
    }

    @Test("An installed snapshot replaces the whole stored log")
    func snapshotInstallReplacesLog() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open(snapshotsHoldLedger: false) // opaque snapshot bytes here
        try store.initialize(with: .bootstrap(voters: [1, 2, 3]))
        var follower = try RaftNode(configuration: Configuration(id: 2, randomSeed: 1), durable: try store.loadDurableState())
        let snapshot = Snapshot(metadata: SnapshotMetadata(index: 40, term: 3, membership: Membership(voters: [1, 2, 3])), data: [9, 9])
        follower.step(Message(from: 1, to: 2, term: 3, body: .installSnapshot(snapshot)))
        try drive(&follower, store)
        let durable = try temporary.open(snapshotsHoldLedger: false).loadDurableState()
        #expect(durable.snapshot == snapshot)
        #expect(durable.entries.isEmpty)
        #expect(durable.hardState.commitIndex == 40)
    }

    @Test("A damaged entry stops the node with the file, the index and what to do")
    func corruptEntryIsRefused() throws {
        let (temporary, _, _) = try storeWithCommands((0..<5).map { i in Array("v\(i)".utf8) })
        try temporary.tamper("UPDATE raft_entry SET payload = X'01020000007639' WHERE log_index = 4")
        let error = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
        #expect(error.code == .corruptEntry)
        #expect(error.reason.contains(temporary.path))
        #expect(error.reason.contains("entry 4"))
        #expect(error.reason.contains("new member"))
    }

    @Test("A hole in the log or a commit index past its end is refused, never skipped")
    func truncatedLogIsRefused() throws {
        let (temporary, _, _) = try storeWithCommands((0..<5).map { i in [UInt8(i)] })
        try temporary.tamper("DELETE FROM raft_entry WHERE log_index = 3")
        let gap = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
        #expect(gap.code == .logGap)
        #expect(gap.reason.contains("from index 2 to 4"))

        try temporary.tamper("DELETE FROM raft_entry WHERE log_index >= 3")
        let lost = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
        #expect(lost.code == .logGap)
        #expect(lost.reason.contains("commit index"))
    }

    @Test("Initializing a store that already holds state is refused and changes nothing")
    func initializeTwiceIsRefused() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        try store.initialize(with: .bootstrap(voters: [1, 2, 3]))
        #expect(throws: StorageError.self) { try store.initialize(with: .bootstrap(voters: [7])) }
        #expect(try store.loadDurableState().entries.first?.payload == .configChange(.bootstrap(voters: [1, 2, 3])))
    }

    @Test("CRC-32C matches the standard check value")
    func crcCheckValue() {
        var crc = CRC32C()
        crc.update(Array("123456789".utf8))
        #expect(crc.value == 0xE306_9283)
        // Eight bytes a step agrees with the definition, bit by bit, at
        // every length and alignment, and across split updates.
        func bitwise(_ bytes: [UInt8]) -> UInt32 {
            var crc: UInt32 = 0xFFFF_FFFF
            for byte in bytes {
                crc ^= UInt32(byte)
                for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
            }
            return crc ^ 0xFFFF_FFFF
        }
        var random = SeededGenerator(seed: 3)
        for length in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1_000] {
            let bytes = (0..<(length + 3)).map { _ in UInt8.random(in: 0...255, using: &random) }
            for offset in 0..<3 {
                var whole = CRC32C()
                whole.update(bytes[offset..<(offset + length)])
                #expect(whole.value == bitwise(Array(bytes[offset..<(offset + length)])), "length \(length), offset \(offset)")
            }
            var split = CRC32C()
            split.update(bytes.prefix(length / 3))
            split.update(bytes[(length / 3)..<length])
            #expect(split.value == bitwise(Array(bytes.prefix(length))))
        }
        var number = CRC32C()
        number.update(UInt64(0x0807_0605_0403_0201))
        #expect(number.value == bitwise([1, 2, 3, 4, 5, 6, 7, 8]), "a UInt64 is its eight little-endian bytes")
    }
}
