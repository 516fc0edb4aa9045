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

    /// Whether `scalar` changes how a line reads where it is shown: C0
    /// and C1 controls and DEL (terminal escapes, line breaks; U+009B is
    /// a CSI to some terminals), Unicode's line and paragraph separators,
    /// and the bidirectional controls (text shown in another order than
    /// it is stored, as in "Trojan Source").
    public static func altersDisplay(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0..<0x20, 0x7F...0x9F, 0x061C, 0x200E, 0x200F, 0x2028, 0x2029, 0x202A...0x202E, 0x2066...0x2069: true
        default: false
        }
    }

    /// `text` to print on a terminal: each scalar that `altersDisplay`
    /// written as `\u{XXXX}`, the rest as it is.
    public static func forDisplay(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: altersDisplay) else { return text }
        var shown = ""
        shown.reserveCapacity(text.utf8.count + 16)
        for scalar in text.unicodeScalars {
            if altersDisplay(scalar) {
                let hex = String(scalar.value, radix: 16, uppercase: true)
                shown += "\\u{" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex + "}"
            } else {
                shown.unicodeScalars.append(scalar)
            }
        }
        return shown
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
