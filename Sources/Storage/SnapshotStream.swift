import Foundation
import Ledger
import Raft
import Synchronization

/// A ledger snapshot as a stream: what a leader sends a follower in pieces
/// (`SnapshotChunk`). The ledger has no size bound (the audit chain only
/// grows), so neither has the stream, and neither side holds it whole in
/// memory: the leader writes it to a file of its own and reads pieces
/// back, the follower stages the pieces in a file and installs from it.
///
/// Encoding (version 2): the version; the applied index; the documents'
/// section length (UInt64) and the documents as `encodeDocuments` writes
/// them; then the audit chain in pages, each its byte length (UInt32)
/// and then its record count (UInt32) and records; a page length of 0
/// ends the stream.
enum SnapshotStream {
    static let version: UInt8 = 2
    /// A page is closed at this many records, or once it is this large.
    static let pageRecordsMax = 10_000
    static let pageBytesTarget = 4 << 20
    /// What a reader accepts: the target and one more record (its four
    /// texts are read with a limit of a MiB each).
    static let pageBytesMax = pageBytesTarget + (5 << 20)
    static let documentsBytesMax: UInt64 = 1 << 36

    /// Writes the stream of `memory` (its documents, and the audit chain
    /// through its head, read from `audit`) through `emit`, a page at a
    /// time.
    static func write(_ memory: LedgerMemory, audit: AuditLog, to emit: ([UInt8]) throws -> Void) throws {
        var documents = BinaryWriter(capacity: memory.contentBytes + memory.documents.count * 96 + 32)
        LedgerSnapshot.encodeDocuments(memory, into: &documents)
        var stream = StreamWriter()
        try stream.begin(applied: memory.applied, documents: documents.bytes, emit)
        documents = BinaryWriter(capacity: 0)
        let head = memory.head.sequence
        var after: UInt64 = 0
        while after < head {
            let records = try audit.records(after: after, limit: Int(min(head - after, UInt64(pageRecordsMax))))
            guard let last = records.last else { break }
            for record in records { try stream.add(record, emit) }
            after = last.sequence
        }
        guard after == head else {
            throw StorageError(code: .corruptState, reason: "\(audit.directory): the audit log holds \(after) records, not the \(head) of the chain")
        }
        try stream.end(emit)
    }

    /// Writes a stream through the `emit` each call is given: the header
    /// and documents, then records in pages.
    struct StreamWriter {
        private var page = BinaryWriter(capacity: SnapshotStream.pageBytesTarget + (64 << 10))
        private var inPage = 0

        func begin(applied: LogIndex, documents: [UInt8], _ emit: ([UInt8]) throws -> Void) throws {
            var header = BinaryWriter(capacity: 32)
            header.write(SnapshotStream.version)
            header.write(applied)
            header.write(UInt64(documents.count))
            try emit(header.bytes)
            try emit(documents)
        }

        mutating func add(_ record: AuditRecord, _ emit: ([UInt8]) throws -> Void) throws {
            LedgerSnapshot.encode(record, into: &page)
            inPage += 1
            if inPage == SnapshotStream.pageRecordsMax || page.bytes.count >= SnapshotStream.pageBytesTarget { try closePage(emit) }
        }

        private mutating func closePage(_ emit: ([UInt8]) throws -> Void) throws {
            guard inPage > 0 else { return }
            var header = BinaryWriter(capacity: 8)
            header.write(UInt32(page.bytes.count + 4))
            header.write(UInt32(inPage))
            try emit(header.bytes)
            try emit(page.bytes)
            page.removeAll(keepingAtMost: SnapshotStream.pageBytesTarget + (64 << 10))
            inPage = 0
        }

        mutating func end(_ emit: ([UInt8]) throws -> Void) throws {
            try closePage(emit)
            var end = BinaryWriter(capacity: 4)
            end.write(UInt32(0))
            try emit(end.bytes)
        }
    }

    // MARK: - The encoding of builds before streams (version 1)

    /// Builds before streams sent a snapshot as one message: version 1,
    /// the applied index, the documents, the audit record count (UInt32)
    /// and every record. A follower of such a build cannot read a stream;
    /// one of this build reads either.
    static let legacyVersion: UInt8 = 1

