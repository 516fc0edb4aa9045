/// JSON written and read by hand on hot paths (JWT headers and claims, API
/// answers, the ledger's own records): JSONEncoder and JSONDecoder were a
/// large share of issuing and verifying an identity. Output is RFC 8259 JSON
/// with keys in the order given (callers sort them), so every node writes
/// the same bytes.
public enum JSONText {
    /// Whether a string literal must escape this byte (control
    /// characters, quote, backslash).
    static func needsEscape(_ byte: UInt8) -> Bool { byte < 0x20 || byte == 0x22 || byte == 0x5C }

    /// A JSON string literal for `text`: `"`, `\` and control characters
    /// escaped, everything else as is.
    public static func quote(_ text: String) -> String {
        var builder = Builder(capacity: text.utf8.count + 2)
        builder.quoted(text)
        return String(decoding: builder.bytes, as: UTF8.self)
    }

    /// Whether `bytes` are `text` as a JSON string literal (what `quote`
    /// writes), checked without making the literal when `text` needs no
    /// escaping.
    public static func isQuoted(_ bytes: [UInt8], _ text: String) -> Bool {
        let utf8 = text.utf8
        guard !utf8.contains(where: needsEscape) else { return bytes.elementsEqual(quote(text).utf8) }
        guard bytes.count == utf8.count + 2, bytes.first == 0x22, bytes.last == 0x22 else { return false }
        return bytes[1..<(bytes.count - 1)].elementsEqual(utf8)
    }

    /// An object of string members, keys sorted.
    public static func object(_ members: [String: String]) -> String {
        var builder = Builder(capacity: 64)
        builder.object(members)
        return String(decoding: builder.bytes, as: UTF8.self)
    }

    /// JSON written into bytes, piece by piece, with no intermediate strings.
    public struct Builder: Sendable {
        public private(set) var bytes: [UInt8] = []

        public init(capacity: Int) {
            bytes.reserveCapacity(capacity)
        }

        /// Bytes written as they are (punctuation, keys known to need no escaping).
        public mutating func raw(_ text: StaticString) {
            text.withUTF8Buffer { bytes.append(contentsOf: $0) }
        }

        /// JSON already written (by a builder), copied as it is.
        public mutating func raw(_ json: UnsafeBufferPointer<UInt8>) {
            bytes.append(contentsOf: json)
        }

        /// Text copied as it is, at most its first `limit` bytes: for text
        /// known to need no escaping, or output that is not JSON (an audit
        /// record's result is built here too).
        public mutating func unescaped(_ text: String, bytes limit: Int = .max) {
            UTF8Text.withBytes(of: text) { bytes.append(contentsOf: UnsafeBufferPointer(rebasing: $0.prefix(limit))) }
        }

        /// A string literal, escaped as `quote` does.
        public mutating func quoted(_ text: String) {
            UTF8Text.withBytes(of: text) { utf8 in
                bytes.append(0x22)
                // Most strings here (ids, digests, names) need no escaping:
                // one pass to find out, then one copy.
                if utf8.contains(where: JSONText.needsEscape) {
                    escaping(utf8)
                } else {
                    bytes.append(contentsOf: utf8)
                }
                bytes.append(0x22)
            }
        }

