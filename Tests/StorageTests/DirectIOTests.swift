import Foundation
import Raft
import Testing
import TestSupport
@testable import Storage

#if canImport(Glibc)
import Glibc
#endif

/// Bytes that differ at every position (a misplaced chunk shows).
private func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var generator = SeededGenerator(seed: seed)
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
}

/// Writes `parts` as a sealed file the way the checkpoint writer does (a
/// length-prefixed part, then `flushIfFull`), and returns its path.
private func writeParts(_ parts: [[UInt8]], in temporary: TemporaryStore) throws -> String {
    let path = temporary.path + "/sealed.bin"
    try FileSystem.writeSealed(to: path, directory: temporary.path, magic: Array("TESTSEAL".utf8)) { file in
        for part in parts {
            file.buffer.writeBytes(part)
            try file.flushIfFull()
        }
    }
    return path
}

private func readParts(_ path: String, count: Int) throws -> [[UInt8]] {
    try FileSystem.unseal(try FileSystem.read(path), magic: Array("TESTSEAL".utf8),
                          damaged: { StorageError(code: .corruptState, reason: $0) }) { r in
        try (0..<count).map { _ in try r.readBytes("part", limit: 1 << 26) }
    }
}

/// Whether the file system under the temporary directory takes O_DIRECT.
let directIOWorks: Bool = {
    guard SealedFile.directFlag != 0, let temporary = try? TemporaryStore() else { return false }
    let descriptor = open(temporary.path + "/probe", O_WRONLY | O_CREAT | O_CLOEXEC | SealedFile.directFlag, 0o600)
    guard descriptor >= 0 else { return false }
    defer { close(descriptor) }
    guard let memory = AlignedMemory(byteCount: SealedFile.blockBytes, alignment: SealedFile.blockBytes) else { return false }
    return write(descriptor, memory.pointer, SealedFile.blockBytes) == SealedFile.blockBytes
}()

/// How many of the file's pages are in the page cache.
func residentPages(_ path: String) throws -> (resident: Int, total: Int) {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    try #require(descriptor >= 0)
    defer { close(descriptor) }
    let size = Int(lseek(descriptor, 0, SEEK_END))
    let mapped = try #require(mmap(nil, size, PROT_READ, MAP_SHARED, descriptor, 0))
    try #require(mapped != MAP_FAILED)
    defer { munmap(mapped, size) }
    let pageBytes = Int(sysconf(Int32(_SC_PAGESIZE)))
    var vector = [UInt8](repeating: 0, count: (size + pageBytes - 1) / pageBytes)
    try #require(mincore(mapped, size, &vector) == 0)
    return (vector.filter { $0 & 1 == 1 }.count, vector.count)
}

@Suite("Sealed files (checkpoints and snapshots)", .onOwnThreads)
struct SealedFileTests {
    @Test("Parts of every size, across chunk boundaries and one larger than a chunk, read back intact and checked")
    func roundTrip() throws {
        let temporary = try TemporaryStore()
        // Sizes that end nowhere near a block: many small parts, one that
        // crosses several chunks, and a tail of 1 byte.
        var parts = (0..<700).map { pattern(1_000 + $0 * 7, seed: UInt64($0)) }
        parts.append(pattern(SealedFile.chunkBytes * 3 + 12_345, seed: 9_999))
        parts.append([42])
        let path = try writeParts(parts, in: temporary)
        #expect(try readParts(path, count: parts.count) == parts)
        #expect(!FileManager.default.fileExists(atPath: path + ".tmp"))

        // One flipped byte anywhere fails the checksum.
        try temporary.modify(path) { $0[$0.count / 2] ^= 0x10 }
        #expect(throws: StorageError.self) { try readParts(path, count: parts.count) }
    }

    @Test("An empty body and a body smaller than a block are sealed too")
    func small() throws {
        let temporary = try TemporaryStore()
        for parts in [[], [[UInt8]()], [pattern(100, seed: 1)]] {
            let path = try writeParts(parts, in: temporary)
            #expect(try readParts(path, count: parts.count) == parts)
        }
    }

    @Test("Where the file system takes direct I/O, a sealed file's whole blocks bypass the page cache",
          .enabled(if: directIOWorks, "the temporary directory's file system refuses O_DIRECT"))
    func bypassesPageCache() throws {
        let temporary = try TemporaryStore()
        let path = try writeParts((0..<40).map { pattern(100_000, seed: UInt64($0)) }, in: temporary)
        let (resident, total) = try residentPages(path)
        #expect(total > 900)
        // Only the last partial block and the checksum went through the cache.
        #expect(resident <= 2, "\(resident) of \(total) pages are cached")
    }
}

