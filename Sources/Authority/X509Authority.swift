import Crypto
import Foundation
import Synchronization
import SwiftASN1
import X509
import _CryptoExtras

/// Why an issuance or verification was refused: a stable code and a
/// sentence for the caller.
public struct AuthorityError: Error, Sendable, Hashable, CustomStringConvertible {
    public var code: String
    public var message: String

    public init(_ code: String, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}

/// What an issued identity says about how it was obtained (the attested
/// context): embedded in a non-critical X.509 extension and in JWT claims.
public typealias Attributes = [String: String]

/// A trust domain's X.509 certificate authority: a self-signed root with a
/// unique Subject, and the rules for X509-SVIDs (X509-SVID.md, and what
/// go-spiffe and py-spiffe enforce).
public struct X509Authority: Sendable {
    public let trustDomain: String
    public let certificate: Certificate
    /// The CA certificate's end, which no identity it signs (nor a JWT-SVID
    /// of the same authority) outlives; read on every issuance.
    public let notValidAfter: Date
    private let key: SigningKey
    /// DER made once for every leaf: the issuer (this CA's subject), the
    /// leaf subject, the signature algorithm, and the authority key
    /// identifier extension.
    private let issuerDER: [UInt8]
    private let authorityKeyIdentifierExtension: [UInt8]

    /// The OID of the attested-context extension (content: a UTF8String
    /// holding sorted JSON). Warrant has no registered enterprise number
    /// yet, so this sits under RFC 5612's documentation arc (32473) until it
    /// does; a UUID arc (2.25.x) would need no registration but its 128-bit
    /// subidentifier does not fit SwiftASN1's object identifiers.
    public static let attributesExtensionOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 4, 1, 32473, 1, 1]
    public static let attributesOIDText = "1.3.6.1.4.1.32473.1.1"
    public static let backdate: TimeInterval = 30
    public static let attributesBytesMax = 8 << 10
    /// Every X509-SVID's subject (the SPIFFE ID is the URI SAN).
    static let leafSubject = try! DistinguishedName { OrganizationName("Warrant") }

