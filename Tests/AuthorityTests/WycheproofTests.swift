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

    @Test("RSA PKCS#1 v1.5 / SHA-256, 2048 bits (the RS256 encoding): every valid vector verifies, every invalid one fails")
    func rsaPKCS1() throws {
        let file = try loadVectors("rsa_signature_2048_sha256_test.json")
        var checked = 0
        for group in file["testGroups"] as? [[String: Any]] ?? [] {
            let jwkText = try #require(group["keyJwk"] as? [String: Any])
            let key = try VerificationKey.fromJWK(jwkText)
            #expect(key.jwsAlgorithm == "RS256")
            for test in group["tests"] as? [[String: Any]] ?? [] {
                let valid = key.isValidJWS(message: hexBytes(test["msg"] as! String), signature: hexBytes(test["sig"] as! String))
                if test["result"] as? String == "valid" { #expect(valid, "tcId \(test["tcId"]!) should verify") }
                if test["result"] as? String == "invalid" { #expect(!valid, "tcId \(test["tcId"]!): \(test["comment"]!) should fail") }
                checked += 1
            }
        }
        #expect(checked > 200)
    }

    @Test("JWS vectors: for every key we accept (EC P-256, P-384, RSA), tokens in its pinned algorithm behave as specified; nothing else passes")
    func jws() throws {
        let file = try loadVectors("json_web_signature_test.json")
        var pinned = 0, others = 0
        for group in file["testGroups"] as? [[String: Any]] ?? [] {
            let jwk = (group["public"] as? [String: Any]) ?? [:]
            // A JWK that may not verify signatures (or names another algorithm) yields no key at all.
            let key = try? VerificationKey.fromJWK(jwk)
            for test in group["tests"] as? [[String: Any]] ?? [] {
                guard let jws = test["jws"] as? String else { continue } // JSON serialisation vectors: not a form we accept
                let header = jws.split(separator: ".").first.flatMap { Base64URL.decode($0) }
                    .flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] }
                let valid = key?.isValidCompactJWS(jws) ?? false
                if let key, header?["alg"] as? String == key.jwsAlgorithm {
                    if test["result"] as? String == "valid" { #expect(valid, "tcId \(test["tcId"]!) should verify") }
                    if test["result"] as? String == "invalid" { #expect(!valid, "tcId \(test["tcId"]!): \(test["comment"]!) should fail") }
                    pinned += 1
                } else {
                    #expect(!valid, "tcId \(test["tcId"]!) (\(group["comment"] ?? "")) passed a check pinned to another algorithm")
                    others += 1
                }
            }
        }
        #expect(pinned > 20 && others > 50, "pinned \(pinned), others \(others)")
    }
}
