import Encoding

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

    public mutating func reserve(_ capacity: Int) { bytes.reserveCapacity(capacity) }

    public mutating func write(_ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func write(_ value: UInt64) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// A 32-bit length, then the bytes.
    public mutating func writeBytes(_ value: some Collection<UInt8>) {
        write(UInt32(value.count))
        bytes.append(contentsOf: value)
    }

    // The two kinds every encoder writes, without the generic path (a
    // call from another module is not specialized).
    public mutating func writeBytes(_ value: [UInt8]) {
        write(UInt32(value.count))
        bytes.append(contentsOf: value)
    }

    public mutating func writeBytes(_ value: String.UTF8View) {
        write(UInt32(value.count))
        let copied: Void? = value.withContiguousStorageIfAvailable { bytes.append(contentsOf: $0) }
        if copied == nil { bytes.append(contentsOf: value) }
    }

    /// Empties the buffer, keeping its memory for the next use unless it
    /// grew past `keepingAtMost` bytes.
    public mutating func removeAll(keepingAtMost limit: Int) {
        bytes.removeAll(keepingCapacity: bytes.capacity <= limit)
    }

    /// Drops the first `count` bytes (those already written out).
    public mutating func removeFirst(_ count: Int) {
        bytes.removeFirst(count)
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
        try readUInt32(named: { field })
    }

    /// The field's name is made only for an error (a length before every
    /// string would otherwise build "<field> length" each time).
    private mutating func readUInt32(named field: () -> String) throws(CodecError) -> UInt32 {
        guard remaining >= 4 else { throw .truncated(field: field(), needed: 4, remaining: remaining) }
        defer { position += 4 }
        return bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: position, as: UInt32.self)) }
    }

    public mutating func readUInt64(_ field: String) throws(CodecError) -> UInt64 {
        guard remaining >= 8 else { throw .truncated(field: field, needed: 8, remaining: remaining) }
        defer { position += 8 }
        return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: position, as: UInt64.self)) }
    }

    /// A length-prefixed string of at most `limit` bytes that must be UTF-8
    /// (read without an intermediate array).
    public mutating func readString(_ field: String, limit: Int) throws(CodecError) -> String {
        let length = Int(try readUInt32(named: { field + " length" }))
        guard length <= limit else { throw .tooLarge(field: field, length: length, limit: limit) }
        guard length <= remaining else { throw .truncated(field: field, needed: length, remaining: remaining) }
        let start = position
        let text = bytes.withUnsafeBufferPointer { UTF8Text.string(UnsafeBufferPointer(rebasing: $0[start..<(start + length)])) }
        guard let text else { throw .invalid(field: field, reason: "not UTF-8") }
        position += length
        return text
    }

    /// A length-prefixed byte string of at most `limit` bytes; the length is
    /// checked before anything is allocated.
    public mutating func readBytes(_ field: String, limit: Int) throws(CodecError) -> [UInt8] {
        let length = Int(try readUInt32(named: { field + " length" }))
        guard length <= limit else { throw .tooLarge(field: field, length: length, limit: limit) }
        return Array(try take(length, field))
    }

    public mutating func readIDs(_ field: String) throws(CodecError) -> [NodeID] {
        let count = Int(try readUInt32(named: { field + " count" }))
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
        case .released:
            preconditionFailure("a released payload was encoded: the driver reads released entries back before they leave the node")
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

extension CodecLimits {
    /// Entries in one AppendEntries or forwarded proposal.
    public static let entriesPerMessageMax = 1 << 20
    /// Snapshot bytes carried inline in one message.
    public static let snapshotBytesMax = 256 << 20
    /// Bytes in one piece of a streamed snapshot.
    public static let snapshotChunkBytesMax = 16 << 20
    /// The longest snapshot stream (1 TiB: a bound on what a follower
    /// agrees to stage, not a size anyone expects).
    public static let snapshotStreamBytesMax: UInt64 = 1 << 40
}

extension BinaryWriter {
    mutating func write(_ flag: Bool) { write(UInt8(flag ? 1 : 0)) }

    mutating func write(_ entry: Entry) {
        write(entry.term)
        write(entry.index)
        entry.payload.encode(into: &self)
    }
}

extension BinaryWriter {
    /// Index, term, membership.
    public mutating func write(_ metadata: SnapshotMetadata) {
        write(metadata.index)
        write(metadata.term)
        writeBytes(metadata.membership.encoded)
    }
}

extension BinaryReader {
    /// What `BinaryWriter.write(_: SnapshotMetadata)` wrote.
    public mutating func readSnapshotMetadata() throws(CodecError) -> SnapshotMetadata {
        let index = try readUInt64("snapshot index")
        let term = try readUInt64("snapshot term")
        let membership = try Membership(decoding: try readBytes("snapshot membership", limit: 16 * CodecLimits.nodeIDsMax))
        return SnapshotMetadata(index: index, term: term, membership: membership)
    }

    mutating func readBool(_ field: String) throws(CodecError) -> Bool {
        switch try readUInt8(field) {
        case 0: return false
        case 1: return true
        case let other: throw .invalid(field: field, reason: "\(other) is neither 0 nor 1")
        }
    }

    mutating func readCount(_ field: String, limit: Int, bytesEachMin: Int) throws(CodecError) -> Int {
        let count = Int(try readUInt32(named: { field + " count" }))
        guard count <= limit else { throw .tooLarge(field: field, length: count, limit: limit) }
        // Refuse counts the remaining bytes cannot hold before allocating.
        guard count * bytesEachMin <= remaining else { throw .truncated(field: field, needed: count * bytesEachMin, remaining: remaining) }
        return count
    }

    mutating func readEntry() throws(CodecError) -> Entry {
        let term = try readUInt64("entry term")
        let index = try readUInt64("entry index")
        return Entry(term: term, index: index, payload: try EntryPayload.decode(from: &self))
    }
}

extension Message {
    /// The encoding version; a decoder refuses any other.
    public static let encodingVersion: UInt8 = 1

    /// The message as bytes: version, sender, receiver, term, a body tag and
    /// the body's fields.
    public var encoded: [UInt8] {
        var w = BinaryWriter(capacity: byteCount + 32)
        w.write(Message.encodingVersion)
        w.write(from)
        w.write(to)
        w.write(term)
        switch body {
        case .appendEntries(let a):
            w.write(UInt8(0))
            w.write(a.prevLogIndex)
            w.write(a.prevLogTerm)
            w.write(a.leaderCommit)
            w.write(UInt32(a.entries.count))
            for entry in a.entries { w.write(entry) }
        case .appendEntriesResponse(let r):
            w.write(UInt8(1))
            w.write(r.index)
            w.write(r.rejected)
            w.write(r.hintIndex)
            w.write(r.hintTerm)
            w.write(r.commitIndex)
        case .requestVote(let v):
            w.write(UInt8(2))
            w.write(v.lastLogIndex)
            w.write(v.lastLogTerm)
            w.write(v.preVote)
            w.write(v.leadershipTransfer)
        case .requestVoteResponse(let r):
            w.write(UInt8(3))
            w.write(r.granted)
            w.write(r.preVote)
        case .heartbeat(let h):
            w.write(UInt8(4))
            w.write(h.commit)
            w.write(h.readRound)
        case .heartbeatResponse(let r):
            w.write(UInt8(5))
            w.write(r.readRound)
            w.write(r.commitIndex)
        case .installSnapshot(let s):
            w.write(UInt8(6))
            w.write(s.metadata)
            w.writeBytes(s.data)
        case .timeoutNow:
            w.write(UInt8(7))
        case .forwardedProposal(let payloads):
            w.write(UInt8(8))
            w.write(UInt32(payloads.count))
            for payload in payloads { payload.encode(into: &w) }
        case .readIndexRequest(let requestID):
            w.write(UInt8(9))
            w.write(requestID)
        case .readIndexResponse(let requestID, let index):
            w.write(UInt8(10))
            w.write(requestID)
            w.write(index)
        case .readIndexRefused(let requestID):
            w.write(UInt8(11))
            w.write(requestID)
        case .snapshotChunk(let c):
            w.write(UInt8(12))
            w.write(c.metadata)
            w.write(c.totalBytes)
            w.write(c.checksum)
            w.write(c.offset)
            w.writeBytes(c.bytes)
        case .snapshotChunkAck(let index, let snapshotTerm, let received):
            w.write(UInt8(13))
            w.write(index)
            w.write(snapshotTerm)
            w.write(received)
        }
        return w.bytes
    }

    /// Decodes exactly one message; anything else (another version, an
    /// unknown tag, a bad flag, a count past its limit, trailing bytes) is
    /// a `CodecError`.
    public init(decoding bytes: [UInt8]) throws(CodecError) {
        var r = BinaryReader(bytes)
        let version = try r.readUInt8("version")
        guard version == Message.encodingVersion else {
            throw .invalid(field: "version", reason: "version \(version) is not supported (expected \(Message.encodingVersion))")
        }
        let from = try r.readUInt64("from")
        let to = try r.readUInt64("to")
        let term = try r.readUInt64("term")
        let body: MessageBody
        switch try r.readUInt8("message tag") {
        case 0:
            let prevLogIndex = try r.readUInt64("prevLogIndex")
            let prevLogTerm = try r.readUInt64("prevLogTerm")
            let leaderCommit = try r.readUInt64("leaderCommit")
            let count = try r.readCount("entries", limit: CodecLimits.entriesPerMessageMax, bytesEachMin: 17)
            var entries: [Entry] = []
            entries.reserveCapacity(count)
            for _ in 0..<count { entries.append(try r.readEntry()) }
            body = .appendEntries(AppendEntries(prevLogIndex: prevLogIndex, prevLogTerm: prevLogTerm, entries: entries, leaderCommit: leaderCommit))
        case 1:
            let index = try r.readUInt64("index")
            let rejected = try r.readBool("rejected")
            let hintIndex = try r.readUInt64("hintIndex")
            let hintTerm = try r.readUInt64("hintTerm")
            let commitIndex = try r.readUInt64("commitIndex")
            body = .appendEntriesResponse(AppendEntriesResponse(index: index, rejected: rejected, hintIndex: hintIndex, hintTerm: hintTerm, commitIndex: commitIndex))
        case 2:
            let lastLogIndex = try r.readUInt64("lastLogIndex")
            let lastLogTerm = try r.readUInt64("lastLogTerm")
            let preVote = try r.readBool("preVote")
            let transfer = try r.readBool("leadershipTransfer")
            body = .requestVote(RequestVote(lastLogIndex: lastLogIndex, lastLogTerm: lastLogTerm, preVote: preVote, leadershipTransfer: transfer))
        case 3:
            let granted = try r.readBool("granted")
            let preVote = try r.readBool("preVote")
            body = .requestVoteResponse(RequestVoteResponse(granted: granted, preVote: preVote))
        case 4:
            let commit = try r.readUInt64("commit")
            let readRound = try r.readUInt64("readRound")
            body = .heartbeat(Heartbeat(commit: commit, readRound: readRound))
        case 5:
            let readRound = try r.readUInt64("readRound")
            let commitIndex = try r.readUInt64("commitIndex")
            body = .heartbeatResponse(HeartbeatResponse(readRound: readRound, commitIndex: commitIndex))
        case 6:
            let metadata = try r.readSnapshotMetadata()
            let data = try r.readBytes("snapshot data", limit: CodecLimits.snapshotBytesMax)
            body = .installSnapshot(Snapshot(metadata: metadata, data: data))
        case 7:
            body = .timeoutNow
        case 8:
            let count = try r.readCount("proposals", limit: CodecLimits.entriesPerMessageMax, bytesEachMin: 1)
            var payloads: [EntryPayload] = []
            payloads.reserveCapacity(count)
            for _ in 0..<count { payloads.append(try EntryPayload.decode(from: &r)) }
            body = .forwardedProposal(payloads)
        case 9:
            body = .readIndexRequest(requestID: try r.readUInt64("requestID"))
        case 10:
            let requestID = try r.readUInt64("requestID")
            body = .readIndexResponse(requestID: requestID, index: try r.readUInt64("index"))
        case 11:
            body = .readIndexRefused(requestID: try r.readUInt64("requestID"))
        case 12:
            let metadata = try r.readSnapshotMetadata()
            let total = try r.readUInt64("snapshot stream length")
            let checksum = try r.readUInt32("snapshot stream checksum")
            let offset = try r.readUInt64("chunk offset")
            let bytes = try r.readBytes("chunk bytes", limit: CodecLimits.snapshotChunkBytesMax)
            guard total <= CodecLimits.snapshotStreamBytesMax else {
                throw .tooLarge(field: "snapshot stream", length: Int(clamping: total), limit: Int(CodecLimits.snapshotStreamBytesMax))
            }
            guard offset <= total, UInt64(bytes.count) <= total - offset else {
                throw .invalid(field: "chunk offset", reason: "bytes \(offset)..<\(offset + UInt64(bytes.count)) lie outside a stream of \(total)")
            }
            body = .snapshotChunk(SnapshotChunk(metadata: metadata, totalBytes: total, checksum: checksum, offset: offset, bytes: bytes))
        case 13:
            let index = try r.readUInt64("snapshot index")
            let snapshotTerm = try r.readUInt64("snapshot term")
            body = .snapshotChunkAck(index: index, snapshotTerm: snapshotTerm, received: try r.readUInt64("received"))
        case let tag:
            throw .unknownTag(field: "message", tag: tag)
        }
        try r.expectEnd()
        self.init(from: from, to: to, term: term, body: body)
    }
}
