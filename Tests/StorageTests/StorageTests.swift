import Foundation
import Ledger
import Raft
import Testing
import TestSupport
@testable import Storage

/// A fresh store directory, removed afterwards.
final class TemporaryStore {
    let directory: URL
    var path: String { directory.path }
    var walDirectory: String { directory.appendingPathComponent("wal").path }

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-storage-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    func open(snapshotsHoldLedger: Bool = true, segmentBytesMax: Int = 64 << 20) throws -> RaftStore {
        try RaftStore(directory: path, snapshotsHoldLedger: snapshotsHoldLedger, segmentBytesMax: segmentBytesMax)
    }

    /// The log's files, oldest first.
    func logFiles() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: walDirectory).filter { $0.hasSuffix(".wal") }.sorted().map { "\(walDirectory)/\($0)" }
    }

    /// Changes bytes of a file from outside, as damage would.
    func modify(_ file: String, _ change: (inout [UInt8]) -> Void) throws {
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        change(&bytes)
        try Data(bytes).write(to: URL(fileURLWithPath: file))
    }

    var auditDirectory: String { directory.appendingPathComponent("audit").path }

    /// Changes audit record `sequence` where it lies in the audit log's
    /// files, as a tamperer who knows the format would: the batch's
    /// checksum is made again. The change must keep the record's length.
    func tamperAudit(sequence: UInt64, _ change: (inout AuditRecord) -> Void) throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: auditDirectory).filter { $0.hasSuffix(".audit") }.sorted()
        for name in files {
            let path = "\(auditDirectory)/\(name)"
            var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
            let (bodies, _, _) = try AuditLog.batches.walk(bytes, from: AuditLog.fileHeaderBytes, isLast: true) { StorageError(code: .corruptState, reason: $0) }
            for body in bodies {
                var reader = BinaryReader(Array(bytes[body]))
                let first = try reader.readUInt64("first")
                let count = try reader.readUInt32("count")
                guard sequence >= first, sequence < first + UInt64(count) else { continue }
                var records: [AuditRecord] = []
                for _ in 0..<count { records.append(try LedgerSnapshot.decodeRecord(&reader)) }
                change(&records[Int(sequence - first)])
                var w = BinaryWriter(capacity: body.count)
                w.write(first)
                w.write(count)
                for record in records { LedgerSnapshot.encode(record, into: &w) }
                precondition(w.bytes.count == body.count, "a tampered record must keep its length")
                var framed: [UInt8] = []
                AuditLog.batches.frame(w.bytes, into: &framed)
                bytes.replaceSubrange((body.lowerBound - BatchFraming.headerBytes)..<body.upperBound, with: framed)
                try Data(bytes).write(to: URL(fileURLWithPath: path))
                return
            }
        }
        Issue.record("audit record \(sequence) is in no file")
    }

    /// Rewrites the whole audit log (a closed store's) with `change` made
    /// to its records, valid checksums and all.
    func rewriteAudit(_ change: (inout [AuditRecord]) -> Void) throws {
        let log = try AuditLog.open(directory: auditDirectory)
        var records = try log.records(after: 0, limit: .max)
        change(&records)
        try log.replaceAll(records)
    }

    deinit {
        // Old log files are unlinked on a queue of the process's: one
        // unlinked there while the removal below walks the directory made
        // it fail part-way, leaving the directory (a CI run left LOCK and
        // the newest log file in /tmp).
        WriteAheadLog.waitForRemovals()
        try? FileManager.default.removeItem(at: directory)
    }
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
func storeWithCommands(_ commands: [[UInt8]], snapshotsHoldLedger: Bool = true, segmentBytesMax: Int = 64 << 20) throws -> (TemporaryStore, RaftStore, RaftNode) {
    let temporary = try TemporaryStore()
    let store = try temporary.open(snapshotsHoldLedger: snapshotsHoldLedger, segmentBytesMax: segmentBytesMax)
    try store.initialize(with: .bootstrap(voters: [1]))
    var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
    node.campaign()
    for command in commands {
        try node.propose(command)
        try drive(&node, store)
    }
    try drive(&node, store)
    return (temporary, store, node)
}

