import Encoding
import Foundation
@testable import Ledger
import Testing

@Suite("Hand-written JSON of the ledger's records")
struct LedgerEncodingTests {
    @Test("Join tokens and issued records written by hand read back, by hand and by JSONDecoder, as the same values")
    func roundTrip() throws {
        var token = JoinToken(hash: String(repeating: "a", count: 64), spiffeID: "spiffe://example.org/ci/\"odd\"\\path", ttlMaxSeconds: 600,
                              expiresAtMillis: 1_795_000_000_000, maxLifetimeSeconds: 86_400)
        for used in [false, true] {
            token.used = used
            token.usedBySerial = used ? "0a0b" : nil
            #expect(JoinToken(canonical: token.canonicalJSON) == token)
            #expect(try JSONDecoder().decode(JoinToken.self, from: Data(token.canonicalJSON)) == token)
        }
        // Written by JSONEncoder (older records): still read.
        #expect(JoinToken(canonical: try CanonicalJSON.encode(token)) == token)
        let record = IssuedRecord(kind: .jwt, spiffeID: "spiffe://example.org/a", serial: "ff", authority: "ca1", issuedAtMillis: 5,
                                  notAfterMillis: 9, attributes: ["repository": "acme/api", "note": "tab\there"])
        #expect(try JSONDecoder().decode(IssuedRecord.self, from: Data(record.canonicalJSON)) == record)
    }

    @Test("The flat-object parser agrees with JSONSerialization on what it accepts and refuses the rest")
    func parser() throws {
        let accepted = [
            #"{}"#, #"{"a":"b"}"#, #" { "a" : 1 , "b" : -20 , "c" : true , "d" : false , "e" : null } "#,
            #"{"s":"\u00e9\ud834\udd1e\n\"\\\/"}"#, #"{"o":{"x":"y"},"n":0}"#, #"{"a":["x","y"],"e":[]}"#,
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
            #"{"a":"\x"}"#, "{\"a\":\"\u{01}\"}", #"{"a":"\ud834"}"#, #"{"a":1,"a":2}"#, #"{"a":99999999999999999999}"#, #"{"a":1} x"#,
        ]
        for text in refused { #expect(JSONText.parseFlatObject(Array(text.utf8)) == nil, "accepted \(text)") }
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
