/// Any JSON value, as the strict parser reads it: objects keep their
/// members in order (keys are unique: a duplicate is an error, not "the
/// last one wins"), numbers that are not integers keep their text.
public indirect enum JSONValue: Sendable, Hashable {
    case string(String)
    case integer(Int64)
    /// A number with a fraction or exponent (or beyond Int64), as written.
    case number(String)
    case bool(Bool)
    case null
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.string(let x), .string(let y)): return x.utf8.elementsEqual(y.utf8)
        case (.integer(let x), .integer(let y)): return x == y
        case (.number(let x), .number(let y)): return x == y
        case (.bool(let x), .bool(let y)): return x == y
        case (.null, .null): return true
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0.utf8.elementsEqual($1.0.utf8) && $0.1 == $1.1 }
        default: return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case .string(let x): hasher.combine(0); hasher.combine(Array(x.utf8))
        case .integer(let x): hasher.combine(1); hasher.combine(x)
        case .number(let x): hasher.combine(2); hasher.combine(x)
        case .bool(let x): hasher.combine(3); hasher.combine(x)
        case .null: hasher.combine(4)
        case .array(let x): hasher.combine(5); hasher.combine(x)
        case .object(let x): hasher.combine(6); for (k, v) in x { hasher.combine(Array(k.utf8)); hasher.combine(v) }
        }
    }

    /// The member `key` of an object (keys compared as bytes).
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0.utf8.elementsEqual(key.utf8) }?.1
    }

    public var stringValue: String? {
        if case .string(let text) = self { return text }
        return nil
    }
}

/// Why a document was refused by `StrictJSON.parse`.
public struct StrictJSONError: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    /// Byte offset where parsing stopped.
    public var offset: Int
    public var description: String { "\(reason) (at byte \(offset))" }
}

/// A JSON parser for input an attacker controls (platform tokens, JWKS
/// documents): RFC 8259 grammar only (no comments, trailing commas, NaN,
/// leading zeros or unescaped control characters), UTF-8 validated,
/// duplicate object keys refused, and bounded in bytes, nesting and values
/// before anything is allocated for them.
public enum StrictJSON {
    public struct Limits: Sendable {
        public var bytesMax: Int
        public var depthMax: Int
        public var valuesMax: Int
        public init(bytesMax: Int = 64 << 10, depthMax: Int = 8, valuesMax: Int = 2_048) {
            self.bytesMax = bytesMax
            self.depthMax = depthMax
            self.valuesMax = valuesMax
        }
    }

    public static func parse(_ bytes: [UInt8], limits: Limits = Limits()) throws(StrictJSONError) -> JSONValue {
        guard bytes.count <= limits.bytesMax else {
            throw StrictJSONError(reason: "JSON of \(bytes.count) bytes is over the limit of \(limits.bytesMax)", offset: 0)
        }
        var parser = StrictParser(scanner: JSONScanner(bytes: bytes), limits: limits)
        let value = try parser.value(depth: 1)
        guard parser.scanner.atEnd else { throw parser.error("trailing bytes after the JSON value") }
        return value
    }

    /// Parses a JSON object (anything else is refused).
    public static func parseObject(_ bytes: [UInt8], limits: Limits = Limits()) throws(StrictJSONError) -> JSONValue {
        let value = try parse(bytes, limits: limits)
        guard case .object = value else { throw StrictJSONError(reason: "expected a JSON object", offset: 0) }
        return value
    }
}

private struct StrictParser {
    var scanner: JSONScanner
    let limits: StrictJSON.Limits
    var values = 0

    func error(_ reason: String) -> StrictJSONError { StrictJSONError(reason: reason, offset: scanner.i) }

