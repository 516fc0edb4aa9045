#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The file being appended to, of a log kept as numbered segment files
/// (the write-ahead log and the audit log).
///
/// Written with direct I/O (O_DIRECT) where the file system allows: each
/// write rewrites the file's last partial block with what follows it,
/// zero-padded to a whole block, from aligned `staging` memory. Nothing
/// goes through the page cache, whose every page was new memory (these
/// files only grow), a host fault each on a VM that hands freed memory
/// back. Past `size` the file holds zeros (the padding, and the zeros
/// written ahead: see `fileLength`); `close(cuttingPadding:)` cuts them
/// off before the owner starts its next file.
struct AppendFile {
    let path: String
    private(set) var descriptor: Int32
    /// Where the next bytes go: everything before it was written.
    private(set) var size: Int
    /// The size at which the owner starts its next file: zeros written
    /// ahead never go past it.
    let lengthMax: Int
    private var direct = false
    private var staging: AlignedMemory?
    /// The file's bytes from the last block boundary up to `size`.
    private var tailBlock: [UInt8] = []
    /// How long the file is: past `size` it holds zeros. A direct write
    /// that would go past it writes up to `zeroAheadBytes` of zeros after
    /// its bytes (never past `lengthMax`), so that most synced writes
    /// overwrite blocks the file already has: a write that grows the file
    /// makes fdatasync commit its new length through the file system's
    /// journal too (measured here: 80 µs of CPU and 170 µs of wall time
    /// per synced 4 KiB append, against 45 and 105 into written zeros).
    private var fileLength: Int
    static let zeroAheadBytes = 1 << 20

