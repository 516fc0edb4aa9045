#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Ledger
import Raft
import Synchronization

/// The audit chain on disk, as append-only files written around the page
/// cache: `<dir>/<file number, 16 hex digits>.audit`. Each file starts
/// with a 24-byte header (magic, file number, the sequence of its first
/// record) and holds batches (`BatchFraming`, magic "AUB1"); a batch is
/// the first sequence, a count, and that many contiguous records.
///
/// It replaces an SQLite table: every record went through SQLite's log,
/// then its database file, and so through new page-cache pages, a host
/// fault each on a VM that hands freed memory back (the table's writer
/// was 2.4-2.6% of the whole machine per node under issuance load).
///
/// Appends are not synced (`sync()` is, before a checkpoint counts: the
/// records after it are made again from the Raft log after a crash). A
/// crash can tear only the unsynced batches at the end of the newest
/// file (a power loss any of them, a later one kept where an earlier is
/// lost); from the first bad batch on they are cut off when the log is
/// opened. A whole chain written
/// at once (`replaceAll`, a snapshot installed) goes to a new file that
/// appears by rename, its first sequence 1: the newest such file starts
/// the chain, and the files before it are what it replaced.
///
/// Safe from any thread: appends, truncation and replacement take the
/// lock; readers copy the index under it and read the files outside it.
final class AuditLog: Sendable {
    static let fileMagic: [UInt8] = Array("WRNTAUD1".utf8)
    static let fileHeaderBytes = 24
    static let batches = BatchFraming(magic: 0x3142_5541) // "AUB1", little-endian
    /// Records per batch written by `replaceAll`.
    static let replaceBatchRecords = 4_096

    /// Where the records of one batch are.
    struct Located: Equatable {
        var file: UInt64
        var offset: Int
        var first: UInt64
        var last: UInt64
    }

    private struct State: ~Copyable {
        /// File numbers, oldest first.
        var files: [UInt64] = []
        var located: [Located] = []
        var file: AppendFile?
        /// The newest record's sequence (0 when there is none).
        var last: UInt64 = 0
        /// A batch's encoding and framing, kept between appends.
        var body = BinaryWriter(capacity: 64 << 10)
        var framed: [UInt8] = []
    }

    let directory: String
    /// A new file is started once the current one is this large.
    let segmentBytesMax: Int
    private let state: Mutex<State>

    private init(directory: String, segmentBytesMax: Int) {
        self.directory = directory
        self.segmentBytesMax = segmentBytesMax
        state = Mutex(State())
    }

    deinit {
        state.withLock { $0.file?.closeDescriptor() }
    }

    func path(of file: UInt64) -> String { "\(directory)/\(WriteAheadLog.hex(file)).audit" }

    private func damaged(_ path: String, _ what: String) -> StorageError {
        StorageError(code: .corruptState, reason: "\(path): \(what) (the audit log is damaged). \(StorageError.rejoinAdvice)")
    }

    // MARK: - Opening

