import Authority
import Crypto
import Foundation
import Testing

/// The vectors, copied beside this file (with their licence) so a clean
/// clone has them.
let wycheproof = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("wycheproof")

func hexBytes(_ text: String) -> [UInt8] {
    var bytes: [UInt8] = []
    var index = text.startIndex
    while index < text.endIndex {
        let next = text.index(index, offsetBy: 2)
        bytes.append(UInt8(text[index..<next], radix: 16)!)
        index = next
    }
    return bytes
}

func loadVectors(_ name: String) throws -> [String: Any] {
    let data = try Data(contentsOf: wycheproof.appendingPathComponent(name))
    return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
}

@Suite("Wycheproof")
struct WycheproofTests {
    @Test("ECDSA P-256 / SHA-256 in P1363 form (the ES256 encoding): every valid vector verifies, every invalid one fails")
    func ecdsaP1363() throws {
        let file = try loadVectors("ecdsa_secp256r1_sha256_p1363_test.json")
        var checked = 0
        for group in file["testGroups"] as? [[String: Any]] ?? [] {
            let keyHex = try #require((group["publicKey"] as? [String: Any])?["uncompressed"] as? String)
            guard let key = try? P256.Signing.PublicKey(x963Representation: hexBytes(keyHex)) else { continue }
            for test in group["tests"] as? [[String: Any]] ?? [] {
                let result = test["result"] as? String
                let valid = JWTVerifier.isValidES256(publicKey: key, message: hexBytes(test["msg"] as! String), signature: hexBytes(test["sig"] as! String))
                if result == "valid" { #expect(valid, "tcId \(test["tcId"]!) should verify") }
                if result == "invalid" { #expect(!valid, "tcId \(test["tcId"]!): \(test["comment"]!) should fail") }
                checked += 1
            }
        }
        #expect(checked > 200)
    }

    @Test("JWS vectors: ES256 ones behave as specified; no token of any other algorithm passes an ES256-pinned check")
    func jws() throws {
        let file = try loadVectors("json_web_signature_test.json")
        var es256 = 0, others = 0
        // Any key will do for the non-ES256 groups: nothing may pass.
        let someKey = P256.Signing.PrivateKey().publicKey
        for group in file["testGroups"] as? [[String: Any]] ?? [] {
            let jwk = (group["public"] as? [String: Any]) ?? [:]
            let isES256 = jwk["kty"] as? String == "EC" && jwk["crv"] as? String == "P-256"
            // A JWK that may not verify signatures yields no key at all.
            let key = isES256 ? try? JWTVerifier.verificationKey(fromJWK: jwk) : someKey
            for test in group["tests"] as? [[String: Any]] ?? [] {
                guard let jws = test["jws"] as? String else { continue } // JSON serialisation vectors: not a form we accept
                let valid = key.map { JWTVerifier.isValidCompactES256(jws, key: $0) } ?? false
                if isES256 {
                    if test["result"] as? String == "valid" { #expect(valid, "tcId \(test["tcId"]!) should verify") }
                    if test["result"] as? String == "invalid" { #expect(!valid, "tcId \(test["tcId"]!): \(test["comment"]!) should fail") }
                    es256 += 1
                } else {
                    #expect(!valid, "tcId \(test["tcId"]!) (\(group["comment"] ?? "")) passed an ES256-pinned check")
                    others += 1
                }
            }
        }
        #expect(es256 > 20 && others > 100)
    }
}
