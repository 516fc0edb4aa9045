import Authority
import Crypto
import Foundation
import SwiftASN1
import Testing
import TestSupport
import X509

/// Runs a program; returns its exit status and combined output.
@discardableResult
func run(_ program: String, _ arguments: [String], input: String? = nil) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [program] + arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    let stdin = Pipe()
    process.standardInput = stdin
    try process.run()
    if let input { stdin.fileHandleForWriting.write(Data(input.utf8)) }
    try stdin.fileHandleForWriting.close()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}

/// A Python that has `cryptography` and `jwt` (scripts/setup.sh installs them).
func interopPython() throws -> String? {
    for candidate in ["python3", "/usr/bin/python3"] {
        if (try? run(candidate, ["-c", "import cryptography, jwt"]))?.status == 0 { return candidate }
    }
    return nil
}

final class Scratch {
    let directory: String
    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-interop-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: directory) }
    func write(_ name: String, _ text: String) throws -> String {
        let path = "\(directory)/\(name)"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
    func read(_ name: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: "\(directory)/\(name)"))) }
}

@Suite("Against real peers: openssl, Python cryptography, PyJWT", .serialized, .onOwnThreads)
struct InteropTests {
    let ca = try! X509Authority.create(trustDomain: "example.org")
    let id = try! SpiffeID(parsing: "spiffe://example.org/ci/acme/build")

