import Raft

/// One unit on a node-to-node connection: a 4-byte little-endian length
/// (of what follows), a kind byte, and the kind's bytes.
public enum Frame: Sendable, Hashable {
    /// A Raft message in the `Raft` codec.
    case raftMessage(Message)
    /// One piece of a message too large for one frame (a snapshot): the
    /// pieces of one message travel in order on one connection.
    case chunk(MessageChunk)
    /// The sender's wall clock as the frame was made: peers compare clocks
    /// with it (`PeerClocks`), the Raft core never sees it.
    case clock(ClockStamp)

    public enum Kind: UInt8, Sendable {
        case raftMessage = 1
        case chunk = 2
        case clock = 3
    }

    /// The frames that carry `message`: one, or pieces of at most
    /// `chunkBytes` when it is larger.
    public static func frames(for message: Message, chunkBytes: Int, messageID: UInt64) -> [Frame] {
        guard message.byteCount > chunkBytes else { return [.raftMessage(message)] }
        let bytes = message.encoded
        guard bytes.count > chunkBytes, bytes.count <= Int(UInt32.max) else { return [.raftMessage(message)] }
        return stride(from: 0, to: bytes.count, by: chunkBytes).map { offset in
            .chunk(MessageChunk(messageID: messageID, totalBytes: UInt32(bytes.count), offset: UInt32(offset),
                                bytes: Array(bytes[offset..<min(offset + chunkBytes, bytes.count)])))
        }
    }

    /// Bytes of the length prefix.
    public static let headerBytes = 4

    public var encoded: [UInt8] {
        var body: [UInt8]
        switch self {
        case .raftMessage(let message):
            body = [Kind.raftMessage.rawValue]
            body.append(contentsOf: message.encoded)
        case .chunk(let chunk):
            var w = BinaryWriter(capacity: chunk.bytes.count + 17)
            w.write(Kind.chunk.rawValue)
            w.write(chunk.messageID)
            w.write(chunk.totalBytes)
            w.write(chunk.offset)
            body = w.bytes
            body.append(contentsOf: chunk.bytes)
        case .clock(let stamp):
            var w = BinaryWriter(capacity: 17)
            w.write(Kind.clock.rawValue)
            w.write(stamp.from)
            w.write(stamp.wallMillis)
            body = w.bytes
        }
        var writer = BinaryWriter(capacity: body.count + Frame.headerBytes)
        writer.write(UInt32(body.count))
        var bytes = writer.bytes
        bytes.append(contentsOf: body)
        return bytes
    }
}

/// Why a connection's byte stream was refused. The connection is closed
/// with this reason logged; the node itself carries on.
public enum FrameError: Error, Sendable, Hashable, CustomStringConvertible {
    case oversized(length: Int, limitBytes: Int)
    case empty
    case unknownKind(UInt8)
    case malformed(kind: UInt8, CodecError)
    case chunkOutOfOrder(String)

    public var description: String {
        switch self {
        case .oversized(let length, let limit): return "frame of \(length) bytes exceeds the \(limit)-byte limit"
        case .empty: return "empty frame"
        case .unknownKind(let kind): return "unknown frame kind \(kind)"
        case .malformed(let kind, let error): return "malformed frame of kind \(kind): \(error)"
        case .chunkOutOfOrder(let reason): return "chunked message out of order: \(reason)"
        }
    }
}

/// Turns a byte stream, arriving in pieces of any size, into frames. Call
/// `next()` after every `append` until it returns nil; then the decoder
/// holds at most one partial frame, whose announced length was checked
/// against `frameBytesMax` before its body was waited for. After an error
/// the stream is unusable (the connection must be closed).
public struct FrameDecoder: Sendable {
    public let frameBytesMax: Int
    private var buffer: [UInt8] = []
    private var start = 0
    private(set) public var failed: FrameError?

    public init(frameBytesMax: Int = 16 << 20) {
        precondition(frameBytesMax >= 64, "frames must at least hold a small message")
        self.frameBytesMax = frameBytesMax
    }

    /// Bytes received and not yet returned as frames.
    public var bufferedBytes: Int { buffer.count - start }

