#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import Raft

/// The Raft log and hard state of one node as append-only segment files:
/// `<dir>/<sequence, 16 hex digits>.wal`. Each file starts with a 16-byte
/// header (magic, sequence) and holds batches; one batch is what one
/// `append` wrote: magic, body length, CRC-32C of the body, then records
/// (an entry, a hard state, or a reset that drops the whole log after a
/// snapshot was installed). Nothing is ever rewritten in place: an entry
/// whose index is at or below the last one replaces the stored suffix
/// from that index on when the log is read back, which is how a follower
/// takes a new leader's log.
///
/// A batch is durable once `append(sync: true)` returns (one write, one
/// fdatasync). A crash can only tear the batches written after the last
/// sync, at the end of the newest file: such a torn tail is cut off when
/// the log is opened. Zeros after the newest file's last batch are not
/// torn: direct writes pad with them and write them ahead. A batch that
/// fails its checksum anywhere else, or that is followed by a valid
/// batch, is damage, and opening refuses.
final class WriteAheadLog {
    static let fileMagic: [UInt8] = Array("WRNTWAL1".utf8)
    static let fileHeaderBytes = 16
    static let batchMagic: UInt32 = 0x3142_4157 // "WAB1", little-endian
    static let batchHeaderBytes = BatchFraming.headerBytes
    static let batches = BatchFraming(magic: batchMagic)

    enum Record: Equatable {
        case entry(Entry)
        case hardState(HardState)
        /// A snapshot at `index` (of `term`) replaced the log: every entry
        /// before this record is gone, and the log goes on at `index + 1`.
        case reset(index: LogIndex, term: Term)
    }

    /// What the files held, replayed in order.
    struct Contents {
        var hardState: HardState?
        /// Contiguous, after every replacement and reset.
        var entries: [Entry] = []
        var lastReset: (index: LogIndex, term: Term)?
        /// Bytes of a torn tail cut off when opening, up to its last
        /// byte that is not zero (0 normally).
        var tornBytesRemoved = 0
        /// Where the entries are (see `WriteAheadLog.located`).
        var located: [Located] = []
    }

    /// The entries one batch holds, and where the batch is. Kept for every
    /// batch with entries, sorted by index and without overlap: a batch
    /// that replaces a suffix clips or drops the ones it replaces, and a
    /// reset drops them all. This is how entries whose payloads the log
    /// released from memory are read back (a peer that lags needs them).
    struct Located: Equatable {
        var sequence: UInt64
        /// Byte offset of the batch header in its file.
        var offset: Int
        var first: LogIndex
        var last: LogIndex
    }

    private struct Segment {
        var sequence: UInt64
        var path: String
        /// The highest entry index the file holds (0 when none).
        var maxIndex: LogIndex
    }

    let directory: String
    /// A new file is started once the current one is this large.
    let segmentBytesMax: Int
    /// Whether a synced append calls fdatasync (tests that kill no
    /// machines may skip it; the bytes are still written).
    let fdatasyncs: Bool
    private var segments: [Segment] = []
    /// The newest file, being appended to (see `AppendFile`).
    private var file: AppendFile?
    /// Batches appended without a sync, written with the next synced one.
    private var unwritten: [UInt8] = []
    private var unwrittenMaxIndex: LogIndex = 0
    private var lastHardState = HardState()
    private var located: [Located] = []

    /// A batch's encoding, kept between appends.
    private var body = BinaryWriter(capacity: 64 << 10)
    /// Buffers kept for reuse up to this size.
    private static let keptBufferBytes = 1 << 20

    private init(directory: String, segmentBytesMax: Int, fdatasyncs: Bool) {
        self.directory = directory
        self.segmentBytesMax = segmentBytesMax
        self.fdatasyncs = fdatasyncs
    }

    deinit {
        file?.closeDescriptor()
    }

    /// Syncs and closes the file being written; the log is not used after.
    func closeFile() throws {
        try file?.close(cuttingPadding: false)
        file = nil
    }

    /// Whether `directory` holds a log.
    static func exists(in directory: String) -> Bool {
        guard let files = try? segmentFiles(in: directory), let first = files.first else { return false }
        // A lone first file without its whole header: a log whose start
        // never finished (an older build's crash), with nothing in it.
        if files.count == 1, let length = try? FileSystem.fileLength(first.path), length < fileHeaderBytes { return false }
        return true
    }

