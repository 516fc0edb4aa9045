@testable import Authority
import Encoding
import Crypto
import Foundation
import SwiftASN1
import Synchronization
import Testing
import TestSupport
import X509

/// The code of the AuthorityError `body` throws ("none" if it returns, "other" for another error).
func authorityCode(_ body: () async throws -> Void) async -> String {
    do {
        try await body()
        return "none"
    } catch let error as AuthorityError {
        return error.code
    } catch {
        return "other"
    }
}

func csr(for key: P256.Signing.PrivateKey, commonName: String = "anything") throws -> [UInt8] {
    let request = try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName(commonName) },
                                                privateKey: .init(key), attributes: CertificateSigningRequest.Attributes())
    var der = DER.Serializer()
    try der.serialize(request)
    return der.serializedBytes
}

@Suite("SPIFFE IDs")
struct SpiffeIDTests {
    @Test("Canonical IDs parse", arguments: ["spiffe://example.org", "spiffe://example.org/ci/github/acme/repo", "spiffe://a-b_c.d/Path.With-Mixed_Case/9"])
    func valid(text: String) throws {
        #expect(try SpiffeID(parsing: text).description == text)
    }

    @Test("Non-canonical IDs are refused with the reason", arguments: [
        ("SPIFFE://example.org/a", SpiffeIDError.badScheme),
        ("https://example.org/a", .badScheme),
        ("spiffe:///a", .emptyTrustDomain),
        ("spiffe://Example.org/a", .badTrustDomainCharacter("E")),
        ("spiffe://example.org:443/a", .badTrustDomainCharacter(":")),
        ("spiffe://user@example.org/a", .badTrustDomainCharacter("@")),
        ("spiffe://example.org/a/", .trailingSlash),
        ("spiffe://example.org//a", .emptySegment),
        ("spiffe://example.org/a/../b", .dotSegment),
        ("spiffe://example.org/./b", .dotSegment),
        ("spiffe://example.org/a%2Fb", .percentEncoded),
        ("spiffe://example.org/a?b", .badPathCharacter("?")),
        ("spiffe://example.org/a#b", .badPathCharacter("#")),
    ])
    func invalid(text: String, error: SpiffeIDError) {
        #expect(throws: error) { try SpiffeID(parsing: text) }
    }

    /// The parser as first written (bytes copied, segments split apart),
    /// kept here as the reference the one-pass parser must agree with.
    private static func reference(_ text: String) -> Result<(String, String), SpiffeIDError> {
        let bytes = Array(text.utf8)
        guard bytes.count <= SpiffeID.bytesMax else { return .failure(.tooLong(bytes.count)) }
        let scheme = Array("spiffe://".utf8)
        guard bytes.starts(with: scheme) else { return .failure(.badScheme) }
        let rest = bytes[scheme.count...]
        let slash = rest.firstIndex(of: UInt8(ascii: "/")) ?? rest.endIndex
        let domain = rest[rest.startIndex..<slash], pathBytes = rest[slash...]
        guard !domain.isEmpty else { return .failure(.emptyTrustDomain) }
        guard domain.count <= SpiffeID.trustDomainBytesMax else { return .failure(.trustDomainTooLong(domain.count)) }
        for byte in domain where !SpiffeID.isTrustDomainByte(byte) { return .failure(.badTrustDomainCharacter(Character(Unicode.Scalar(byte)))) }
        if !pathBytes.isEmpty {
            guard pathBytes.last != UInt8(ascii: "/") else { return .failure(.trailingSlash) }
            for segment in pathBytes.dropFirst().split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false) {
                guard !segment.isEmpty else { return .failure(.emptySegment) }
                guard !(segment.elementsEqual([UInt8(ascii: ".")]) || segment.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")])) else {
                    return .failure(.dotSegment)
                }
                for byte in segment where !SpiffeID.isPathByte(byte) {
                    return .failure(byte == UInt8(ascii: "%") ? .percentEncoded : .badPathCharacter(Character(Unicode.Scalar(byte))))
                }
            }
        }
        return .success((String(decoding: domain, as: UTF8.self), String(decoding: pathBytes, as: UTF8.self)))
    }

    @Test("The one-pass parser agrees with the reference on 20,000 strings drawn from the characters that matter (seed 11)")
    func agreesWithReference() {
        var state: UInt64 = 11 // splitmix64
        func below(_ bound: Int) -> Int {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return Int((z ^ (z >> 31)) % UInt64(bound))
        }
        let pieces = ["spiffe://", "spiffe:/", "SPIFFE://", "/", "//", ".", "..", "a", "Z", "9", "-", "_", "%", "?", "é", ":", "@", "example.org", "x"]
        var seen: Set<String> = []
        for _ in 0..<20_000 {
            var text = below(5) > 0 ? "spiffe://" : ""
            for _ in 0..<below(9) { text += pieces[below(pieces.count)] }
            switch (Result { () throws(SpiffeIDError) in try SpiffeID(parsing: text) }, Self.reference(text)) {
            case (.success(let id), .success(let parts)):
                seen.insert("valid")
                #expect(id.trustDomain == parts.0 && id.path == parts.1 && id.description == text, "\(text)")
            case (.failure(let error), .failure(let expected)):
                seen.insert("\(error)".prefix(20).description)
                #expect(error == expected, "\(text)")
            case (let ours, let reference):
                Issue.record("\(text): \(ours) but the reference gives \(reference)")
            }
        }
        #expect(seen.count >= 9, "valid IDs and most kinds of refusal were drawn: \(seen.sorted())")
    }

    @Test("Length limits: 2048 bytes in all, 255 for the trust domain")
    func lengths() throws {
        let longPath = "spiffe://example.org/" + String(repeating: "a", count: 2048 - 21)
        #expect(try SpiffeID(parsing: longPath).description.utf8.count == 2048)
        #expect(throws: SpiffeIDError.tooLong(2049)) { try SpiffeID(parsing: longPath + "a") }
        #expect(throws: SpiffeIDError.trustDomainTooLong(256)) { try SpiffeID(parsing: "spiffe://" + String(repeating: "d", count: 256)) }
    }
}

