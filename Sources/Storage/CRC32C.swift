/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum
/// storage systems use for records on disk. Table-driven, one byte a step.
struct CRC32C {
    private static let table: [UInt32] = (0..<256).map { byte in
        var crc = UInt32(byte)
        for _ in 0..<8 { crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        return crc
    }

    private var state: UInt32 = 0xFFFF_FFFF

    mutating func update(_ bytes: some Sequence<UInt8>) {
        let done: Void? = bytes.withContiguousStorageIfAvailable { buffer in
            Self.table.withUnsafeBufferPointer { table in
                var crc = state
                for byte in buffer { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
                state = crc
            }
        }
        if done == nil { update(Array(bytes)) }
    }

    /// Eight little-endian bytes.
    mutating func update(_ value: UInt64) {
        var v = value
        for _ in 0..<8 {
            state = Self.table[Int((state ^ UInt32(v & 0xFF)) & 0xFF)] ^ (state >> 8)
            v >>= 8
        }
    }

    var value: UInt32 { state ^ 0xFFFF_FFFF }
}
