import Foundation
import Raft
import Testing
import TestSupport
@testable import Storage

/// Between compactions a node keeps only the newest payloads in memory;
/// older entries are read back from the write-ahead log for a peer that lags.
@Suite("Raft store: entries read back from the write-ahead log", .onOwnThreads)
struct ReleasedEntriesTests {
    private static let payload = [UInt8](repeating: 7, count: 300)

    @Test("Entries read back match what was written, across files and after a restart")
    func readBackAcrossFilesAndRestart() throws {
        let (temporary, store, node) = try storeWithCommands((0..<40).map { i in [UInt8(i)] + Self.payload }, segmentBytesMax: 2_000)
        #expect(try temporary.logFiles().count > 4, "small files: the log spans several")
        let written = node.entries(from: 1, through: node.lastIndex)
        #expect(try store.logEntries(from: 1, through: node.lastIndex) == written)
        #expect(try store.logEntries(from: 17, through: 23) == Array(written[16..<23]))
        #expect(try store.logEntries(from: node.lastIndex, through: node.lastIndex) == [written.last!])
        let reopened = try temporary.open(segmentBytesMax: 2_000)
        _ = try reopened.loadDurableState()
        #expect(try reopened.logEntries(from: 1, through: node.lastIndex) == written, "the places are found again when the log is replayed")
        #expect(throws: StorageError.self) { try reopened.logEntries(from: 40, through: node.lastIndex + 1) }
    }

    @Test("After a new leader replaced a suffix, the replacement is what reads back; the replaced entries are gone")
    func readBackAfterSuffixReplacement() throws {
        let temporary = try TemporaryStore()
        var (store, follower) = try followerHolding(through: 9, temporary)
        let first = follower.entries(from: 2, through: 9)
        let replacement = (5...6).map { Entry(term: 3, index: $0, payload: .command([UInt8(50 + $0)])) }
        follower.step(Message(from: 3, to: 1, term: 3, body: .appendEntries(AppendEntries(prevLogIndex: 4, prevLogTerm: 2, entries: replacement, leaderCommit: 1))))
        try drive(&follower, store)
        #expect(try store.logEntries(from: 2, through: 6) == Array(first[0..<3]) + replacement)
        #expect(throws: StorageError.self) { try store.logEntries(from: 6, through: 7) }
        let reopened = try temporary.open()
        _ = try reopened.loadDurableState()
        #expect(try reopened.logEntries(from: 2, through: 6) == Array(first[0..<3]) + replacement)
    }

    @Test("The core releases only applied, durable commands, keeps their sizes, and the store fills them back exactly")
    func releaseAndFill() throws {
        let (temporary, store, written) = try storeWithCommands((0..<40).map { i in [UInt8(i)] + Self.payload }, segmentBytesMax: 2_000)
        var node = written
        let original = node.entries(from: 1, through: node.lastIndex)
        #expect(node.releasePayloads(through: 1_000) == 40, "the 40 commands; the bootstrap and no-op entries stay")
        #expect(node.payloadsReleasedThrough == node.appliedIndex)
        var entries = node.entries(from: 1, through: node.lastIndex)
        #expect(entries.filter { $0.payload.isReleased }.count == 40)
        #expect(entries.map(\.byteCount) == original.map(\.byteCount), "flow control sees the same sizes")
        #expect(try store.fillReleased(&entries) == 40)
        #expect(entries == original)

        // Not past what is applied: a new command stays until it is.
        try node.propose([1, 2, 3])
        let ready = node.ready()
        try store.persist(ready)
        #expect(node.releasePayloads(through: 1_000) == 0, "not yet marked stable and applied")
        node.advance()
        try drive(&node, store)
        #expect(node.releasePayloads(through: 1_000) == 1)

        // What reads back must be the entry that was released.
        var forged = node.entries(from: 30, through: 32)
        forged[1].term += 1
        let error = try #require(throws: StorageError.self) { _ = try store.fillReleased(&forged) }
        #expect(error.code == .corruptEntry)
        _ = temporary
    }

    /// A leader sends its new entries before writing them (in parallel with
    /// replication), so an AppendEntries to a peer that lags can run from
    /// released entries to ones the log does not hold yet: only the
    /// released ones are read back.
    @Test("Released entries are filled in a message that also carries entries not written yet")
    func fillBeforeTheTailIsWritten() throws {
        let (temporary, store, written) = try storeWithCommands((0..<40).map { i in [UInt8(i)] + Self.payload }, segmentBytesMax: 2_000)
        var node = written
        let original = node.entries(from: 1, through: node.lastIndex)
        #expect(node.releasePayloads(through: 1_000) == 40)
        try node.propose([9, 9, 9])
        let ready = node.ready() // not persisted: the new entry is only in memory
        #expect(ready.entries.count == 1)
        var entries = node.entries(from: 20, through: node.lastIndex)
        #expect(entries.last?.payload == .command([9, 9, 9]))
        #expect(try store.fillReleased(&entries) == entries.count - 1)
        #expect(Array(entries.dropLast()) == Array(original[19...]) && entries.last?.payload == .command([9, 9, 9]))
        _ = temporary
    }

    @Test("Damage found when reading back is an error naming the file, never wrong bytes")
    func damageOnReadBack() throws {
        let (temporary, store, node) = try storeWithCommands((0..<40).map { i in [UInt8(i)] + Self.payload }, segmentBytesMax: 2_000)
        let files = try temporary.logFiles()
        // Some batches hold only a hard state; flip a bit in the last byte of every one.
        let victims = try batches(in: files[1])
        #expect(victims.count > 2)
        try temporary.modify(files[1]) { bytes in
            for victim in victims { bytes[victim.offset + victim.length - 1] ^= 0x01 }
        }
        let error = try #require(throws: StorageError.self) { _ = try store.logEntries(from: 1, through: node.lastIndex) }
        #expect(error.code == .corruptEntry)
        #expect(error.reason.contains(files[1]))
        #expect(error.reason.contains("checksum"))
    }

    @Test("A compaction forgets the places of the files it deletes; the entries after it still read back")
    func readBackAfterCompaction() throws {
        let (temporary, store, written) = try storeWithCommands((0..<40).map { i in [UInt8(i)] + Self.payload }, snapshotsHoldLedger: false,
                                                                segmentBytesMax: 2_000)
        var node = written
        let original = node.entries(from: 31, through: node.lastIndex)
        let metadata = try node.compactLog(through: 30, snapshotData: [1])
        try store.compact(through: metadata, data: [1])
        #expect(try store.logEntries(from: 31, through: node.lastIndex) == original)
        #expect(throws: StorageError.self) { try store.logEntries(from: 2, through: 3) }
        _ = temporary
    }
}