    public static func create(trustDomain: String, algorithm: KeyAlgorithm = .ecdsaP256, now: Date = Date(),
                              validity: TimeInterval = 365 * 86_400) throws -> X509Authority {
        let key = try SigningKey.generate(algorithm)
        let serial = randomSerial()
        let name = try DistinguishedName {
            OrganizationName("Warrant")
            CommonName("Warrant \(trustDomain) CA \(Hex.encode(serial.bytes).prefix(16))")
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: serial, publicKey: key.certificateKey.publicKey,
            notValidBefore: now.addingTimeInterval(-backdate), notValidAfter: now.addingTimeInterval(validity),
            issuer: name, subject: name, signatureAlgorithm: key.certificateSignatureAlgorithm,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://\(trustDomain)")])
                SubjectKeyIdentifier(hash: key.certificateKey.publicKey)
            },
            issuerPrivateKey: key.certificateKey)
        return X509Authority(trustDomain: trustDomain, certificate: certificate, key: key)
    }

    public init(trustDomain: String, certificate: Certificate, privateKey: SigningKey) throws {
        guard certificate.publicKey == privateKey.certificateKey.publicKey else {
            throw AuthorityError("bad_key", "the CA key does not match the CA certificate")
        }
        self.init(trustDomain: trustDomain, certificate: certificate, key: privateKey)
    }

    private init(trustDomain: String, certificate: Certificate, key: SigningKey) {
        self.trustDomain = trustDomain
        self.certificate = certificate
        notValidAfter = certificate.notValidAfter
        self.key = key
        var issuer = DER.Serializer()
        try! issuer.serialize(certificate.subject) // a parsed certificate's name serializes
        issuerDER = issuer.serializedBytes
        let keyID = (try? certificate.extensions.subjectKeyIdentifier)??.keyIdentifier
        let aki = DERWriter.sequence(keyID.map { DERWriter.element(0x80, Array($0)) } ?? [])
        authorityKeyIdentifierExtension = DERWriter.sequence([0x06, 0x03, 0x55, 0x1D, 0x23] + DERWriter.element(0x04, aki))
    }

    public var privateKeyPEM: String { key.pemRepresentation }
    public var algorithm: KeyAlgorithm { key.algorithm }

    /// Positive, 16 random bytes (128 bits) with the top bit cleared, never
    /// zero: at most 16 octets in DER.
    public static func randomSerial() -> Certificate.SerialNumber {
        Certificate.SerialNumber(bytes: randomSerialBytes())
    }

    /// 16 random bytes, the first bit clear (a positive serial), never all zero.
    static func randomSerialBytes() -> [UInt8] {
        var bytes = SerialEntropy.take16()
        bytes[0] &= 0x7F
        if bytes.allSatisfy({ $0 == 0 }) { bytes[15] = 1 }
        return bytes
    }

    /// Checks a PKCS#10 request: it parses, its signature verifies with its
    /// own key (proof of possession), and the key is strong enough. Only
    /// the key is used; the subject, SANs and extensions asked for are not.
    public static func publicKey(fromCSR der: [UInt8]) throws(AuthorityError) -> Certificate.PublicKey {
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(derEncoded: der)
        } catch {
            // The parser refuses small RSA keys outright; say so plainly.
            if let bits = rsaModulusBits(inCSR: der), bits < 2048 {
                throw AuthorityError("weak_key", "RSA keys must have at least 2048 bits; this one has \(bits)")
            }
            // And keys on curves it does not know (secp256k1, brainpool).
            if let spki = spkiDER(inCSR: der), spki.count < 1_024, contains(spki, idECPublicKey), !contains(spki, p256CurveOID), !contains(spki, p384CurveOID) {
                throw AuthorityError("unsupported_key", "the CSR's key is on a curve not accepted here: use P-256 or P-384 (or RSA of 2048 bits or more)")
            }
            throw AuthorityError("bad_csr", "the CSR is not a DER PKCS#10 request: \(error)")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw AuthorityError("bad_csr_signature", "the CSR's signature does not verify with its public key")
        }
        try checkStrength(csr.publicKey)
        return csr.publicKey
    }

    /// id-ecPublicKey (1.2.840.10045.2.1), as an encoded OID.
    static let idECPublicKey: [UInt8] = [0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01]
    /// prime256v1 (1.2.840.10045.3.1.7) and secp384r1 (1.3.132.0.34): a CSR
    /// on these that does not parse is malformed, not on another curve.
    static let p256CurveOID: [UInt8] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]
    static let p384CurveOID: [UInt8] = [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22]

    static func contains(_ bytes: ArraySlice<UInt8>, _ pattern: [UInt8]) -> Bool {
        guard bytes.count >= pattern.count else { return false }
        return bytes.indices.dropLast(pattern.count - 1).contains { bytes[$0..<($0 + pattern.count)].elementsEqual(pattern) }
    }

    /// `publicKey(fromCSR:)`, and the request's SubjectPublicKeyInfo bytes
    /// when they are what the certificate would carry anyway (an
    /// uncompressed P-256 point): the certificate then copies them instead
    /// of writing the key out again (swift-crypto's conversion of the point
    /// was a fifth of building a leaf).
    public static func requestedKey(fromCSR der: [UInt8]) throws(AuthorityError) -> RequestedKey {
        let key = try publicKey(fromCSR: der)
        return RequestedKey(publicKey: key, spkiDER: canonicalP256SPKI(inCSR: der))
    }

    /// The SubjectPublicKeyInfo of a CSR that swift-certificates has
    /// already parsed and checked as DER, if it is exactly the canonical
    /// P-256 form.
    static func canonicalP256SPKI(inCSR der: [UInt8]) -> [UInt8]? {
        guard let spki = spkiDER(inCSR: der), spki.count == p256SPKIPrefix.count + 64, spki.starts(with: p256SPKIPrefix) else { return nil }
        return Array(spki)
    }

    /// A CSR's SubjectPublicKeyInfo, whole (CertificationRequestInfo's
    /// third member), found by walking element headers: DER has one
    /// encoding for each value, so these are the bytes a DER parser reads
    /// the key from (DER.parse of the whole request cost more than the
    /// key conversion the copy saves).
    static func spkiDER(inCSR der: [UInt8]) -> ArraySlice<UInt8>? {
        /// The element at `start`: its tag, where its content starts, where it ends.
        func element(at start: Int, end limit: Int) -> (tag: UInt8, content: Int, end: Int)? {
            guard start + 2 <= limit else { return nil }
            let first = der[start + 1]
            var length = Int(first), content = start + 2
            if first >= 0x80 {
                let count = Int(first & 0x7F)
                guard (1...3).contains(count), content + count <= limit else { return nil }
                length = 0
                for k in 0..<count { length = length << 8 | Int(der[content + k]) }
                content += count
            }
            guard content + length <= limit else { return nil }
            return (der[start], content, content + length)
        }
        guard let request = element(at: 0, end: der.count), request.tag == 0x30,
              let info = element(at: request.content, end: request.end), info.tag == 0x30,
              let version = element(at: info.content, end: info.end), version.tag == 0x02,
              let subject = element(at: version.end, end: info.end), subject.tag == 0x30,
              let spki = element(at: subject.end, end: info.end), spki.tag == 0x30 else { return nil }
        return der[subject.end..<spki.end]
    }

    /// Everything before the point's coordinates in a P-256 key's
    /// SubjectPublicKeyInfo as swift-certificates writes it (algorithm,
    /// curve, bit string header, and the uncompressed-point marker 04).
    static let p256SPKIPrefix: [UInt8] = {
        var serializer = DER.Serializer()
        try! serializer.serialize(Certificate.PublicKey(P256.Signing.PrivateKey().publicKey))
        return Array(serializer.serializedBytes.dropLast(64))
    }()

    /// The RSA modulus size of a CSR's key, read from the raw DER
    /// (CertificationRequestInfo -> SubjectPublicKeyInfo -> RSAPublicKey).
    static func rsaModulusBits(inCSR der: [UInt8]) -> Int? {
        guard let spkiBytes = spkiDER(inCSR: der), let spkiNode = try? DER.parse(spkiBytes),
              case .constructed(let spki) = spkiNode.content else { return nil }
        let spkiNodes = Array(spki)
        guard spkiNodes.count == 2, case .constructed(let algorithm) = spkiNodes[0].content,
              let oidNode = algorithm.first(where: { _ in true }),
              let oid = try? ASN1ObjectIdentifier(derEncoded: oidNode), oid == [1, 2, 840, 113_549, 1, 1, 1],
              let bits = try? ASN1BitString(derEncoded: spkiNodes[1]),
              let key = try? DER.parse(Array(bits.bytes)), case .constructed(let numbers) = key.content,
              let modulusNode = numbers.first(where: { _ in true }), case .primitive(let modulus) = modulusNode.content else { return nil }
        let significant = modulus.drop { $0 == 0 }
        guard let top = significant.first else { return 0 }
        return (significant.count - 1) * 8 + (8 - top.leadingZeroBitCount)
    }

    /// P-256, P-384, or RSA of at least 2048 bits.
    static func checkStrength(_ key: Certificate.PublicKey) throws(AuthorityError) {
        if P256.Signing.PublicKey(key) != nil || P384.Signing.PublicKey(key) != nil { return }
        if let rsa = _RSA.Signing.PublicKey(key) {
            guard rsa.keySizeInBits >= 2048 else {
                throw AuthorityError("weak_key", "RSA keys must have at least 2048 bits; this one has \(rsa.keySizeInBits)")
            }
            return
        }
        throw AuthorityError("unsupported_key", "the key must be ECDSA P-256, P-384, or RSA of at least 2048 bits")
    }

    /// An X509-SVID for `spiffeID` on `publicKey`, valid from a little before
    /// `now` for `ttl` seconds but never past this CA.
    public func issue(spiffeID: SpiffeID, publicKey: Certificate.PublicKey, ttl: TimeInterval, attributes: Attributes,
                      serial chosen: Certificate.SerialNumber? = nil, now: Date = Date()) throws -> IssuedX509 {
        try issue(spiffeID: spiffeID, key: RequestedKey(publicKey), ttl: ttl, attributes: attributes, serial: chosen, now: now)
    }

    /// `issue(spiffeID:publicKey:...)` for a key a CSR asked for.
    public func issue(spiffeID: SpiffeID, key requested: RequestedKey, ttl: TimeInterval, attributes: Attributes,
                      serial chosen: Certificate.SerialNumber? = nil, now: Date = Date()) throws -> IssuedX509 {
        guard spiffeID.trustDomain == trustDomain else {
            throw AuthorityError("wrong_trust_domain", "\(spiffeID) is not in trust domain \(trustDomain)")
        }
        guard spiffeID.namesWorkload else { throw AuthorityError("bad_spiffe_id", SpiffeID.workloadPathMessage) }
        // Whole seconds, as the certificate encodes them: notBefore +
        // backdate is then exactly when it was signed (revocation rules
        // compare that with their own time).
        let now = Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.down))
        let notAfter = min(now.addingTimeInterval(ttl.rounded(.down)), certificate.notValidAfter)
        guard notAfter > now else { throw AuthorityError("ca_expired", "the CA expires before the identity could be valid") }
        let serial = chosen ?? Self.randomSerial()
        let attributesJSON = Self.canonicalJSON(attributes)
        guard attributesJSON.count <= Self.attributesBytesMax else {
            throw AuthorityError("attributes_too_large", "the attested context is \(attributesJSON.count) bytes; at most \(Self.attributesBytesMax)")
        }
        // The leaf is written as DER by hand (the same bytes the
        // swift-certificates builder wrote, which a test checks, at a
        // fraction of the cost): the profile never changes, only the
        // serial, the times, the key, the SPIFFE ID and the context do.
        let publicKeyDER: [UInt8]
        if let spki = requested.spkiDER {
            publicKeyDER = spki
        } else {
            var serializer = DER.Serializer()
            try serializer.serialize(requested.publicKey)
            publicKeyDER = serializer.serializedBytes
        }
        let notBefore = now.addingTimeInterval(-Self.backdate)
        var extensions = Self.leafConstantExtensions
        extensions += DERWriter.sequence([0x06, 0x03, 0x55, 0x1D, 0x11]
            + DERWriter.element(0x04, DERWriter.sequence(DERWriter.element(0x86, Array(spiffeID.description.utf8)))))
        extensions += authorityKeyIdentifierExtension
        extensions += DERWriter.sequence(Self.attributesOIDDER + DERWriter.element(0x04, DERWriter.element(0x0C, attributesJSON)))
        var tbs: [UInt8] = [0xA0, 0x03, 0x02, 0x01, 0x02]
        tbs += DERWriter.unsignedInteger(Array(serial.bytes))
        tbs += key.algorithmIdentifierDER
        tbs += issuerDER
        tbs += DERWriter.sequence(DERWriter.time(notBefore) + DERWriter.time(notAfter))
        tbs += Self.leafSubjectDER
        tbs += publicKeyDER
        tbs += DERWriter.element(0xA3, DERWriter.sequence(extensions))
        let tbsDER = DERWriter.sequence(tbs)
        let signature = try key.x509Signature(for: tbsDER)
        let der = DERWriter.sequence(tbsDER + key.algorithmIdentifierDER + DERWriter.element(0x03, [0] + signature))
        return IssuedX509(der: der, serialBytes: Array(serial.bytes), notValidBefore: notBefore, notValidAfter: notAfter)
    }

    /// Every leaf's BasicConstraints (critical, not a CA), KeyUsage
    /// (critical, digitalSignature) and ExtendedKeyUsage (serverAuth,
    /// clientAuth), in that order.
    static let leafConstantExtensions: [UInt8] = [
        0x30, 0x0C, 0x06, 0x03, 0x55, 0x1D, 0x13, 0x01, 0x01, 0xFF, 0x04, 0x02, 0x30, 0x00,
        0x30, 0x0E, 0x06, 0x03, 0x55, 0x1D, 0x0F, 0x01, 0x01, 0xFF, 0x04, 0x04, 0x03, 0x02, 0x07, 0x80,
        0x30, 0x1D, 0x06, 0x03, 0x55, 0x1D, 0x25, 0x04, 0x16, 0x30, 0x14,
        0x06, 0x08, 0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
    ]
    static let leafSubjectDER: [UInt8] = {
        var serializer = DER.Serializer()
        try! serializer.serialize(leafSubject)
        return serializer.serializedBytes
    }()
    static let attributesOIDDER: [UInt8] = {
        var serializer = DER.Serializer()
        try! serializer.serialize(attributesExtensionOID)
        return serializer.serializedBytes
    }()

    /// A CRL (RFC 5280 section 5, version 2) signed by this authority,
    /// listing `revoked` (serial bytes and revocation time), valid from
    /// `now` until `nextUpdate`, with CRL number `number` (unsigned,
    /// big-endian, 1 to 20 bytes) and the authority's key identifier.
    public func crl(revoked: [(serial: [UInt8], at: Date)], number: [UInt8], now: Date = Date(), nextUpdate: Date) throws -> [UInt8] {
        guard (1...20).contains(number.count) else { throw AuthorityError("bad_crl_number", "a CRL number is 1 to 20 bytes") }
        var entries: [UInt8] = []
        for entry in revoked.sorted(by: { $0.serial.lexicographicallyPrecedes($1.serial) }) {
            entries += DERWriter.sequence(DERWriter.unsignedInteger(entry.serial) + DERWriter.time(entry.at))
        }
        var extensions: [UInt8] = []
        if try certificate.extensions.subjectKeyIdentifier != nil { extensions += authorityKeyIdentifierExtension }
        // cRLNumber INTEGER
        let crlNumber = DERWriter.unsignedInteger(number)
        extensions += DERWriter.sequence([0x06, 0x03, 0x55, 0x1D, 0x14] + DERWriter.element(0x04, crlNumber))
        var tbs: [UInt8] = [0x02, 0x01, 0x01] + key.algorithmIdentifierDER + issuerDER + DERWriter.time(now) + DERWriter.time(nextUpdate)
        if !entries.isEmpty { tbs += DERWriter.sequence(entries) }
        tbs += DERWriter.element(0xA0, DERWriter.sequence(extensions))
        let tbsDER = DERWriter.sequence(tbs)
        let signature = try key.x509Signature(for: tbsDER)
        return DERWriter.sequence(tbsDER + key.algorithmIdentifierDER + DERWriter.element(0x03, [0] + signature))
    }

    /// Sorted-key JSON of string pairs (deterministic bytes).
    static func canonicalJSON(_ attributes: Attributes) -> [UInt8] {
        var json = JSONText.Builder(capacity: 64 + attributes.count * 48)
        json.object(attributes)
        return json.bytes
    }
}