@Suite("Hex")
struct HexTests {
    /// Every byte value, from an array, a digest read in place and a
    /// sequence without contiguous storage, against String(format:), and
    /// back through decode.
    @Test("Lower-case hex of arrays, digests and other sequences, and back")
    func encodeDecode() {
        let all = (0...255).map { UInt8($0) }
        let expected = all.map { String(format: "%02x", $0) }.joined()
        #expect(Hex.encode(all) == expected)
        #expect(Hex.encode(all.lazy.map { $0 }) == expected)
        #expect(Hex.decode(expected) == all)
        let digest = SHA256.hash(data: Array("abc".utf8))
        #expect(Hex.encode(digest) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(Hex.encode(Array(digest)) == Hex.encode(digest))
        #expect(Hex.encode([UInt8]()) == "")
    }
}

@Suite("Serials")
struct SerialTests {
    @Test("Serials are 16 bytes, positive, never repeated, across many refills of the entropy pool; JWT serials are 32 hex digits")
    func distinct() {
        var seen = Set<[UInt8]>()
        for _ in 0..<5_000 {
            let bytes = X509Authority.randomSerialBytes()
            #expect(bytes.count == 16 && bytes[0] & 0x80 == 0)
            seen.insert(bytes)
        }
        #expect(seen.count == 5_000)
        // Every bit position takes both values (the bytes are not stuck, zeroed or copied).
        for bit in 1..<128 {
            let ones = seen.filter { $0[bit / 8] & (0x80 >> UInt8(bit % 8)) != 0 }.count
            #expect((2_000...3_000).contains(ones), "bit \(bit) set in \(ones) of 5,000")
        }
        let jti = JWTAuthority.randomSerial()
        #expect(JWTAuthority.isSerial(jti) && jti != JWTAuthority.randomSerial())
    }
}

@Suite("X509-SVIDs", .onOwnThreads)
struct X509SVIDTests {
    let ca: X509Authority
    let id: SpiffeID

    init() throws {
        ca = try X509Authority.create(trustDomain: "example.org")
        id = try SpiffeID(parsing: "spiffe://example.org/ci/acme/build")
    }