    /// A stream (`source`, of the snapshot at `index`) in the older
    /// encoding, whole in memory: at most `limit` bytes.
    static func legacyBytes<Source: SnapshotSource>(of source: Source, at index: LogIndex, path: String, limit: Int) throws -> [UInt8] {
        var reader = try SnapshotStreamReader(source, at: index, path: path)
        var documents = BinaryWriter(capacity: 1 << 20)
        documents.write(legacyVersion)
        documents.write(index)
        LedgerSnapshot.encodeDocuments(of: try reader.documents(), into: &documents)
        var records = BinaryWriter(capacity: 1 << 20)
        var count = 0
        func checkSize() throws {
            guard documents.bytes.count + records.bytes.count + 4 <= limit, count <= UInt32.max else {
                throw StorageError(code: .invalidRequest, reason: "\(path): the snapshot at index \(index) is over the \(limit) bytes one message of the older encoding may carry")
            }
        }
        try checkSize()
        while let page = try reader.nextPage() {
            for record in page { LedgerSnapshot.encode(record, into: &records) }
            count += page.count
            try checkSize()
        }
        var bytes = documents.bytes
        bytes.reserveCapacity(bytes.count + 4 + records.bytes.count)
        withUnsafeBytes(of: UInt32(count).littleEndian) { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: records.bytes)
        return bytes
    }

    /// Snapshot bytes in the older encoding as a stream (what an older
    /// leader sends, read by this build); a stream as it is.
    static func fromLegacy(_ bytes: [UInt8], at index: LogIndex, path: String) throws -> [UInt8] {
        guard bytes.first == legacyVersion else { return bytes }
        func damaged(_ reason: String) -> StorageError {
            StorageError(code: .corruptState, reason: "\(path): the ledger snapshot at index \(index) is unusable (\(reason)); nothing was installed")
        }
        var r = BinaryReader(bytes)
        var stream: [UInt8] = []
        stream.reserveCapacity(bytes.count + bytes.count / 64 + 64)
        var writer = StreamWriter()
        let emit: ([UInt8]) throws -> Void = { stream.append(contentsOf: $0) }
        do {
            _ = try r.readUInt8("version")
            let applied = try r.readUInt64("applied index")
            guard applied == index else { throw damaged("it was taken at \(applied), not \(index)") }
            var documents = BinaryWriter(capacity: 0)
            LedgerSnapshot.encodeDocuments(of: try LedgerSnapshot.decodeDocuments(&r), into: &documents)
            try writer.begin(applied: applied, documents: documents.bytes, emit)
            let count = Int(try r.readUInt32("audit count"))
            guard count <= r.remaining else { throw damaged("impossible audit count") }
            for _ in 0..<count { try writer.add(try LedgerSnapshot.decodeRecord(&r), emit) }
            try r.expectEnd()
            try writer.end(emit)
        } catch let error as CodecError {
            throw damaged("\(error)")
        }
        return stream
    }
}

/// Where a stream is read from: its bytes in memory, or a file.
protocol SnapshotSource {
    /// The next `count` bytes; fewer left throws.
    mutating func read(_ count: Int, _ field: String) throws -> [UInt8]
    mutating func skip(_ count: Int) throws
    var atEnd: Bool { get }
}

struct BytesSource: SnapshotSource {
    let bytes: [UInt8]
    var position = 0

    mutating func read(_ count: Int, _ field: String) throws -> [UInt8] {
        guard count <= bytes.count - position else { throw CodecError.truncated(field: field, needed: count, remaining: bytes.count - position) }
        defer { position += count }
        return Array(bytes[position..<(position + count)])
    }

    mutating func skip(_ count: Int) throws {
        guard count <= bytes.count - position else { throw CodecError.truncated(field: "documents", needed: count, remaining: bytes.count - position) }
        position += count
    }

    var atEnd: Bool { position == bytes.count }
}

/// A file this process made and unlinked (it lives while it is open): the
/// stream a leader sends, or the one a follower stages.
final class SnapshotFile: @unchecked Sendable {
    let descriptor: Int32
    let path: String

