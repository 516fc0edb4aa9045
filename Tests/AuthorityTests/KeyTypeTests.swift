import Authority
import Crypto
import Foundation
import SwiftASN1
import Testing
import TestSupport
import X509

@Suite("Authorities of every key type", .serialized, .onOwnThreads)
struct KeyTypeTests {
    let id = try! SpiffeID(parsing: "spiffe://example.org/ci/acme/build")

    @Test("P-256, P-384 and RSA authorities issue X509-SVIDs that verify here and with openssl", arguments: KeyAlgorithm.allCases.filter { $0 != .rsa4096 })
    func x509(algorithm: KeyAlgorithm) async throws {
        let ca = try X509Authority.create(trustDomain: "example.org", algorithm: algorithm)
        #expect(ca.algorithm == algorithm)
        let issued = try ca.issue(spiffeID: id, publicKey: .init(P256.Signing.PrivateKey().publicKey), ttl: 600, attributes: ["a": "b"])
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1)
        let verified = try await bundle.verifyX509(chain: [try issued.certificate])
        #expect(verified.spiffeID == id && verified.attributes == ["a": "b"])
        let scratch = try Scratch()
        let result = try run("openssl", ["verify", "-CAfile", try scratch.write("bundle.pem", try bundle.pem()), try scratch.write("svid.pem", issued.pem)])
        #expect(result.status == 0, "\(algorithm): \(result.output)")
        // The bundle's x509-svid key describes the CA's key type.
        let jwks = try #require(try JSONSerialization.jsonObject(with: Data(try bundle.jwks())) as? [String: Any])
        let key = try #require((jwks["keys"] as? [[String: Any]])?.first)
        #expect(key["kty"] as? String == (algorithm == .ecdsaP256 || algorithm == .ecdsaP384 ? "EC" : "RSA"))
    }

    @Test("JWT-SVIDs: ES256, ES384 and RS256 verify with their own key only, whatever the header claims", arguments: [KeyAlgorithm.ecdsaP256, .ecdsaP384, .rsa2048])
    func jwt(algorithm: KeyAlgorithm) throws {
        let signer = try JWTAuthority.create(trustDomain: "example.org", algorithm: algorithm)
        let token = try signer.issue(spiffeID: id, audiences: ["x"], ttl: 60, attributes: ["repo": "acme"]).token
        let header = try #require(try JSONSerialization.jsonObject(with: Data(Base64URL.decode(token.split(separator: ".")[0])!)) as? [String: Any])
        #expect(header["alg"] as? String == signer.publicKey.jwsAlgorithm)
        let verifier = JWTVerifier(trustDomain: "example.org", keys: [signer.keyID: signer.publicKey])
        let verified = try verifier.verify(token, audience: "x")
        #expect(verified.spiffeID == id && verified.attributes == ["repo": "acme"])
        // The same signature under a header naming another algorithm is refused before any check.
        var parts = token.split(separator: ".").map(String.init)
        let otherAlg = signer.publicKey.jwsAlgorithm == "ES256" ? "ES384" : "ES256"
        parts[0] = Base64URL.encode(Array(try JSONSerialization.data(withJSONObject: ["alg": otherAlg, "kid": signer.keyID, "typ": "JWT"])))
        #expect(throws: AuthorityError("bad_algorithm", "the key '\(signer.keyID)' accepts only \(signer.publicKey.jwsAlgorithm)")) {
            try verifier.verify(parts.joined(separator: "."), audience: "x")
        }
        // The JWK round-trips, pinned to the same algorithm; a JWK naming another is refused.
        var jwk = signer.publicKey.jwk()
        let back = try VerificationKey.fromJWK(jwk)
        #expect(back.keyID == signer.keyID && back.jwsAlgorithm == signer.publicKey.jwsAlgorithm)
        jwk["alg"] = otherAlg
        #expect(throws: AuthorityError.self) { try VerificationKey.fromJWK(jwk) }
    }

    @Test("RSA JWKs under 2048 bits and unknown curves are refused")
    func weakJWKs() throws {
        var modulus = (0..<128).map { _ in UInt8.random(in: 0...255) }
        modulus[0] |= 0x80
        modulus[127] |= 1
        let jwk: [String: Any] = ["kty": "RSA", "n": Base64URL.encode(modulus), "e": "AQAB"]
        #expect(throws: AuthorityError.self) { try VerificationKey.fromJWK(jwk) }
        #expect(throws: AuthorityError.self) { try VerificationKey.fromJWK(["kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"]) }
    }

    @Test("A CRL lists exactly the revoked serials; openssl refuses a listed certificate with -crl_check and accepts the others", arguments: [KeyAlgorithm.ecdsaP256, .rsa2048])
    func crl(algorithm: KeyAlgorithm) throws {
        let ca = try X509Authority.create(trustDomain: "example.org", algorithm: algorithm)
        let revoked = try ca.issue(spiffeID: id, publicKey: .init(P256.Signing.PrivateKey().publicKey), ttl: 600, attributes: [:])
        let kept = try ca.issue(spiffeID: id, publicKey: .init(P256.Signing.PrivateKey().publicKey), ttl: 600, attributes: [:])
        // A 16-byte number (content version, then seconds) as openssl reads it.
        let number: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0x2A] + [0, 0, 0, 0, 0x69, 0x2F, 0x8E, 0x01]
        let der = try ca.crl(revoked: [(Array(revoked.certificate.serialNumber.bytes), Date())], number: number, nextUpdate: Date().addingTimeInterval(3_600))
        let scratch = try Scratch()
        let crlPath = try scratch.write("crl.pem", PEMDocument(type: "X509 CRL", derBytes: der).pemString + "\n")
        let bundlePath = try scratch.write("bundle.pem", try TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1).pem())
        let text = try run("openssl", ["crl", "-in", crlPath, "-noout", "-text", "-CAfile", bundlePath])
        #expect(text.status == 0 && text.output.contains("verify OK") && text.output.contains("CRL Number"), "\(text.output)")
        #expect(text.output.contains("774763251097565892097"), "42 * 2^64 + 0x692F8E01: \(text.output)")
        #expect(throws: AuthorityError.self) { try ca.crl(revoked: [], number: [], nextUpdate: Date()) }
        #expect(throws: AuthorityError.self) { try ca.crl(revoked: [], number: Array(repeating: 1, count: 21), nextUpdate: Date()) }
        #expect(text.output.uppercased().contains(revoked.serialHex.uppercased()) && !text.output.uppercased().contains(kept.serialHex.uppercased()))
        let refused = try run("openssl", ["verify", "-crl_check", "-CAfile", bundlePath, "-CRLfile", crlPath, try scratch.write("r.pem", revoked.pem)])
        #expect(refused.status != 0 && refused.output.contains("revoked"), "\(refused.output)")
        let accepted = try run("openssl", ["verify", "-crl_check", "-CAfile", bundlePath, "-CRLfile", crlPath, try scratch.write("k.pem", kept.pem)])
        #expect(accepted.status == 0, "\(accepted.output)")
        // Signed by another CA, the CRL does not count.
        let other = try X509Authority.create(trustDomain: "example.org", algorithm: algorithm)
        let forged = try other.crl(revoked: [(Array(kept.certificate.serialNumber.bytes), Date())], number: [8], nextUpdate: Date().addingTimeInterval(3_600))
        let forgedPath = try scratch.write("forged.pem", PEMDocument(type: "X509 CRL", derBytes: forged).pemString + "\n")
        let notFooled = try run("openssl", ["verify", "-crl_check", "-CAfile", bundlePath, "-CRLfile", forgedPath, try scratch.write("k2.pem", kept.pem)])
        #expect(!notFooled.output.contains("revoked"), "\(notFooled.output)")
    }
}

