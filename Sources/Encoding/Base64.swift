#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// PEM (RFC 7468) written and read by hand on hot paths: one certificate
/// per issuance, one CSR per request.
public enum PEMText {
    /// `-----BEGIN <label>-----`, base64 in lines of 64, the END line, a newline.
    public static func encode(_ der: [UInt8], label: String) -> String {
        let base64 = Array(Base64.encode(der).utf8)
        var out = Array("-----BEGIN \(label)-----\n".utf8)
        out.reserveCapacity(base64.count + base64.count / 64 + 64)
        var i = 0
        while i < base64.count {
            let end = min(i + 64, base64.count)
            out += base64[i..<end]
            out.append(0x0A)
            i = end
        }
        out += Array("-----END \(label)-----\n".utf8)
        return String(decoding: out, as: UTF8.self)
    }

    /// The DER inside exactly one PEM block with this label (text around it
    /// is allowed, other blocks are not); nil for anything else. Byte-wise:
    /// the base64 between the markers may be broken by ASCII whitespace.
    public static func decode(_ text: String, label: String) -> [UInt8]? {
        guard let blocks = try? decodeAll(text, label: label, limit: 1), blocks.count == 1 else { return nil }
        return blocks[0]
    }

    /// The DER inside each PEM block with this label, in order (a chain:
    /// leaf first), at most `limit` of them. Text between and around the
    /// blocks is allowed (RFC 7468's explanatory text), a block with
    /// another label is not; the base64 may be broken by ASCII whitespace.
    public static func decodeAll(_ text: String, label: String, limit: Int) throws(PEMError) -> [[UInt8]] {
        return try UTF8Text.withBytes(of: text) { bytes in Result { () throws(PEMError) in try decodeAll(bytes, label: label, limit: limit) } }.get()
    }

    private static func decodeAll(_ bytes: UnsafeBufferPointer<UInt8>, label: String, limit: Int) throws(PEMError) -> [[UInt8]] {
        let begin = Array("-----BEGIN \(label)-----".utf8), end = Array("-----END \(label)-----".utf8)
        let anyBegin = Array("-----BEGIN".utf8)
        var blocks: [[UInt8]] = []
        var position = 0
        var next = firstIndex(of: anyBegin, in: bytes, from: 0)
        while let start = next {
            guard firstIndex(of: end, in: UnsafeBufferPointer(rebasing: bytes[..<start]), from: position) == nil else { throw .noBegin(label: label) }
            guard start + begin.count <= bytes.count, bytes[start..<(start + begin.count)].elementsEqual(begin) else {
                throw .otherLabel(expected: label)
            }
            guard blocks.count < limit else { throw .tooMany(limit: limit) }
            let body = start + begin.count
            guard let stop = firstIndex(of: end, in: bytes, from: body) else { throw .noEnd(block: blocks.count + 1, label: label) }
            // The next BEGIN, found once: inside this block it tears it.
            next = firstIndex(of: anyBegin, in: bytes, from: body)
            if let inside = next, inside < stop { throw .noEnd(block: blocks.count + 1, label: label) }
            guard let der = Base64.decode(UnsafeBufferPointer(rebasing: bytes[body..<stop]), skippingWhitespace: true) else {
                throw .badBase64(block: blocks.count + 1)
            }
            blocks.append(der)
            position = stop + end.count
        }
        // An END line with no BEGIN before it is a torn block.
        guard firstIndex(of: end, in: bytes, from: position) == nil else { throw .noBegin(label: label) }
        return blocks
    }

    private static func firstIndex(of needle: [UInt8], in haystack: UnsafeBufferPointer<UInt8>, from: Int) -> Int? {
        guard let first = needle.first, haystack.count >= needle.count, let base = haystack.baseAddress else { return nil }
        var i = from
        while i + needle.count <= haystack.count {
            // The needle's first byte ('-') by memchr: base64 has none, so
            // the search skips a block's body in one call (byte by byte it
            // was 0.7% of a follower verifying chains).
            guard let hit = memchr(base + i, Int32(first), haystack.count - needle.count + 1 - i) else { return nil }
            i = base.distance(to: hit.assumingMemoryBound(to: UInt8.self))
            var j = 1
            while j < needle.count && haystack[i + j] == needle[j] { j += 1 }
            if j == needle.count { return i }
            i += 1
        }
        return nil
    }
}

/// Why text is not the PEM blocks asked for.
public enum PEMError: Error, Sendable, Equatable, CustomStringConvertible {
    case otherLabel(expected: String)
    case tooMany(limit: Int)
    case noEnd(block: Int, label: String)
    case noBegin(label: String)
    case badBase64(block: Int)

    public var description: String {
        switch self {
        case .otherLabel(let label): return "a PEM block is not a \(label)"
        case .tooMany(let limit): return "more than \(limit) PEM blocks"
        case .noEnd(let block, let label): return "PEM block \(block) has no -----END \(label)----- line"
        case .noBegin(let label): return "an -----END \(label)----- line has no BEGIN line before it"
        case .badBase64(let block): return "PEM block \(block) is not base64"
        }
    }
}

/// Base64 (RFC 4648): one codec, two alphabets.
private struct Base64Codec {
    let alphabet: [UInt8]
    let values: [UInt8]
    let padded: Bool

    init(_ characters: String, padded: Bool) {
        alphabet = Array(characters.utf8)
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (value, character) in alphabet.enumerated() { table[Int(character)] = UInt8(value) }
        values = table
        self.padded = padded
    }

