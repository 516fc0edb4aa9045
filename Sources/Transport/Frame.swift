import Raft

/// One unit on a node-to-node connection: a 4-byte little-endian length
/// (of what follows), a kind byte, and the kind's bytes.
public enum Frame: Sendable, Hashable {
    /// A Raft message in the `Raft` codec.
    case raftMessage(Message)

    public enum Kind: UInt8, Sendable {
        case raftMessage = 1
    }

    /// Bytes of the length prefix.
    public static let headerBytes = 4

    public var encoded: [UInt8] {
        var body: [UInt8]
        switch self {
        case .raftMessage(let message):
            body = [Kind.raftMessage.rawValue]
            body.append(contentsOf: message.encoded)
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

    public var description: String {
        switch self {
        case .oversized(let length, let limit): return "frame of \(length) bytes exceeds the \(limit)-byte limit"
        case .empty: return "empty frame"
        case .unknownKind(let kind): return "unknown frame kind \(kind)"
        case .malformed(let kind, let error): return "malformed frame of kind \(kind): \(error)"
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
        case nil:
            throw .unknownKind(kind)
        }
    }
}
