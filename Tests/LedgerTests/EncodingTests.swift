import Encoding
import Foundation
@testable import Ledger
import Testing

@Suite("Hand-written JSON of the ledger's records")
struct LedgerEncodingTests {
    /// The token as made, and as used by a serial.
    static func unusedAndUsed(_ token: JoinToken) -> [JoinToken] {
        var used = token
        used.used = true
        used.usedBySerial = "0a0b"
        return [token, used]
    }

    @Test("Join tokens and issued records written by hand read back, by hand and by JSONDecoder, as the same values")
    func roundTrip() throws {
        let states = Self.unusedAndUsed(JoinToken(hash: String(repeating: "a", count: 64), spiffeID: "spiffe://example.org/ci/\"odd\"\\path",
                                                  ttlMaxSeconds: 600, expiresAtMillis: 1_795_000_000_000, maxLifetimeSeconds: 86_400))
        for state in states {
            #expect(JoinToken(canonical: state.canonicalJSON) == state)
            #expect(try JSONDecoder().decode(JoinToken.self, from: Data(state.canonicalJSON)) == state)
        }
        let token = states[1]
        // Written by JSONEncoder (older records): still read.
        #expect(JoinToken(canonical: try CanonicalJSON.encode(token)) == token)
        let record = IssuedRecord(kind: .jwt, spiffeID: "spiffe://example.org/a", serial: "ff", authority: "ca1", issuedAtMillis: 5,
                                  notAfterMillis: 9, attributes: ["repository": "acme/api", "note": "tab\there"])
        #expect(try JSONDecoder().decode(IssuedRecord.self, from: Data(record.canonicalJSON)) == record)
        var fingerprinted = record
        fingerprinted.fingerprint = String(repeating: "ab", count: 32)
        #expect(try JSONDecoder().decode(IssuedRecord.self, from: Data(fingerprinted.canonicalJSON)) == fingerprinted)
    }

    @Test("A record's kind and fingerprint are read without decoding the rest; a record without one (or with one only among its attributes) has none")
    func recordFingerprint() throws {
        var record = IssuedRecord(kind: .x509, spiffeID: "spiffe://example.org/a", serial: "0c", authority: "ca1", issuedAtMillis: 5,
                                  notAfterMillis: 9, attributes: ["fingerprint": String(repeating: "1", count: 64), "quote": "a\"b"])
        #expect(IssuedRecord.fingerprint(in: record.canonicalJSON) == nil)
        record.fingerprint = String(repeating: "2", count: 64)
        let read = try #require(IssuedRecord.fingerprint(in: record.canonicalJSON))
        #expect(read.kind == .x509 && read.fingerprint == String(repeating: "2", count: 64))
        record.kind = .jwt
        #expect(IssuedRecord.fingerprint(in: record.canonicalJSON)?.kind == .jwt)
        #expect(IssuedRecord.fingerprint(in: Array("{\"fingerprint\":\"22\",\"kind\":7}".utf8)) == nil, "an unknown kind")
    }