    /// Opens (or, when `create`, starts) the log in `directory` and
    /// replays it.
    static func open(directory: String, segmentBytesMax: Int = 64 << 20, fdatasyncs: Bool = true, create: Bool) throws -> (WriteAheadLog, Contents) {
        let log = WriteAheadLog(directory: directory, segmentBytesMax: segmentBytesMax, fdatasyncs: fdatasyncs)
        try FileSystem.makeDirectory(directory)
        waitForRemovals()
        var files = try segmentFiles(in: directory)
        // A crash while a new file was being started can leave it without
        // its whole header: nothing was ever written after it, so it goes.
        if let last = files.last, try FileSystem.fileLength(last.path) < fileHeaderBytes {
            try FileSystem.remove(last.path)
            files.removeLast()
        }
        if files.isEmpty {
            guard create else {
                throw StorageError(code: .invalidRequest, reason: "\(directory) holds no write-ahead log")
            }
            try log.startSegment(sequence: 1)
            return (log, Contents())
        }
        var contents = Contents()
        for (position, file) in files.enumerated() {
            if position > 0, file.sequence != files[position - 1].sequence + 1 {
                throw StorageError(code: .logGap, reason: "\(directory): write-ahead log file \(hex(files[position - 1].sequence + 1)).wal is missing (the files go from \(hex(files[position - 1].sequence)) to \(hex(file.sequence))). \(StorageError.rejoinAdvice)")
            }
            let isLast = position == files.count - 1
            let (maxIndex, validBytes, tornBytes) = try replay(file.path, sequence: file.sequence, isLast: isLast, into: &contents)
            log.segments.append(Segment(sequence: file.sequence, path: file.path, maxIndex: maxIndex))
            if isLast {
                // Zeros after the last batch (padding, and zeros written
                // ahead) stay; a torn write is cut off with them.
                contents.tornBytesRemoved = tornBytes
                log.file = try AppendFile.reopen(path: file.path, validBytes: validBytes, tornBytes: tornBytes, lengthMax: segmentBytesMax)
            }
        }
        log.lastHardState = contents.hardState ?? HardState()
        log.located = contents.located
        contents.located = []
        return (log, contents)
    }

    // MARK: - Writing

    /// Appends one batch of records. With `sync`, it and every batch
    /// appended before it are durable when this returns; without, they
    /// wait for the next synced append (a crash may lose them).
    func append(_ records: [Record], sync: Bool) throws {
        if !records.isEmpty {
            // Sized up front: entries carry whole commands (a kilobyte and
            // more each), and growing the buffer copies it every time.
            var capacity = 0
            for record in records {
                if case .entry(let entry) = record { capacity += entry.payload.byteCount }
                capacity += 64
            }
            // The same memory every time: fresh pages cost a fault each
            // (and a host fault on a VM that hands freed memory back).
            body.removeAll(keepingAtMost: Self.keptBufferBytes)
            body.reserve(capacity)
            var span = BatchSpan()
            for record in records {
                Self.encode(record, into: &body)
                span.add(record)
                switch record {
                case .entry(let entry): unwrittenMaxIndex = max(unwrittenMaxIndex, entry.index)
                case .hardState(let state): lastHardState = state
                case .reset: break
                }
            }
            span.place(sequence: segments[segments.count - 1].sequence, offset: file!.size + unwritten.count, into: &located)
            Self.batches.frame(body.bytes, into: &unwritten)
        }
        guard sync, !unwritten.isEmpty else { return }
        try file!.write(unwritten)
        if fdatasyncs { try file!.sync() }
        segments[segments.count - 1].maxIndex = max(segments[segments.count - 1].maxIndex, unwrittenMaxIndex)
        unwritten.removeAll(keepingCapacity: unwritten.capacity <= Self.keptBufferBytes)
        unwrittenMaxIndex = 0
        if file!.size >= segmentBytesMax {
            try startSegment(sequence: segments.last!.sequence + 1)
        }
    }