        /// `utf8` with what JSON requires escaped; runs that need nothing
        /// are copied whole (a PEM block is 64 characters between newlines).
        private mutating func escaping(_ utf8: UnsafeBufferPointer<UInt8>) {
            var start = 0
            for (position, byte) in utf8.enumerated() where JSONText.needsEscape(byte) {
                bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[start..<position]))
                start = position + 1
                bytes.append(0x5C)
                switch byte {
                case 0x22, 0x5C: bytes.append(byte)
                case 0x0A: bytes.append(0x6E)
                case 0x0D: bytes.append(0x72)
                case 0x09: bytes.append(0x74)
                default:
                    bytes.append(0x75)
                    bytes.append(0x30)
                    bytes.append(0x30)
                    bytes.append(Self.hex[Int(byte >> 4)])
                    bytes.append(Self.hex[Int(byte & 0x0F)])
                }
            }
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[start...]))
        }

        private static let hex: [UInt8] = Array("0123456789abcdef".utf8)

        /// A signed integer (JWT times).
        public mutating func number(_ value: Int) {
            if value < 0 {
                bytes.append(UInt8(ascii: "-"))
                integer(UInt64(value.magnitude))
            } else {
                integer(UInt64(value))
            }
        }

        public mutating func integer(_ value: UInt64) {
            // Digits written in place, most significant first (no buffer to allocate).
            var count = 1
            var power: UInt64 = 10
            while count < 20 && value >= power {
                count += 1
                power = power &* 10
            }
            let start = bytes.count
            bytes.append(contentsOf: repeatElement(0x30, count: count))
            var rest = value
            for position in stride(from: start + count - 1, through: start, by: -1) {
                bytes[position] = 0x30 + UInt8(rest % 10)
                rest /= 10
            }
        }

        public mutating func bool(_ value: Bool) {
            value ? raw("true") : raw("false")
        }

        /// An object of string members, keys sorted.
        public mutating func object(_ members: [String: String]) {
            bytes.append(0x7B)
            if members.count == 2 {
                // The usual size of an identity's context: ordered without
                // making a sorted array.
                let first = members.first!, second = members[members.index(after: members.startIndex)]
                let (low, high) = first.key < second.key ? (first, second) : (second, first)
                member(low.key, low.value)
                bytes.append(0x2C)
                member(high.key, high.value)
            } else {
                for (position, pair) in members.sorted(by: { $0.key < $1.key }).enumerated() {
                    if position > 0 { bytes.append(0x2C) }
                    member(pair.key, pair.value)
                }
            }
            bytes.append(0x7D)
        }

        private mutating func member(_ key: String, _ value: String) {
            quoted(key)
            bytes.append(0x3A)
            quoted(value)
        }
    }

    /// A value of a flat JSON object.
    public enum Value: Sendable, Hashable {
        case string(String)
        case integer(Int64)
        case bool(Bool)
        case null
        /// A nested object of strings (one level only).
        case strings([String: String])
        /// An array of strings (one level only).
        case stringArray([String])
    }

    /// Parses a JSON object whose values are strings, integers, booleans,
    /// null, arrays of strings or objects of strings: what the ledger
    /// writes for itself, API requests and JWT claims. Nil
    /// for anything else (callers then fall back to JSONDecoder). At most
    /// `membersMax` members in all.
    public static func parseFlatObject(_ bytes: [UInt8], membersMax: Int = 256) -> [String: Value]? {
        var parser = Parser(bytes: bytes)
        guard let object = parser.object(depth: 0, membersMax: membersMax), parser.atEnd else { return nil }
        return object
    }

    private struct Parser {
        var scanner: JSONScanner
        var members = 0

        init(bytes: [UInt8]) { scanner = JSONScanner(bytes: bytes) }

        var atEnd: Bool { mutating get { scanner.atEnd } }

        mutating func object(depth: Int, membersMax: Int) -> [String: Value]? {
            guard scanner.expect(0x7B) else { return nil }
            var result: [String: Value] = [:]
            if scanner.expect(0x7D) { return result }
            repeat {
                members += 1
                guard members <= membersMax, let key = scanner.string(), scanner.expect(0x3A), let next = scanner.peek() else { return nil }
                let value: Value
                switch next {
                case 0x22:
                    guard let text = scanner.string() else { return nil }
                    value = .string(text)
                case 0x7B:
                    guard depth == 0, let nested = object(depth: 1, membersMax: membersMax) else { return nil }
                    var strings: [String: String] = [:]
                    for (name, member) in nested {
                        guard case .string(let text) = member else { return nil }
                        strings[name] = text
                    }
                    value = .strings(strings)
                case 0x5B:
                    guard depth == 0, let array = stringArray(membersMax: membersMax) else { return nil }
                    value = .stringArray(array)
                case 0x74: guard scanner.literal("true") else { return nil }; value = .bool(true)
                case 0x66: guard scanner.literal("false") else { return nil }; value = .bool(false)
                case 0x6E: guard scanner.literal("null") else { return nil }; value = .null
                default:
                    guard let number = scanner.integer() else { return nil }
                    value = .integer(number)
                }
                guard result.updateValue(value, forKey: key) == nil else { return nil } // duplicate keys: not ours
            } while scanner.expect(0x2C)
            return scanner.expect(0x7D) ? result : nil
        }

        mutating func stringArray(membersMax: Int) -> [String]? {
            guard scanner.expect(0x5B) else { return nil }
            var result: [String] = []
            if scanner.expect(0x5D) { return result }
            repeat {
                members += 1
                guard members <= membersMax, let text = scanner.string() else { return nil }
                result.append(text)
            } while scanner.expect(0x2C)
            return scanner.expect(0x5D) ? result : nil
        }
    }
}

/// The lexical layer both JSON parsers share: whitespace, literals,
/// integers and strings (escapes and surrogate pairs checked, UTF-8
/// validated, control characters refused).
struct JSONScanner {
    let bytes: [UInt8]
    var i = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    var atEnd: Bool {
        mutating get {
            skipSpace()
            return i == bytes.count
        }
    }

