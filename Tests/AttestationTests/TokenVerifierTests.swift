import Attestation
import Authority
import ClusterHarness
import Encoding
import Crypto
import Foundation
import Testing
import TestSupport

let audience = "warrant.example"

/// A provider, its key set and requirements, and a verify helper.
struct Fixture {
    let provider: TestIssuer
    let keys: PlatformKeySet
    var requirements: TokenRequirements
    let now = Int64(Date().timeIntervalSince1970)

    init(_ algorithms: [KeyAlgorithm] = [.rsa2048, .ecdsaP256]) throws {
        provider = try TestIssuer(keys: algorithms)
        keys = try PlatformKeySet(jwks: provider.jwks(), algorithms: ["RS256", "ES256"])
        requirements = TokenRequirements(issuer: provider.issuer, audience: audience, algorithms: ["RS256", "ES256"], maxAgeSeconds: 600,
                                         maxLifetimeSeconds: 3_600)
    }

    func verify(_ token: String, method: JoinMethod = .github) throws(AttestationError) -> VerifiedToken {
        try TokenVerifier.verify(try PlatformToken(parsing: token), method: method, requirements: requirements, keys: keys, now: now)
    }

    /// The error code verifying `token` gives (nil if it verified).
    func refusal(_ token: String) -> String? {
        do {
            _ = try verify(token)
            return nil
        } catch {
            return error.code
        }
    }

    func github(_ extra: [(String, TestIssuer.Claim)] = [], now: Int64? = nil, lifetime: Int64 = 300) -> [(String, TestIssuer.Claim)] {
        provider.githubClaims(audience: audience, now: now ?? self.now, lifetime: lifetime, extra: extra)
    }
}

func replacing(_ claims: [(String, TestIssuer.Claim)], _ name: String, with value: TestIssuer.Claim?) -> [(String, TestIssuer.Claim)] {
    var claims = claims.filter { $0.0 != name }
    if let value { claims.append((name, value)) }
    return claims
}

func b64(_ text: String) -> String { Base64URL.encode(Array(text.utf8)) }

@Suite("Platform token verification", .onOwnThreads)
struct TokenVerifierTests {
    @Test("A GitHub Actions token (RS256) and a Kubernetes token (ES256) verify; their claims come out as text, Kubernetes' nested ones flattened")
    func accepts() throws {
        let f = try Fixture()
        let verified = try f.verify(try f.provider.mint(f.github()))
        #expect(verified.claims["repository"] == "acme/api")
        #expect(verified.claims["repository_owner_id"] == "1342004")
        #expect(verified.replayKey.count == 64)
        let k8s = try f.provider.mint(f.provider.kubernetesClaims(audience: audience, now: f.now, lifetime: 600), kid: "key-2")
        let verifiedK8s = try f.verify(k8s, method: .kubernetes)
        #expect(verifiedK8s.claims["namespace"] == "payments")
        #expect(verifiedK8s.claims["service_account"] == "api")
        #expect(verifiedK8s.claims["pod_uid"] == "c0ffee")
    }