    /// Deletes the files whose entries all lie at or before `index` (a
    /// durable snapshot covers them), never the one being written. The log
    /// forgets them at once; the files are unlinked on a queue of their
    /// own, since unlinking a full 64 MiB file took 12-16 ms here, all of
    /// it on the Raft driver's thread. A file left behind (a crash, or an
    /// unlink that failed) is harmless: opening skips the entries a
    /// snapshot covers, and the next compaction removes it again.
    func removeSegments(through index: LogIndex) {
        var paths: [String] = []
        while segments.count > 1, segments[0].maxIndex <= index {
            let removed = segments.removeFirst()
            paths.append(removed.path)
            let gone = located.prefix { $0.sequence <= removed.sequence }.count
            located.removeFirst(gone)
        }
        guard !paths.isEmpty else { return }
        Self.remover.async { [paths] in
            for path in paths { _ = try? FileSystem.remove(path) }
        }
    }

    /// Waits until the files `removeSegments` let go of are unlinked.
    static func waitForRemovals() {
        remover.sync {}
    }

    /// One for the process: opening a log waits for it, so a store opened
    /// again in the same process never lists a file that is about to go.
    private static let remover = DispatchQueue(label: "warrant.wal.remove", qos: .utility)

    /// Entries `from...through` read back from the files (for payloads the
    /// in-memory log released). Every batch read is checked against its
    /// checksum; an entry that is not there, or damage, throws.
    func entries(from: LogIndex, through: LogIndex) throws -> [Entry] {
        guard from <= through else { return [] }
        // The first batch that ends at or after `from` (they are sorted).
        var low = 0, high = located.count
        while low < high {
            let middle = (low + high) / 2
            if located[middle].last < from { low = middle + 1 } else { high = middle }
        }
        var result: [Entry] = []
        var next = from
        var position = low
        while next <= through, position < located.count, located[position].first <= next {
            let batch = located[position]
            let upper = min(batch.last, through)
            var picked: [Entry] = []
            for record in try readBatch(batch) {
                // Later records replace earlier ones from their index on,
                // as when the log is replayed.
                guard case .entry(let entry) = record, entry.index >= next, entry.index <= upper else { continue }
                let slot = Int(entry.index - next)
                guard slot <= picked.count else { continue }
                picked.removeSubrange(slot...)
                picked.append(entry)
            }
            guard picked.count == Int(upper - next + 1) else { break }
            result.append(contentsOf: picked)
            next = upper + 1
            position += 1
        }
        guard next > through else {
            throw StorageError(code: .corruptEntry, reason: "\(directory): entry \(next) is not where the write-ahead log put it (wanted \(from)...\(through)). \(StorageError.rejoinAdvice)")
        }
        return result
    }