    func encode(_ bytes: some Collection<UInt8>) -> String {
        var out = [UInt8]()
        encode(bytes, into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends the encoding of `bytes` to `out`.
    func encode(_ bytes: some Collection<UInt8>, into out: inout [UInt8]) {
        if let done: Void = bytes.withContiguousStorageIfAvailable({ encode(contiguous: $0, into: &out) }) { return done }
        Array(bytes).withUnsafeBufferPointer { encode(contiguous: $0, into: &out) }
    }

    private func encode(contiguous input: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) {
        let full = input.count / 3, rest = input.count % 3
        let count = full * 4 + (rest == 0 ? 0 : padded ? 4 : rest + 1)
        let start = out.count
        out.append(contentsOf: repeatElement(0, count: count))
        alphabet.withUnsafeBufferPointer { alphabet in
            out.withUnsafeMutableBufferPointer { all in
                var o = start, i = 0
                for _ in 0..<full {
                    let n = UInt32(input[i]) << 16 | UInt32(input[i + 1]) << 8 | UInt32(input[i + 2])
                    all[o] = alphabet[Int(n >> 18 & 63)]
                    all[o + 1] = alphabet[Int(n >> 12 & 63)]
                    all[o + 2] = alphabet[Int(n >> 6 & 63)]
                    all[o + 3] = alphabet[Int(n & 63)]
                    i += 3
                    o += 4
                }
                guard rest > 0 else { return }
                let n = UInt32(input[i]) << 16 | (rest == 2 ? UInt32(input[i + 1]) << 8 : 0)
                all[o] = alphabet[Int(n >> 18 & 63)]
                all[o + 1] = alphabet[Int(n >> 12 & 63)]
                if rest == 2 { all[o + 2] = alphabet[Int(n >> 6 & 63)] } else if padded { all[o + 2] = 0x3D }
                if padded { all[o + 3] = 0x3D }
            }
        }
    }

    /// Nil for a length that cannot occur, another character, padding
    /// where there should be none (or none where there should be), or
    /// non-zero bits left over in the last character.
    func decode(_ text: some StringProtocol) -> [UInt8]? { decode(Array(text.utf8)) }

    /// The same over bytes; with `skippingWhitespace`, ASCII space, tab,
    /// CR, LF, FF and VT are left out first (PEM's line breaks).
    func decode(_ bytes: some Collection<UInt8>, skippingWhitespace: Bool = false) -> [UInt8]? {
        if skippingWhitespace {
            var input: [UInt8] = []
            input.reserveCapacity(bytes.count)
            for byte in bytes where !(byte == 0x20 || (byte >= 0x09 && byte <= 0x0D)) { input.append(byte) }
            return input.withUnsafeBufferPointer { decode(contiguous: $0) }
        }
        if let decoded = bytes.withContiguousStorageIfAvailable({ decode(contiguous: $0) }) { return decoded }
        return Array(bytes).withUnsafeBufferPointer { decode(contiguous: $0) }
    }

    /// The decoder itself, over bytes in place (a token's segments are
    /// slices of it): output sized once, read through raw pointers.
    private func decode(contiguous buffer: UnsafeBufferPointer<UInt8>) -> [UInt8]? {
        var count = buffer.count
        if padded {
            guard count % 4 == 0 else { return nil }
            if count > 0 && buffer[count - 1] == 0x3D { count -= 1 }
            if count > 0 && buffer[count - 1] == 0x3D { count -= 1 }
        }
        guard count % 4 != 1 else { return nil }
        let outCount = count * 3 / 4
        var valid = true
        let out = values.withUnsafeBufferPointer { table in
            [UInt8](unsafeUninitializedCapacity: outCount) { out, initialized in
                var accumulator: UInt32 = 0
                var bits = 0
                var written = 0
                for i in 0..<count {
                    let value = table[Int(buffer[i])]
                    guard value != 0xFF else { valid = false; break }
                    accumulator = accumulator << 6 | UInt32(value)
                    bits += 6
                    if bits >= 8 {
                        bits -= 8
                        out[written] = UInt8(truncatingIfNeeded: accumulator >> UInt32(bits))
                        written += 1
                    }
                }
                if valid && accumulator & ((1 << UInt32(bits)) - 1) != 0 { valid = false }
                initialized = written
            }
        }
        return valid ? out : nil
    }
}

/// Standard base64 (RFC 4648 section 4), with padding.
public enum Base64 {
    private static let codec = Base64Codec("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", padded: true)
    public static func encode(_ bytes: some Collection<UInt8>) -> String { codec.encode(bytes) }
    public static func decode(_ text: some StringProtocol) -> [UInt8]? { codec.decode(text) }
    public static func decode(_ bytes: some Collection<UInt8>, skippingWhitespace: Bool) -> [UInt8]? {
        codec.decode(bytes, skippingWhitespace: skippingWhitespace)
    }
}

/// Unpadded base64url (RFC 4648 section 5), as JOSE uses it.
public enum Base64URL {
    private static let codec = Base64Codec("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", padded: false)
    public static func encode(_ bytes: some Collection<UInt8>) -> String { codec.encode(bytes) }
    /// Appends the encoding of `bytes` to `out` (a token built in one buffer).
    public static func encode(_ bytes: some Collection<UInt8>, into out: inout [UInt8]) { codec.encode(bytes, into: &out) }
    public static func decode(_ text: some StringProtocol) -> [UInt8]? { codec.decode(text) }
    public static func decode(_ bytes: some Collection<UInt8>) -> [UInt8]? { codec.decode(bytes) }
}