    @Test("An issued SVID follows every X509-SVID rule and carries the attested context")
    func rules() async throws {
        let key = P256.Signing.PrivateKey()
        let publicKey = try X509Authority.publicKey(fromCSR: try csr(for: key, commonName: "ignored.example"))
        let now = Date()
        let issued = try ca.issue(spiffeID: id, publicKey: publicKey, ttl: 600, attributes: ["repository": "acme/build", "sha": "abc123"], now: now)
        let cert = try issued.certificate
        #expect(cert.publicKey == Certificate.PublicKey(key.publicKey))
        let uris = try #require(try cert.extensions.subjectAlternativeNames).compactMap { if case .uniformResourceIdentifier(let u) = $0 { u } else { nil } }
        #expect(uris == [id.description])
        #expect(try cert.extensions.subjectAlternativeNames?.count == 1, "no other SAN, whatever the CSR asked")
        #expect(try cert.extensions.basicConstraints == .notCertificateAuthority)
        let usage = try #require(cert.extensions[oid: .X509ExtensionID.keyUsage])
        #expect(usage.critical)
        #expect(try cert.extensions.keyUsage == KeyUsage(digitalSignature: true))
        #expect(try cert.extensions.extendedKeyUsage.map(Array.init) == [.serverAuth, .clientAuth])
        let serial = cert.serialNumber.bytes
        // The serial's magnitude (swift-certificates encodes it as a positive
        // INTEGER, with a 0x00 first when its top bit is set): at most 16
        // bytes, not zero. Its first byte has its top bit set when the
        // random draw's first byte was zero (1 in 256: this test had
        // expected the bit clear, and failed that often).
        #expect(serial.count >= 8 && serial.count <= 16 && serial.contains { $0 != 0 })
        #expect(cert.notValidBefore < now && cert.notValidBefore > now.addingTimeInterval(-120))
        #expect(abs(cert.notValidAfter.timeIntervalSince(now.addingTimeInterval(600))) < 2)
        #expect(!cert.subject.description.contains("ignored.example"))
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1)
        let verified = try await bundle.verifyX509(chain: [cert])
        #expect(verified.spiffeID == id && verified.attributes == ["repository": "acme/build", "sha": "abc123"])
    }

    @Test("A P-256 CSR's own key bytes go into the leaf as they are: the same certificate as writing the key out; other keys are written out")
    func requestedKeyBytes() throws {
        let key = P256.Signing.PrivateKey()
        let der = try csr(for: key)
        let requested = try X509Authority.requestedKey(fromCSR: der)
        let spki = try #require(requested.spkiDER, "an uncompressed P-256 key is carried as it came")
        var written = DER.Serializer()
        try written.serialize(Certificate.PublicKey(key.publicKey))
        #expect(spki == written.serializedBytes)
        #expect(requested.publicKey == Certificate.PublicKey(key.publicKey))
        let serial = X509Authority.randomSerial(), now = Date(timeIntervalSince1970: 1_790_000_000)
        let copied = try ca.issue(spiffeID: id, key: requested, ttl: 600, attributes: ["sha": "abc"], serial: serial, now: now)
        let rewritten = try ca.issue(spiffeID: id, publicKey: requested.publicKey, ttl: 600, attributes: ["sha": "abc"], serial: serial, now: now)
        // ECDSA signatures differ per signing: the to-be-signed bytes must not.
        #expect(try copied.certificate.tbsCertificateBytes == rewritten.certificate.tbsCertificateBytes)
        #expect(try copied.certificate.publicKey == Certificate.PublicKey(key.publicKey))
        // P-384 and RSA keys are written out as before.
        let p384 = try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName("x") },
                                                 privateKey: .init(P384.Signing.PrivateKey()), attributes: CertificateSigningRequest.Attributes())
        var p384DER = DER.Serializer()
        try p384DER.serialize(p384)
        #expect(try X509Authority.requestedKey(fromCSR: p384DER.serializedBytes).spkiDER == nil)
    }

    @Test("The leaf written by hand is the certificate the swift-certificates builder makes: the same to-be-signed bytes, for every key type and either time encoding",
          arguments: [KeyAlgorithm.ecdsaP256, .ecdsaP384, .rsa2048], [false, true])
    func handWrittenLeaf(algorithm: KeyAlgorithm, after2049: Bool) throws {
        // 2049-12-31T23:59:00Z: notAfter falls in 2050. Whole seconds, as certificates hold them.
        let now = Date(timeIntervalSince1970: after2049 ? 2_524_607_940 : Date().timeIntervalSince1970.rounded(.down))
        let authority = try X509Authority.create(trustDomain: "example.org", algorithm: algorithm, now: now, validity: 2 * 86_400)
        let subjectKey = Certificate.PublicKey(P384.Signing.PrivateKey().publicKey)
        let attributes = ["repository": "acme/api", "note": "tab\there \"q\""]
        // One serial in 256 starts with a zero byte and then a byte with its top bit set.
        let serial = after2049 ? Certificate.SerialNumber(bytes: [0x00, 0x80] + [UInt8](repeating: 7, count: 14)) : nil
        let issued = try authority.issue(spiffeID: id, publicKey: subjectKey, ttl: 3_600, attributes: attributes, serial: serial, now: now)
        let ours = try issued.certificate
        // The same certificate through the builder, signed by any key of the same kind.
        var json = DER.Serializer()
        try json.serialize(ASN1UTF8String(contentBytes: ArraySlice(Array(JSONText.object(attributes).utf8))))
        let otherKey = try SigningKey.generate(algorithm)
        let reference = try Certificate(
            version: .v3, serialNumber: ours.serialNumber, publicKey: subjectKey, notValidBefore: ours.notValidBefore, notValidAfter: ours.notValidAfter,
            issuer: authority.certificate.subject, subject: try DistinguishedName { OrganizationName("Warrant") },
            signatureAlgorithm: ours.signatureAlgorithm,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames([.uniformResourceIdentifier(id.description)])
                try AuthorityKeyIdentifier(keyIdentifier: authority.certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
                Certificate.Extension(oid: X509Authority.attributesExtensionOID, critical: false, value: ArraySlice(json.serializedBytes))
            },
            issuerPrivateKey: otherKey.certificateKey)
        #expect(Array(ours.tbsCertificateBytes) == Array(reference.tbsCertificateBytes))
        #expect(issued.notValidAfter == ours.notValidAfter && issued.notValidBefore == ours.notValidBefore)
        #expect(issued.serialBytes == Array(ours.serialNumber.bytes))
        #expect(ours.notValidAfter.timeIntervalSince(now) == 3_600)
        // And its signature verifies with its authority's key.
        #expect(authority.certificate.publicKey.isValidSignature(ours.signature, for: ours))
    }

    @Test("Lifetimes stop at the CA's end; other trust domains are refused")
    func limits() async throws {
        let now = Date()
        let shortCA = try X509Authority.create(trustDomain: "example.org", now: now, validity: 300)
        let key = Certificate.PublicKey(P256.Signing.PrivateKey().publicKey)
        let issued = try shortCA.issue(spiffeID: id, publicKey: key, ttl: 3_600, attributes: [:], now: now)
        #expect(issued.notValidAfter == shortCA.certificate.notValidAfter)
        #expect(throws: AuthorityError.self) { try ca.issue(spiffeID: try SpiffeID(parsing: "spiffe://other.org/x"), publicKey: key, ttl: 60, attributes: [:]) }
        // The bare trust domain ID names no workload (X509-SVID 3.1): neither signed nor taken as a leaf.
        let bare = try SpiffeID(parsing: "spiffe://example.org")
        #expect(await authorityCode { _ = try ca.issue(spiffeID: bare, publicKey: key, ttl: 60, attributes: [:]) } == "bad_spiffe_id")
        #expect(await authorityCode { _ = try JWTAuthority.create(trustDomain: "example.org").issue(spiffeID: bare, audiences: ["x"], ttl: 60, attributes: [:]) } == "bad_spiffe_id")
        let leafKey = P256.Signing.PrivateKey()
        func leaf(_ uri: String) throws -> Certificate {
            try Certificate(version: .v3, serialNumber: .init(), publicKey: .init(leafKey.publicKey), notValidBefore: now - 60,
                            notValidAfter: now + 60, issuer: try DistinguishedName { CommonName("x") },
                            subject: try DistinguishedName { CommonName("x") }, signatureAlgorithm: .ecdsaWithSHA256,
                            extensions: try Certificate.Extensions {
                                Critical(BasicConstraints.notCertificateAuthority)
                                Critical(KeyUsage(digitalSignature: true))
                                SubjectAlternativeNames([.uniformResourceIdentifier(uri)])
                            }, issuerPrivateKey: .init(leafKey))
        }
        let bareLeaf = try leaf("spiffe://example.org"), pathLeaf = try leaf("spiffe://example.org/w")
        #expect(await authorityCode { _ = try TrustBundle.checkLeaf(bareLeaf, trustDomain: "example.org") } == "bad_svid")
        // The same leaf with a path is taken (so the refusal is the path's).
        #expect(await authorityCode { _ = try TrustBundle.checkLeaf(pathLeaf, trustDomain: "example.org") } == "none")
    }

    @Test("A CSR whose signature does not match its key, or that is not a CSR, is refused")
    func badCSRs() throws {
        var bytes = try csr(for: P256.Signing.PrivateKey())
        bytes[bytes.count - 5] ^= 0x55
        func code(_ der: [UInt8]) -> String? {
            do {
                _ = try X509Authority.publicKey(fromCSR: der)
                return nil
            } catch {
                return error.code
            }
        }
        #expect(code(bytes) == "bad_csr_signature" || code(bytes) == "bad_csr")
        #expect(code([0x30, 0x03, 0x02, 0x01, 0x01]) == "bad_csr")
        #expect(code(try csr(for: P256.Signing.PrivateKey())) == nil)
    }

    @Test("Verification refuses another CA's SVID, an expired one, and a CA certificate posing as a leaf")
    func verificationRefusals() async throws {
        let key = Certificate.PublicKey(P256.Signing.PrivateKey().publicKey)
        let issued = try ca.issue(spiffeID: id, publicKey: key, ttl: 60, attributes: [:])
        let other = try X509Authority.create(trustDomain: "example.org")
        let wrongBundle = TrustBundle(trustDomain: "example.org", x509Authorities: [other.certificate], jwtKeys: [:], sequence: 1)
        await #expect(throws: AuthorityError.self) { _ = try await wrongBundle.verifyX509(chain: [try issued.certificate]) }
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1)
        // Out of its time: said so, not "untrusted".
        #expect(await authorityCode { _ = try await bundle.verifyX509(chain: [try issued.certificate], now: Date().addingTimeInterval(120)) } == "expired")
        #expect(await authorityCode { _ = try await bundle.verifyX509(chain: [try issued.certificate], now: Date().addingTimeInterval(-3_600)) } == "not_yet_valid")
        // Expired and from another authority: expired too (either way it is refused).
        #expect(await authorityCode { _ = try await wrongBundle.verifyX509(chain: [try issued.certificate], now: Date().addingTimeInterval(120)) } == "expired")
        #expect(await authorityCode { _ = try await wrongBundle.verifyX509(chain: [try issued.certificate]) } == "untrusted")
        #expect(throws: AuthorityError.self) { _ = try TrustBundle.checkLeaf(ca.certificate, trustDomain: "example.org") }
        let empty = TrustBundle(trustDomain: "example.org", x509Authorities: [], jwtKeys: [:], sequence: 1)
        await #expect(throws: AuthorityError.self) { _ = try await empty.verifyX509(chain: [try issued.certificate]) }
        // A bundle whose authorities change validates against the new ones.
        var changing = wrongBundle
        changing.x509Authorities = [ca.certificate]
        #expect(try await changing.verifyX509(chain: [try issued.certificate]).spiffeID == id)
        changing.x509Authorities = [other.certificate]
        await #expect(throws: AuthorityError.self) { _ = try await changing.verifyX509(chain: [try issued.certificate]) }
    }

    @Test("The chain memo: a PEM chain verified once is answered from the memo while its path is valid, never past it; refusals are not kept")
    func chainMemo() async throws {
        let memo = VerificationMemo<TrustBundle.MemoizedX509>(capacity: 4)
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1)
        let issued = try ca.issue(spiffeID: id, publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), ttl: 60, attributes: ["repository": "acme/deploy"])
        let pem = try issued.certificate.serializeAsPEM().pemString
        let first = try await bundle.verifyX509(chainPEM: pem, memo: memo)
        #expect(first.spiffeID == id && first.attributes["repository"] == "acme/deploy" && memo.count == 1)
        #expect(try await bundle.verifyX509(chainPEM: pem, memo: memo).serialHex == first.serialHex)
        #expect(memo.count == 1)
        // The time is checked on every hit, against the whole path's validity.
        #expect(await authorityCode { _ = try await bundle.verifyX509(chainPEM: pem, memo: memo, now: Date().addingTimeInterval(120)) } == "expired")
        #expect(await authorityCode { _ = try await bundle.verifyX509(chainPEM: pem, memo: memo, now: Date().addingTimeInterval(-3_600)) } == "not_yet_valid")
        // Another CA's leaf is refused and not kept; neither is an oversized chain.
        let other = try X509Authority.create(trustDomain: "example.org")
        let foreign = try other.issue(spiffeID: id, publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), ttl: 60, attributes: [:])
        await #expect(throws: AuthorityError.self) { _ = try await bundle.verifyX509(chainPEM: try foreign.certificate.serializeAsPEM().pemString, memo: memo) }
        await #expect(throws: AuthorityError.self) {
            _ = try await bundle.verifyX509(chainPEM: String(repeating: "A", count: TrustBundle.chainPEMBytesMax + 1), memo: memo)
        }
        #expect(memo.count == 1)
        // The memo is what answers: a planted entry is returned without parsing (so only the verifier writes it).
        let planted = "not PEM at all"
        memo.remember(TrustBundle.MemoizedX509(verified: first, validFrom: Date().addingTimeInterval(-10), validUntil: Date().addingTimeInterval(60)),
                      for: MemoDigest(SHA256.hash(data: Array(planted.utf8))))
        #expect(try await bundle.verifyX509(chainPEM: planted, memo: memo).spiffeID == id)
        await #expect(throws: (any Error).self) { _ = try await bundle.verifyX509(chainPEM: planted, memo: nil) }
    }

    @Test("The issuance records: a leaf whose SHA-256 they hold is not path-validated, but its authority must still be in the bundle, the time and the SVID rules still hold; one they do not hold is validated")
    func chainRecords() async throws {
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [:], sequence: 1)
        func make(_ authority: X509Authority) throws -> IssuedX509 {
            try authority.issue(spiffeID: id, publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), ttl: 60,
                                attributes: ["repository": "acme/deploy"])
        }
        let issued = try make(ca)
        var broken = issued.der
        broken[broken.count - 3] ^= 0x01 // inside the signature
        let other = try X509Authority.create(trustDomain: "example.org")
        let foreign = try make(other)
        // The records as the ledger names them: kind, serial, not after (ms), SHA-256.
        func key(_ der: [UInt8], serial: String, notAfter: Date) -> String {
            "x509 \(serial) \(UInt64(notAfter.timeIntervalSince1970 * 1000)) \(Hex.encode(SHA256.hash(data: der)))"
        }
        let records = Set([key(issued.der, serial: issued.serialHex, notAfter: issued.notValidAfter),
                           key(broken, serial: issued.serialHex, notAfter: issued.notValidAfter),
                           key(foreign.der, serial: foreign.serialHex, notAfter: foreign.notValidAfter)])
        let lookup: IssuedLookup = { kind, serial, notAfter, fingerprint in
            kind == .x509 && records.contains("x509 \(serial) \(notAfter) \(fingerprint)")
        }
        func verify(_ der: [UInt8], _ lookup: IssuedLookup?, now: Date = Date()) async throws -> VerifiedX509 {
            try await bundle.verifyX509(chainPEM: PEMText.encode(der, label: "CERTIFICATE"), memo: nil, issued: lookup, now: now)
        }
        let recorded = try await verify(issued.der, lookup)
        #expect(recorded.signature == .recorded && recorded.spiffeID == id && recorded.attributes["repository"] == "acme/deploy")
        #expect(recorded.serialHex == issued.serialHex)
        #expect(try await verify(issued.der, nil).signature == .checked)
        #expect(try await verify(issued.der, { _, _, _, _ in false }).signature == .checked)
        // The time: past the leaf's end, or before its start.
        #expect(await authorityCode { _ = try await verify(issued.der, lookup, now: Date().addingTimeInterval(120)) } == "expired")
        #expect(await authorityCode { _ = try await verify(issued.der, lookup, now: Date().addingTimeInterval(-3_600)) } == "not_yet_valid")
        // An authority that left the bundle is not trusted, whatever the records say.
        await #expect(throws: AuthorityError.self) { _ = try await verify(foreign.der, lookup) }
        // What the records say stands in for the signature (so only records the leader committed may say yes).
        #expect(try await verify(broken, lookup).signature == .recorded)
        await #expect(throws: AuthorityError.self) { _ = try await verify(broken, nil) }
        // Remembered afterwards, and said so.
        let memo = VerificationMemo<TrustBundle.MemoizedX509>()
        let pem = PEMText.encode(issued.der, label: "CERTIFICATE")
        #expect(try await bundle.verifyX509(chainPEM: pem, memo: memo, issued: lookup).signature == .recorded)
        #expect(try await bundle.verifyX509(chainPEM: pem, memo: memo, issued: lookup).signature == .remembered)
    }
}