    /// Creates `path` afresh, readable and writable, and unlinks it.
    init(creating path: String) throws {
        try FileSystem.remove(path)
        let descriptor = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw FileSystem.error("create", path) }
        self.descriptor = descriptor
        self.path = path
        try FileSystem.remove(path)
    }

    deinit { close(descriptor) }

    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        _ = try bytes.withUnsafeBytes { try FileSystem.writeAll($0, to: descriptor, at: Int(offset), path, refusedAsFalse: false) }
    }

    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try FileSystem.readExactly(&bytes, from: descriptor, at: Int(offset), path)
        return bytes
    }
}

struct FileSource: SnapshotSource {
    let file: SnapshotFile
    let length: UInt64
    var position: UInt64 = 0

    mutating func read(_ count: Int, _ field: String) throws -> [UInt8] {
        guard UInt64(count) <= length - position else {
            throw CodecError.truncated(field: field, needed: count, remaining: Int(length - position))
        }
        defer { position += UInt64(count) }
        return try file.read(at: position, count: count)
    }

    mutating func skip(_ count: Int) throws {
        guard UInt64(count) <= length - position else { throw CodecError.truncated(field: "documents", needed: count, remaining: Int(length - position)) }
        position += UInt64(count)
    }

    var atEnd: Bool { position == length }
}

/// Reads a stream: the documents first, then the audit chain a page at a
/// time. Every error is the snapshot's, as `StorageError.corruptState`.
struct SnapshotStreamReader<Source: SnapshotSource> {
    private var source: Source
    let index: LogIndex
    let path: String

    init(_ source: Source, at index: LogIndex, path: String) throws {
        self.source = source
        self.index = index
        self.path = path
        try checked {
            var header = BinaryReader(try $0.source.read(9, "header"))
            guard try header.readUInt8("version") == SnapshotStream.version else { throw $0.damaged("unknown version") }
            let applied = try header.readUInt64("applied index")
            guard applied == index else { throw $0.damaged("it was taken at \(applied), not \(index)") }
        }
    }

    func damaged(_ reason: String) -> StorageError {
        StorageError(code: .corruptState, reason: "\(path): the ledger snapshot at index \(index) is unusable (\(reason)); nothing was installed")
    }

    private mutating func checked<T>(_ body: (inout Self) throws -> T) throws -> T {
        do {
            return try body(&self)
        } catch let error as StorageError {
            throw error
        } catch {
            throw damaged("\(error)")
        }
    }

    private mutating func length(_ field: String, max: UInt64) throws -> Int {
        var r = BinaryReader(try source.read(8, field))
        let length = try r.readUInt64(field)
        guard length <= max else { throw damaged("\(field) \(length) is over \(max)") }
        return Int(length)
    }

    /// The documents (first, once), in name order.
    mutating func documents() throws -> [Document] {
        try checked {
            let length = try $0.length("documents' length", max: SnapshotStream.documentsBytesMax)
            var r = BinaryReader(try $0.source.read(length, "documents"))
            let documents = try LedgerSnapshot.decodeDocuments(&r)
            try r.expectEnd()
            return documents
        }
    }

    /// Passes over the documents (first, once).
    mutating func skipDocuments() throws {
        try checked {
            let length = try $0.length("documents' length", max: SnapshotStream.documentsBytesMax)
            try $0.source.skip(length)
        }
    }

    /// The next page of audit records (after `documents()`), nil at the
    /// end of the stream. Records are decoded, not checked.
    mutating func nextPage() throws -> [AuditRecord]? {
        try checked {
            var r = BinaryReader(try $0.source.read(4, "page length"))
            let length = Int(try r.readUInt32("page length"))
            guard length > 0 else {
                guard $0.source.atEnd else { throw $0.damaged("bytes follow the last page") }
                return nil
            }
            guard length <= SnapshotStream.pageBytesMax else { throw $0.damaged("a page of \(length) bytes") }
            var page = BinaryReader(try $0.source.read(length, "page"))
            let count = Int(try page.readUInt32("record count"))
            guard count > 0, count <= page.remaining else { throw $0.damaged("a page of \(count) records") }
            var records: [AuditRecord] = []
            records.reserveCapacity(count)
            for _ in 0..<count { records.append(try LedgerSnapshot.decodeRecord(&page)) }
            try page.expectEnd()
            return records
        }
    }

