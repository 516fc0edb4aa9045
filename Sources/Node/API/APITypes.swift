import Authority
import Encoding
import Foundation
import NIOHTTP1
import Synchronization

/// An API failure: an HTTP status, a stable machine-readable code and a
/// sentence for the operator. Rendered as {"error": {"code", "message"}}.
public struct APIError: Error, Sendable, CustomStringConvertible {
    public var status: HTTPResponseStatus
    public var code: String
    public var message: String
    public var headers: [(String, String)] = []
    /// The refusal is in the audit chain already (the ledger refused the
    /// command and audited that): no denial record is written for it.
    public var audited = false

    public var description: String { "\(status.code) \(code): \(message)" }

    public static func badRequest(_ message: String) -> APIError { APIError(status: .badRequest, code: "bad_request", message: message) }
    public static func notFound(_ message: String) -> APIError { APIError(status: .notFound, code: "not_found", message: message) }
    public static func payloadTooLarge(_ message: String) -> APIError { APIError(status: .payloadTooLarge, code: "too_large", message: message) }
    public static func unavailable(_ code: String, _ message: String) -> APIError {
        APIError(status: .serviceUnavailable, code: code, message: message, headers: [("retry-after", "1")])
    }

    public var response: HTTPResponse {
        let body = APIJSON.encode(ErrorBody(error: .init(code: code, message: message)))
        return HTTPResponse(status: status, headers: [("content-type", "application/json")] + headers, body: body)
    }

    struct ErrorBody: Codable {
        struct Detail: Codable {
            var code: String
            var message: String
        }
        var error: Detail
    }
}

/// JSON as the API writes and reads it: snake_case keys, sorted.
/// A body on a hot path that writes its own JSON (the same members, snake
/// case, keys sorted, as `APIJSON.encode` would; JSONEncoder was a large
/// share of answering an issuance or a verification).
protocol HandEncodedJSON {
    var json: [UInt8] { get }
}

/// A request body on a hot path that can be read from a flat JSON object:
/// nil whenever a member has another type than `Decodable` would accept.
protocol HandDecodedJSON {
    init?(flat: [String: JSONText.Value])
}

extension [String: JSONText.Value] {
    /// .some(nil) when absent or null, nil when of another type.
    func string(_ key: String) -> String?? {
        switch self[key] {
        case nil, .null?: return .some(nil)
        case .string(let text)?: return .some(text)
        default: return nil
        }
    }

    func uint32(_ key: String) -> UInt32?? {
        switch self[key] {
        case nil, .null?: return .some(nil)
        case .integer(let number)?: return UInt32(exactly: number).map { .some($0) } ?? nil
        default: return nil
        }
    }
}

/// Builds a JSON object member by member into bytes, keys in the order
/// given (sorted by the caller); nil members are left out.
struct JSONObjectWriter {
    private var builder = JSONText.Builder(capacity: 256)
    private var first = true

    private mutating func key(_ key: StaticString) {
        builder.raw(first ? "{\"" : ",\"")
        first = false
        builder.raw(key)
        builder.raw("\":")
    }
    mutating func add(_ name: StaticString, _ value: String?) {
        guard let value else { return }
        key(name)
        builder.quoted(value)
    }
    mutating func add(_ name: StaticString, _ value: Bool?) {
        guard let value else { return }
        key(name)
        builder.bool(value)
    }
    mutating func add(_ name: StaticString, _ value: UInt64?) {
        guard let value else { return }
        key(name)
        builder.integer(value)
    }
    mutating func add(_ name: StaticString, _ value: [String: String]?) {
        guard let value else { return }
        key(name)
        builder.object(value)
    }
    var bytes: [UInt8] {
        var done = builder
        done.raw(first ? "{}" : "}")
        return done.bytes
    }
}

public enum APIJSON {
    public static func encode(_ value: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array((try? encoder.encode(value)) ?? Data("{}".utf8))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        // Hot request bodies read by hand; anything unusual (or wrong) goes
        // to JSONDecoder, which says what is wrong with it.
        if let fast = type as? any HandDecodedJSON.Type, let flat = JSONText.parseFlatObject(bytes, membersMax: 64),
           let value = fast.init(flat: flat) as? T {
            return value
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(type, from: Data(bytes))
    }

    /// A request body, read as the hand decoder reads one whichever way it
    /// goes: a duplicate member is refused (not the last one taken), and
    /// members are snake_case only (`idempotencyKey` is no name here, as
    /// the hand decoder has it; JSONDecoder's snake-case conversion would
    /// take it when some other member sent the body its way).
    public static func decodeRequest<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        if let fast = type as? any HandDecodedJSON.Type, let flat = JSONText.parseFlatObject(bytes, membersMax: 64),
           let value = fast.init(flat: flat) as? T {
            return value
        }
        _ = try StrictJSON.parse(bytes, limits: .init(bytesMax: 1 << 20, depthMax: 16, valuesMax: 1 << 16))
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .custom { path in SnakeCaseKey(path.last!.stringValue) }
        return try decoder.decode(type, from: Data(bytes))
    }