@Suite("JWT-SVIDs")
struct JWTSVIDTests {
    let signer = try! JWTAuthority.create(trustDomain: "example.org")
    let id = try! SpiffeID(parsing: "spiffe://example.org/ci/acme/deploy")

    var verifier: JWTVerifier { JWTVerifier(trustDomain: "example.org", keys: [signer.keyID: signer.publicKey]) }

    @Test("A JWT-SVID verifies for its audience, with its claims, and not for another audience")
    func roundTrip() throws {
        let issued = try signer.issue(spiffeID: id, audiences: ["sts.amazonaws.com"], ttl: 300, attributes: ["repository": "acme/deploy"])
        let verified = try verifier.verify(issued.token, audience: "sts.amazonaws.com")
        #expect(verified.spiffeID == id && verified.attributes == ["repository": "acme/deploy"])
        #expect(throws: AuthorityError.self) { try verifier.verify(issued.token, audience: "other") }
        let header = try #require(Base64URL.decode(issued.token.split(separator: ".")[0]))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(header)) as? [String: String])
        #expect(object == ["alg": "ES256", "kid": signer.keyID, "typ": "JWT"])
    }

    @Test("Claims are written exactly: keys sorted, one audience a string, several an array, strings escaped; the token's bytes are its text")
    func claimsText() throws {
        let now = Date(timeIntervalSince1970: 1_790_000_000.7)
        func claims(_ issued: IssuedJWT) throws -> String {
            #expect(issued.bytes == Array(issued.token.utf8) && issued.token.split(separator: ".").count == 3)
            #expect(try verifier.verify(issued.token, audience: "a", now: now).spiffeID == id)
            return String(decoding: try #require(Base64URL.decode(issued.token.split(separator: ".")[1])), as: UTF8.self)
        }
        let serial = "0123456789abcdef0123456789abcdef"
        #expect(try claims(signer.issue(spiffeID: id, audiences: ["a"], ttl: 300, attributes: [:], now: now, serial: serial))
                == #"{"aud":"a","exp":1790000300,"iat":1790000000,"jti":"0123456789abcdef0123456789abcdef","sub":"spiffe://example.org/ci/acme/deploy"}"#)
        #expect(try claims(signer.issue(spiffeID: id, audiences: ["a", "b\"c"], ttl: 300, attributes: ["z": "1", "k": "t\tq"], now: now, serial: serial))
                == #"{"aud":["a","b\"c"],"exp":1790000300,"iat":1790000000,"jti":"0123456789abcdef0123456789abcdef","sub":"spiffe://example.org/ci/acme/deploy","warrant":{"k":"t\tq","z":"1"}}"#)
        // An issuer, when given, is iss (between iat and jti: keys stay sorted).
        #expect(try claims(signer.issue(spiffeID: id, audiences: ["a"], ttl: 300, attributes: [:], now: now, serial: serial, issuer: "https://w.example/t"))
                == #"{"aud":"a","exp":1790000300,"iat":1790000000,"iss":"https://w.example/t","jti":"0123456789abcdef0123456789abcdef","sub":"spiffe://example.org/ci/acme/deploy"}"#)
        // By default a random serial; one that is not 32 lower-case hex digits is refused.
        let first = try signer.issue(spiffeID: id, audiences: ["a"], ttl: 300, attributes: [:], now: now)
        let second = try signer.issue(spiffeID: id, audiences: ["a"], ttl: 300, attributes: [:], now: now)
        #expect(JWTAuthority.isSerial(first.serial) && first.serial != second.serial)
        #expect(try claims(first).contains(#""jti":"\#(first.serial)""#))
        for bad in ["0123456789ABCDEF0123456789abcdef", "0123", String(repeating: "g", count: 32)] {
            #expect(throws: AuthorityError.self) { try signer.issue(spiffeID: id, audiences: ["a"], ttl: 300, attributes: [:], serial: bad) }
        }
    }

    /// `signature` with s replaced by n - s (P-256's order n): as valid as
    /// the original, other bytes.
    static func malleated(_ signature: [UInt8]) -> [UInt8] {
        let order: [UInt8] = [0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                              0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51]
        var s = Array(signature[32...])
        var borrow = 0
        for i in stride(from: 31, through: 0, by: -1) {
            let difference = Int(order[i]) - Int(s[i]) - borrow
            s[i] = UInt8((difference + 256) % 256)
            borrow = difference < 0 ? 1 : 0
        }
        return Array(signature[..<32]) + s
    }

    @Test("A JWT-SVID's serial is its jti: a signature rewritten as (r, n - s) still verifies, under the same serial, so revocation by serial holds; a jti that is not a serial is refused; a token without jti keeps the old serial (its SHA-256's first 32 hex digits)")
    func serialIsJTI() throws {
        let issued = try signer.issue(spiffeID: id, audiences: ["x"], ttl: 60, attributes: [:])
        let parts = issued.token.split(separator: ".").map(String.init)
        let signature = try #require(Base64URL.decode(parts[2]))
        let rewritten = "\(parts[0]).\(parts[1]).\(Base64URL.encode(Self.malleated(signature)))"
        #expect(rewritten != issued.token)
        let original = try verifier.verify(issued.token, audience: "x")
        let other = try verifier.verify(rewritten, audience: "x")
        #expect(original.serial == issued.serial && other.serial == issued.serial)
        #expect(original.fingerprint != other.fingerprint)
        // Issued by a key that writes no jti: the old serial. With a jti that is not a serial: refused.
        let foreign = P256.Signing.PrivateKey()
        let keys: [String: VerificationKey] = ["f": .p256(foreign.publicKey)]
        let exp = Int(Date().timeIntervalSince1970) + 300
        let legacy = try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x", "exp": exp], key: foreign)
        let verified = try JWTVerifier(trustDomain: "example.org", keys: keys).verify(legacy, audience: "x")
        #expect(verified.serial == JWTAuthority.legacySerial(fingerprint: verified.fingerprint) && verified.serial.count == 32)
        for jti: Any in ["0123", "0123456789ABCDEF0123456789ABCDEF", 5] {
            let token = try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x", "exp": exp, "jti": jti], key: foreign)
            #expect(throws: AuthorityError("malformed_token", "jti is not a serial (32 lower-case hex digits)")) {
                try JWTVerifier(trustDomain: "example.org", keys: keys).verify(token, audience: "x")
            }
        }
    }

