import Encoding
import Testing

@Suite("The strict JSON parser")
struct StrictJSONTests {
    private func parse(_ bytes: [UInt8]) -> Result<JSONValue, StrictJSONError> {
        Result { () throws(StrictJSONError) in try StrictJSON.parse(bytes) }
    }

    private func object(_ keys: [String]) -> [UInt8] {
        Array(("{" + keys.enumerated().map { "\"\($0.element)\":\($0.offset)" }.joined(separator: ",") + "}").utf8)
    }

    @Test("Duplicate keys are refused wherever they fall, among the 64 members compared in turn and past them")
    func duplicates() throws {
        let distinct = (0..<100).map { "key\($0)" }
        guard case .success(let value) = parse(object(distinct)) else { Issue.record("100 distinct keys must parse"); return }
        #expect(value["key99"] == .integer(99) && value["key0"] == .integer(0))
        for (first, second) in [(0, 1), (3, 15), (2, 16), (1, 10), (10, 11), (30, 31), (2, 63), (2, 64), (63, 64), (64, 65), (70, 99)] {
            var keys = distinct
            keys[second] = keys[first]
            guard case .failure(let error) = parse(object(keys)) else { Issue.record("duplicate at \(first) and \(second) accepted"); continue }
            #expect(error.reason == "duplicate key \"key\(first)\"", "\(error)")
        }
        // Keys are bytes: the precomposed and the decomposed é are two keys.
        #expect(throws: Never.self) { try StrictJSON.parse(Array("{\"\u{e9}\":1,\"e\u{301}\":2}".utf8)) }
    }

    @Test("Strings: plain ones as they are, escapes and surrogate pairs decoded, bad UTF-8, control characters and unterminated strings refused")
    func strings() throws {
        let cases: [(String, String)] = [
            (#""plain text/with:colons""#, "plain text/with:colons"),
            (#""a\"b\\c\/d\n""#, "a\"b\\c/d\n"),
            (#""caf\u00e9 \ud83d\ude00 x""#, "caf\u{e9} \u{1F600} x"),
            (#""""#, ""),
            ("\"d\u{e9}j\u{e0}\"", "d\u{e9}j\u{e0}"),
        ]
        for (json, text) in cases {
            guard case .success(.string(let parsed)) = parse(Array(json.utf8)) else { Issue.record("\(json) did not parse"); continue }
            #expect(Array(parsed.utf8) == Array(text.utf8), "\(json)")
        }
        for bad in [[0x22, 0x61, 0xFF, 0x22], [0x22, 0x61, 0x0A, 0x22], [0x22, 0x61, 0x62], [0x22, 0xC3, 0x22], [0x22, 0x5C, 0x78, 0x22]] as [[UInt8]] {
            guard case .failure = parse(bad) else { Issue.record("\(bad) accepted"); continue }
        }
    }
}