    @Test("Algorithm attacks: none, HS256 keyed with the public key, an algorithm that does not fit the key, one the issuer does not allow")
    func algorithms() throws {
        var f = try Fixture()
        let claims = b64(TestIssuer.object(f.github()))
        // alg none, with and without a signature.
        #expect(throws: AttestationError.self) { try PlatformToken(parsing: "\(b64(#"{"alg":"none","kid":"key-1"}"#)).\(claims).") }
        #expect(f.refusal("\(b64(#"{"alg":"none","kid":"key-1"}"#)).\(claims).AAAA") == "algorithm_not_allowed")
        #expect(f.refusal("\(b64(#"{"alg":"NONE","kid":"key-1"}"#)).\(claims).AAAA") == "algorithm_not_allowed")
        // HS256 with the RSA public key (DER) as the HMAC secret: the classic confusion.
        let rsa = f.provider.keys[0].key.publicKey
        let input = "\(b64(#"{"alg":"HS256","kid":"key-1","typ":"JWT"}"#)).\(claims)"
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: rsa.derRepresentation))
        #expect(f.refusal(input + "." + Base64URL.encode(Array(mac))) == "algorithm_not_allowed")
        // ES256 header on the RSA key, RS256 header on the EC key.
        let esOnRSA = try f.provider.mint(f.github(), kid: "key-1", header: [("alg", .string("ES256"))])
        #expect(f.refusal(esOnRSA) == "algorithm_mismatch")
        let rsOnEC = try f.provider.mint(f.github(), kid: "key-2", header: [("alg", .string("RS256"))])
        #expect(f.refusal(rsOnEC) == "algorithm_mismatch")
        // The issuer allows only RS256.
        f.requirements.algorithms = ["RS256"]
        #expect(f.refusal(try f.provider.mint(f.github(), kid: "key-2")) == "algorithm_not_allowed")
        #expect(f.refusal(try f.provider.mint(f.github(), kid: "key-1")) == nil)
        // A signature by a key the set does not have, under a known kid.
        let stranger = try TestIssuer(keys: [.rsa2048])
        #expect(f.refusal(try stranger.mint(replacing(f.github(), "iss", with: .string(f.provider.issuer)))) == "bad_signature")
    }

    @Test("Key attacks: wrong kid, kid with path characters, missing kid, embedded jwk, jku, x5u, x5c, crit, unknown header parameters")
    func keys() throws {
        let f = try Fixture()
        #expect(f.refusal(try f.provider.mint(f.github(), header: [("kid", .string("key-9"))])) == "unknown_key")
        for kid in ["../../etc/passwd", "a/b", "key-1\\x", "..", "key 1", String(repeating: "k", count: 129), ""] {
            #expect(f.refusal(try f.provider.mint(f.github(), header: [("kid", .string(kid))])) == "bad_kid", "kid \(kid)")
        }
        let noKid = "\(b64(#"{"alg":"RS256","typ":"JWT"}"#)).\(b64(TestIssuer.object(f.github()))).AAAA"
        #expect(f.refusal(noKid) == "missing_kid")
        let jwk = JSONText.object(f.provider.keys[0].key.publicKey.jwk().compactMapValues { $0 as? String })
        for (name, value) in [("jwk", TestIssuer.Claim.raw(jwk)), ("jku", .string("https://evil.example/jwks")), ("x5u", .string("https://evil.example/x")),
                              ("x5c", .raw(#"["MIIB"]"#))] {
            #expect(f.refusal(try f.provider.mint(f.github(), header: [(name, value)])) == "key_in_header", "\(name)")
        }
        #expect(f.refusal(try f.provider.mint(f.github(), header: [("crit", .raw(#"["exp"]"#))])) == "critical_header")
        #expect(f.refusal(try f.provider.mint(f.github(), header: [("zip", .string("DEF"))])) == "unsupported_header")
        #expect(f.refusal(try f.provider.mint(f.github(), header: [("typ", .string("at+jwt"))])) == "malformed_token")
        // GitHub's x5t is allowed (it is only a thumbprint).
        #expect(f.refusal(try f.provider.mint(f.github(), header: [("x5t", .string("abc"))])) == nil)
    }

    @Test("Claim attacks: wrong iss, missing or wrong aud, aud as an array without ours, expired, future nbf or iat, too old, too long-lived, non-integer times")
    func claims() throws {
        let f = try Fixture()
        func refusal(_ claims: [(String, TestIssuer.Claim)]) throws -> String? { f.refusal(try f.provider.mint(claims)) }
        #expect(try refusal(replacing(f.github(), "iss", with: .string(f.provider.issuer + "/"))) == "wrong_issuer")
        #expect(try refusal(replacing(f.github(), "iss", with: .string(f.provider.issuer.uppercased()))) == "wrong_issuer")
        #expect(try refusal(replacing(f.github(), "iss", with: nil)) == "missing_issuer")
        #expect(try refusal(replacing(f.github(), "aud", with: nil)) == "wrong_audience")
        #expect(try refusal(replacing(f.github(), "aud", with: .string("sts.amazonaws.com"))) == "wrong_audience")
        #expect(try refusal(replacing(f.github(), "aud", with: .string(audience.uppercased()))) == "wrong_audience")
        #expect(try refusal(replacing(f.github(), "aud", with: .raw(#"["sts.amazonaws.com","other"]"#))) == "wrong_audience")
        #expect(try refusal(replacing(f.github(), "aud", with: .raw("[\"x\",\"\(audience)\"]"))) == nil)
        #expect(try refusal(replacing(f.github(), "aud", with: .raw("[[\"\(audience)\"]]"))) == "wrong_audience")
        #expect(try refusal(f.github(now: f.now - 400)) == "token_expired")
        #expect(try refusal(replacing(f.github(), "exp", with: nil)) == "missing_claim")
        #expect(try refusal(replacing(f.github(), "exp", with: .string("\(f.now + 60)"))) == "bad_claim")
        #expect(try refusal(replacing(f.github(), "exp", with: .raw("\(f.now + 60).5"))) == "bad_claim")
        #expect(try refusal(replacing(f.github(), "nbf", with: .number(f.now + 61))) == "not_yet_valid")
        #expect(try refusal(replacing(f.github(), "nbf", with: .number(f.now + 59))) == nil, "within the 60 s leeway")
        #expect(try refusal(f.github(now: f.now + 120)) == "issued_in_future")
        #expect(try refusal(f.github(now: f.now - 601, lifetime: 3_000)) == "token_too_old")
        #expect(try refusal(f.github(lifetime: 3_601)) == "lifetime_too_long")
        #expect(try refusal(replacing(f.github(), "jti", with: .number(7))) == "bad_claim")
    }

    @Test("Malformed tokens: oversized, wrong segment counts, padding, bad base64url, duplicate JSON keys, deep nesting, trailing bytes, not objects")
    func malformed() throws {
        let f = try Fixture()
        let good = try f.provider.mint(f.github())
        func code(_ text: String) -> String? {
            do { _ = try PlatformToken(parsing: text); return nil } catch { return error.code }
        }
        #expect(code(String(repeating: "a", count: PlatformToken.bytesMax + 1)) == "token_too_large")
        #expect(code("") == "malformed_token")
        #expect(code("a.b") == "malformed_token")
        #expect(code(good + ".x") == "malformed_token")
        #expect(code(good + "=") == "malformed_token")
        #expect(code(good.replacingOccurrences(of: ".", with: "=.")) == "malformed_token")
        #expect(code("!" + good) == "malformed_token")
        let parts = good.split(separator: ".").map(String.init)
        let header = parts[0]
        func withClaims(_ json: String) -> String { "\(header).\(b64(json)).\(parts[2])" }
        #expect(code(withClaims(#"{"iss":"a","iss":"b"}"#)) == "malformed_token")
        #expect(code(withClaims(#"{"iss":"a","x":[[[[[[[[1]]]]]]]]}"#)) == "malformed_token")
        #expect(code(withClaims(#"{"iss":"a"} x"#)) == "malformed_token")
        #expect(code(withClaims(#"["iss"]"#)) == "malformed_token")
        #expect(code(withClaims(#"{"iss":"a",}"#)) == "malformed_token")
        #expect(code(withClaims("{\"iss\":\"a\u{01}\"}")) == "malformed_token")
        #expect(code(withClaims(#"{"iss":"\ud800"}"#)) == "malformed_token")
        #expect(code(withClaims(#"{"iss":"a","n":01}"#)) == "malformed_token")
        #expect(code("\(b64(#"{"alg":"RS256","kid":"key-1","kid":"key-2"}"#)).\(parts[1]).\(parts[2])") == "malformed_token")
        // Invalid UTF-8 in the claims.
        let invalid = Base64URL.encode([0x7B, 0x22, 0x69, 0x73, 0x73, 0x22, 0x3A, 0x22, 0xC3, 0x28, 0x22, 0x7D])
        #expect(code("\(header).\(invalid).\(parts[2])") == "malformed_token")
    }

    @Test("Claims compare as bytes: a look-alike issuer or repository (Cyrillic 'а', a decomposed 'é') is a different value")
    func lookAlikes() throws {
        let f = try Fixture()
        let cyrillic = f.provider.issuer.replacingOccurrences(of: "https", with: "httpѕ")
        #expect(f.refusal(try f.provider.mint(replacing(f.github(), "iss", with: .string(cyrillic)))) == "wrong_issuer")
        var requirements = f.requirements
        requirements.audience = "caf\u{E9}"
        let decomposed = try f.provider.mint(replacing(f.github(), "aud", with: .string("cafe\u{301}")))
        #expect(throws: AttestationError.self) {
            try TokenVerifier.verify(try PlatformToken(parsing: decomposed), method: .github, requirements: requirements, keys: f.keys, now: f.now)
        }
        // In a list of audiences too.
        let decomposedInList = try f.provider.mint(replacing(f.github(), "aud", with: .raw("[\"cafe\u{301}\"]")))
        #expect(throws: AttestationError.self) {
            try TokenVerifier.verify(try PlatformToken(parsing: decomposedInList), method: .github, requirements: requirements, keys: f.keys, now: f.now)
        }
        // Two claims whose names String takes as one (K and the Kelvin sign): refused, not collapsed into one.
        let kelvin = try f.provider.mint(f.github() + [("\u{212A}ind", .string("x")), ("Kind", .string("y"))])
        #expect(f.refusal(kelvin) == "bad_claim")
    }

    @Test("Replay keys: the same jti from the same issuer gives the same key; another jti or issuer another; without jti, the hash of what was signed (an ECDSA signature's twin is the same token)")
    func replayKeys() throws {
        let f = try Fixture()
        let a = try f.verify(try f.provider.mint(replacing(f.github(), "jti", with: .string("j-1")))).replayKey
        let b = try f.verify(try f.provider.mint(replacing(f.github(now: f.now - 1), "jti", with: .string("j-1")))).replayKey
        let c = try f.verify(try f.provider.mint(replacing(f.github(), "jti", with: .string("j-2")))).replayKey
        #expect(a == b && a != c)
        let noJTI = try f.provider.mint(replacing(f.github(), "jti", with: nil))
        #expect(try f.verify(noJTI).replayKey == f.verify(noJTI).replayKey)
        #expect(try f.verify(noJTI).replayKey != f.verify(try f.provider.mint(replacing(f.github(now: f.now - 1), "jti", with: nil))).replayKey)
        // An ES256 signature's twin (r, n - s), which anyone holding the
        // token can make, verifies too: it is the same token.
        let es256 = try f.provider.mint(replacing(f.github(), "jti", with: nil), kid: "key-2")
        let parts = es256.split(separator: ".").map(String.init)
        var signature = try #require(Base64URL.decode(parts[2]))
        #expect(signature.count == 64)
        let order: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                              0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51]
        var borrow = 0
        for i in (0..<32).reversed() {
            let difference = Int(order[i]) - Int(signature[32 + i]) - borrow
            signature[32 + i] = UInt8((difference + 256) % 256)
            borrow = difference < 0 ? 1 : 0
        }
        let twin = parts[0] + "." + parts[1] + "." + Base64URL.encode(signature)
        #expect(twin != es256)
        #expect(try f.verify(twin).replayKey == f.verify(es256).replayKey, "the twin signature verifies, and is the same token")
    }

    @Test("Key sets: duplicate kids refuse the whole set; weak, symmetric, encryption and disallowed keys are left out; oversized and malformed sets are refused")
    func keySets() throws {
        let provider = try TestIssuer(keys: [.rsa2048, .ecdsaP256])
        let entries = String(decoding: provider.jwks(), as: UTF8.self)
        let duplicate = entries.replacingOccurrences(of: "\"key-2\"", with: "\"key-1\"")
        #expect(throws: AttestationError("duplicate_kid", "two keys share the kid 'key-1'; the set is refused rather than guessing")) {
            try PlatformKeySet(jwks: Array(duplicate.utf8), algorithms: ["RS256", "ES256"])
        }
        let onlyRS = try PlatformKeySet(jwks: provider.jwks(), algorithms: ["RS256"])
        #expect(onlyRS.keys.keys.sorted() == ["key-1"] && onlyRS.skipped.count == 1)
        let withOthers = entries.replacingOccurrences(of: "{\"keys\":[", with: """
            {"keys":[{"kty":"oct","kid":"hmac","k":"c2VjcmV0"},{"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            """)
        let set = try PlatformKeySet(jwks: Array(withOthers.utf8), algorithms: ["RS256", "ES256"])
        #expect(set.keys.keys.sorted() == ["key-1", "key-2"])
        #expect(set.skipped.count == 2)
        #expect(throws: AttestationError.self) { try PlatformKeySet(jwks: Array(#"{"keys":[{"kty":"oct","kid":"a","k":"AA"}]}"#.utf8), algorithms: ["RS256"]) }
        #expect(throws: AttestationError.self) { try PlatformKeySet(jwks: Array(#"{"keys":{}}"#.utf8), algorithms: ["RS256"]) }
        #expect(throws: AttestationError.self) { try PlatformKeySet(jwks: [UInt8](repeating: 0x20, count: PlatformKeySet.bytesMax + 1), algorithms: ["RS256"]) }
        #expect(throws: AttestationError.self) {
            try PlatformKeySet(jwks: Array(entries.replacingOccurrences(of: "\"key-1\"", with: "\"../x\"").utf8), algorithms: ["RS256"])
        }
        // A member of the wrong type is a malformed key, left out with its reason, not read as absent.
        let bads: [(String, Any)] = [("use", 1), ("alg", NSNull()), ("key_ops", ["verify", 7] as [Any]), ("use", ["sig"])]
        for (member, bad) in bads {
            var document = try #require(try JSONSerialization.jsonObject(with: Data(provider.jwks())) as? [String: Any])
            var keys = try #require(document["keys"] as? [[String: Any]])
            let index = try #require(keys.firstIndex { $0["kid"] as? String == "key-1" })
            keys[index][member] = bad
            document["keys"] = keys
            let malformed = try PlatformKeySet(jwks: Array(try JSONSerialization.data(withJSONObject: document)), algorithms: ["RS256", "ES256"])
            #expect(malformed.keys.keys.sorted() == ["key-2"] && malformed.skipped.contains { $0.hasPrefix("key-1:") && $0.contains(member) },
                    "\(member) = \(bad): \(malformed.skipped)")
        }
        // Discovery must name the same issuer.
        #expect(try PlatformKeySet.jwksURI(discovery: Array(#"{"issuer":"https://a","jwks_uri":"https://a/k"}"#.utf8), issuer: "https://a") == "https://a/k")
        #expect(throws: AttestationError.self) { try PlatformKeySet.jwksURI(discovery: Array(#"{"issuer":"https://b","jwks_uri":"https://a/k"}"#.utf8), issuer: "https://a") }
    }
}