    public static func response(_ value: some Encodable, status: HTTPResponseStatus = .ok, headers: [(String, String)] = []) -> HTTPResponse {
        let body = (value as? any HandEncodedJSON)?.json ?? encode(value)
        return HTTPResponse(status: status, headers: [("content-type", "application/json")] + headers, body: body)
    }
}

// MARK: - Bodies (docs/openapi.yaml describes each)

public struct DocumentBody: Codable, Sendable {
    public var name: String
    public var format: String
    public var version: UInt64
    public var logIndex: UInt64
    public var content: String?
}

public struct DocumentListBody: Codable, Sendable {
    public var documents: [DocumentBody]
}

public struct WriteResultBody: Codable, Sendable {
    public init(name: String, version: UInt64?, deleted: Bool, logIndex: UInt64, leader: UInt64, warnings: [String]? = nil) {
        self.warnings = warnings
        self.name = name
        self.version = version
        self.deleted = deleted
        self.logIndex = logIndex
        self.leader = leader
    }

    public var name: String
    /// The new version; absent after a delete.
    public var version: UInt64?
    public var deleted: Bool
    public var logIndex: UInt64
    public var leader: UInt64
    /// For join rules: what the lint found (the rule is saved anyway).
    public var warnings: [String]?

    /// The same JSON as `APIJSON.encode` gives (sorted keys), written
    /// directly: this is the answer to every write. Document names hold
    /// only characters that need no escaping.
    public var json: [UInt8] {
        let versionField = version.map { ",\"version\":\($0)" } ?? ""
        let warningsField = warnings.map { ",\"warnings\":[" + $0.map(JSONText.quote).joined(separator: ",") + "]" } ?? ""
        return Array("{\"deleted\":\(deleted),\"leader\":\(leader),\"log_index\":\(logIndex),\"name\":\"\(name)\"\(versionField)\(warningsField)}".utf8)
    }
}

public struct AuditRecordBody: Codable, Sendable, Equatable {
    public var sequence: UInt64
    public var logIndex: UInt64
    public var timeMillis: UInt64
    public var actor: String
    public var action: String
    public var target: String
    public var result: String
    public var previousHash: String
    public var hash: String

    /// The record on one line, as `warrant audit tail` prints it. Records
    /// quote callers' text (claims, names): it is shown so that none can
    /// end the line, move the cursor or reorder what follows
    /// (`UTF8Text.forDisplay`).
    public var line: String {
        // Membership changes carry no caller time (the core writes them).
        let time = timeMillis == 0 ? "-" : Date(timeIntervalSince1970: Double(timeMillis) / 1000).formatted(.iso8601)
        return UTF8Text.forDisplay("#\(sequence) idx=\(logIndex) \(time) \(actor) \(action) \(target) -> \(result)") + " hash=\(hash.prefix(16))"
    }
}

public struct AuditPageBody: Codable, Sendable {
    public var records: [AuditRecordBody]
}

public struct AuditVerifyBody: Codable, Sendable {
    public var node: UInt64
    public var intact: Bool
    public var records: UInt64
    public var headHash: String?
    public var brokenAt: UInt64?
    public var reason: String?
}

public struct MemberBody: Codable, Sendable {
    public var id: UInt64
    public var role: String
    public var peerAddress: String?
    public var apiAddress: String?
    /// Known on the leader only.
    public var matchIndex: UInt64?
    public var lag: UInt64?
    public var replication: String?
}

public struct ClusterStatusBody: Codable, Sendable {
    public var id: UInt64
    public var role: String
    public var term: UInt64
    public var leader: UInt64
    public var commitIndex: UInt64
    public var appliedIndex: UInt64
    public var lastIndex: UInt64
    public var snapshotIndex: UInt64
    public var members: [MemberBody]
    /// The ledger rules in force (`LedgerRules`), and the newest this node's build applies by.
    public var rulesInForce: UInt32?
    public var rulesKnown: UInt32?
}

