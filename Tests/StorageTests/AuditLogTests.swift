import Foundation
import GRDB
import Ledger
import Raft
import Testing
import TestSupport
@testable import Storage


/// A chain of `count` records from sequence `from` on (hashes linked from
/// `previous`), with texts of varying length.
private func chain(_ count: Int, from: UInt64 = 1, previous: [UInt8] = AuditRecord.genesisHash, seed: UInt64 = 1) -> [AuditRecord] {
    var generator = SeededGenerator(seed: seed)
    var previous = previous
    return (0..<count).map { position in
        let sequence = from + UInt64(position)
        var record = AuditRecord(sequence: sequence, logIndex: sequence * 2, timeMillis: 1_000 + sequence, actor: "node-\(sequence % 3)",
                                 action: "identity.issue", target: "spiffe://example.org/job/\(sequence)",
                                 result: String(repeating: "r", count: Int.random(in: 1...400, using: &generator)), previousHash: previous)
        record.hash = record.computedHash
        previous = record.hash
        return record
    }
}

/// `records` in batches of 50, in files of 32 KiB, synced.
private func writeInBatches(_ records: [AuditRecord], to directory: String) throws {
    let log = try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10)
    for start in stride(from: 0, to: records.count, by: 50) { try log.append(Array(records[start..<min(start + 50, records.count)])) }
    try log.sync()
}

private func auditFiles(_ directory: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".audit") }.sorted()
}