    public mutating func append(_ bytes: some Collection<UInt8>) {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, nil if more bytes are needed.
    public mutating func next() throws(FrameError) -> Frame? {
        if let failed { throw failed }
        do {
            return try decodeNext()
        } catch {
            failed = error
            buffer.removeAll()
            start = 0
            throw error
        }
    }

    private mutating func decodeNext() throws(FrameError) -> Frame? {
        guard bufferedBytes >= Frame.headerBytes else { return nil }
        var length = 0
        for offset in 0..<Frame.headerBytes { length |= Int(buffer[start + offset]) << (offset * 8) }
        guard length <= frameBytesMax else { throw .oversized(length: length, limitBytes: frameBytesMax) }
        guard length > 0 else { throw .empty }
        guard bufferedBytes >= Frame.headerBytes + length else { return nil }
        let bodyStart = start + Frame.headerBytes
        let kind = buffer[bodyStart]
        let body = Array(buffer[(bodyStart + 1)..<(bodyStart + length)])
        start = bodyStart + length
        if start > 4096 && start * 2 > buffer.count {
            buffer.removeFirst(start)
            start = 0
        }
        switch Frame.Kind(rawValue: kind) {
        case .raftMessage:
            do {
                return .raftMessage(try Message(decoding: body))
            } catch {
                throw .malformed(kind: kind, error)
            }
        case .chunk:
            do throws(CodecError) {
                var r = BinaryReader(body)
                let id = try r.readUInt64("message id")
                let total = try r.readUInt32("total bytes")
                let offset = try r.readUInt32("offset")
                let bytes = Array(body[16...])
                guard !bytes.isEmpty, UInt64(offset) + UInt64(bytes.count) <= UInt64(total) else {
                    throw CodecError.invalid(field: "chunk", reason: "\(bytes.count) bytes at \(offset) do not fit in \(total)")
                }
                return .chunk(MessageChunk(messageID: id, totalBytes: total, offset: offset, bytes: bytes))
            } catch {
                throw .malformed(kind: kind, error)
            }
        case .clock:
            do throws(CodecError) {
                guard body.count == 16 else { throw CodecError.invalid(field: "clock", reason: "\(body.count) bytes, not 16") }
                var r = BinaryReader(body)
                let stamp = ClockStamp(from: try r.readUInt64("from"), wallMillis: try r.readUInt64("wall clock"))
                guard stamp.wallMillis <= ClockStamp.wallMillisMax else {
                    throw CodecError.invalid(field: "clock", reason: "wall clock \(stamp.wallMillis) ms is past any plausible time")
                }
                return .clock(stamp)
            } catch {
                throw .malformed(kind: kind, error)
            }
        case nil:
            throw .unknownKind(kind)
        }
    }
}

/// A node's wall clock (milliseconds since 1970) at the moment it framed
/// this stamp.
public struct ClockStamp: Sendable, Hashable {
    public var from: NodeID
    public var wallMillis: UInt64
    /// 2^53 ms, some 285,000 years: larger stamps are refused, so offsets
    /// (differences of two stamps) never overflow.
    public static let wallMillisMax: UInt64 = 1 << 53

    public init(from: NodeID, wallMillis: UInt64) {
        self.from = from
        self.wallMillis = wallMillis
    }
}

public struct MessageChunk: Sendable, Hashable {
    public var messageID: UInt64
    public var totalBytes: UInt32
    public var offset: UInt32
    public var bytes: [UInt8]

    public init(messageID: UInt64, totalBytes: UInt32, offset: UInt32, bytes: [UInt8]) {
        self.messageID = messageID
        self.totalBytes = totalBytes
        self.offset = offset
        self.bytes = bytes
    }
}

/// Puts a chunked message back together on one connection. Pieces must
/// come in order, one message at a time, within `messageBytesMax`; anything
/// else is an error (the connection is closed, the sender retries).
public struct ChunkAssembler: Sendable {
    public let messageBytesMax: Int
    private var current: (id: UInt64, total: Int, bytes: [UInt8])?

    public init(messageBytesMax: Int) {
        self.messageBytesMax = messageBytesMax
    }

    static let reservedBytesMax = 16 << 20

    /// The memory held for the message being put together (tests).
    package var bufferedCapacity: Int { current?.bytes.capacity ?? 0 }

    /// The whole message once its last piece arrived, else nil.
    public mutating func add(_ chunk: MessageChunk) throws(FrameError) -> Message? {
        if chunk.offset == 0 {
            guard current == nil else { throw .chunkOutOfOrder("a new message began before message \(current!.id) was complete") }
            guard Int(chunk.totalBytes) <= messageBytesMax else {
                throw .oversized(length: Int(chunk.totalBytes), limitBytes: messageBytesMax)
            }
            current = (chunk.messageID, Int(chunk.totalBytes), [])
            // What the first piece claims is reserved only up to a bound:
            // the rest grows as pieces arrive, so a claim alone holds no
            // memory.
            current!.bytes.reserveCapacity(min(Int(chunk.totalBytes), Self.reservedBytesMax))
        }
        guard var assembling = current, assembling.id == chunk.messageID, Int(chunk.offset) == assembling.bytes.count,
              Int(chunk.totalBytes) == assembling.total else {
            throw .chunkOutOfOrder("piece at \(chunk.offset) of message \(chunk.messageID) does not continue what was received")
        }
        current = nil // keep one copy while appending
        assembling.bytes.append(contentsOf: chunk.bytes)
        guard assembling.bytes.count == assembling.total else {
            current = assembling
            return nil
        }
        do {
            return try Message(decoding: assembling.bytes)
        } catch {
            throw .malformed(kind: Frame.Kind.chunk.rawValue, error)
        }
    }
}