    /// Opens the log in `directory` (made if missing): every file's batch
    /// headers are read and checked to continue each other; the newest
    /// file is read whole, and a torn tail cut off. A truncation a crash
    /// stopped part-way is finished (`truncate.pending`).
    static func open(directory: String, segmentBytesMax: Int = 64 << 20) throws -> AuditLog {
        let log = AuditLog(directory: directory, segmentBytesMax: segmentBytesMax)
        try FileSystem.makeDirectory(directory)
        var numbers: [UInt64] = []
        for name in try FileSystem.list(directory) {
            if name.hasSuffix(".audit.tmp") {
                try FileSystem.remove("\(directory)/\(name)") // a replacement that never finished
            } else if name.utf8.count == 22, name.hasSuffix(".audit"), let number = UInt64(name.prefix(16), radix: 16) {
                numbers.append(number)
            }
        }
        numbers.sort()
        // The newest file that starts at 1 starts the chain: older ones
        // are what a replacement left behind.
        // A newest file without its whole header was being made when the
        // process stopped (its header is written and synced before any
        // record): it holds nothing.
        if let newest = numbers.last, try log.isHeaderless(newest) {
            try FileSystem.remove(log.path(of: newest))
            numbers.removeLast()
        }
        var headers: [(number: UInt64, first: UInt64)] = []
        for number in numbers { headers.append((number, try log.header(of: number))) }
        if let start = headers.lastIndex(where: { $0.first == 1 }) {
            for old in headers[..<start] { try FileSystem.remove(log.path(of: old.number)) }
            headers.removeFirst(start)
        }
        try log.state.withLock { state in
            var next: UInt64 = 1
            for (position, header) in headers.enumerated() {
                let path = log.path(of: header.number)
                guard header.first == next else {
                    throw log.damaged(path, "it starts at record \(header.first), but the records before it end at \(next - 1)")
                }
                if position > 0, header.number != headers[position - 1].number + 1 {
                    throw log.damaged(path, "file \(WriteAheadLog.hex(headers[position - 1].number + 1)).audit before it is missing")
                }
                let isLast = position == headers.count - 1
                let (located, validBytes, tornBytes) = isLast ? try log.readWhole(header.number) : try log.scanHeaders(header.number)
                for batch in located {
                    guard batch.first == next else {
                        throw log.damaged(path, "the batch at byte \(batch.offset) starts at record \(batch.first), not \(next)")
                    }
                    next = batch.last + 1
                }
                state.located.append(contentsOf: located)
                state.files.append(header.number)
                if isLast {
                    state.file = try AppendFile.reopen(path: path, validBytes: validBytes, tornBytes: tornBytes, lengthMax: segmentBytesMax)
                }
            }
            state.last = next - 1
            if state.file == nil { try log.startFile(number: 1, first: 1, &state) }
        }
        try log.finishTruncation()
        return log
    }