    @Test("The fast reading of a token document takes exactly what canonicalJSON writes, and leaves anything else to the general parser")
    func tokenFastPath() throws {
        let states = Self.unusedAndUsed(JoinToken(hash: String(repeating: "b", count: 64), spiffeID: "spiffe://example.org/ci/build", ttlMaxSeconds: 600,
                                                  expiresAtMillis: 1_795_000_000_000, maxLifetimeSeconds: 86_400))
        for state in states { #expect(JoinToken(exactlyCanonical: state.canonicalJSON) == state) }
        let token = states[1]
        let escaped = JoinToken(hash: "c", spiffeID: "spiffe://example.org/\"q\"", ttlMaxSeconds: 1, expiresAtMillis: 0)
        #expect(JoinToken(exactlyCanonical: escaped.canonicalJSON) == nil, "escapes: the general parser's work")
        #expect(JoinToken(canonical: escaped.canonicalJSON) == escaped)
        let text = String(decoding: token.canonicalJSON, as: UTF8.self)
        for variant in [text.replacingOccurrences(of: "\":", with: "\" : "), text.replacingOccurrences(of: "\"ttlMaxSeconds\":600", with: "\"ttlMaxSeconds\":0600"),
                        text + " ", text.replacingOccurrences(of: "true", with: "True"), String(text.dropLast())] {
            #expect(JoinToken(exactlyCanonical: Array(variant.utf8)) == nil, "\(variant)")
        }
        #expect(JoinToken(canonical: Array(text.replacingOccurrences(of: "\":", with: "\" : ").utf8)) == token, "spaces: still read by the general parser")
        var large = token
        large.expiresAtMillis = .max
        #expect(JoinToken(exactlyCanonical: large.canonicalJSON) == large)
        #expect(JoinToken(exactlyCanonical: Array(String(decoding: large.canonicalJSON, as: UTF8.self)
            .replacingOccurrences(of: "\(UInt64.max)", with: "18446744073709551616").utf8)) == nil, "one past UInt64.max")
    }

    @Test("Marking a token used changes only the end of its canonical document: the bytes canonicalJSON writes for the used token")
    func tokenMarkedUsed() throws {
        var generator = SystemRandomNumberGenerator()
        for n in 0..<200 {
            let digits = "0123456789abcdef"
            let serial = String((0..<(1 + n % 40)).map { _ in digits.randomElement(using: &generator)! })
            let token = JoinToken(hash: String(repeating: "d", count: 64), spiffeID: "spiffe://example.org/ci/job-\(n)",
                                  ttlMaxSeconds: UInt32.random(in: 1...86_400), expiresAtMillis: UInt64.random(in: 0...UInt64.max),
                                  maxLifetimeSeconds: n % 3 == 0 ? nil : UInt32.random(in: 1...UInt32.max))
            var used = token
            used.used = true
            used.usedBySerial = n == 7 ? "odd\"serial\\" : serial
            #expect(JoinToken.markingUsed(token.canonicalJSON, serial: used.usedBySerial!) == used.canonicalJSON)
        }
        let token = Self.unusedAndUsed(JoinToken(hash: "e", spiffeID: "spiffe://example.org/a", ttlMaxSeconds: 1, expiresAtMillis: 2))
        #expect(JoinToken.markingUsed(token[1].canonicalJSON, serial: "ff") == nil, "already used")
        #expect(JoinToken.markingUsed(Array("{\"used\":false}".utf8), serial: "ff") == nil, "only the used member")
        #expect(JoinToken.markingUsed(Array("false}".utf8), serial: "ff") == nil, "too short to be a token")
    }

    @Test("Text for a terminal: C0 and C1 controls (U+009B is a CSI), DEL, line and paragraph separators and bidirectional controls are written as \\u{XXXX}; other text, accented or not, as it is")
    func textForDisplay() {
        for plain in ["", "plain", "é 東京 \u{1F642} e\u{301}", "spiffe://warrant.local/ci/repo"] {
            #expect(UTF8Text.forDisplay(plain) == plain)
        }
        #expect(UTF8Text.forDisplay("a\u{1B}[2Jb") == "a\\u{001B}[2Jb")
        #expect(UTF8Text.forDisplay("x\u{202E}gnp.exe") == "x\\u{202E}gnp.exe")
        #expect(UTF8Text.forDisplay("l1\u{2028}l2\nl3\u{9B}\u{7F}\u{2066}") == "l1\\u{2028}l2\\u{000A}l3\\u{009B}\\u{007F}\\u{2066}")
        let altering: [UInt32] = [0x0, 0x9, 0x1F, 0x7F, 0x80, 0x9F, 0x61C, 0x200E, 0x200F, 0x2028, 0x2029, 0x202A, 0x202E, 0x2066, 0x2069]
        let keeping: [UInt32] = [0x20, 0x7E, 0xA0, 0xE9, 0x200D, 0x2027, 0x202F, 0x2065, 0x206A, 0x1F642]
        #expect(altering.allSatisfy { UTF8Text.altersDisplay(Unicode.Scalar($0)!) })
        #expect(!keeping.contains { UTF8Text.altersDisplay(Unicode.Scalar($0)!) })
    }

    @Test("UTF8Text.withBytes lends a string's UTF-8 as it is: empty, small, large, not ASCII, cut from another string, made from bytes")
    func withBytesLendsTheUTF8() {
        let large = String(repeating: "authority/issued/1767225600/", count: 9)
        var samples = ["", "a", "fifteen bytes!!", "sixteen bytes!!!", large, "spiffe://warrant.local/é/ü/\u{1F600}", "a\u{0}b"]
        samples.append(String(large.dropFirst(17).prefix(40)))
        samples.append(String(decoding: Array(large.utf8.reversed()), as: UTF8.self))
        for text in samples {
            let lent = UTF8Text.withBytes(of: text) { Array($0) }
            #expect(lent == Array(text.utf8), "\(text.debugDescription)")
            #expect(UTF8Text.prefix(text, bytes: 5) == String(decoding: Array(text.utf8.prefix(5)), as: UTF8.self))
        }
    }

    @Test("quote writes literals JSONSerialization reads back as the same text, and copies text needing no escaping as it is")
    func quotedRoundTrip() throws {
        var texts = ["", "plain", "spiffe://example.org/ci/job", String(repeating: "ab01", count: 16), "a\"b", "back\\slash", "line\nbreak",
                     "tab\t", "cr\r", "\u{1}start", "end\u{1F}", "é and 😀", "-----BEGIN X-----\nMIIB\n-----END X-----\n"]
        texts += (0..<32).map { "x\(Character(Unicode.Scalar(UInt8($0))))y" }
        for text in texts {
            let literal = JSONText.quote(text)
            let decoded = try JSONSerialization.jsonObject(with: Data(literal.utf8), options: .fragmentsAllowed) as? String
            #expect(decoded == text, "\(text.debugDescription) -> \(literal)")
            if text.utf8.allSatisfy({ $0 >= 0x20 && $0 != 0x22 && $0 != 0x5C }) {
                #expect(literal == "\"\(text)\"", "\(text.debugDescription) needs no escaping")
            }
        }
    }

    @Test("isQuoted agrees with quote: the literal of the same text and no other")
    func quotedComparison() {
        let texts = ["", "ca-1", "a\"b", "back\\slash", "tab\t", "é", "\u{1}", "plain text"]
        for text in texts {
            for other in texts {
                #expect(JSONText.isQuoted(Array(JSONText.quote(other).utf8), text) == (text == other), "\(text) / \(other)")
            }
            #expect(!JSONText.isQuoted(Array(text.utf8), text), "unquoted: \(text)")
        }
    }

    @Test("An issuance's audit text is written piece by piece exactly as the interpolated form it replaced")
    func issuedText() {
        func reference(_ i: Issuance, _ replayed: Bool, _ requestID: String) -> String {
            let evidence = !i.platformReplayKey.isEmpty ? "platform_token=\(i.platformReplayKey.prefix(16))"
                : i.tokenHash.isEmpty ? "renewed_from=\(i.renewedFrom)" : "token=\(i.tokenHash.prefix(16))"
            // Separators and spaces in names and values percent-encoded (upper-case hex), everything else as it is.
            func field(_ text: String) -> String {
                text.unicodeScalars.map { " ,=%\u{7F}".unicodeScalars.contains($0) || $0.value < 0x20
                    ? String(format: "%%%02X", $0.value) : String($0) }.joined()
            }
            let context = i.attributes.sorted { $0.key < $1.key }.map { "\(field($0.key))=\(field($0.value))" }.joined(separator: ",")
            return (replayed ? "replayed" : "ok") + ": \(i.kind == .x509 ? "x509" : "jwt") serial=\(i.serial) sha256=\(i.fingerprint) ttl=\(i.ttlSeconds)s"
                + " not_after=\(i.notAfterMillis) \(evidence) authority=\(i.authority) node=\(i.node) request=\(requestID)"
                + (context.isEmpty ? "" : " context=\(context)")
        }
        var issuance = Issuance(kind: .x509, spiffeID: "spiffe://example.org/a", serial: "0aff", fingerprint: String(repeating: "e", count: 64),
                                issuedAtMillis: 1, notAfterMillis: 1_795_000_000_123, ttlSeconds: 600, tokenHash: String(repeating: "9", count: 64),
                                idempotencyKey: "", node: 3, authority: "ca-1", attributes: ["repository": "acme/api", "évent": "push", "a": ""], artifact: [1])
        var cases = [issuance]
        issuance.kind = .jwt
        issuance.tokenHash = ""
        issuance.renewedFrom = "0aff"
        issuance.attributes = [:]
        cases.append(issuance)
        issuance.platformReplayKey = String(repeating: "7", count: 64)
        issuance.attributes = ["sha": "abc"]
        cases.append(issuance)
        // A value that would pass for more fields, and other separators.
        issuance.attributes = ["workflow": "deploy context=repository=acme/prod", "a,b": "x=y", "pct": "50%", "tab": "a\tb", "é": "ü ü"]
        cases.append(issuance)
        #expect(Ledger.issuedText(issuance, replayed: false, requestID: "r").hasSuffix(
            " context=a%2Cb=x%3Dy,pct=50%25,tab=a%09b,workflow=deploy%20context%3Drepository%3Dacme/prod,é=ü%20ü"))
        for i in cases {
            for replayed in [false, true] {
                #expect(Ledger.issuedText(i, replayed: replayed, requestID: "req-1") == reference(i, replayed, "req-1"))
            }
        }
    }

    @Test("The JSON builder writes what JSONSerialization reads back, numbers and escapes included")
    func builder() throws {
        for number in [UInt64(0), 1, 9, 10, 99, 100, 1_000_000_007, 999_999_999_999_999_999, 1_000_000_000_000_000_000,
                       9_999_999_999_999_999_999, 10_000_000_000_000_000_000, .max] {
            var json = JSONText.Builder(capacity: 8)
            json.integer(number)
            #expect(String(decoding: json.bytes, as: UTF8.self) == String(number))
        }
        let members = ["b": "tab\there \"quoted\" \\ back", "a": "é\u{1}", "": "empty key",
                       "pem": "-----BEGIN CERTIFICATE-----\nMIIB\r\nAAAA\n-----END CERTIFICATE-----\n",
                       "edges": "\"both ends\\", "controls": "\u{0}\u{1f}\u{7f}", "plain": "no escapes at all", "e": ""]
        var json = JSONText.Builder(capacity: 8)
        json.object(members)
        #expect(try JSONSerialization.jsonObject(with: Data(json.bytes)) as? [String: String] == members)
        #expect(JSONText.object(members) == String(decoding: json.bytes, as: UTF8.self))
    }

    @Test("The flat-object parser agrees with JSONSerialization on what it accepts and refuses the rest")
    func parser() throws {
        let accepted = [
            #"{}"#, #"{"a":"b"}"#, #" { "a" : 1 , "b" : -20 , "c" : true , "d" : false , "e" : null } "#,
            #"{"s":"\u00e9\ud834\udd1e\n\"\\\/"}"#, #"{"o":{"x":"y"},"n":0}"#, #"{"a":["x","y"],"e":[]}"#,
            // Runs of plain bytes between escapes (a PEM in a request).
            #"{"pem":"-----BEGIN X-----\nAAAA\nBBBB\n-----END X-----\n","t":"a\tb\u00e9c\"d\\","u":"\n"}"#,
            "{\"e\":\"\\n\u{e9}\u{1D11E}x\"}",
        ]
        for text in accepted {
            let ours = try #require(JSONText.parseFlatObject(Array(text.utf8)), "refused \(text)")
            let theirs = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
            #expect(ours.count == theirs.count)
            for (key, value) in ours {
                switch value {
                case .string(let s): #expect(theirs[key] as? String == s, "\(text): \(key)")
                case .integer(let n): #expect((theirs[key] as? NSNumber)?.int64Value == n)
                case .bool(let b): #expect((theirs[key] as? NSNumber)?.boolValue == b)
                case .null: #expect(theirs[key] is NSNull)
                case .strings(let m): #expect(theirs[key] as? [String: String] == m)
                case .stringArray(let a): #expect(theirs[key] as? [String] == a)
                }
            }
        }
        let refused = [
            "", "[]", #"{"a":1.5}"#, #"{"a":01}"#, #"{"a":"b",}"#, #"{"a":"b""#, #"{"a":{"b":{"c":"d"}}}"#, #"{"a":[1]}"#, #"{"a":[["x"]]}"#, #"{"a":["x",]}"#,
            #"{"a":"\x"}"#, "{\"a\":\"\u{01}\"}", "{\"a\":\"\\nab\u{01}cd\"}", "{\"a\":\"\\nab\ncd\"}", #"{"a":"\nabc"#, #"{"a":"\nab\"#,
            #"{"a":"\ud834"}"#, #"{"a":1,"a":2}"#, #"{"a":99999999999999999999}"#, #"{"a":1} x"#,
        ]
        for text in refused { #expect(JSONText.parseFlatObject(Array(text.utf8)) == nil, "accepted \(text)") }
        // Bytes that are not UTF-8, in a run after an escape.
        #expect(JSONText.parseFlatObject(Array(#"{"a":"\nab"#.utf8) + [0xFF] + Array(#"c"}"#.utf8)) == nil)
        // and in a string without escapes (a multi-byte sequence cut short, a lone continuation byte).
        #expect(JSONText.parseFlatObject(Array(#"{"a":"abcdefgh"#.utf8) + [0xC3] + Array(#""}"#.utf8)) == nil)
        #expect(JSONText.parseFlatObject(Array(#"{"a":"x"#.utf8) + [0x80] + Array(#"yz"}"#.utf8)) == nil)
        #expect(JSONText.parseFlatObject(Array(#"{"a":"abcdefgh"#.utf8) + [0xC3, 0xA9] + Array(#""}"#.utf8)).flatMap { if case .string(let s) = $0["a"] { s } else { nil } } == "abcdefgh\u{e9}")
        // Random bytes never crash it, and what it accepts JSONSerialization accepts too.
        var generator = SystemRandomNumberGenerator()
        let alphabet = Array(#"{}":,\ab01-tfnlrue.[] "#.utf8)
        for _ in 0..<3_000 {
            let bytes = (0..<Int.random(in: 0..<24, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! }
            if JSONText.parseFlatObject(bytes) != nil {
                #expect((try? JSONSerialization.jsonObject(with: Data(bytes))) != nil, "accepted \(String(decoding: bytes, as: UTF8.self))")
            }
        }
    }
}