/// DER written by hand: tag, definite length, content.
enum DERWriter {
    static func length(_ count: Int) -> [UInt8] {
        if count < 0x80 { return [UInt8(count)] }
        let bytes = withUnsafeBytes(of: UInt64(count).bigEndian) { Array($0) }.drop { $0 == 0 }
        return [0x80 | UInt8(bytes.count)] + bytes
    }

    static func element(_ tag: UInt8, _ content: [UInt8]) -> [UInt8] {
        var out: [UInt8] = [tag]
        out.reserveCapacity(content.count + 5)
        out += length(content.count)
        out += content
        return out
    }

    static func sequence(_ content: [UInt8]) -> [UInt8] { element(0x30, content) }

    /// An INTEGER holding the non-negative big-endian number `bytes`:
    /// leading zeros dropped, and one put back when the top bit is set
    /// (else it would read as negative).
    static func unsignedInteger(_ bytes: [UInt8]) -> [UInt8] {
        var value = Array(bytes.drop { $0 == 0 })
        if value.isEmpty || value[0] & 0x80 != 0 { value.insert(0, at: 0) }
        return element(0x02, value)
    }

    /// RFC 5280 section 4.1.2.5: UTCTime (YYMMDDHHMMSSZ) through 2049,
    /// GeneralizedTime (YYYYMMDDHHMMSSZ) from 2050, whole seconds, UTC.
    static func time(_ date: Date) -> [UInt8] {
        var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let year = Int(parts.tm_year) + 1900
        func two(_ value: Int32) -> [UInt8] { [0x30 + UInt8(value / 10 % 10), 0x30 + UInt8(value % 10)] }
        let rest = two(parts.tm_mon + 1) + two(parts.tm_mday) + two(parts.tm_hour) + two(parts.tm_min) + two(parts.tm_sec) + [0x5A]
        if (1950..<2050).contains(year) { return element(0x17, two(Int32(year % 100)) + rest) }
        return element(0x18, two(Int32(year / 100)) + two(Int32(year % 100)) + rest)
    }
}

