import CCRC32C

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum
/// storage systems use for records on disk. With the CPU's instruction
/// where there is one (x86-64 SSE4.2, AArch64 CRC: eight bytes a cycle or
/// so); else table-driven, eight bytes a step ("slicing by 8": one table
/// per byte position), then one byte a step. The tables were ~1% of the
/// machine's CPU under issuance load (every node checksums its log
/// entries and audit batches).
struct CRC32C {
    /// Whether this CPU has the instruction.
    static let hardwareAvailable = warrant_crc32c_hardware() != 0

    /// Eight tables of 256 entries, one after another: table k gives the
    /// CRC of a byte followed by k zero bytes.
    private static let tables: [UInt32] = {
        var tables = [UInt32](repeating: 0, count: 8 * 256)
        for byte in 0..<256 {
            var crc = UInt32(byte)
            for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
            tables[byte] = crc
        }
        for k in 1..<8 {
            for byte in 0..<256 {
                let previous = tables[(k - 1) * 256 + byte]
                tables[k * 256 + byte] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
            }
        }
        return tables
    }()

    private var state: UInt32 = 0xFFFF_FFFF
    private let hardware: Bool

    /// `hardware` false: the tables even where the instruction exists (tests).
    init(hardware: Bool = CRC32C.hardwareAvailable) {
        self.hardware = hardware && Self.hardwareAvailable
    }

    mutating func update(_ bytes: some Sequence<UInt8>) {
        let done: Void? = bytes.withContiguousStorageIfAvailable { buffer in update(UnsafeRawBufferPointer(buffer)) }
        if done == nil { update(Array(bytes)) }
    }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        if hardware {
            if let base = bytes.baseAddress { state = warrant_crc32c_update(state, base, bytes.count) }
        } else {
            Self.tables.withUnsafeBufferPointer { t in state = Self.update(state, bytes, t) }
        }
    }

    private static func update(_ start: UInt32, _ bytes: UnsafeRawBufferPointer, _ t: UnsafeBufferPointer<UInt32>) -> UInt32 {
        var crc = start
        var i = 0
        while i + 8 <= bytes.count {
            let one = crc ^ UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self))
            let two = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self))
            crc = t[7 * 256 + Int(one & 0xFF)] ^ t[6 * 256 + Int((one >> 8) & 0xFF)]
                ^ t[5 * 256 + Int((one >> 16) & 0xFF)] ^ t[4 * 256 + Int(one >> 24)]
                ^ t[3 * 256 + Int(two & 0xFF)] ^ t[2 * 256 + Int((two >> 8) & 0xFF)]
                ^ t[256 + Int((two >> 16) & 0xFF)] ^ t[Int(two >> 24)]
            i += 8
        }
        while i < bytes.count {
            crc = t[Int((crc ^ UInt32(bytes[i])) & 0xFF)] ^ (crc >> 8)
            i += 1
        }
        return crc
    }

    /// Eight little-endian bytes.
    mutating func update(_ value: UInt64) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { update($0) }
    }

    var value: UInt32 { state ^ 0xFFFF_FFFF }
}