    /// A token with `header` and `claims`, signed by the real key.
    func forge(_ header: [String: Any], _ claims: [String: Any], key: P256.Signing.PrivateKey? = nil) throws -> String {
        let h = Base64URL.encode(Array(try JSONSerialization.data(withJSONObject: header)))
        let c = Base64URL.encode(Array(try JSONSerialization.data(withJSONObject: claims)))
        let signingKey = key ?? P256.Signing.PrivateKey()
        let signature = try signingKey.signature(for: Array("\(h).\(c)".utf8))
        return "\(h).\(c).\(Base64URL.encode(Array(signature.rawRepresentation)))"
    }

    @Test("alg none, HS256, extra header fields, unknown kid, a foreign key, no exp, expired, tampered: each refused with its code")
    func refusals() throws {
        let exp = Int(Date().timeIntervalSince1970) + 300
        let claims: [String: Any] = ["sub": id.description, "aud": "x", "exp": exp]
        let foreign = P256.Signing.PrivateKey()
        let other = JWTVerifier(trustDomain: "example.org", keys: [signer.keyID: signer.publicKey, "f": .p256(foreign.publicKey)])
        let cases: [(String, String)] = [
            (try forge(["alg": "none", "kid": signer.keyID], claims), "bad_algorithm"),
            (try forge(["alg": "HS256", "kid": signer.keyID], claims), "bad_algorithm"),
            (try forge(["alg": "ES256", "kid": signer.keyID, "jku": "https://evil"], claims), "bad_header"),
            (try forge(["alg": "ES256", "kid": "nope"], claims), "unknown_key"),
            (try forge(["alg": "ES256"], claims), "missing_kid"),
            (try forge(["alg": "ES256", "kid": signer.keyID], claims), "bad_signature"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x"], key: foreign), "missing_expiry"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x", "exp": 1], key: foreign), "expired"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": "spiffe://other.org/x", "aud": "x", "exp": exp], key: foreign), "wrong_trust_domain"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "exp": exp], key: foreign), "bad_audience"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": "spiffe://example.org", "aud": "x", "exp": exp], key: foreign), "bad_subject"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x", "exp": exp, "nbf": exp - 200], key: foreign), "not_yet_valid"),
            (try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x", "exp": exp, "nbf": "now"], key: foreign), "malformed_token"),
            ("a.b", "malformed_token"),
            (String(repeating: "a", count: 20_000), "token_too_large"),
        ]
        for (token, code) in cases {
            do {
                _ = try other.verify(token, audience: "x")
                Issue.record("accepted a token that should fail with \(code)")
            } catch {
                #expect(error.code == code, "expected \(code), got \(error)")
            }
        }
        // Another subject, the signature left as it was.
        let parts = try signer.issue(spiffeID: id, audiences: ["x"], ttl: 60, attributes: [:]).token.split(separator: ".").map(String.init)
        let otherClaims = Base64URL.encode(Array(try JSONSerialization.data(withJSONObject: ["sub": "spiffe://example.org/admin", "aud": "x", "exp": exp])))
        #expect(throws: AuthorityError.self) { try verifier.verify("\(parts[0]).\(otherClaims).\(parts[2])", audience: "x") }
        #expect(try verifier.verify(parts.joined(separator: "."), audience: "x").spiffeID == id)
        // An nbf within the leeway X.509 notBefore gets is taken.
        let soon = try forge(["alg": "ES256", "kid": "f"], ["sub": id.description, "aud": "x", "exp": exp, "nbf": exp - 290], key: foreign)
        #expect(try other.verify(soon, audience: "x").spiffeID == id)
    }