    private func readBatch(_ batch: Located) throws -> [Record] {
        guard let segment = segments.first(where: { $0.sequence == batch.sequence }) else {
            throw StorageError(code: .corruptEntry, reason: "\(directory): write-ahead log file \(Self.hex(batch.sequence)).wal is gone but still holds entries \(batch.first)...\(batch.last)")
        }
        let descriptor = Glibc.open(segment.path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileSystem.error("open", segment.path) }
        defer { close(descriptor) }
        var header = [UInt8](repeating: 0, count: Self.batchHeaderBytes)
        try FileSystem.readExactly(&header, from: descriptor, at: batch.offset, segment.path)
        let length = header.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self))) }
        guard length <= BatchFraming.bodyBytesMax else {
            throw StorageError(code: .corruptEntry, reason: "\(segment.path): the batch at byte \(batch.offset) claims \(length) bytes. \(StorageError.rejoinAdvice)")
        }
        var bytes = header + [UInt8](repeating: 0, count: length)
        try FileSystem.readExactly(&bytes, from: descriptor, at: batch.offset, segment.path)
        guard let valid = bytes.withUnsafeBytes({ Self.batches.validBatch($0, at: 0) }) else {
            throw StorageError(code: .corruptEntry, reason: "\(segment.path): the batch at byte \(batch.offset) fails its checksum. \(StorageError.rejoinAdvice)")
        }
        do {
            return try Self.decodeRecords(Array(bytes[valid.body]))
        } catch {
            throw StorageError(code: .corruptEntry, reason: "\(segment.path): a record of the batch at byte \(batch.offset) does not decode (\(error)). \(StorageError.rejoinAdvice)")
        }
    }

    /// How many files the log spans now.
    var segmentCount: Int { segments.count }

    /// A new file, begun with the current hard state so that older files
    /// can be deleted without losing it.
    private func startSegment(sequence: UInt64) throws {
        let path = "\(directory)/\(Self.hex(sequence)).wal"
        var header = Self.fileMagic
        withUnsafeBytes(of: sequence.littleEndian) { header.append(contentsOf: $0) }
        var body = BinaryWriter(capacity: 32)
        Self.encode(.hardState(lastHardState), into: &body)
        Self.batches.frame(body.bytes, into: &header)
        // The current file is cut and synced first: a crash before the next
        // exists leaves it whole, as the newest file.
        try file?.close(cuttingPadding: true)
        let next = try AppendFile.create(path: path, directory: directory, lengthMax: segmentBytesMax, header: header)
        file = next
        segments.append(Segment(sequence: sequence, path: path, maxIndex: 0))
    }

    // MARK: - Encoding

    private static func encode(_ record: Record, into w: inout BinaryWriter) {
        switch record {
        case .entry(let entry):
            w.write(UInt8(1))
            w.write(entry.index)
            w.write(entry.term)
            entry.payload.encode(into: &w)
        case .hardState(let state):
            w.write(UInt8(2))
            w.write(state.term)
            w.write(state.votedFor)
            w.write(state.commitIndex)
        case .reset(let index, let term):
            w.write(UInt8(3))
            w.write(index)
            w.write(term)
        }
    }

    static func decodeRecords(_ body: [UInt8]) throws(CodecError) -> [Record] {
        var reader = BinaryReader(body)
        var records: [Record] = []
        while reader.remaining > 0 {
            switch try reader.readUInt8("record kind") {
            case 1:
                let index = try reader.readUInt64("index")
                let term = try reader.readUInt64("term")
                records.append(.entry(Entry(term: term, index: index, payload: try EntryPayload.decode(from: &reader))))
            case 2:
                records.append(.hardState(HardState(term: try reader.readUInt64("term"), votedFor: try reader.readUInt64("vote"),
                                                    commitIndex: try reader.readUInt64("commit index"))))
            case 3:
                records.append(.reset(index: try reader.readUInt64("index"), term: try reader.readUInt64("term")))
            case let kind:
                throw CodecError.unknownTag(field: "record kind", tag: kind)
            }
        }
        return records
    }

    /// The entries of one batch after its last reset, to place it in `located`.
    private struct BatchSpan {
        var first: LogIndex?
        var last: LogIndex = 0
        var reset = false

        mutating func add(_ record: Record) {
            switch record {
            case .entry(let entry):
                if first == nil || entry.index < first! { first = entry.index }
                last = entry.index
            case .reset:
                reset = true
                first = nil
            case .hardState:
                break
            }
        }

        func place(sequence: UInt64, offset: Int, into located: inout [Located]) {
            if reset { located.removeAll() }
            guard let first else { return }
            while let previous = located.last, previous.last >= first {
                if previous.first >= first {
                    located.removeLast()
                } else {
                    located[located.count - 1].last = first - 1
                    break
                }
            }
            located.append(Located(sequence: sequence, offset: offset, first: first, last: last))
        }
    }

    // MARK: - Reading

    static func segmentFiles(in directory: String) throws -> [(sequence: UInt64, path: String)] {
        try FileSystem.list(directory).compactMap { name -> (UInt64, String)? in
            guard name.utf8.count == 20, name.hasSuffix(".wal"), let sequence = UInt64(name.prefix(16), radix: 16) else { return nil }
            return (sequence, "\(directory)/\(name)")
        }.sorted { $0.0 < $1.0 }
    }

    static func hex(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
    }

    /// Replays one file into `contents`; returns the highest entry index
    /// in it, how many of its bytes are valid, and how long a torn tail
    /// follows them (up to its last byte that is not zero: only the last
    /// file may have one, and zeros alone are not torn).
    private static func replay(_ path: String, sequence: UInt64, isLast: Bool, into contents: inout Contents) throws -> (LogIndex, Int, Int) {
        let data = try FileSystem.read(path)
        func damaged(_ what: String) -> StorageError {
            StorageError(code: .corruptEntry, reason: "\(path): \(what) (the file is damaged). \(StorageError.rejoinAdvice)")
        }
        guard data.count >= fileHeaderBytes, Array(data[0..<8]) == fileMagic else {
            throw damaged("not a Warrant write-ahead log file (bad header)")
        }
        let storedSequence = data.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        guard storedSequence == sequence else { throw damaged("its header names sequence \(storedSequence), not \(sequence)") }
        var maxIndex: LogIndex = 0
        let (bodies, validBytes, torn) = try batches.walk(data, from: fileHeaderBytes, isLast: isLast, damaged: damaged)
        for body in bodies {
            let records: [Record]
            do {
                records = try decodeRecords(Array(data[body]))
            } catch {
                throw damaged("a record at byte \(body.lowerBound) does not decode (\(error))")
            }
            var span = BatchSpan()
            for record in records {
                span.add(record)
                switch record {
                case .entry(let entry):
                    try add(entry, to: &contents, path: path)
                    maxIndex = max(maxIndex, entry.index)
                case .hardState(let state):
                    contents.hardState = state
                case .reset(let index, let term):
                    contents.entries.removeAll()
                    contents.lastReset = (index, term)
                }
            }
            span.place(sequence: sequence, offset: body.lowerBound - batchHeaderBytes, into: &contents.located)
        }
        return (maxIndex, validBytes, torn)
    }

    /// An entry continues the log, or replaces the suffix from its index on.
    private static func add(_ entry: Entry, to contents: inout Contents, path: String) throws {
        if let last = contents.entries.last {
            if entry.index == last.index + 1 {
                contents.entries.append(entry)
                return
            }
            guard entry.index <= last.index else {
                throw StorageError(code: .logGap, reason: "\(path): the Raft log jumps from index \(last.index) to \(entry.index) (truncated or damaged). \(StorageError.rejoinAdvice)")
            }
            let first = contents.entries[0].index
            if entry.index >= first {
                contents.entries.removeSubrange(Int(entry.index - first)...)
            } else {
                contents.entries.removeAll()
            }
            contents.entries.append(entry)
            return
        }
        if let reset = contents.lastReset, entry.index != reset.index + 1 {
            throw StorageError(code: .logGap, reason: "\(path): after a snapshot at index \(reset.index) the log goes on at \(entry.index), not \(reset.index + 1). \(StorageError.rejoinAdvice)")
        }
        contents.entries.append(entry)
    }
}