    mutating func skipSpace() {
        while i < bytes.count, bytes[i] == 0x20 || bytes[i] == 0x0A || bytes[i] == 0x0D || bytes[i] == 0x09 { i += 1 }
    }

    /// The next byte after whitespace, not consumed.
    mutating func peek() -> UInt8? {
        skipSpace()
        return i < bytes.count ? bytes[i] : nil
    }

    mutating func expect(_ byte: UInt8) -> Bool {
        skipSpace()
        guard i < bytes.count, bytes[i] == byte else { return false }
        i += 1
        return true
    }

    mutating func literal(_ word: String) -> Bool {
        let expected = Array(word.utf8)
        guard i + expected.count <= bytes.count, Array(bytes[i..<(i + expected.count)]) == expected else { return false }
        i += expected.count
        return true
    }

    mutating func integer() -> Int64? {
        var negative = false
        if i < bytes.count, bytes[i] == 0x2D { negative = true; i += 1 }
        let start = i
        var value: Int64 = 0
        while i < bytes.count, bytes[i] >= 0x30, bytes[i] <= 0x39 {
            let (times, o1) = value.multipliedReportingOverflow(by: 10)
            let (plus, o2) = times.addingReportingOverflow(Int64(bytes[i] - 0x30))
            guard !o1, !o2 else { return nil }
            value = plus
            i += 1
        }
        guard i > start, i - start == 1 || bytes[start] != 0x30 else { return nil }
        // Fractions and exponents are not ours.
        if i < bytes.count, bytes[i] == 0x2E || bytes[i] == 0x65 || bytes[i] == 0x45 { return nil }
        return negative ? -value : value
    }

    mutating func string() -> String? {
        skipSpace()
        guard i < bytes.count, bytes[i] == 0x22 else { return nil }
        i += 1
        // Most strings hold no escape: their bytes are the text, validated
        // once (byte by byte into a growing array was most of parsing a
        // platform token's claims).
        let start = i
        while i < bytes.count {
            let byte = bytes[i]
            if byte == 0x22 {
                let text = bytes.withUnsafeBufferPointer { UTF8Text.string(UnsafeBufferPointer(rebasing: $0[start..<i])) }
                i += 1
                return text
            }
            if byte == 0x5C || byte < 0x20 { break }
            i += 1
        }
        var out = Array(bytes[start..<i])
        while i < bytes.count {
            let byte = bytes[i]
            i += 1
            switch byte {
            case 0x22:
                return out.withUnsafeBufferPointer { UTF8Text.string($0) }
            case 0x5C:
                guard i < bytes.count else { return nil }
                let escape = bytes[i]
                i += 1
                switch escape {
                case 0x22, 0x5C, 0x2F: out.append(escape)
                case 0x62: out.append(0x08)
                case 0x66: out.append(0x0C)
                case 0x6E: out.append(0x0A)
                case 0x72: out.append(0x0D)
                case 0x74: out.append(0x09)
                case 0x75:
                    guard let unit = hex4() else { return nil }
                    var scalarValue = UInt32(unit)
                    if (0xD800..<0xDC00).contains(unit) {
                        guard i + 1 < bytes.count, bytes[i] == 0x5C, bytes[i + 1] == 0x75 else { return nil }
                        i += 2
                        guard let low = hex4(), (0xDC00..<0xE000).contains(low) else { return nil }
                        scalarValue = 0x10000 + (UInt32(unit) - 0xD800) << 10 + (UInt32(low) - 0xDC00)
                    }
                    guard let scalar = Unicode.Scalar(scalarValue) else { return nil }
                    out.append(contentsOf: Array(String(Character(scalar)).utf8))
                default: return nil
                }
            case ..<0x20:
                return nil
            default:
                // The run of plain bytes up to the next escape or quote,
                // copied at once (a PEM in a request is ~900 bytes broken
                // by a "\n" every 64).
                let run = i - 1
                while i < bytes.count, bytes[i] != 0x22, bytes[i] != 0x5C, bytes[i] >= 0x20 { i += 1 }
                out.append(contentsOf: bytes[run..<i])
            }
        }
        return nil
    }

    mutating func hex4() -> UInt16? {
        guard i + 4 <= bytes.count else { return nil }
        var value: UInt16 = 0
        for _ in 0..<4 {
            let c = bytes[i]
            let digit: UInt8
            switch c {
            case 0x30...0x39: digit = c - 0x30
            case 0x61...0x66: digit = c - 0x61 + 10
            case 0x41...0x46: digit = c - 0x41 + 10
            default: return nil
            }
            value = value << 4 | UInt16(digit)
            i += 1
        }
        return value
    }
}