    mutating func value(depth: Int) throws(StrictJSONError) -> JSONValue {
        values += 1
        guard values <= limits.valuesMax else { throw error("more than \(limits.valuesMax) JSON values") }
        guard let next = scanner.peek() else { throw error("unexpected end of JSON") }
        switch next {
        case 0x7B:
            guard depth <= limits.depthMax else { throw error("JSON nested deeper than \(limits.depthMax)") }
            scanner.i += 1
            var members: [(String, JSONValue)] = []
            // Duplicates: the members of most objects (a platform token's
            // claims are about 30) are compared in turn, lengths first;
            // past 64, a set of their bytes (made then) takes over.
            var keys: Set<[UInt8]>?
            if scanner.expect(0x7D) { return .object(members) }
            repeat {
                guard scanner.peek() == 0x22 else { throw error("expected a member name") }
                guard let key = scanner.string() else { throw error("malformed string") }
                let duplicate: Bool
                if members.count < 64 {
                    let length = key.utf8.count
                    duplicate = members.contains { $0.0.utf8.count == length && $0.0.utf8.elementsEqual(key.utf8) }
                } else {
                    if keys == nil { keys = Set(members.map { Array($0.0.utf8) }) }
                    duplicate = !keys!.insert(Array(key.utf8)).inserted
                }
                guard !duplicate else { throw error("duplicate key \"\(key.prefix(64))\"") }
                guard scanner.expect(0x3A) else { throw error("expected ':'") }
                members.append((key, try value(depth: depth + 1)))
            } while scanner.expect(0x2C)
            guard scanner.expect(0x7D) else { throw error("expected ',' or '}'") }
            return .object(members)
        case 0x5B:
            guard depth <= limits.depthMax else { throw error("JSON nested deeper than \(limits.depthMax)") }
            scanner.i += 1
            var elements: [JSONValue] = []
            if scanner.expect(0x5D) { return .array(elements) }
            repeat {
                elements.append(try value(depth: depth + 1))
            } while scanner.expect(0x2C)
            guard scanner.expect(0x5D) else { throw error("expected ',' or ']'") }
            return .array(elements)
        case 0x22:
            guard let text = scanner.string() else { throw error("malformed string (bad escape, control character or invalid UTF-8)") }
            return .string(text)
        case 0x74:
            guard scanner.literal("true") else { throw error("unexpected token") }
            return .bool(true)
        case 0x66:
            guard scanner.literal("false") else { throw error("unexpected token") }
            return .bool(false)
        case 0x6E:
            guard scanner.literal("null") else { throw error("unexpected token") }
            return .null
        case 0x2D, 0x30...0x39:
            return try number()
        default:
            throw error("unexpected character")
        }
    }

    /// RFC 8259 numbers: integers that fit Int64 become `.integer`, the rest
    /// keep their text.
    mutating func number() throws(StrictJSONError) -> JSONValue {
        let bytes = scanner.bytes
        let start = scanner.i
        var i = start
        func digits() -> Int {
            let from = i
            while i < bytes.count, (0x30...0x39).contains(bytes[i]) { i += 1 }
            return i - from
        }
        if bytes[i] == 0x2D { i += 1 }
        let intStart = i
        let intDigits = digits()
        guard intDigits > 0 else { scanner.i = i; throw error("malformed number") }
        guard intDigits == 1 || bytes[intStart] != 0x30 else { scanner.i = i; throw error("number with a leading zero") }
        var integral = true
        if i < bytes.count, bytes[i] == 0x2E {
            i += 1
            integral = false
            guard digits() > 0 else { scanner.i = i; throw error("malformed number") }
        }
        if i < bytes.count, bytes[i] == 0x65 || bytes[i] == 0x45 {
            i += 1
            integral = false
            if i < bytes.count, bytes[i] == 0x2B || bytes[i] == 0x2D { i += 1 }
            guard digits() > 0 else { scanner.i = i; throw error("malformed number") }
        }
        scanner.i = i
        let text = String(decoding: bytes[start..<i], as: UTF8.self)
        if integral, let value = Int64(text) { return .integer(value) }
        return .number(text)
    }
}