/// The few file operations storage needs, with errors that name the file.
enum FileSystem {
    static func error(_ operation: String, _ path: String) -> StorageError {
        let code = errno
        return StorageError(code: .ioFailure, reason: "\(operation) \(path): \(String(cString: strerror(code))) (errno \(code))")
    }

    /// Makes `path` if it is not there; a directory made is synced into
    /// its parent, so a power loss cannot take it (and the files made in
    /// it, each synced into it) away.
    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o700) == 0 {
            var trimmed = Substring(path)
            while trimmed.count > 1, trimmed.hasSuffix("/") { trimmed.removeLast() }
            let parent = trimmed.lastIndex(of: "/").map { $0 == trimmed.startIndex ? "/" : String(trimmed[..<$0]) } ?? "."
            try syncDirectory(parent)
        } else if errno != EEXIST {
            throw error("mkdir", path)
        }
    }

    static func list(_ directory: String) throws -> [String] {
        guard let handle = opendir(directory) else { throw error("opendir", directory) }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafePointer(to: entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: Int(NAME_MAX) + 1) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    static func length(of descriptor: Int32, _ path: String) throws -> Int {
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw error("stat", path) }
        return Int(info.st_size)
    }

    static func fileLength(_ path: String) throws -> Int {
        var info = stat()
        guard stat(path, &info) == 0 else { throw error("stat", path) }
        return Int(info.st_size)
    }

    static func exists(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0
    }

    /// Fills `bytes` from `offset` of an open file; a short file throws.
    static func readExactly(_ bytes: inout [UInt8], from descriptor: Int32, at offset: Int, _ path: String) throws {
        var done = 0
        let count = bytes.count
        try bytes.withUnsafeMutableBytes { buffer in
            while done < count {
                let read = pread(descriptor, buffer.baseAddress! + done, count - done, off_t(offset + done))
                if read < 0 {
                    if errno == EINTR { continue }
                    throw error("read", path)
                }
                guard read > 0 else {
                    throw StorageError(code: .corruptEntry, reason: "\(path) ends before byte \(offset + count) (a batch the log located there). \(StorageError.rejoinAdvice)")
                }
                done += read
            }
        }
    }

    static func read(_ path: String) throws -> [UInt8] {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw error("open", path) }
        defer { close(descriptor) }
        let length = try length(of: descriptor, path)
        var bytes = [UInt8](repeating: 0, count: length)
        var offset = 0
        try bytes.withUnsafeMutableBytes { buffer in
            while offset < length {
                let count = pread(descriptor, buffer.baseAddress! + offset, length - offset, off_t(offset))
                if count < 0 {
                    if errno == EINTR { continue }
                    throw error("read", path)
                }
                if count == 0 { break }
                offset += count
            }
        }
        return offset == length ? bytes : Array(bytes[0..<offset])
    }

    /// Writes a sealed file (`magic`, what `body` writes, a CRC-32C of
    /// both) to `path` so that a crash leaves either the old file or the
    /// whole new one: a temporary file written a megabyte at a time, fsync,
    /// rename, fsync of the directory.
    ///
    /// The file is written around the page cache (O_DIRECT) where the file
    /// system allows it. A checkpoint is tens of megabytes written once and
    /// read only after a restart or for a lagging follower; through the
    /// cache, every one of its pages was new memory, and on a VM that hands
    /// freed memory back to its host each such page costs a host fault (a
    /// 24 MB file took 175 ms of CPU that way here, and 2 ms direct).
    static func writeSealed(to path: String, directory: String, magic: [UInt8], _ body: (inout SealedFile) throws -> Void) throws {
        let temporary = path + ".tmp"
        let descriptor = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw error("create", temporary) }
        var closed = false
        defer { if !closed { close(descriptor) } }
        var file = try SealedFile(descriptor: descriptor, path: temporary)
        for byte in magic { file.buffer.write(byte) }
        try body(&file)
        try file.finish()
        guard fsync(descriptor) == 0 else { throw error("fsync", temporary) }
        closed = true
        close(descriptor)
        guard rename(temporary, path) == 0 else { throw error("rename", temporary) }
        try syncDirectory(directory)
    }

    /// Writes all of `bytes` at `offset`. With `refusedAsFalse`, EINVAL
    /// (direct I/O the file system will not do) returns false instead.
    static func writeAll(_ bytes: UnsafeRawBufferPointer, to descriptor: Int32, at offset: Int, _ path: String, refusedAsFalse: Bool) throws -> Bool {
        var done = 0
        while done < bytes.count {
            let written = pwrite(descriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if written < 0 {
                if errno == EINTR { continue }
                if errno == EINVAL && refusedAsFalse { return false }
                throw error("write", path)
            }
            done += written
        }
        return true
    }

    /// Turns direct I/O (O_DIRECT) on or off for an open file; whether it
    /// is on afterwards. Turning it on where the platform or the file
    /// system does not do it leaves it off; failing to turn it off throws.
    static func setDirectIO(_ descriptor: Int32, _ on: Bool, _ path: String) throws -> Bool {
        guard SealedFile.directFlag != 0 else { return false }
        let flags = fcntl(descriptor, F_GETFL)
        guard flags >= 0 else { throw error("fcntl", path) }
        if fcntl(descriptor, F_SETFL, on ? flags | SealedFile.directFlag : flags & ~SealedFile.directFlag) == 0 { return on }
        guard on else { throw error("fcntl", path) }
        return false
    }

    /// The body of a file written by `writeSealed`, once its magic and
    /// checksum are checked; `damaged` makes the error for what is wrong.
    static func unseal<T>(_ bytes: [UInt8], magic: [UInt8], damaged: (String) -> StorageError, _ body: (inout BinaryReader) throws -> T) throws -> T {
        guard bytes.count >= magic.count + 4, Array(bytes[0..<magic.count]) == magic else { throw damaged("not a Warrant file of this kind (bad header)") }
        var crc = CRC32C()
        crc.update(bytes[0..<(bytes.count - 4)])
        let stored = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: bytes.count - 4, as: UInt32.self)) }
        guard crc.value == stored else { throw damaged("it fails its checksum") }
        var r = BinaryReader(Array(bytes[magic.count..<(bytes.count - 4)]))
        do {
            let value = try body(&r)
            try r.expectEnd()
            return value
        } catch let error as StorageError {
            throw error
        } catch {
            throw damaged("\(error)")
        }
    }

    static func syncDirectory(_ path: String) throws {
        let descriptor = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard descriptor >= 0 else { throw error("open", path) }
        defer { close(descriptor) }
        guard fsync(descriptor) == 0 else { throw error("fsync", path) }
    }

    static func remove(_ path: String) throws {
        guard unlink(path) == 0 || errno == ENOENT else { throw error("unlink", path) }
    }

    /// Removes a directory of plain files (no subdirectories) with its
    /// files; one that is not there is not an error.
    static func removeFlatDirectory(_ path: String) throws {
        guard exists(path) else { return }
        for name in try list(path) { try remove("\(path)/\(name)") }
        guard rmdir(path) == 0 || errno == ENOENT else { throw error("rmdir", path) }
    }
}