    /// A new file holding `header`, synced with its directory.
    static func create(path: String, directory: String, lengthMax: Int, header: [UInt8]) throws -> AppendFile {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw FileSystem.error("create", path) }
        var file = AppendFile(path: path, descriptor: descriptor, size: 0, fileLength: 0, lengthMax: lengthMax)
        do {
            try file.startDirect()
            try file.write(header)
            guard fsync(descriptor) == 0 else { throw FileSystem.error("fsync", path) }
            try FileSystem.syncDirectory(directory)
        } catch {
            file.closeDescriptor()
            throw error
        }
        return file
    }

    /// An existing file whose first `validBytes` are kept: anything after
    /// them that is not zero (a torn write) is cut off first, with the
    /// zeros up to it.
    static func reopen(path: String, validBytes: Int, tornBytes: Int, lengthMax: Int) throws -> AppendFile {
        let descriptor = open(path, O_RDWR | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileSystem.error("open", path) }
        var file = AppendFile(path: path, descriptor: descriptor, size: validBytes, fileLength: 0, lengthMax: lengthMax)
        do {
            if tornBytes > 0 {
                guard ftruncate(descriptor, off_t(validBytes)) == 0, fsync(descriptor) == 0 else { throw FileSystem.error("truncate", path) }
            }
            file.fileLength = try FileSystem.length(of: descriptor, path)
            try file.startDirect()
        } catch {
            file.closeDescriptor()
            throw error
        }
        return file
    }

    private init(path: String, descriptor: Int32, size: Int, fileLength: Int, lengthMax: Int) {
        self.path = path
        self.descriptor = descriptor
        self.size = size
        self.fileLength = fileLength
        self.lengthMax = lengthMax
    }

    /// Switches the file to direct I/O where the file system allows,
    /// keeping its last partial block for the next write.
    private mutating func startDirect() throws {
        // Read before direct I/O is on: then reads must be whole blocks too.
        var tail = [UInt8](repeating: 0, count: size % SealedFile.blockBytes)
        try FileSystem.readExactly(&tail, from: descriptor, at: size - tail.count, path)
        direct = try FileSystem.setDirectIO(descriptor, true, path)
        tailBlock = direct ? tail : []
    }

    /// Writes `bytes` at `size` (not synced): directly, the last partial
    /// block and `bytes` zero-padded to whole blocks, or else through the
    /// cache.
    mutating func write(_ bytes: [UInt8]) throws {
        let block = SealedFile.blockBytes
        if direct {
            let start = size - tailBlock.count
            let total = tailBlock.count + bytes.count
            var padded = (total + block - 1) / block * block
            if start + padded > fileLength {
                // Zeros ahead, up to the size at which the next file starts.
                let limit = (lengthMax + block - 1) / block * block
                padded = max(padded, min(padded + Self.zeroAheadBytes, limit - start))
            }
            if (staging?.byteCount ?? 0) < padded {
                staging = AlignedMemory(byteCount: max(padded, Self.zeroAheadBytes + (256 << 10)), alignment: block)
            }
            if let memory = staging {
                tailBlock.withUnsafeBytes { memory.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
                bytes.withUnsafeBytes { (memory.pointer + tailBlock.count).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
                (memory.pointer + total).initializeMemory(as: UInt8.self, repeating: 0, count: padded - total)
                if try FileSystem.writeAll(UnsafeRawBufferPointer(start: memory.pointer, count: padded), to: descriptor, at: start, path,
                                           refusedAsFalse: true) {
                    let end = size + bytes.count
                    let boundary = end - end % block
                    tailBlock = Array(UnsafeRawBufferPointer(start: memory.pointer + (boundary - start), count: end - boundary))
                    fileLength = max(fileLength, start + padded)
                    size = end
                    return
                }
            }
            // Refused after all: this file goes through the cache.
            direct = try FileSystem.setDirectIO(descriptor, false, path)
            tailBlock = []
        }
        _ = try bytes.withUnsafeBytes { try FileSystem.writeAll($0, to: descriptor, at: size, path, refusedAsFalse: false) }
        size += bytes.count
        fileLength = max(fileLength, size)
    }

    /// Makes what was written durable (fdatasync).
    func sync() throws {
        guard fdatasync(descriptor) == 0 else { throw FileSystem.error("fdatasync", path) }
    }

    /// Cuts a direct write's zero padding off (only a log's newest file may
    /// end in anything but its last batch), syncs, and closes.
    mutating func close(cuttingPadding: Bool) throws {
        guard descriptor >= 0 else { return }
        if cuttingPadding, try FileSystem.length(of: descriptor, path) > size {
            guard ftruncate(descriptor, off_t(size)) == 0 else { throw FileSystem.error("truncate", path) }
        }
        guard fsync(descriptor) == 0 else { throw FileSystem.error("fsync", path) }
        closeDescriptor()
    }

    /// Makes every later write fail as a broken disk would (EBADF): a
    /// read-only descriptor of /dev/null takes the file's number (tests).
    func failWrites() {
        let readOnly = open("/dev/null", O_RDONLY | O_CLOEXEC)
        guard readOnly >= 0 else { return }
        dup2(readOnly, descriptor)
        Glibc.close(readOnly)
    }

    /// Closes without anything else (an owner going away; a failed open).
    mutating func closeDescriptor() {
        if descriptor >= 0 { Glibc.close(descriptor) }
        descriptor = -1
    }
}

/// The batches of a segment file: magic, body length, CRC-32C of the body,
/// body. One batch is what one append wrote; a crash can tear only the
/// batches after the last sync, at the end of the newest file.
struct BatchFraming {
    let magic: UInt32
    static let headerBytes = 12
    /// A batch body larger than this is damage, not data.
    static let bodyBytesMax = 1 << 30

    func frame(_ body: [UInt8], into out: inout [UInt8]) {
        var crc = CRC32C()
        crc.update(body)
        withUnsafeBytes(of: magic.littleEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(body.count).littleEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: crc.value.littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: body)
    }

    /// Where a batch starting at `offset` ends, if a whole, valid batch
    /// starts there.
    func validBatch(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> (body: Range<Int>, end: Int)? {
        guard let length = claimedLength(bytes, at: offset) else { return nil }
        let stored = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset + 8, as: UInt32.self))
        let start = offset + Self.headerBytes
        guard length <= bytes.count - start else { return nil }
        var crc = CRC32C()
        crc.update(UnsafeRawBufferPointer(rebasing: bytes[start..<(start + length)]))
        guard crc.value == stored else { return nil }
        return (start..<(start + length), start + length)
    }

    /// The body length a batch header at `offset` claims, if one with this
    /// magic and a plausible length is there.
    func claimedLength(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> Int? {
        guard bytes.count - offset >= Self.headerBytes,
              UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) == magic else { return nil }
        let length = Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self)))
        return length <= Self.bodyBytesMax ? length : nil
    }

    /// Walks the batches of a whole file's bytes from `offset`: the valid
    /// ones, where they end, and how long a torn tail follows them (up to
    /// its last byte that is not zero). An invalid batch is damage unless
    /// `isLast` and nothing valid follows it; `damaged` makes that error.
    /// `unsyncedTail`: the file's last batches may be many writes not yet
    /// synced (the audit log's), so a power loss can keep a later one and
    /// lose one before it: in the newest file everything from the first
    /// invalid batch on is the torn tail.
    func walk(_ data: [UInt8], from offset: Int, isLast: Bool, unsyncedTail: Bool = false,
              damaged: (String) -> StorageError) throws -> (bodies: [Range<Int>], validBytes: Int, tornBytes: Int) {
        var offset = offset
        var bodies: [Range<Int>] = []
        try data.withUnsafeBytes { bytes in
            while offset < bytes.count {
                if let batch = validBatch(bytes, at: offset) {
                    bodies.append(batch.body)
                    offset = batch.end
                    continue
                }
                // Not a valid batch. At the end of the newest file that is
                // a write a crash cut short; anywhere else, damage.
                guard isLast else { throw damaged("the batch at byte \(offset) fails its checksum") }
                var claimedEnd = bytes.count
                if bytes.count - offset >= Self.headerBytes {
                    let length = Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self)))
                    claimedEnd = min(bytes.count, offset + Self.headerBytes + min(length, Self.bodyBytesMax))
                }
                if !unsyncedTail, claimedEnd < bytes.count, validBatch(bytes, at: claimedEnd) != nil {
                    throw damaged("the batch at byte \(offset) fails its checksum and valid batches follow it")
                }
                break
            }
        }
        let torn = data[offset...].lastIndex { $0 != 0 }.map { $0 + 1 - offset } ?? 0
        return (bodies, offset, torn)
    }
}