    /// Whether a file is shorter than its header.
    private func isHeaderless(_ number: UInt64) throws -> Bool {
        let path = path(of: number)
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileSystem.error("open", path) }
        defer { close(descriptor) }
        return try FileSystem.length(of: descriptor, path) < Self.fileHeaderBytes
    }

    /// The first sequence a file's header names.
    private func header(of number: UInt64) throws -> UInt64 {
        let path = path(of: number)
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileSystem.error("open", path) }
        defer { close(descriptor) }
        guard try FileSystem.length(of: descriptor, path) >= Self.fileHeaderBytes else {
            throw damaged(path, "it is shorter than its header")
        }
        var header = [UInt8](repeating: 0, count: Self.fileHeaderBytes)
        try FileSystem.readExactly(&header, from: descriptor, at: 0, path)
        guard Array(header[0..<8]) == Self.fileMagic else { throw damaged(path, "not a Warrant audit file (bad header)") }
        let (stored, first) = header.withUnsafeBytes {
            (UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)),
             UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 16, as: UInt64.self)))
        }
        guard stored == number else { throw damaged(path, "its header names file \(stored)") }
        return first
    }

    /// Where each batch of an older file is, from the batch headers alone
    /// (checksums are checked when a batch is read): the file must end
    /// exactly after its last batch.
    private func scanHeaders(_ number: UInt64) throws -> ([Located], Int, Int) {
        let path = path(of: number)
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileSystem.error("open", path) }
        defer { close(descriptor) }
        let length = try FileSystem.length(of: descriptor, path)
        var located: [Located] = []
        var offset = Self.fileHeaderBytes
        var prefix = [UInt8](repeating: 0, count: BatchFraming.headerBytes + 12)
        while offset < length {
            guard length - offset >= prefix.count else { throw damaged(path, "the batch at byte \(offset) is cut short") }
            try FileSystem.readExactly(&prefix, from: descriptor, at: offset, path)
            guard let bodyLength = prefix.withUnsafeBytes({ Self.batches.claimedLength($0, at: 0) }),
                  offset + BatchFraming.headerBytes + bodyLength <= length else {
                throw damaged(path, "the batch at byte \(offset) has a bad header")
            }
            let (first, count) = prefix.withUnsafeBytes {
                (UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: BatchFraming.headerBytes, as: UInt64.self)),
                 UInt64(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: BatchFraming.headerBytes + 8, as: UInt32.self))))
            }
            guard count > 0 else { throw damaged(path, "the batch at byte \(offset) holds no records") }
            guard first >= 1, first <= UInt64.max - count else { throw damaged(path, "the batch at byte \(offset) has a bad header (first record \(first))") }
            located.append(Located(file: number, offset: offset, first: first, last: first + count - 1))
            offset += BatchFraming.headerBytes + bodyLength
        }
        return (located, offset, 0)
    }

    /// The newest file read whole: its valid batches (checksums checked,
    /// records decoded), where they end, and the torn tail after them.
    private func readWhole(_ number: UInt64) throws -> ([Located], Int, Int) {
        let path = path(of: number)
        let data = try FileSystem.read(path)
        // Batches since the last sync are not ordered on the disk: all
        // after the first bad one go (made again from the Raft log; the
        // checkpoint's chain head, checked when loading it, says whether
        // anything synced was lost).
        let (bodies, validBytes, tornBytes) = try Self.batches.walk(data, from: Self.fileHeaderBytes, isLast: true, unsyncedTail: true) { damaged(path, $0) }
        var located: [Located] = []
        for body in bodies {
            let records = try decode(Array(data[body]), path: path, offset: body.lowerBound - BatchFraming.headerBytes)
            located.append(Located(file: number, offset: body.lowerBound - BatchFraming.headerBytes, first: records[0].sequence,
                                   last: records[records.count - 1].sequence))
        }
        return (located, validBytes, tornBytes)
    }

    private func decode(_ body: [UInt8], path: String, offset: Int) throws -> [AuditRecord] {
        var reader = BinaryReader(body)
        do {
            let first = try reader.readUInt64("first sequence")
            let count = Int(try reader.readUInt32("record count"))
            guard count > 0, count <= body.count else { throw CodecError.invalid(field: "record count", reason: "\(count)") }
            var records: [AuditRecord] = []
            records.reserveCapacity(count)
            for position in 0..<count {
                let record = try LedgerSnapshot.decodeRecord(&reader)
                guard record.sequence == first + UInt64(position) else {
                    throw CodecError.invalid(field: "sequence", reason: "record \(record.sequence) where \(first + UInt64(position)) belongs")
                }
                records.append(record)
            }
            try reader.expectEnd()
            return records
        } catch let error as CodecError {
            throw damaged(path, "the batch at byte \(offset) does not decode (\(error))")
        }
    }

    // MARK: - Writing

    /// The newest record's sequence (0 when there is none).
    var lastSequence: UInt64 { state.withLock { $0.last } }

    /// Appends records that continue the chain, not synced.
    func append(_ records: [AuditRecord]) throws {
        guard let first = records.first else { return }
        try state.withLock { state in
            guard state.file != nil else { throw noFile }
            guard first.sequence == state.last + 1 else {
                throw StorageError(code: .invalidRequest, reason: "\(directory): audit record \(first.sequence) does not follow record \(state.last)")
            }
            state.body.removeAll(keepingAtMost: 1 << 20)
            try encodeBatch(records, into: &state.body)
            state.framed.removeAll(keepingCapacity: state.framed.capacity <= 1 << 20)
            Self.batches.frame(state.body.bytes, into: &state.framed)
            let offset = state.file!.size
            try state.file!.write(state.framed)
            let last = records[records.count - 1].sequence
            state.located.append(Located(file: state.files[state.files.count - 1], offset: offset, first: first.sequence, last: last))
            state.last = last
            if state.file!.size >= segmentBytesMax {
                try startFile(number: state.files[state.files.count - 1] + 1, first: last + 1, &state)
            }
        }
    }

    /// A batch's body: its first sequence, a count, the records (which
    /// must be contiguous).
    private func encodeBatch(_ records: [AuditRecord], into body: inout BinaryWriter) throws {
        let first = records[0].sequence
        body.write(first)
        body.write(UInt32(records.count))
        for (position, record) in records.enumerated() {
            guard record.sequence == first + UInt64(position) else {
                throw StorageError(code: .invalidRequest, reason: "\(directory): audit record \(record.sequence) where \(first + UInt64(position)) belongs")
            }
            LedgerSnapshot.encode(record, into: &body)
        }
    }

    /// A new file after the current one, which is first cut to its last
    /// batch and synced: a crash between the two leaves no older file
    /// ending in padding, and no newer file that records it does not hold.
    private func startFile(number: UInt64, first: UInt64, _ state: inout State) throws {
        try state.file?.close(cuttingPadding: true)
        let next = try AppendFile.create(path: path(of: number), directory: directory, lengthMax: segmentBytesMax,
                                         header: Self.header(number: number, first: first))
        state.file = next
        state.files.append(number)
    }

    private static func header(number: UInt64, first: UInt64) -> [UInt8] {
        var header = fileMagic
        withUnsafeBytes(of: number.littleEndian) { header.append(contentsOf: $0) }
        withUnsafeBytes(of: first.littleEndian) { header.append(contentsOf: $0) }
        return header
    }

    /// Makes every later write fail as a broken disk would (tests).
    func failWrites() {
        state.withLock { $0.file?.failWrites() }
    }

    /// Makes every record appended so far durable (older files were
    /// synced when the next one started).
    func sync() throws {
        try state.withLock { state in
            guard state.file != nil else { throw noFile }
            try state.file!.sync()
        }
    }

    /// A truncation or replacement failed between closing the file and
    /// opening the next: nothing more is written (the node stops on it).
    private var noFile: StorageError {
        StorageError(code: .ioFailure, reason: "\(directory): the audit log has no file open (a truncation or replacement of it failed)")
    }

    /// Drops the records after `sequence` (durably): files after the one
    /// that holds it go, and its file is cut after it. A batch holding
    /// records on both sides is cut whole and its records through
    /// `sequence` written again. Those are first sealed in a file of their
    /// own (`truncate.pending`), removed once they are written again: a
    /// crash in between finds it at `open`, which writes them again, so
    /// the chain is never left short of `sequence`.
    func truncate(after sequence: UInt64) throws {
        let kept = try cut(after: sequence)
        guard !kept.isEmpty else { return }
        try append(kept)
        try sync()
        try removePending()
    }

    /// Removes `truncate.pending`, durably (one that came back after a
    /// power loss would be judged against a chain that moved on).
    private func removePending() throws {
        guard FileSystem.exists(pendingPath) else { return }
        try FileSystem.remove(pendingPath)
        try FileSystem.syncDirectory(directory)
    }

    /// The cut of `truncate`, without writing the kept records again (what
    /// a crash right after it leaves, for tests; only `truncate` calls it
    /// otherwise): those records. The chain is left short of `sequence`.
    func cut(after sequence: UInt64) throws -> [AuditRecord] {
        try state.withLock { state -> [AuditRecord] in
            guard sequence < state.last, let cut = state.located.firstIndex(where: { $0.last > sequence }) else { return [] }
            let batch = state.located[cut]
            let kept = batch.first <= sequence ? try read(batch).filter { $0.sequence <= sequence } : []
            if !kept.isEmpty {
                var body = BinaryWriter(capacity: kept.count * 256)
                try encodeBatch(kept, into: &body)
                try FileSystem.writeSealed(to: pendingPath, directory: directory, magic: Self.pendingMagic) { $0.buffer.writeBytes(body.bytes) }
            } else {
                try removePending()
            }
            state.file?.closeDescriptor()
            state.file = nil
            // Newest first: a crash part-way leaves a chain that still continues.
            while let number = state.files.last, number > batch.file {
                try FileSystem.remove(path(of: number))
                state.files.removeLast()
            }
            // Their removal durable before the cut: a power loss must not
            // keep the cut and bring back a file after it.
            try FileSystem.syncDirectory(directory)
            let path = path(of: batch.file)
            let descriptor = Glibc.open(path, O_RDWR | O_CLOEXEC)
            guard descriptor >= 0 else { throw FileSystem.error("open", path) }
            defer { close(descriptor) }
            guard ftruncate(descriptor, off_t(batch.offset)) == 0, fsync(descriptor) == 0 else { throw FileSystem.error("truncate", path) }
            try FileSystem.syncDirectory(directory)
            state.file = try AppendFile.reopen(path: path, validBytes: batch.offset, tornBytes: 0, lengthMax: segmentBytesMax)
            state.located.removeSubrange(cut...)
            state.last = batch.first - 1
            return kept
        }
    }

    /// Where a truncation keeps the records it writes again.
    var pendingPath: String { "\(directory)/truncate.pending" }
    static let pendingMagic: [UInt8] = Array("WRNTAUDT".utf8)

    /// A truncation that stopped part-way (`truncate.pending` found at
    /// open) is finished: its records are written again if the cut had
    /// happened, and the file removed. Its temporary file (the cut had not
    /// begun) is removed.
    private func finishTruncation() throws {
        let path = pendingPath
        try FileSystem.remove(path + ".tmp")
        guard FileSystem.exists(path) else { return }
        let bytes = try FileSystem.read(path)
        let body = try FileSystem.unseal(bytes, magic: Self.pendingMagic, damaged: { self.damaged(path, $0) }) { reader in
            try reader.readBytes("records", limit: bytes.count)
        }
        let kept = try decode(body, path: path, offset: Self.pendingMagic.count)
        let first = kept[0].sequence, last = kept[kept.count - 1].sequence
        let chainLast = lastSequence
        if chainLast >= last {
            // Not cut yet, or written again: the chain must hold these very records.
            guard let stored = try records(after: last - 1, limit: 1).first, stored.hash == kept[kept.count - 1].hash else {
                throw damaged(path, "it holds records \(first)...\(last), and the chain (through record \(chainLast)) holds another record \(last)")
            }
        } else if chainLast == first - 1 {
            guard try lastRecord()?.hash ?? AuditRecord.genesisHash == kept[0].previousHash else {
                throw damaged(path, "it holds records \(first)...\(last), and they do not follow the chain's record \(chainLast)")
            }
            try append(kept)
            try sync()
        } else {
            throw damaged(path, "it holds records \(first)...\(last), but the chain ends at record \(chainLast)")
        }
        try removePending()
    }

    /// Replaces the whole chain with `records` (from sequence 1), durably.
    func replaceAll(_ records: [AuditRecord]) throws {
        var given = false
        try replaceAll(pages: {
            defer { given = true }
            return given ? nil : records
        })
    }

    /// Replaces the whole chain with the records `nextPage` gives, page
    /// after page until it returns nil (from sequence 1, in order),
    /// durably: a new file written beside the old ones a page at a time
    /// appears by rename, and then the old ones are removed. Only a page
    /// is in memory at once, however long the chain.
    func replaceAll(pages nextPage: () throws -> [AuditRecord]?) throws {
        try state.withLock { state in
            let number = (state.files.last ?? 0) + 1
            let final = path(of: number)
            let temporary = final + ".tmp"
            let descriptor = Glibc.open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard descriptor >= 0 else { throw FileSystem.error("create", temporary) }
            var closed = false
            defer { if !closed { close(descriptor) } }
            var bytes = Self.header(number: number, first: 1)
            var written = 0
            var located: [Located] = []
            var next: UInt64 = 1
            while let page = try nextPage() {
                var start = page.startIndex
                while start < page.endIndex {
                    let part = page[start..<min(page.endIndex, start + Self.replaceBatchRecords)]
                    var body = BinaryWriter(capacity: part.count * 256)
                    body.write(next)
                    body.write(UInt32(part.count))
                    for record in part {
                        guard record.sequence == next else {
                            throw StorageError(code: .invalidRequest, reason: "\(directory): audit record \(record.sequence) where \(next) belongs")
                        }
                        LedgerSnapshot.encode(record, into: &body)
                        next += 1
                    }
                    located.append(Located(file: number, offset: written + bytes.count, first: part.first!.sequence, last: next - 1))
                    Self.batches.frame(body.bytes, into: &bytes)
                    start = part.endIndex
                }
                if bytes.count >= 1 << 20 {
                    _ = try bytes.withUnsafeBytes { try FileSystem.writeAll($0, to: descriptor, at: written, temporary, refusedAsFalse: false) }
                    written += bytes.count
                    bytes.removeAll(keepingCapacity: true)
                }
            }
            _ = try bytes.withUnsafeBytes { try FileSystem.writeAll($0, to: descriptor, at: written, temporary, refusedAsFalse: false) }
            written += bytes.count
            guard fsync(descriptor) == 0 else { throw FileSystem.error("fsync", temporary) }
            closed = true
            close(descriptor)
            guard rename(temporary, final) == 0 else { throw FileSystem.error("rename", temporary) }
            try FileSystem.syncDirectory(directory)
            // A truncation's records belong to the chain replaced.
            try removePending()
            state.file?.closeDescriptor()
            state.file = nil
            for old in state.files { try FileSystem.remove(path(of: old)) }
            state.files = [number]
            state.located = located
            state.last = next - 1
            state.file = try AppendFile.reopen(path: final, validBytes: written, tornBytes: 0, lengthMax: segmentBytesMax)
            // A long chain is followed by a file of its own at once, as an
            // append would once the file is full: opening reads only the
            // newest file whole, and this one may be gigabytes.
            if written >= segmentBytesMax { try startFile(number: number + 1, first: next, &state) }
        }
    }

    // MARK: - Reading (any thread)

    /// Records after `sequence`, oldest first, at most `limit`.
    func records(after sequence: UInt64, limit: Int) throws -> [AuditRecord] {
        guard limit > 0 else { return [] }
        let batches = state.withLock { state -> ArraySlice<Located> in
            // The first batch that ends after `sequence` (they are sorted).
            var low = 0, high = state.located.count
            while low < high {
                let middle = (low + high) / 2
                if state.located[middle].last <= sequence { low = middle + 1 } else { high = middle }
            }
            var end = low
            var count: UInt64 = 0
            while end < state.located.count, count < UInt64(limit) {
                count += state.located[end].last - max(state.located[end].first, sequence + 1) + 1
                end += 1
            }
            return state.located[low..<end]
        }
        var result: [AuditRecord] = []
        for batch in batches {
            for record in try read(batch) where record.sequence > sequence {
                result.append(record)
                if result.count == limit { return result }
            }
        }
        return result
    }

    /// The newest record, read back.
    func lastRecord() throws -> AuditRecord? {
        guard let batch = state.withLock({ $0.located.last }) else { return nil }
        return try read(batch).last
    }

    /// One batch's records, its checksum checked.
    private func read(_ batch: Located) throws -> [AuditRecord] {
        let path = path(of: batch.file)
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileSystem.error("open", path) }
        defer { close(descriptor) }
        var header = [UInt8](repeating: 0, count: BatchFraming.headerBytes)
        try FileSystem.readExactly(&header, from: descriptor, at: batch.offset, path)
        guard let length = header.withUnsafeBytes({ Self.batches.claimedLength($0, at: 0) }) else {
            throw damaged(path, "the batch at byte \(batch.offset) has a bad header")
        }
        var bytes = header + [UInt8](repeating: 0, count: length)
        try FileSystem.readExactly(&bytes, from: descriptor, at: batch.offset, path)
        guard let valid = bytes.withUnsafeBytes({ Self.batches.validBatch($0, at: 0) }) else {
            throw damaged(path, "the batch at byte \(batch.offset) fails its checksum")
        }
        let records = try decode(Array(bytes[valid.body]), path: path, offset: batch.offset)
        guard records.first?.sequence == batch.first, records.last?.sequence == batch.last else {
            throw damaged(path, "the batch at byte \(batch.offset) holds records \(records.first!.sequence)...\(records.last!.sequence), not \(batch.first)...\(batch.last)")
        }
        return records
    }
}
