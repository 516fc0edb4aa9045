/// The one binary encoding of the core's values, shared by storage and (in
/// time) the transport: little-endian fixed-width integers and
/// length-prefixed byte strings. Decoding is bounded and total: malformed
/// input gets a `CodecError`, never a crash or an unbounded allocation.
public enum CodecError: Error, Sendable, Hashable, CustomStringConvertible {
    case truncated(field: String, needed: Int, remaining: Int)
    case tooLarge(field: String, length: Int, limit: Int)
    case unknownTag(field: String, tag: UInt8)
    case trailingBytes(count: Int)
    case invalid(field: String, reason: String)

    public var description: String {
        switch self {
        case .truncated(let field, let needed, let remaining): return "\(field): needs \(needed) bytes, \(remaining) left"
        case .tooLarge(let field, let length, let limit): return "\(field): length \(length) exceeds the limit of \(limit)"
        case .unknownTag(let field, let tag): return "\(field): unknown tag \(tag)"
        case .trailingBytes(let count): return "\(count) unexpected bytes after the value"
        case .invalid(let field, let reason): return "\(field): \(reason)"
        }
    }
}

public enum CodecLimits {
    /// The largest command an entry may carry.
    public static let commandBytesMax = 64 << 20
    /// The most node ids in one membership list.
    public static let nodeIDsMax = 4096
}

public struct BinaryWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) {
        bytes.reserveCapacity(capacity)
    }

    public mutating func write(_ value: UInt8) { bytes.append(value) }

    public mutating func write(_ value: UInt32) {
        for shift in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt32(shift))) }
    }

    public mutating func write(_ value: UInt64) {
        for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
    }

    /// A 32-bit length, then the bytes.
    public mutating func writeBytes(_ value: some Collection<UInt8>) {
        write(UInt32(value.count))
        bytes.append(contentsOf: value)
    }

    public mutating func writeIDs(_ ids: some Collection<NodeID>) {
        write(UInt32(ids.count))
        for id in ids { write(id) }
    }
}

public struct BinaryReader: Sendable {
    private let bytes: [UInt8]
    private var position = 0

    public init(_ bytes: [UInt8]) {
        self.bytes = bytes
    }

    public var remaining: Int { bytes.count - position }

    private mutating func take(_ count: Int, _ field: String) throws(CodecError) -> ArraySlice<UInt8> {
        guard count <= remaining else { throw .truncated(field: field, needed: count, remaining: remaining) }
        defer { position += count }
        return bytes[position..<(position + count)]
    }

    public mutating func readUInt8(_ field: String) throws(CodecError) -> UInt8 {
        try take(1, field).first!
    }

    public mutating func readUInt32(_ field: String) throws(CodecError) -> UInt32 {
        var value: UInt32 = 0
        for (offset, byte) in try take(4, field).enumerated() { value |= UInt32(byte) << UInt32(offset * 8) }
        return value
    }

    public mutating func readUInt64(_ field: String) throws(CodecError) -> UInt64 {
        var value: UInt64 = 0
        for (offset, byte) in try take(8, field).enumerated() { value |= UInt64(byte) << UInt64(offset * 8) }
        return value
    }

    /// A length-prefixed byte string of at most `limit` bytes; the length is
    /// checked before anything is allocated.
    public mutating func readBytes(_ field: String, limit: Int) throws(CodecError) -> [UInt8] {
        let length = Int(try readUInt32(field + " length"))
        guard length <= limit else { throw .tooLarge(field: field, length: length, limit: limit) }
        return Array(try take(length, field))
    }

    public mutating func readIDs(_ field: String) throws(CodecError) -> [NodeID] {
        let count = Int(try readUInt32(field + " count"))
        guard count <= CodecLimits.nodeIDsMax else { throw .tooLarge(field: field, length: count, limit: CodecLimits.nodeIDsMax) }
        guard count * 8 <= remaining else { throw .truncated(field: field, needed: count * 8, remaining: remaining) }
        var ids: [NodeID] = []
        ids.reserveCapacity(count)
        for _ in 0..<count { ids.append(try readUInt64(field)) }
        return ids
    }

    public func expectEnd() throws(CodecError) {
        guard remaining == 0 else { throw .trailingBytes(count: remaining) }
    }
}

extension EntryPayload {
    public func encode(into writer: inout BinaryWriter) {
        switch self {
        case .noop:
            writer.write(UInt8(0))
        case .command(let bytes):
            writer.write(UInt8(1))
            writer.writeBytes(bytes)
        case .configChange(let change):
            writer.write(UInt8(2))
            switch change {
            case .bootstrap(let voters):
                writer.write(UInt8(0))
                writer.writeIDs(voters)
            case .addLearner(let id):
                writer.write(UInt8(1))
                writer.write(id)
            case .promoteLearner(let id):
                writer.write(UInt8(2))
                writer.write(id)
            case .removeNode(let id):
                writer.write(UInt8(3))
                writer.write(id)
            }
        }
    }

    public static func decode(from reader: inout BinaryReader) throws(CodecError) -> EntryPayload {
        switch try reader.readUInt8("payload tag") {
        case 0: return .noop
        case 1: return .command(try reader.readBytes("command", limit: CodecLimits.commandBytesMax))
        case 2:
            switch try reader.readUInt8("config change tag") {
            case 0: return .configChange(.bootstrap(voters: try reader.readIDs("bootstrap voters")))
            case 1: return .configChange(.addLearner(try reader.readUInt64("node id")))
            case 2: return .configChange(.promoteLearner(try reader.readUInt64("node id")))
            case 3: return .configChange(.removeNode(try reader.readUInt64("node id")))
            case let tag: throw .unknownTag(field: "config change", tag: tag)
            }
        case let tag: throw .unknownTag(field: "payload", tag: tag)
        }
    }

    /// The payload alone, as stored beside an entry's index and term.
    public var encoded: [UInt8] {
        var writer = BinaryWriter(capacity: byteCount + 8)
        encode(into: &writer)
        return writer.bytes
    }

    /// Decodes exactly one payload from `bytes`.
    public init(decoding bytes: [UInt8]) throws(CodecError) {
        var reader = BinaryReader(bytes)
        self = try EntryPayload.decode(from: &reader)
        try reader.expectEnd()
    }
}

extension Membership {
    public var encoded: [UInt8] {
        var writer = BinaryWriter()
        writer.writeIDs(voters.sorted())
        writer.writeIDs(learners.sorted())
        writer.writeIDs(removed.sorted())
        return writer.bytes
    }

    public init(decoding bytes: [UInt8]) throws(CodecError) {
        var reader = BinaryReader(bytes)
        let voters = Set(try reader.readIDs("voters"))
        let learners = Set(try reader.readIDs("learners"))
        let removed = Set(try reader.readIDs("removed"))
        try reader.expectEnd()
        guard voters.isDisjoint(with: learners), !voters.contains(noNode), !learners.contains(noNode) else {
            throw .invalid(field: "membership", reason: "a node is both voter and learner, or has id 0")
        }
        self.init(voters: voters, learners: learners, removed: removed)
    }
}