    /// Reads every page, checking every link of the chain (sequence from
    /// 1, each record's hash, each previous hash, no record after the
    /// snapshot's index): the chain's head.
    mutating func checkChain() throws -> (sequence: UInt64, hash: [UInt8]) {
        var head: (sequence: UInt64, hash: [UInt8]) = (0, AuditRecord.genesisHash)
        while let page = try nextPage() {
            for record in page {
                guard record.sequence == head.sequence + 1, record.previousHash == head.hash, record.computedHash == record.hash,
                      record.logIndex <= index else {
                    throw damaged("audit record \(record.sequence) does not verify")
                }
                head = (record.sequence, record.hash)
            }
        }
        return head
    }
}

/// A snapshot's stream written to a file for sending, read back a piece
/// at a time (any thread).
public final class OutgoingSnapshot: Sendable {
    public let metadata: SnapshotMetadata
    public let byteCount: UInt64
    /// CRC-32C of the whole stream.
    public let checksum: UInt32
    let file: SnapshotFile

    init(metadata: SnapshotMetadata, byteCount: UInt64, checksum: UInt32, file: SnapshotFile) {
        self.metadata = metadata
        self.byteCount = byteCount
        self.checksum = checksum
        self.file = file
    }

    /// The stream's bytes from `offset`, at most `count`.
    public func chunk(at offset: UInt64, count: Int) throws -> SnapshotChunk {
        let take = Int(min(UInt64(count), byteCount - min(offset, byteCount)))
        return SnapshotChunk(metadata: metadata, totalBytes: byteCount, checksum: checksum, offset: offset,
                             bytes: try file.read(at: offset, count: take))
    }

    /// The whole stream (tests, and snapshots small enough to go whole).
    func bytes() throws -> [UInt8] {
        try file.read(at: 0, count: Int(byteCount))
    }
}

/// What a follower holds of a stream being sent to it.
public struct SnapshotReceipt: Sendable, Equatable {
    /// The stream's first `received` bytes are staged.
    public var received: UInt64
    /// The whole stream arrived and matched its checksum: the snapshot can
    /// be installed (`RaftStore` installs it when the core's Ready carries
    /// a snapshot with these metadata and no bytes).
    public var complete: Bool
    /// Bytes this piece added (0 for one held already, or past a gap).
    public var added: Int = 0
}

/// The stream a follower is being sent, staged in a file.
struct IncomingSnapshot {
    var leader: NodeID
    var metadata: SnapshotMetadata
    var totalBytes: UInt64
    var checksum: UInt32
    var file: SnapshotFile
    var received: UInt64 = 0
    var crc = CRC32C()
    var complete = false

    func isSame(_ chunk: SnapshotChunk, from leader: NodeID) -> Bool {
        leader == self.leader && chunk.metadata == metadata && chunk.totalBytes == totalBytes && chunk.checksum == checksum
    }

    /// Stages `chunk` if it is the next piece (a piece already held, or
    /// one past a gap, changes nothing: the leader sends again from what
    /// the receipt says). A stream whose checksum fails is dropped.
    mutating func take(_ chunk: SnapshotChunk) throws -> SnapshotReceipt {
        var added = 0
        if chunk.offset == received && !complete && !chunk.bytes.isEmpty {
            try file.write(chunk.bytes, at: received)
            crc.update(chunk.bytes)
            received += UInt64(chunk.bytes.count)
            added = chunk.bytes.count
            if received == totalBytes {
                guard crc.value == checksum else {
                    (received, crc) = (0, CRC32C())
                    throw StorageError(code: .corruptState, reason: "\(file.path): the snapshot at index \(metadata.index) from node \(leader) fails its checksum; it is asked for again from the start")
                }
                complete = true
            }
        }
        return SnapshotReceipt(received: received, complete: complete, added: added)
    }
}