/// Where each batch of a log file starts, and how long it is (header included).
/// The batches of a log file, up to its end or the zeros a direct write
/// pads the newest file with.
func batches(in file: String) throws -> [(offset: Int, length: Int)] {
    let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
    var result: [(Int, Int)] = []
    var offset = WriteAheadLog.fileHeaderBytes
    func field(_ at: Int) -> Int { bytes[at..<(at + 4)].enumerated().reduce(0) { $0 | Int($1.element) << ($1.offset * 8) } }
    while offset + WriteAheadLog.batchHeaderBytes <= bytes.count, field(offset) == Int(WriteAheadLog.batchMagic) {
        let length = field(offset + 4)
        result.append((offset, WriteAheadLog.batchHeaderBytes + length))
        offset += WriteAheadLog.batchHeaderBytes + length
    }
    return result
}

/// A follower (node 1 of three) that stored entries 2...`last` of term 2
/// from leader 2 (entry N's command is the byte N).
func followerHolding(through last: LogIndex, _ temporary: TemporaryStore) throws -> (RaftStore, RaftNode) {
    let store = try temporary.open()
    try store.initialize(with: .bootstrap(voters: [1, 2, 3]))
    var follower = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
    let entries = (2...last).map { Entry(term: 2, index: $0, payload: .command([UInt8($0)])) }
    follower.step(Message(from: 2, to: 1, term: 2, body: .appendEntries(AppendEntries(prevLogIndex: 1, prevLogTerm: 1, entries: entries, leaderCommit: 1))))
    try drive(&follower, store)
    return (store, follower)
}

/// Where a log file's last batch ends (its length less any padding).
func logicalLength(_ file: String) throws -> Int {
    try batches(in: file).last.map { $0.offset + $0.length } ?? WriteAheadLog.fileHeaderBytes
}