/// One issued X509-SVID.
public struct IssuedX509: Sendable {
    public let der: [UInt8]
    public let serialBytes: [UInt8]
    public let notValidBefore: Date
    public let notValidAfter: Date

    /// The certificate, parsed from `der` (for callers that need more
    /// than the DER and the fields above).
    public var certificate: Certificate {
        get throws { try Certificate(derEncoded: der) }
    }

    public var serialHex: String { Hex.encode(serialBytes) }
    public var fingerprintSHA256: String { Hex.encode(SHA256.digest(der)) }
    public var pem: String { PEMText.encode(der, label: "CERTIFICATE") }
}

/// A key to certify: a public key, and for one a CSR asked for, the
/// SubjectPublicKeyInfo bytes it came in when the certificate can carry
/// them as they are (made only by `X509Authority.requestedKey(fromCSR:)`).
public struct RequestedKey: Sendable {
    public let publicKey: Certificate.PublicKey
    let spkiDER: [UInt8]?

    public init(_ publicKey: Certificate.PublicKey) {
        self.publicKey = publicKey
        spkiDER = nil
    }

    init(publicKey: Certificate.PublicKey, spkiDER: [UInt8]?) {
        self.publicKey = publicKey
        self.spkiDER = spkiDER
    }
}

/// The kernel's random bytes for serials, drawn 256 at a time
/// (getentropy) and each handed out once, then cleared: one system call
/// per sixteen serials, where the system generator made two per serial
/// (a getrandom(2) per 64-bit draw, 1% of the leader's CPU when every
/// JWT-SVID drew its jti).
enum SerialEntropy {
    private static let pool = Mutex<(bytes: [UInt8], next: Int)>(([UInt8](repeating: 0, count: 256), 256))

    static func take16() -> [UInt8] {
        pool.withLock { pool in
            if pool.next + 16 > pool.bytes.count {
                let drawn = pool.bytes.withUnsafeMutableBytes { getentropy($0.baseAddress, $0.count) } == 0
                if !drawn {
                    // Not expected; the system generator never fails.
                    var generator = SystemRandomNumberGenerator()
                    for i in pool.bytes.indices { pool.bytes[i] = generator.next() }
                }
                pool.next = 0
            }
            let start = pool.next
            pool.next += 16
            let taken = Array(pool.bytes[start..<start + 16])
            for i in start..<start + 16 { pool.bytes[i] = 0 }
            return taken
        }
    }
}