/// A file being written by `FileSystem.writeSealed`: write into `buffer`
/// and call `flushIfFull()` now and then; the checksum follows along.
///
/// Written directly (O_DIRECT), only whole blocks leave the buffer, from
/// memory aligned for the device; the last partial block and the checksum
/// go through the page cache once direct writing is switched off. A direct
/// write the file system refuses falls back to the cache.
struct SealedFile {
    static let chunkBytes = 1 << 20
    /// What O_DIRECT needs: offsets, lengths and memory in whole blocks.
    static let blockBytes = 4096
    #if os(Linux) && arch(x86_64)
    static let directFlag: Int32 = 0o40000
    #elseif os(Linux) && arch(arm64)
    static let directFlag: Int32 = 0o200000
    #else
    static let directFlag: Int32 = 0
    #endif

    fileprivate let descriptor: Int32
    fileprivate let path: String
    private var crc = CRC32C()
    /// Bytes written to the file so far.
    private var offset = 0
    var buffer = BinaryWriter(capacity: SealedFile.chunkBytes + 64 << 10)
    /// Aligned memory the direct writes copy each chunk into; nil when the
    /// file is written through the page cache.
    private var aligned: AlignedMemory?

    fileprivate init(descriptor: Int32, path: String) throws {
        self.descriptor = descriptor
        self.path = path
        if let memory = AlignedMemory(byteCount: Self.chunkBytes + 64 << 10, alignment: Self.blockBytes),
           try FileSystem.setDirectIO(descriptor, true, path) {
            aligned = memory
        }
    }