@Suite("Hand-written encodings")
struct EncodingTests {
    @Test("base64 and base64url agree with Foundation for every length; base64url refuses padding, other characters and leftover bits")
    func base64url() {
        for length in 0..<70 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255) }
            let foundation = Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
            #expect(Base64URL.encode(bytes) == foundation)
            #expect(Base64URL.encode(bytes.lazy.map { $0 }) == foundation, "from a collection without contiguous storage")
            #expect(Base64.encode(bytes) == Data(bytes).base64EncodedString(), "padded")
            var appended = Array("x.".utf8)
            Base64URL.encode(bytes, into: &appended)
            #expect(appended == Array("x.\(foundation)".utf8), "appended after what is there")
            #expect(Base64URL.decode(foundation) == bytes)
            #expect(Base64URL.decode(Array(foundation.utf8)[...]) == bytes, "from a slice, in place")
            #expect(Base64URL.decode(foundation.utf8.lazy.map { $0 }) == bytes, "from a collection without contiguous storage")
        }
        #expect(Base64URL.decode("AB*C") == nil && Base64URL.decode("ABC\u{e9}") == nil)
        #expect(Base64URL.decode("AA==") == nil && Base64URL.decode("A+") == nil && Base64URL.decode("A") == nil)
        #expect(Base64URL.decode("AB") == nil, "leftover bits must be zero")
    }

    @Test("PEM and base64 written by hand agree with SwiftASN1 and Foundation, and read back; anything else is refused")
    func pem() throws {
        for length in [0, 1, 2, 3, 47, 48, 49, 300, 777] {
            let der = (0..<length).map { _ in UInt8.random(in: 0...255) }
            #expect(Base64.encode(der) == Data(der).base64EncodedString())
            #expect(Base64.decode(Data(der).base64EncodedString()) == der)
            let ours = PEMText.encode(der, label: "CERTIFICATE")
            #expect(ours == PEMDocument(type: "CERTIFICATE", derBytes: der).pemString + "\n")
            #expect(PEMText.decode("junk before\n" + ours + "after", label: "CERTIFICATE") == der)
            #expect(PEMText.decode(ours.replacingOccurrences(of: "\n", with: "\r\n"), label: "CERTIFICATE") == der, "CRLF line breaks")
        }
        let spaced = "-----BEGIN CERTIFICATE-----\n AQ\tID \n-----END CERTIFICATE-----"
        #expect(PEMText.decode(spaced, label: "CERTIFICATE") == [1, 2, 3], "ASCII whitespace inside the base64 is skipped")
        let dashes = "a - b -- c ----- d ----BEGIN x ---\n" + spaced + "\n-- e -----END -"
        #expect(PEMText.decode(dashes, label: "CERTIFICATE") == [1, 2, 3], "dashes around the block are only text")
        #expect(PEMText.decode(String(spaced.dropLast()), label: "CERTIFICATE") == nil, "an END line cut short is no END line")
        #expect(PEMText.decode(spaced.replacingOccurrences(of: "\t", with: "\u{00A0}"), label: "CERTIFICATE") == nil, "non-ASCII space is not base64")
        #expect(PEMText.decode("-----BEGIN CERTIFICATE-----\nAQID\n", label: "CERTIFICATE") == nil, "no END line")
        #expect(PEMText.decode("-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nAQID\n", label: "CERTIFICATE") == nil, "END before BEGIN")
        let one = PEMText.encode([1, 2, 3], label: "CERTIFICATE REQUEST")
        #expect(PEMText.decode(one, label: "CERTIFICATE") == nil, "another label")
        #expect(PEMText.decode(one + one, label: "CERTIFICATE REQUEST") == nil, "two blocks")
        #expect(PEMText.decode(one.replacingOccurrences(of: "AQID", with: "AQI*"), label: "CERTIFICATE REQUEST") == nil)
        #expect(Base64.decode("AQI=") != nil && Base64.decode("AQJ=") == nil && Base64.decode("A=AA") == nil && Base64.decode("AQI") == nil)
    }

    @Test("A PEM chain reads back block by block, as SwiftASN1 reads it, with text between blocks; other labels, torn blocks and too many are refused, saying which")
    func pemChain() throws {
        let ders: [[UInt8]] = [[1, 2, 3], (0..<300).map { UInt8($0 % 251) }, [9]]
        let blocks: [String] = ders.map { PEMText.encode($0, label: "CERTIFICATE") }
        let chain: String = "subject=leaf\n" + blocks[0] + "issuer: an intermediate\n" + blocks[1] + blocks[2] + "trailing text"
        #expect(try PEMText.decodeAll(chain, label: "CERTIFICATE", limit: 8) == ders)
        #expect(try PEMDocument.parseMultiple(pemString: blocks.joined()).map(\.derBytes) == ders)
        #expect(try PEMText.decodeAll("no blocks at all", label: "CERTIFICATE", limit: 8) == [])
        func refusal(_ text: String, limit: Int = 8) -> PEMError? {
            do { _ = try PEMText.decodeAll(text, label: "CERTIFICATE", limit: limit); return nil } catch { return error }
        }
        #expect(refusal(chain, limit: 2) == .tooMany(limit: 2))
        #expect(refusal(blocks[0] + PEMText.encode([1], label: "PRIVATE KEY")) == .otherLabel(expected: "CERTIFICATE"))
        #expect(refusal(blocks[0] + "-----BEGIN CERTIFICATE-----\nAQID\n") == .noEnd(block: 2, label: "CERTIFICATE"))
        #expect(refusal("-----BEGIN CERTIFICATE-----\nAQID\n" + blocks[0]) == .noEnd(block: 1, label: "CERTIFICATE"), "a BEGIN inside a block")
        #expect(refusal(blocks[0] + "-----END CERTIFICATE-----\n") == .noBegin(label: "CERTIFICATE"))
        #expect(refusal("-----END CERTIFICATE-----\n" + blocks[0]) == .noBegin(label: "CERTIFICATE"))
        #expect(refusal(blocks[0] + blocks[1].replacingOccurrences(of: "AAEC", with: "AA*C")) == .badBase64(block: 2))
        #expect(PEMError.noEnd(block: 2, label: "CERTIFICATE").description == "PEM block 2 has no -----END CERTIFICATE----- line")
    }

    @Test("JSON text escapes what RFC 8259 requires and parses back to the same strings")
    func jsonText() throws {
        let tricky = ["q\"uote": "back\\slash", "control": "\u{01}\n\t\r", "unicode": "é✓𝄞", "slash": "a/b"]
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(JSONText.object(tricky).utf8)) as? [String: String])
        #expect(parsed == tricky)
    }
}
