import Attestation
import Authority
import Encoding
import Foundation
import Testing
import TestSupport

/// The vectors live beside the Authority tests (with their licence).
let vectors = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("AuthorityTests/wycheproof")

func loadJSON(_ name: String) throws -> [String: Any] {
    try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: vectors.appendingPathComponent(name))) as? [String: Any])
}

/// What the platform-token path makes of a compact JWS and a key set:
/// nil when the signature is accepted, else the refusal's code.
func platformCheck(_ jws: String, keySet: [String: Any], algorithms: Set<String>, keyIDRequired: Bool) -> String? {
    do {
        let envelope = try CompactJWS(parsing: jws, keyIDRequired: keyIDRequired)
        let data = try JSONSerialization.data(withJSONObject: keySet)
        let keys: PlatformKeySet
        if keyIDRequired {
            keys = try PlatformKeySet(jwks: Array(data), algorithms: algorithms)
        } else {
            // Vectors without kid: the group's one key under "".
            let jwk = (keySet["keys"] as? [[String: Any]])?.first ?? [:]
            keys = PlatformKeySet(keys: [envelope.keyID: try VerificationKey.fromJWK(jwk)])
        }
        try TokenVerifier.checkSignature(envelope, algorithms: algorithms, keys: keys)
        return nil
    } catch let error as AttestationError {
        return error.code
    } catch {
        return "\(error)"
    }
}

@Suite("Wycheproof JOSE vectors through the platform-token verifier", .onOwnThreads)
struct WycheproofJOSETests {
    static let asymmetric: Set<String> = ["RS256", "ES256", "ES384"]

    @Test("JWK set vectors: valid asymmetric tokens verify; HMAC (even 'valid'), mixed and duplicate-kid sets, weak or mismatched keys are refused")
    func keySets() throws {
        let file = try loadJSON("json_web_key_test.json")
        var verified = 0, refused = 0
        for group in file["testGroups"] as? [[String: Any]] ?? [] {
            let set = (group["public"] as? [String: Any]) ?? (group["private"] as? [String: Any]) ?? [:]
            let keySet: [String: Any] = set["keys"] != nil ? set : ["keys": [set]]
            for test in group["tests"] as? [[String: Any]] ?? [] {
                let jws = try #require(test["jws"] as? String)
                let outcome = platformCheck(jws, keySet: keySet, algorithms: Self.asymmetric, keyIDRequired: true)
                let header = Base64URL.decode(jws.split(separator: ".")[0]).flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] }
                let asymmetric = Self.asymmetric.contains(header?["alg"] as? String ?? "")
                if test["result"] as? String == "valid" && asymmetric {
                    #expect(outcome == nil, "tcId \(test["tcId"]!) (\(group["comment"]!)) should verify: \(outcome ?? "")")
                    verified += 1
                } else {
                    #expect(outcome != nil, "tcId \(test["tcId"]!) (\(group["comment"]!)) was accepted")
                    refused += 1
                }
            }
        }
        #expect(verified >= 1 && refused >= 20, "verified \(verified), refused \(refused)")
    }

    @Test("JWS vectors: each key's own algorithm behaves as specified; every other algorithm (and HMAC, none, crit, b64) is refused")
    func signatures() throws {
        let file = try loadJSON("json_web_signature_test.json")
        var pinned = 0, others = 0
        for group in file["testGroups"] as? [[String: Any]] ?? [] {
            let jwk = (group["public"] as? [String: Any]) ?? [:]
            let key = try? VerificationKey.fromJWK(jwk)
            for test in group["tests"] as? [[String: Any]] ?? [] {
                guard let jws = test["jws"] as? String else { continue }
                let outcome = platformCheck(jws, keySet: ["keys": [jwk]], algorithms: Self.asymmetric, keyIDRequired: false)
                let header = jws.split(separator: ".").first.flatMap { Base64URL.decode($0) }
                    .flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] }
                // What our stricter rules refuse whatever the signature: other header parameters, odd kids, another typ, an empty payload.
                let kid = header?["kid"] as? String, typ = header?["typ"] as? String
                let plainHeader = Set(header?.keys.map { $0 } ?? []).isSubset(of: PlatformToken.headerParameters)
                    && (kid == nil || PlatformToken.isPlainKeyID(kid!)) && (typ == nil || typ == "JWT") && !jws.contains("..")
                if let key, header?["alg"] as? String == key.jwsAlgorithm, plainHeader {
                    if test["result"] as? String == "valid" { #expect(outcome == nil, "tcId \(test["tcId"]!) should verify: \(outcome ?? "")") }
                    if test["result"] as? String == "invalid" { #expect(outcome != nil, "tcId \(test["tcId"]!): \(test["comment"]!) should fail") }
                    pinned += 1
                } else {
                    #expect(outcome != nil, "tcId \(test["tcId"]!) (\(group["comment"] ?? "")) passed")
                    others += 1
                }
            }
        }
        #expect(pinned > 20 && others > 50, "pinned \(pinned), others \(others)")
    }
}