@Suite("The write-ahead log with direct I/O", .onOwnThreads)
struct DirectLogTests {
    @Test("Where the file system takes direct I/O, the log bypasses the page cache, writes zeros ahead only in its newest file, and reopens with nothing taken for torn",
          .enabled(if: directIOWorks, "the temporary directory's file system refuses O_DIRECT"))
    func directLog() throws {
        let temporary = try TemporaryStore()
        var entries: [Entry] = []
        func entry(_ index: Int) -> Entry {
            Entry(term: 1, index: LogIndex(index), payload: .command(pattern(100 + index * 37 % 700, seed: UInt64(index))))
        }
        do {
            let (log, _) = try WriteAheadLog.open(directory: temporary.walDirectory, segmentBytesMax: 32 << 10, create: true)
            for index in 1...300 {
                entries.append(entry(index))
                // Some appends wait for a later synced one, as a Ready's do.
                try log.append([.entry(entries.last!)], sync: index % 3 == 0)
            }
            let files = try temporary.logFiles()
            #expect(files.count > 3)
            // Before anything here reads the files (that fills the cache).
            let resident = try files.map { try residentPages($0).resident }.reduce(0, +)
            #expect(resident == 0, "\(resident) pages of the log went through the page cache")
            for file in files.dropLast() {
                #expect(try FileSystem.fileLength(file) == logicalLength(file), "a finished file ends with its last batch")
            }
            let newest = try #require(files.last)
            let length = try FileSystem.fileLength(newest), logical = try logicalLength(newest)
            // Zeros written ahead up to the size at which a file ends.
            #expect(length == max(32 << 10, roundedUp(logical)), "the newest file is \(length) bytes, \(logical) of them batches")
            #expect(try zerosAfter(logical, in: newest))
            #expect(try log.entries(from: 1, through: 300) == entries, "read back from the files as written")
        }
        // Reopened: the padding is not a torn write, and appends go on
        // from the partial block.
        do {
            let (log, contents) = try WriteAheadLog.open(directory: temporary.walDirectory, segmentBytesMax: 32 << 10, create: false)
            #expect(contents.entries == entries)
            #expect(contents.tornBytesRemoved == 0)
            for index in 301...310 {
                entries.append(entry(index))
                try log.append([.entry(entries.last!)], sync: true)
            }
        }
        let (_, contents) = try WriteAheadLog.open(directory: temporary.walDirectory, segmentBytesMax: 32 << 10, create: false)
        #expect(contents.entries == entries)
        #expect(contents.tornBytesRemoved == 0)
    }

    @Test("Synced appends land in zeros written ahead instead of growing the file; a crash's bytes among those zeros are cut off, zeros alone are kept",
          .enabled(if: directIOWorks, "the temporary directory's file system refuses O_DIRECT"))
    func zerosAhead() throws {
        let temporary = try TemporaryStore()
        var entries: [Entry] = []
        func append(_ log: WriteAheadLog, _ range: ClosedRange<Int>) throws {
            for index in range {
                entries.append(Entry(term: 1, index: LogIndex(index), payload: .command(pattern(300, seed: UInt64(index)))))
                try log.append([.entry(entries.last!)], sync: true)
            }
        }
        let file: String
        let zeroed: Int
        do {
            let (log, _) = try WriteAheadLog.open(directory: temporary.walDirectory, create: true)
            try append(log, 1...1)
            file = try #require(try temporary.logFiles().last)
            zeroed = try FileSystem.fileLength(file)
            #expect(zeroed >= AppendFile.zeroAheadBytes, "the first write wrote zeros ahead (\(zeroed) bytes)")
            try append(log, 2...100)
            #expect(try FileSystem.fileLength(file) == zeroed, "99 synced appends wrote into those zeros without growing the file")
            #expect(try logicalLength(file) > 100 * 300)
        }
        // Reopened: the zeros are not torn, and stay.
        do {
            let (log, contents) = try WriteAheadLog.open(directory: temporary.walDirectory, create: false)
            #expect(contents.entries == entries)
            #expect(contents.tornBytesRemoved == 0)
            #expect(try FileSystem.fileLength(file) == zeroed)
            try append(log, 101...110)
        }
        // Part of a write a crash cut short: bytes that are not zero, with
        // zeros before and after them.
        let logical = try logicalLength(file)
        try #require(try FileSystem.fileLength(file) >= logical + 5_100)
        try temporary.modify(file) { bytes in
            for offset in (logical + 5_000)..<(logical + 5_100) { bytes[offset] = 0x5A }
        }
        do {
            let (log, contents) = try WriteAheadLog.open(directory: temporary.walDirectory, create: false)
            #expect(contents.entries == entries, "nothing synced is lost")
            #expect(contents.tornBytesRemoved == 5_100)
            #expect(try FileSystem.fileLength(file) == logical, "the torn tail is cut off with the zeros after it")
            try append(log, 111...120)
        }
        let (_, contents) = try WriteAheadLog.open(directory: temporary.walDirectory, create: false)
        #expect(contents.entries == entries)
        #expect(contents.tornBytesRemoved == 0)
    }
}

private func roundedUp(_ count: Int) -> Int {
    (count + SealedFile.blockBytes - 1) / SealedFile.blockBytes * SealedFile.blockBytes
}

/// Whether every byte of `file` from `offset` on is zero.
private func zerosAfter(_ offset: Int, in file: String) throws -> Bool {
    try FileSystem.read(file)[offset...].allSatisfy { $0 == 0 }
}
