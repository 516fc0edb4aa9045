/// Text from bytes that must be UTF-8 (the Raft codec's and the JSON
/// parsers' strings).
public enum UTF8Text {
    /// `bytes` as a string, or nil if they are not valid UTF-8. ASCII (the
    /// names, identifiers and paths the ledger decodes, nearly all of
    /// them) is checked eight bytes at a time and taken as it is; anything
    /// else goes through the standard library's validation, which is
    /// generic and costs over twice as much for short ASCII strings.
    public static func string(_ bytes: UnsafeBufferPointer<UInt8>) -> String? {
        guard isASCII(bytes) else { return String(validating: bytes, as: UTF8.self) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The first `count` bytes of `text`, which is ASCII (a hex digest, an
    /// id), cut by bytes: `String.prefix` walks characters, which showed
    /// on the issuance path (serials, token and actor names).
    public static func prefix(_ text: String, bytes count: Int) -> String {
        withBytes(of: text) { String(decoding: UnsafeBufferPointer(rebasing: $0.prefix(count)), as: UTF8.self) }
    }

    /// `body` over `text`'s UTF-8, read where it lies (a native or small
    /// string, nearly all of them) without copying the string: the copy
    /// `String.withUTF8` needs (it is mutating) was a retain and a release
    /// each time, on every name compared and every field written while
    /// applying an issuance. A bridged string is copied into native
    /// storage first.
    @inlinable
    public static func withBytes<T>(of text: String, _ body: (UnsafeBufferPointer<UInt8>) throws -> T) rethrows -> T {
        if let result = try text.utf8.withContiguousStorageIfAvailable(body) { return result }
        var text = text
        return try text.withUTF8(body)
    }

    public static func isASCII(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        let raw = UnsafeRawPointer(base)
        var i = 0
        while i + 8 <= bytes.count {
            if raw.loadUnaligned(fromByteOffset: i, as: UInt64.self) & 0x8080_8080_8080_8080 != 0 { return false }
            i += 8
        }
        while i < bytes.count {
            if bytes[i] >= 0x80 { return false }
            i += 1
        }
        return true
    }
}