public struct ReadinessBody: Codable, Sendable {
    public var ready: Bool
    public var leader: UInt64
    public var reason: String?
    /// The node answering, and the newest ledger rules its build applies by
    /// (absent from builds before they were reported here).
    public var node: UInt64?
    public var rulesKnown: UInt32?
}

public struct AddMemberRequest: Codable, Sendable {
    public var id: UInt64
    public var peerAddress: String
    public var apiAddress: String

    public init(id: UInt64, peerAddress: String, apiAddress: String) {
        self.id = id
        self.peerAddress = peerAddress
        self.apiAddress = apiAddress
    }
}

public struct MemberChangeBody: Codable, Sendable {
    public var id: UInt64
    public var change: String
    public var logIndex: UInt64
    public var leader: UInt64
}

public struct TransferRequest: Codable, Sendable {
    public var to: UInt64
    public init(to: UInt64) { self.to = to }
}

public struct TransferResultBody: Codable, Sendable {
    public var leader: UInt64
}

/// What a `cluster/members/<id>` document holds: where a member listens.
public struct MemberAddressesBody: Codable, Sendable, Hashable {
    public var peerAddress: String
    public var apiAddress: String
}

/// Request ids for the commands a node proposes itself (when the caller
/// sent no `warrant-request-id`): a random 64-bit prefix drawn once per
/// process, then a counter, written as a UUID. Unique without a system
/// call each: Foundation's UUID() opened, read and closed /dev/urandom for
/// every one, ~1% of the leader's CPU under issuance load.
enum RequestID {
    private static let prefix = UInt64.random(in: .min ... .max)
    private static let counter = Atomic<UInt64>(0)

    static func make() -> String {
        format(prefix: prefix, count: counter.add(1, ordering: .relaxed).newValue)
    }

    /// The longest `warrant-request-id` a client may send.
    static let clientBytesMax = 64

    /// A command's request id for `request`: the client's
    /// `warrant-request-id` (1 to 64 letters, digits, '.', '_', ':' or
    /// '-'), then '/' and an id of this node's own. Never the client's
    /// alone: a follower that hands a write to the leader through Raft
    /// knows its outcome by this id, so no other request (another client
    /// sending the same header, to any node) may share it; and the audit
    /// text, which shows it, must not take spaces or separators from a
    /// client.
    static func forCommand(_ request: HTTPRequest) throws -> String {
        guard let client = try client(request) else { return make() }
        return client + "/" + make()
    }

    /// The client's `warrant-request-id`, if it sent one; refused if malformed.
    static func client(_ request: HTTPRequest) throws -> String? {
        guard let client = request.headers.first(name: "warrant-request-id") else { return nil }
        guard (1...clientBytesMax).contains(client.utf8.count),
              client.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) || ".-_:".utf8.contains($0) }) else {
            throw APIError(status: .badRequest, code: "bad_request_id",
                           message: "warrant-request-id must be 1 to \(clientBytesMax) letters, digits, '.', '_', ':' or '-'")
        }
        return client
    }

    /// The sixteen bytes (prefix then count, big-endian) as UUID text,
    /// 8-4-4-4-12 uppercase hex digits as `UUID.uuidString` writes them
    /// (which formats through sprintf: a hundredth of answering an issuance).
    static func format(prefix: UInt64, count: UInt64) -> String {
        String(unsafeUninitializedCapacity: 36) { out in
            var position = 0
            for digit in 0..<32 {
                if digit == 8 || digit == 12 || digit == 16 || digit == 20 {
                    out[position] = UInt8(ascii: "-")
                    position += 1
                }
                let value = digit < 16 ? prefix : count
                let nibble = UInt8(truncatingIfNeeded: value >> UInt64(60 - 4 * (digit % 16))) & 0xF
                out[position] = nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "A") + nibble - 10
                position += 1
            }
            return position
        }
    }
}

/// A snake_case member name as the property it names (`ttl_seconds`:
/// `ttlSeconds`); a name with anything but ASCII lower-case letters,
/// digits and '_' names no property (Unicode's upper-casing would make
/// `ttl_ſeconds` `ttlSeconds`, which the hand decoder does not read).
private struct SnakeCaseKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }

    init(_ name: String) {
        guard name.utf8.allSatisfy({ (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0)
                                     || $0 == UInt8(ascii: "_") }) else {
            stringValue = "\u{0}" + name
            return
        }
        let parts = name.split(separator: "_", omittingEmptySubsequences: false)
        stringValue = parts.count < 2 || parts.contains(where: \.isEmpty) ? name
            : String(parts[0]) + parts.dropFirst().map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
    }

    init?(stringValue: String) { self.init(stringValue) }
    init?(intValue: Int) { nil }
}