    @Test("Claims the hand parser leaves to the strict parser (a fractional exp, nested objects) read as the flat ones do; a typ that is not a string is refused; a duplicate member is refused, not read as the last one")
    func claimsBothWays() async throws {
        let foreign = P256.Signing.PrivateKey()
        let other = JWTVerifier(trustDomain: "example.org", keys: ["f": .p256(foreign.publicKey)])
        let now = Int(Date().timeIntervalSince1970)
        let flat: [String: Any] = ["sub": id.description, "aud": ["x", "y"], "exp": now + 300, "iat": now, "warrant": ["repository": "acme/deploy"]]
        var nested = flat
        nested["exp"] = Double(now + 300) + 0.5
        nested["extra"] = ["deeper": ["level": 1]]
        for (claims, expiry) in [(flat, Double(now + 300)), (nested, Double(now + 300) + 0.5)] {
            let verified = try other.verify(try forge(["alg": "ES256", "kid": "f", "typ": "JWT"], claims, key: foreign), audience: "y")
            #expect(verified.spiffeID == id && verified.audiences == ["x", "y"] && verified.attributes == ["repository": "acme/deploy"])
            #expect(verified.expiry.timeIntervalSince1970 == expiry && verified.issuedAt?.timeIntervalSince1970 == Double(now))
        }
        #expect(throws: AuthorityError("bad_header", "typ must be JWT or JOSE")) {
            try other.verify(try forge(["alg": "ES256", "kid": "f", "typ": 5], flat, key: foreign), audience: "x")
        }
        var stale = nested
        stale["exp"] = 17.5
        #expect(throws: AuthorityError.self) { try other.verify(try forge(["alg": "ES256", "kid": "f"], stale, key: foreign), audience: "x") }
        // A duplicate member, in the header or the claims, flat or nested.
        func signed(_ header: String, _ claims: String) throws -> String {
            let input = "\(Base64URL.encode(Array(header.utf8))).\(Base64URL.encode(Array(claims.utf8)))"
            return "\(input).\(Base64URL.encode(Array(try foreign.signature(for: Array(input.utf8)).rawRepresentation)))"
        }
        let claims = #"{"sub":"\#(id)","aud":"x","exp":\#(now + 300),"extra":{"a":[1]}}"#
        #expect(try other.verify(try signed(#"{"alg":"ES256","kid":"f"}"#, claims), audience: "x").spiffeID == id)
        let duplicated = [
            try signed(#"{"alg":"ES256","kid":"f"}"#, #"{"sub":"\#(id)","aud":"x","exp":\#(now + 300),"extra":{"a":[1]},"sub":"spiffe://example.org/admin"}"#),
            try signed(#"{"alg":"ES256","kid":"f"}"#, #"{"sub":"\#(id)","aud":"x","exp":\#(now + 300),"sub":"spiffe://example.org/admin"}"#),
            try signed(#"{"alg":"ES256","kid":"f","kid":"g","x":{"y":[1]}}"#, claims),
        ]
        for token in duplicated {
            #expect(await authorityCode { _ = try other.verify(token, audience: "x") } == "malformed_token", "\(token)")
        }
    }

    @Test("An audience matches byte for byte, not by Unicode equivalence; exp, nbf and iat past 2^40 s, infinite (1e400) or negative are refused, not trapped on")
    func audienceBytesAndTimeBounds() async throws {
        let foreign = P256.Signing.PrivateKey()
        let other = JWTVerifier(trustDomain: "example.org", keys: ["f": .p256(foreign.publicKey)])
        let now = Int(Date().timeIntervalSince1970)
        func signed(_ claims: String) throws -> String {
            let input = "\(Base64URL.encode(Array(#"{"alg":"ES256","kid":"f"}"#.utf8))).\(Base64URL.encode(Array(claims.utf8)))"
            return "\(input).\(Base64URL.encode(Array(try foreign.signature(for: Array(input.utf8)).rawRepresentation)))"
        }
        // é precomposed against e + combining acute; the Kelvin sign against K: equal to String's ==.
        for (tokenAudience, asked) in [("caf\u{E9}", "cafe\u{301}"), ("\u{212A}afka", "Kafka")] {
            #expect(tokenAudience == asked, "the spellings are canonically equivalent")
            let token = try signed(#"{"sub":"\#(id)","aud":"\#(tokenAudience)","exp":\#(now + 300)}"#)
            #expect(try other.verify(token, audience: tokenAudience).spiffeID == id)
            #expect(await authorityCode { _ = try other.verify(token, audience: asked) } == "wrong_audience", "\(asked)")
        }
        for claims in [#""exp":1e400"#, #""exp":1099511627776"#, #""exp":\#(now + 300),"nbf":-1"#, #""exp":\#(now + 300),"iat":1e300"#,
                       #""exp":\#(now + 300),"nbf":-1e400"#] {
            let token = try signed(#"{"sub":"\#(id)","aud":"x",\#(claims)}"#)
            #expect(await authorityCode { _ = try other.verify(token, audience: "x") } == "malformed_token", "\(claims)")
        }
        #expect(try other.verify(try signed(#"{"sub":"\#(id)","aud":"x","exp":\#(now + 300),"iat":\#(now)}"#), audience: "x").spiffeID == id)
    }

    @Test("The signature memo: a token's signature is checked once, its claims every time; bad signatures are never kept; a full memo starts over")
    func signatureMemo() throws {
        let memo = SignatureMemo(capacity: 3)
        let remembering = JWTVerifier(trustDomain: "example.org", keys: [signer.keyID: signer.publicKey], memo: memo)
        let issued = try signer.issue(spiffeID: id, audiences: ["x"], ttl: 60, attributes: [:])
        #expect(try remembering.verify(issued.token, audience: "x").spiffeID == id)
        #expect(memo.count == 1)
        #expect(try remembering.verify(issued.token, audience: "x").fingerprint == (try verifier.verify(issued.token, audience: "x").fingerprint))
        #expect(memo.count == 1, "the same token is kept once")
        // A memoized token is still read in full: audience and expiry are checked again.
        #expect(throws: AuthorityError("wrong_audience", "the token is not for 'y'")) { try remembering.verify(issued.token, audience: "y") }
        #expect(throws: AuthorityError.self) { try remembering.verify(issued.token, audience: "x", now: Date().addingTimeInterval(120)) }
        // And under other keys (a new key set gets a new memo, but even a shared one): the kid must be trusted.
        let rotated = JWTVerifier(trustDomain: "example.org", keys: [:], memo: memo)
        #expect(throws: AuthorityError.self) { try rotated.verify(issued.token, audience: "x") }
        // A bad signature is refused and not kept.
        let parts = issued.token.split(separator: ".").map(String.init)
        var signature = Array(parts[2].utf8)
        signature[4] = signature[4] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
        let tampered = "\(parts[0]).\(parts[1]).\(String(decoding: signature, as: UTF8.self))"
        #expect(throws: AuthorityError.self) { try remembering.verify(tampered, audience: "x") }
        #expect(memo.count == 1)
        // The memo is what is consulted: a digest planted in it passes a forged signature (which is why only the verifier writes it).
        memo.remember(true, for: MemoDigest(SHA256.hash(data: Array(tampered.utf8))))
        #expect(try remembering.verify(tampered, audience: "x").spiffeID == id)
        #expect(throws: AuthorityError.self) { try verifier.verify(tampered, audience: "x") }
        // Bounded: the fourth token starts it over.
        for _ in 0..<2 { _ = try remembering.verify(try signer.issue(spiffeID: id, audiences: ["x"], ttl: 60, attributes: [:]).token, audience: "x") }
        #expect(memo.count == 1, "three held, then the fourth started over")
    }

    @Test("The issuance records: a token whose SHA-256 they hold needs no signature check, its claims are still checked; one they do not hold gets its signature checked")
    func issuanceRecords() throws {
        let issued = try signer.issue(spiffeID: id, audiences: ["x"], ttl: 60, attributes: [:])
        let parts = issued.token.split(separator: ".").map(String.init)
        var signature = Array(parts[2].utf8)
        signature[4] = signature[4] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
        let tampered = "\(parts[0]).\(parts[1]).\(String(decoding: signature, as: UTF8.self))"
        // The records as a set of (kind, serial, not after, fingerprint), as the ledger names them.
        func hex(_ token: String) -> String { Hex.encode(SHA256.hash(data: Array(token.utf8))) }
        let asked = Mutex<[String]>([])
        func verifier(recording tokens: [String], memo: SignatureMemo? = nil) -> JWTVerifier {
            let records = Set(tokens.map { "jwt \(issued.serial) \(Int(issued.expiry.timeIntervalSince1970) * 1000) \(hex($0))" })
            return JWTVerifier(trustDomain: "example.org", keys: [signer.keyID: signer.publicKey], memo: memo) { kind, serial, notAfter, fingerprint in
                let key = "\(kind == .jwt ? "jwt" : "x509") \(serial) \(notAfter) \(fingerprint)"
                asked.withLock { $0.append(key) }
                return records.contains(key)
            }
        }
        let recorded = verifier(recording: [issued.token])
        let verified = try recorded.verify(issued.token, audience: "x")
        #expect(verified.signature == .recorded && verified.spiffeID == id && verified.fingerprint == hex(issued.token))
        #expect(asked.withLock { $0.count } == 1)
        // The claims are read and checked as ever.
        #expect(throws: AuthorityError("wrong_audience", "the token is not for 'y'")) { try recorded.verify(issued.token, audience: "y") }
        #expect(throws: AuthorityError.self) { try recorded.verify(issued.token, audience: "x", now: Date().addingTimeInterval(120)) }
        // Other bytes have another SHA-256: the tampered token is not in the records, and its signature fails.
        #expect(throws: AuthorityError("bad_signature", "the signature does not verify")) { try recorded.verify(tampered, audience: "x") }
        // Not recorded (issued outside the ledger, or not yet applied here): the signature is checked.
        #expect(try verifier(recording: []).verify(issued.token, audience: "x").signature == .checked)
        // What the records say stands in for the signature (so only records the leader committed may say yes).
        #expect(try verifier(recording: [tampered]).verify(tampered, audience: "x").signature == .recorded)
        // A remembered signature is not looked up.
        let memo = SignatureMemo()
        let remembering = verifier(recording: [], memo: memo)
        #expect(try remembering.verify(issued.token, audience: "x").signature == .checked)
        let before = asked.withLock { $0.count }
        #expect(try remembering.verify(issued.token, audience: "x").signature == .remembered)
        #expect(asked.withLock { $0.count } == before)
        #expect(try self.verifier.verify(issued.token, audience: "x").signature == .checked, "no records: every signature is checked")
    }
}

@Suite("Trust bundles")
struct BundleTests {
    @Test("The SPIFFE JWKS: x509-svid keys without kid and one x5c; jwt-svid keys with kid; sequence and refresh hint")
    func jwks() throws {
        let ca = try X509Authority.create(trustDomain: "example.org")
        let signer = try JWTAuthority.create(trustDomain: "example.org")
        let bundle = TrustBundle(trustDomain: "example.org", x509Authorities: [ca.certificate], jwtKeys: [signer.keyID: signer.publicKey], sequence: 7)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(try bundle.jwks())) as? [String: Any])
        #expect(object["spiffe_sequence"] as? Int == 7 && object["spiffe_refresh_hint"] as? Int == 60)
        let keys = try #require(object["keys"] as? [[String: Any]])
        let x509 = try #require(keys.first { $0["use"] as? String == "x509-svid" })
        #expect(x509["kid"] == nil && (x509["x5c"] as? [String])?.count == 1 && x509["kty"] as? String == "EC")
        let jwt = try #require(keys.first { $0["use"] as? String == "jwt-svid" })
        #expect(jwt["kid"] as? String == signer.keyID && jwt["x5c"] == nil)
        #expect(try bundle.pem().hasPrefix("-----BEGIN CERTIFICATE-----"))
    }
}