@Suite("Raft store: the write-ahead log", .onOwnThreads)
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

        store = try temporary.open() // as after a crash: only the files remain
        let durable = try store.loadDurableState()
        #expect(durable.entries.count == 52)
        #expect(durable.hardState.term == before.0)
        #expect(durable.hardState.votedFor == 1)
        var restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 2), durable: durable)
        #expect((restarted.term, restarted.lastIndex) == (before.0, before.1))
        #expect(restarted.commitIndex <= before.2, "a commit index only ever comes back behind, never ahead")
        #expect(restarted.entries(from: 1, through: 52) == node.entries(from: 1, through: 52))
        restarted.campaign()
        try drive(&restarted, store)
        try restarted.propose(Array("after".utf8))
        try drive(&restarted, store)
        #expect(try temporary.open().loadDurableState().entries.last?.payload == .command(Array("after".utf8)))
    }


    @Test("A Ready that only advances the commit index writes nothing; new entries or a new term are synced at once")
    func commitOnlyReadysWriteNothing() throws {
        let temporary = try TemporaryStore()
        let (store, follower0) = try followerHolding(through: 5, temporary)
        var follower = follower0
        let file = try #require(try temporary.logFiles().last)
        let size = try logicalLength(file)
        follower.step(Message(from: 2, to: 1, term: 2, body: .appendEntries(AppendEntries(prevLogIndex: 5, prevLogTerm: 2, entries: [], leaderCommit: 5))))
        #expect(follower.hasReady)
        let ready = follower.ready()
        #expect(ready.hardState?.commitIndex == 5 && ready.entries.isEmpty)
        try store.persist(ready)
        follower.advance()
        #expect(try logicalLength(file) == size, "the commit index waits for the next synced write")
        follower.step(Message(from: 2, to: 1, term: 2, body: .appendEntries(AppendEntries(prevLogIndex: 5, prevLogTerm: 2,
            entries: [Entry(term: 2, index: 6, payload: .command([6]))], leaderCommit: 5))))
        try drive(&follower, store)
        #expect(try logicalLength(file) > size)
        let durable = try temporary.open().loadDurableState()
        #expect(durable.hardState.commitIndex == 5, "it went out with the entry")
        #expect(durable.entries.last?.index == 6)
    }

    @Test("Entries from a new leader replace the stored suffix from their first index on")
    func conflictingSuffixIsReplaced() throws {
        let temporary = try TemporaryStore()
        let (store, follower0) = try followerHolding(through: 5, temporary)
        var follower = follower0
        let replacement = [Entry(term: 3, index: 3, payload: .command([33]))]
        follower.step(Message(from: 3, to: 1, term: 3, body: .appendEntries(AppendEntries(prevLogIndex: 2, prevLogTerm: 2, entries: replacement, leaderCommit: 1))))
        try drive(&follower, store)
        let stored = try temporary.open().loadDurableState().entries
        #expect(stored.map(\.index) == [1, 2, 3])
        #expect(stored.last == replacement.first)
    }

    @Test("Compaction keeps the entries after the snapshot and the snapshot itself, and deletes the files it covers")
    func compaction() throws {
        let payload = [UInt8](repeating: 7, count: 300)
        let (temporary, store, written) = try storeWithCommands((0..<40).map { i in [UInt8(i)] + payload }, snapshotsHoldLedger: false,
                                                                segmentBytesMax: 2_000)
        var node = written
        let filesBefore = try temporary.logFiles()
        #expect(filesBefore.count > 4, "small files: the log spans several")
        let metadata = try node.compactLog(through: 30, snapshotData: Array("state at 30".utf8))
        try store.compact(through: metadata, data: Array("state at 30".utf8))
        store.waitForLogFileRemovals()
        let filesAfter = try temporary.logFiles()
        #expect(filesAfter.count < filesBefore.count)
        #expect(filesAfter.last == filesBefore.last)
        let durable = try temporary.open(snapshotsHoldLedger: false, segmentBytesMax: 2_000).loadDurableState()
        #expect(durable.snapshot?.metadata == metadata)
        #expect(durable.snapshot?.data == Array("state at 30".utf8))
        #expect(durable.entries.map(\.index) == Array(31...42))
        let restarted = try RaftNode(configuration: Configuration(id: 1, randomSeed: 3), durable: durable)
        #expect(restarted.snapshotIndex == 30)
        #expect(restarted.lastIndex == 42)
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
        #expect(durable.hardState.term == 3)
    }

    @Test("A write a crash cut short at the end of the newest file is dropped; nothing synced before it is")
    func tornTailIsDropped() throws {
        let (temporary, _, node) = try storeWithCommands((0..<5).map { i in Array("v\(i)".utf8) })
        let file = try #require(try temporary.logFiles().last)
        let last = try #require(try batches(in: file).last)
        // Half of the last batch made it to the disk.
        try temporary.modify(file) { $0.removeSubrange((last.offset + last.length / 2)...) }
        let durable = try temporary.open().loadDurableState()
        #expect(durable.entries.count < Int(node.lastIndex))
        #expect(try FileSystem.fileLength(file) == last.offset, "the torn batch is cut off the file")
        // Garbage where the next batch would start is a torn write too.
        try temporary.modify(file) { $0 += [0x57, 0x41, 0x42, 0x31, 0xFF, 0, 0, 0, 1, 2, 3] }
        let again = try temporary.open().loadDurableState()
        #expect(again.entries == durable.entries)
    }

    @Test("A damaged batch anywhere else stops the node with the file, where, and what to do")
    func corruptBatchIsRefused() throws {
        let (temporary, _, _) = try storeWithCommands((0..<5).map { i in Array("v\(i)".utf8) })
        let file = try #require(try temporary.logFiles().last)
        let all = try batches(in: file)
        #expect(all.count > 3)
        let victim = all[all.count - 3] // valid batches follow it
        try temporary.modify(file) { $0[victim.offset + WriteAheadLog.batchHeaderBytes + 2] ^= 0x40 }
        let error = try #require(throws: StorageError.self) { try temporary.open().loadDurableState() }
        #expect(error.code == .corruptEntry)
        #expect(error.reason.contains(file))
        #expect(error.reason.contains("byte \(victim.offset)"))
        #expect(error.reason.contains("new member"))
    }

    @Test("Damage in an older file is refused even at its end")
    func corruptOlderFileIsRefused() throws {
        let (temporary, _, _) = try storeWithCommands((0..<30).map { i in [UInt8(i)] + [UInt8](repeating: 1, count: 200) }, segmentBytesMax: 1_500)
        let files = try temporary.logFiles()
        #expect(files.count >= 3)
        let victim = try #require(try batches(in: files[0]).last)
        try temporary.modify(files[0]) { $0.removeLast(victim.length / 2) }
        let error = try #require(throws: StorageError.self) { try temporary.open(segmentBytesMax: 1_500).loadDurableState() }
        #expect(error.code == .corruptEntry)
        #expect(error.reason.contains(files[0]))
    }

    @Test("A missing file or a hole in the log is refused, never skipped")
    func holesAreRefused() throws {
        let (temporary, _, _) = try storeWithCommands((0..<30).map { i in [UInt8(i)] + [UInt8](repeating: 1, count: 200) }, segmentBytesMax: 1_500)
        let files = try temporary.logFiles()
        try FileManager.default.removeItem(atPath: files[1])
        let missing = try #require(throws: StorageError.self) { try temporary.open(segmentBytesMax: 1_500).loadDurableState() }
        #expect(missing.code == .logGap)
        #expect(missing.reason.contains("is missing"))

        // The oldest file gone: the log no longer starts at its beginning.
        let (other, _, _) = try storeWithCommands((0..<30).map { i in [UInt8(i)] + [UInt8](repeating: 1, count: 200) }, segmentBytesMax: 1_500)
        try FileManager.default.removeItem(atPath: try other.logFiles()[0])
        let gap = try #require(throws: StorageError.self) { try other.open(segmentBytesMax: 1_500).loadDurableState() }
        #expect(gap.code == .logGap)
        #expect(gap.reason.contains("not right after the snapshot at 0"))
    }

    @Test("Initializing a store that already holds state is refused and changes nothing")
    func initializeTwiceIsRefused() throws {
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        try store.initialize(with: .bootstrap(voters: [1, 2, 3]))
        #expect(throws: StorageError.self) { try store.initialize(with: .bootstrap(voters: [7])) }
        #expect(try store.loadDurableState().entries.first?.payload == .configChange(.bootstrap(voters: [1, 2, 3])))
    }

    @Test("A log that is only a first file cut short in its header (an older build's crash while starting it) is no state: the store is initialized over it")
    func lonePartialFileIsNoState() throws {
        let temporary = try TemporaryStore()
        try FileManager.default.createDirectory(atPath: temporary.walDirectory, withIntermediateDirectories: true)
        let partial = "\(temporary.walDirectory)/\(WriteAheadLog.hex(1)).wal"
        try Data(WriteAheadLog.fileMagic.prefix(5)).write(to: URL(fileURLWithPath: partial))
        let store = try temporary.open()
        #expect(!store.hasState, "a start that wrote nothing holds nothing")
        try store.initialize(with: .bootstrap(voters: [1, 2, 3]))
        #expect(try temporary.open().loadDurableState().entries.map(\.payload) == [.configChange(.bootstrap(voters: [1, 2, 3]))])
        // With a whole first file beside it, a short second one is a file being started: the log is there.
        try Data(WriteAheadLog.fileMagic.prefix(5)).write(to: URL(fileURLWithPath: "\(temporary.walDirectory)/\(WriteAheadLog.hex(2)).wal"))
        #expect(try temporary.open().hasState)
    }

    @Test("Initializing that stops after the log's first file exists leaves the store uninitialized, and the next start initializes it whole")
    func interruptedInitializeLeavesNoState() throws {
        struct Interrupted: Error {}
        let temporary = try TemporaryStore()
        let store = try temporary.open()
        store.afterStagedLogStarted = { throw Interrupted() }
        #expect(throws: Interrupted.self) { try store.initialize(with: .bootstrap(voters: [1, 2, 3])) }
        // As after a crash there: a new process opens the same directory.
        let again = try temporary.open()
        #expect(!again.hasState, "a log without its first state would start a founder with no voters")
        try again.initialize(with: .bootstrap(voters: [1, 2, 3]))
        #expect(!FileManager.default.fileExists(atPath: temporary.walDirectory + "/.new"), "the staging directory is gone, its file moved into place")
        let reopened = try temporary.open()
        #expect(reopened.hasState)
        #expect(try reopened.loadDurableState().entries.map(\.payload) == [.configChange(.bootstrap(voters: [1, 2, 3]))])
    }

    @Test("A wal that is a symbolic link to another disk's directory (with lost+found, as a mount point has) is initialized, written and read back through the link, which stays")
    func walElsewhere() throws {
        let temporary = try TemporaryStore()
        let elsewhere = temporary.path + "-elsewhere"
        defer { try? FileManager.default.removeItem(atPath: elsewhere) }
        try FileManager.default.createDirectory(atPath: elsewhere + "/lost+found", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: temporary.path, withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: temporary.walDirectory, withDestinationPath: elsewhere)
        let store = try temporary.open()
        #expect(!store.hasState)
        try store.initialize(with: .bootstrap(voters: [1]))
        var node = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: try store.loadDurableState())
        node.campaign()
        for value in 0..<5 { try node.propose([UInt8(value)]) }
        try drive(&node, store)

        let again = try temporary.open()
        #expect(again.hasState)
        let commands = try again.loadDurableState().entries.compactMap { entry -> [UInt8]? in
            if case .command(let bytes) = entry.payload { return bytes }
            return nil
        }
        #expect(commands == (0..<5).map { [UInt8($0)] })
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: temporary.walDirectory) == elsewhere, "still a link")
        let files = try FileManager.default.contentsOfDirectory(atPath: elsewhere).sorted()
        #expect(files.contains("lost+found") && files.contains { $0.hasSuffix(".wal") }, "\(files)")
        #expect(!files.contains(".new"))
    }

    @Test("A data directory of the SQLite-log format is refused with what to do")
    func olderFormatIsRefused() throws {
        let temporary = try TemporaryStore()
        try Data("SQLite format 3".utf8).write(to: temporary.directory.appendingPathComponent("raft.sqlite"))
        let error = try #require(throws: StorageError.self) { try temporary.open() }
        #expect(error.code == .schemaMismatch)
        #expect(error.reason.contains("cluster/down --wipe"))
    }

    @Test("CRC-32C matches the standard check value, with the tables and with the CPU's instruction", arguments: [false, true])
    func crcCheckValue(hardware: Bool) throws {
        if hardware {
            // The instruction is found where the CPU says it has it.
            let flags = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
            if flags.contains(" sse4_2") || flags.contains(" crc32") { #expect(CRC32C.hardwareAvailable) }
            guard CRC32C.hardwareAvailable else { return }
        }
        var crc = CRC32C(hardware: hardware)
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
                var whole = CRC32C(hardware: hardware)
                whole.update(bytes[offset..<(offset + length)])
                #expect(whole.value == bitwise(Array(bytes[offset..<(offset + length)])), "length \(length), offset \(offset)")
            }
            var split = CRC32C(hardware: hardware)
            split.update(bytes.prefix(length / 3))
            split.update(bytes[(length / 3)..<length])
            #expect(split.value == bitwise(Array(bytes.prefix(length))))
        }
        var number = CRC32C(hardware: hardware)
        number.update(UInt64(0x0807_0605_0403_0201))
        #expect(number.value == bitwise([1, 2, 3, 4, 5, 6, 7, 8]), "a UInt64 is its eight little-endian bytes")
    }
}