@Suite("Audit log files", .onOwnThreads)
struct AuditLogTests {
    @Test("Records appended across several files read back the same after reopening, in pages from any sequence")
    func appendAndReadBack() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let records = chain(3_000)
        do {
            let log = try AuditLog.open(directory: directory, segmentBytesMax: 64 << 10)
            var start = 0
            var sizes = [1, 7, 250, 3, 1_000]
            while start < records.count {
                let size = min(sizes.removeFirst(), records.count - start)
                sizes.append(size)
                try log.append(Array(records[start..<(start + size)]))
                start += size
            }
            #expect(log.lastSequence == 3_000)
            #expect(try log.records(after: 0, limit: .max) == records, "before reopening")
        }
        #expect(try auditFiles(directory).count > 5, "small files: the chain spans several")
        let log = try AuditLog.open(directory: directory, segmentBytesMax: 64 << 10)
        #expect(log.lastSequence == 3_000)
        #expect(try log.records(after: 0, limit: .max) == records)
        for after in [0, 1, 6, 257, 1_999, 2_999] as [UInt64] {
            #expect(try log.records(after: after, limit: 300) == Array(records.dropFirst(Int(after)).prefix(300)), "after \(after)")
        }
        #expect(try log.records(after: 3_000, limit: 10).isEmpty)
        #expect(try log.lastRecord() == records.last)
        // The next record continues the chain; a gap is refused and changes nothing.
        let gap = try #require(throws: StorageError.self) { try log.append(chain(1, from: 3_002)) }
        #expect(gap.reason.contains("audit record 3002 does not follow record 3000"), "\(gap)")
        try log.append(chain(1, from: 3_001))
        #expect(log.lastSequence == 3_001)
    }

    @Test("A torn write at the end of the newest file is cut off at opening; damage anywhere else is refused or found when read")
    func tornAndDamaged() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let records = chain(600)
        try writeInBatches(records, to: directory)
        let files = try auditFiles(directory).map { "\(directory)/\($0)" }
        #expect(files.count >= 3)
        // Half a batch's worth of bytes after the newest file's last batch.
        let newest = try #require(files.last)
        let length = try FileSystem.fileLength(newest)
        var torn: [UInt8] = []
        AuditLog.batches.frame(Array(repeating: 7, count: 400), into: &torn)
        try temporary.modify(newest) { bytes in
            let end = max(AuditLog.fileHeaderBytes, bytes.lastIndex { $0 != 0 }! + 1)
            bytes.replaceSubrange(end..<min(bytes.count, end + 200), with: torn.prefix(200))
        }
        let reopened = try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10)
        #expect(try reopened.records(after: 0, limit: .max) == records, "the torn bytes are gone, every record is there")
        #expect(try FileSystem.fileLength(newest) <= length)

        // A flipped byte inside an older file's batch body: found when that
        // batch is read, with the file named.
        try temporary.modify(files[0]) { $0[AuditLog.fileHeaderBytes + BatchFraming.headerBytes + 40] ^= 0x20 }
        let log = try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10)
        let damaged = try #require(throws: StorageError.self) { try log.records(after: 0, limit: 10) }
        #expect(damaged.reason.contains(files[0]) && damaged.reason.contains("fails its checksum"), "\(damaged)")
        // A batch header destroyed in an older file: refused at opening.
        try temporary.modify(files[0]) { $0[AuditLog.fileHeaderBytes] ^= 0xff }
        let refused = try #require(throws: StorageError.self) { try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10) }
        #expect(refused.code == .corruptState && refused.reason.contains("bad header"), "\(refused)")
        // A missing middle file: refused, naming it.
        try temporary.modify(files[0]) { $0[AuditLog.fileHeaderBytes] ^= 0xff }
        try FileManager.default.removeItem(atPath: files[1])
        let gap = try #require(throws: StorageError.self) { try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10) }
        #expect(gap.reason.contains("starts at record"), "\(gap)")
    }

    @Test("A power loss can lose an unsynced batch and keep later ones: the newest file is cut at the first bad batch, not refused (what follows is made again from the Raft log)")
    func lostMiddleBatch() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let records = chain(500)
        do {
            let log = try AuditLog.open(directory: directory, segmentBytesMax: 1 << 20)
            for start in stride(from: 0, to: records.count, by: 50) { try log.append(Array(records[start..<(start + 50)])) }
        }
        let files = try auditFiles(directory)
        #expect(files.count == 1, "ten batches in one file")
        let path = "\(directory)/\(try #require(files.first))"
        try temporary.modify(path) { bytes in
            // The third batch: a byte of its body flipped, as a block lost.
            var offset = AuditLog.fileHeaderBytes
            for _ in 0..<2 {
                let length = bytes[(offset + 4)..<(offset + 8)].withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self))) }
                offset += BatchFraming.headerBytes + length
            }
            bytes[offset + BatchFraming.headerBytes + 40] ^= 0x20
        }
        let length = try FileSystem.fileLength(path)
        let log = try AuditLog.open(directory: directory, segmentBytesMax: 1 << 20)
        #expect(try log.records(after: 0, limit: .max) == Array(records.prefix(100)), "the two batches before it, nothing after")
        #expect(log.lastSequence == 100)
        #expect(try FileSystem.fileLength(path) < length, "the rest cut off the file")
        // Appending goes on from there.
        try log.append(Array(records[100..<150]))
        #expect(try AuditLog.open(directory: directory, segmentBytesMax: 1 << 20).records(after: 0, limit: .max) == Array(records.prefix(150)))
    }

    @Test("A newest file left without its whole header (the process stopped while making it, before any record went in) is dropped at opening; the file before it goes on")
    func headerlessNewestFile() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let records = chain(300)
        try writeInBatches(records, to: directory)
        let files = try auditFiles(directory)
        let newest = try #require(files.last)
        let next = try #require(UInt64(newest.prefix(16), radix: 16)) + 1
        for bytes in [0, 10] {
            let path = "\(directory)/\(WriteAheadLog.hex(next)).audit"
            #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 0x57, count: bytes)))
            let reopened = try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10)
            #expect(try reopened.records(after: 0, limit: .max) == records, "with a \(bytes)-byte newest file")
            #expect(try auditFiles(directory) == files, "the headerless file was dropped")
        }
        let log = try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10)
        try log.append(chain(400).suffix(100))
        #expect(try AuditLog.open(directory: directory, segmentBytesMax: 32 << 10).records(after: 0, limit: .max) == chain(400))
    }

    @Test("Truncation keeps exactly the records through a sequence, inside a batch or at its edge, across files, and survives reopening")
    func truncation() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let records = chain(900)
        let log = try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10)
        for start in stride(from: 0, to: 900, by: 60) { try log.append(Array(records[start..<(start + 60)])) }
        let filesBefore = try auditFiles(directory).count
        for keep in [899, 840, 777, 400, 60, 1, 0] as [UInt64] {
            try log.truncate(after: keep)
            #expect(log.lastSequence == keep)
            #expect(!FileManager.default.fileExists(atPath: log.pendingPath), "removed once the records are written again")
            #expect(try log.records(after: 0, limit: .max) == Array(records.prefix(Int(keep))), "through \(keep)")
            let again = try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10)
            let lastRecord = try again.lastRecord()
            #expect(again.lastSequence == keep && lastRecord == records.prefix(Int(keep)).last, "reopened through \(keep)")
        }
        #expect(try auditFiles(directory).count < filesBefore, "later files were removed")
        // The chain goes on from where it was cut.
        try log.append(Array(records.prefix(100)))
        #expect(try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10).records(after: 0, limit: .max) == Array(records.prefix(100)))
    }

    @Test("A truncation stopped part-way is finished at opening: after the cut the kept records are written again; before it nothing changes; a damaged redo file is refused")
    func truncationStoppedPartWay() throws {
        let temporary = try TemporaryStore()
        let records = chain(600)
        func fresh(_ name: String) throws -> (String, AuditLog) {
            let directory = temporary.path + "/" + name
            let log = try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10)
            for start in stride(from: 0, to: 600, by: 60) { try log.append(Array(records[start..<(start + 60)])) }
            try log.sync()
            return (directory, log)
        }
        // The process stops right after the cut: record 421 is inside a
        // batch (421...480), so 421 went with it.
        let (directory, log) = try fresh("after-cut")
        let kept = try log.cut(after: 421)
        #expect(kept.map(\.sequence) == [421] && log.lastSequence == 420, "the batch is cut whole")
        #expect(FileManager.default.fileExists(atPath: log.pendingPath))
        let reopened = try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10)
        #expect(reopened.lastSequence == 421)
        #expect(try reopened.records(after: 0, limit: .max) == Array(records.prefix(421)))
        #expect(!FileManager.default.fileExists(atPath: reopened.pendingPath), "removed once written again")
        #expect(try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10).records(after: 0, limit: .max) == Array(records.prefix(421)))

        // Redo files planted in other directories, as a cut of the same
        // chain (or of another) left it.
        let (_, sourceLog) = try fresh("source")
        _ = try sourceLog.cut(after: 421)
        let redo = try Data(contentsOf: URL(fileURLWithPath: sourceLog.pendingPath))
        func plant(_ bytes: Data, in directory: String) throws {
            try bytes.write(to: URL(fileURLWithPath: directory + "/truncate.pending"))
        }

        // The process stops after the redo file is written, before the
        // cut: the chain is whole, kept as it is, the file removed.
        let (beforeCut, _) = try fresh("before-cut")
        try plant(redo, in: beforeCut)
        try Data("half".utf8).write(to: URL(fileURLWithPath: beforeCut + "/truncate.pending.tmp"))
        let whole = try AuditLog.open(directory: beforeCut, segmentBytesMax: 24 << 10)
        #expect(try whole.records(after: 0, limit: .max) == records)
        #expect(try FileManager.default.contentsOfDirectory(atPath: beforeCut).filter { !$0.hasSuffix(".audit") } == [], "redo and temporary files removed")

        // Refused, and left for whoever looks: a redo file that fails its
        // checksum, one of another chain, one the chain does not reach.
        var damaged = redo
        damaged[damaged.count / 2] ^= 0x40
        let otherRecords = chain(600, seed: 9)
        let otherLog = try AuditLog.open(directory: temporary.path + "/other-chain", segmentBytesMax: 24 << 10)
        try otherLog.append(otherRecords)
        let otherShort = try AuditLog.open(directory: temporary.path + "/other-short", segmentBytesMax: 24 << 10)
        try otherShort.append(Array(otherRecords.prefix(420)))
        let (short, shortLog) = try fresh("short")
        try shortLog.truncate(after: 300)
        for (bytes, directory, reason) in [(damaged, beforeCut, "fails its checksum"),
                                           (redo, temporary.path + "/other-chain", "the chain (through record 600) holds another record 421"),
                                           (redo, temporary.path + "/other-short", "they do not follow the chain's record 420"),
                                           (redo, short, "the chain ends at record 300")] {
            try plant(bytes, in: directory)
            #expect { try AuditLog.open(directory: directory, segmentBytesMax: 24 << 10) } throws: { error in
                "\(error)".contains(reason) && "\(error)".contains("truncate.pending")
            }
            #expect(FileManager.default.fileExists(atPath: directory + "/truncate.pending"), "kept: \(reason)")
        }
    }

    @Test("A whole chain replaces the old one by rename: an unfinished replacement is ignored, and files it replaced are dropped at opening")
    func replacement() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let old = chain(300, seed: 1)
        let new = chain(500, seed: 2)
        let log = try AuditLog.open(directory: directory, segmentBytesMax: 16 << 10)
        try log.append(old)
        let oldFiles = try auditFiles(directory)
        #expect(oldFiles.count > 1)
        let saved = try oldFiles.map { ($0, try Data(contentsOf: URL(fileURLWithPath: "\(directory)/\($0)"))) }
        try log.replaceAll(new)
        #expect(try log.records(after: 0, limit: .max) == new)
        // The new chain in one file, longer than a file's bound, and an
        // empty one after it, for what comes next (opening reads only the
        // newest file whole).
        let newFiles = try auditFiles(directory)
        #expect(newFiles.count == 2 && !oldFiles.contains(newFiles[0]), "\(newFiles)")
        #expect(try FileSystem.fileLength("\(directory)/\(newFiles[0])") > 16 << 10)
        // A crash after the rename, before the old files were unlinked.
        for (name, data) in saved { try data.write(to: URL(fileURLWithPath: "\(directory)/\(name)")) }
        // And one during a later replacement, before its rename.
        try Data(repeating: 9, count: 100).write(to: URL(fileURLWithPath: "\(directory)/\(WriteAheadLog.hex(99)).audit.tmp"))
        let reopened = try AuditLog.open(directory: directory, segmentBytesMax: 16 << 10)
        #expect(try reopened.records(after: 0, limit: .max) == new)
        #expect(try auditFiles(directory) == newFiles, "leftovers removed")
        try reopened.append(chain(1, from: 501, previous: new.last!.hash, seed: 3))
        #expect(reopened.lastSequence == 501)
        try reopened.replaceAll([])
        let left = try reopened.records(after: 0, limit: 10)
        #expect(reopened.lastSequence == 0 && left.isEmpty)
    }

    @Test("Where the file system takes direct I/O, appended records bypass the page cache",
          .enabled(if: directIOWorks, "O_DIRECT is not available here"))
    func bypassesPageCache() throws {
        let temporary = try TemporaryStore()
        let directory = temporary.path + "/audit"
        let log = try AuditLog.open(directory: directory)
        let records = chain(2_000)
        for start in stride(from: 0, to: 2_000, by: 100) { try log.append(Array(records[start..<(start + 100)])) }
        try log.sync()
        let file = "\(directory)/\(try #require(try auditFiles(directory).last))"
        let (resident, total) = try residentPages(file)
        #expect(total > 100, "the records took many pages (\(total))")
        #expect(resident <= 2, "\(resident) of \(total) pages went through the cache")
    }

    @Test("A node made before the audit log moves its SQLite audit table into the log once, and the database goes")
    func migratesTheTable() throws {
        let temporary = try TemporaryStore()
        let records = chain(250)
        let database = temporary.path + "/ledger.sqlite"
        do {
            let queue = try DatabaseQueue(path: database)
            try queue.write { db in
                try db.execute(sql: """
                    CREATE TABLE ledger_audit (sequence INTEGER PRIMARY KEY, log_index INTEGER NOT NULL, time_millis INTEGER NOT NULL,
                        actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, result TEXT NOT NULL,
                        previous_hash BLOB NOT NULL, hash BLOB NOT NULL)
                    """)
                for r in records {
                    try db.execute(sql: "INSERT INTO ledger_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   arguments: [Int64(r.sequence), Int64(r.logIndex), Int64(r.timeMillis), r.actor, r.action, r.target, r.result,
                                               Data(r.previousHash), Data(r.hash)])
                }
            }
            try queue.close()
        }
        let store = try LedgerStore(directory: temporary.path)
        #expect(try store.auditRecords(limit: 1_000) == records)
        #expect(!FileManager.default.fileExists(atPath: database), "the database is gone once the log holds the records")
        #expect(try LedgerStore(directory: temporary.path).auditRecords(limit: 1_000) == records, "and the next start finds them in the log")
    }
}