    @Test("openssl verify accepts an issued SVID with the bundle and refuses it with another CA")
    func opensslVerify() throws {
        let scratch = try Scratch()
        let issued = try ca.issue(spiffeID: id, publicKey: .init(P256.Signing.PrivateKey().publicKey), ttl: 600, attributes: ["a": "b"])
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1)
        let leaf = try scratch.write("svid.pem", issued.pem)
        let good = try run("openssl", ["verify", "-CAfile", try scratch.write("bundle.pem", try bundle.pem()), leaf])
        #expect(good.status == 0 && good.output.contains("OK"), "\(good.output)")
        let other = try X509Authority.create(trustDomain: "example.org")
        let otherBundle = TrustBundle(trustDomain: "example.org", x509Authorities: [other.certificate], jwtKeys: [:], sequence: 1)
        let bad = try run("openssl", ["verify", "-CAfile", try scratch.write("other.pem", try otherBundle.pem()), leaf])
        #expect(bad.status != 0, "\(bad.output)")
    }

    @Test("An openssl CSR asking for a CA certificate, extra names and extensions gets only the SPIFFE ID; weak and unsupported keys are refused")
    func opensslCSRs() throws {
        let scratch = try Scratch()
        func makeCSR(_ name: String, _ keyArguments: [String]) throws -> [UInt8] {
            let key = "\(scratch.directory)/\(name).key"
            #expect(try run("openssl", ["genpkey"] + keyArguments + ["-out", key]).status == 0)
            let request = try run("openssl", ["req", "-new", "-key", key, "-subj", "/CN=evil.example/O=Mallory", "-outform", "DER",
                                              "-out", "\(scratch.directory)/\(name).csr",
                                              "-addext", "subjectAltName=DNS:evil.example,URI:spiffe://example.org/admin",
                                              "-addext", "basicConstraints=critical,CA:TRUE",
                                              "-addext", "keyUsage=critical,keyCertSign"])
            #expect(request.status == 0, "\(request.output)")
            return try scratch.read("\(name).csr")
        }
        let p256 = try X509Authority.publicKey(fromCSR: try makeCSR("p256", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]))
        let issued = try ca.issue(spiffeID: id, publicKey: p256, ttl: 600, attributes: [:])
        let names = try #require(try issued.certificate.extensions.subjectAlternativeNames).map { "\($0)" }
        #expect(names.count == 1 && names[0].contains(id.description))
        #expect(try issued.certificate.extensions.basicConstraints == .notCertificateAuthority)
        #expect(try issued.certificate.extensions.keyUsage == KeyUsage(digitalSignature: true))
        #expect(try !issued.certificate.subject.description.contains("evil"))
        _ = try X509Authority.publicKey(fromCSR: try makeCSR("p384", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]))
        // A P-256 request that does not parse (its signature's BIT STRING tag changed) is malformed, not on another curve.
        var broken = try makeCSR("p256-broken", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        let signatureAlgorithm: [UInt8] = [0x30, 0x0A, 0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02]
        let at = try #require((0...(broken.count - signatureAlgorithm.count)).last { broken[$0..<($0 + signatureAlgorithm.count)].elementsEqual(signatureAlgorithm) })
        #expect(broken[at + signatureAlgorithm.count] == 0x03)
        broken[at + signatureAlgorithm.count] = 0x04
        do {
            _ = try X509Authority.publicKey(fromCSR: broken)
            Issue.record("a request that does not parse was accepted")
        } catch {
            #expect(error.code == "bad_csr", "\(error)")
        }
        _ = try X509Authority.publicKey(fromCSR: try makeCSR("rsa2048", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]))
        for (name, arguments, code) in [("rsa1024", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"], "weak_key"),
                                        ("ed25519", ["-algorithm", "ED25519"], "unsupported_key"),
                                        ("p521", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"], "unsupported_key"),
                                        ("secp256k1", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1"], "unsupported_key"),
                                        ("brainpool", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:brainpoolP256r1"], "unsupported_key")] {
            do {
                _ = try X509Authority.publicKey(fromCSR: try makeCSR(name, arguments))
                Issue.record("\(name) was accepted")
            } catch let error as AuthorityError {
                #expect(error.code == code, "\(name): \(error)")
            }
        }
    }

    @Test("Python cryptography parses an issued SVID and every X509-SVID rule holds on it")
    func pythonCryptography() throws {
        let python = try #require(try interopPython(), "run scripts/setup.sh: it installs Python's cryptography and PyJWT")
        let scratch = try Scratch()
        let issued = try ca.issue(spiffeID: id, publicKey: .init(P256.Signing.PrivateKey().publicKey), ttl: 600, attributes: ["repository": "acme/build"])
        let path = try scratch.write("svid.pem", issued.pem)
        let script = """
        import sys
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID
        cert = x509.load_pem_x509_certificate(open(sys.argv[1], 'rb').read())
        ext = cert.extensions
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [sys.argv[2]], uris
        assert len(list(san)) == 1, list(san)
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.value.ca is False
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign and not ku.value.crl_sign
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}, list(eku)
        serial = cert.serial_number
        assert serial > 0 and serial.bit_length() >= 64 and (serial.bit_length() + 8) // 8 <= 20, serial
        context = ext.get_extension_for_oid(x509.ObjectIdentifier(sys.argv[3]))
        assert not context.critical and b'acme/build' in context.value.value
        print("rules hold")
        """
        let result = try run(python, ["-c", script, path, id.description, X509Authority.attributesOIDText])
        #expect(result.status == 0 && result.output.contains("rules hold"), "\(result.output)")
    }

    @Test("PyJWT verifies a JWT-SVID with the OIDC JWKS, and refuses it for another audience")
    func pyJWT() throws {
        let python = try #require(try interopPython(), "run scripts/setup.sh: it installs Python's cryptography and PyJWT")
        let signer = try JWTAuthority.create(trustDomain: "example.org")
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [], jwtKeys: [signer.keyID: signer.publicKey], sequence: 1)
        let token = try signer.issue(spiffeID: id, audiences: ["sts.amazonaws.com"], ttl: 300, attributes: ["sha": "abc"]).token
        let scratch = try Scratch()
        let jwks = try scratch.write("jwks.json", String(decoding: try bundle.oidcJWKS(), as: UTF8.self))
        let script = """
        import sys, json, jwt
        keys = jwt.PyJWKSet.from_json(open(sys.argv[1]).read())
        token = sys.argv[2]
        kid = jwt.get_unverified_header(token)["kid"]
        key = next(k for k in keys.keys if k.key_id == kid)
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com", options={"require": ["exp", "sub", "aud"]})
        assert claims["sub"] == sys.argv[3] and claims["warrant"]["sha"] == "abc", claims
        try:
            jwt.decode(token, key.key, algorithms=["ES256"], audience="someone-else")
            print("wrong audience accepted")
            sys.exit(1)
        except jwt.InvalidAudienceError:
            pass
        print("verified")
        """
        let result = try run(python, ["-c", script, jwks, token, id.description])
        #expect(result.status == 0 && result.output.contains("verified"), "\(result.output)")
    }
}