    mutating func flushIfFull() throws {
        if buffer.bytes.count >= Self.chunkBytes { try flush() }
    }

    /// Writes out what the buffer holds: all of it through the cache, or
    /// its whole blocks directly.
    private mutating func flush() throws {
        guard let memory = aligned else {
            _ = try buffer.bytes.withUnsafeBytes { try FileSystem.writeAll($0, to: descriptor, at: offset, path, refusedAsFalse: false) }
            return wroteOut(buffer.bytes.count)
        }
        let blocks = buffer.bytes.count - buffer.bytes.count % Self.blockBytes
        var done = 0
        while done < blocks {
            let count = min(blocks - done, memory.byteCount)
            buffer.bytes.withUnsafeBytes { memory.pointer.copyMemory(from: $0.baseAddress! + done, byteCount: count) }
            guard try FileSystem.writeAll(UnsafeRawBufferPointer(start: memory.pointer, count: count), to: descriptor, at: offset + done, path,
                                          refusedAsFalse: true) else {
                // Not for this file after all: the rest through the cache.
                wroteOut(done)
                try stopDirect()
                return try flush()
            }
            done += count
        }
        wroteOut(done)
    }

    private mutating func wroteOut(_ count: Int) {
        crc.update(buffer.bytes[0..<count])
        offset += count
        buffer.removeFirst(count)
        // A part far larger than a chunk (a snapshot's bytes) is not kept.
        if buffer.bytes.isEmpty { buffer.removeAll(keepingAtMost: Self.chunkBytes * 2) }
    }

    private mutating func stopDirect() throws {
        aligned = nil
        _ = try FileSystem.setDirectIO(descriptor, false, path)
    }

    fileprivate mutating func finish() throws {
        try flush()
        if aligned != nil {
            try stopDirect()
            try flush()
        }
        buffer.write(crc.value)
        _ = try buffer.bytes.withUnsafeBytes { try FileSystem.writeAll($0, to: descriptor, at: offset, path, refusedAsFalse: false) }
    }
}

/// Memory at an alignment Swift's allocator does not promise, freed with
/// its owner.
final class AlignedMemory {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int

    init?(byteCount: Int, alignment: Int) {
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, alignment, byteCount) == 0, let memory else { return nil }
        pointer = memory
        self.byteCount = byteCount
    }

    deinit { free(pointer) }
}
