import Crypto
import Foundation
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
    private let key: SigningKey

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
        self.key = key
    }

    public var privateKeyPEM: String { key.pemRepresentation }
    public var algorithm: KeyAlgorithm { key.algorithm }

    /// Positive, 16 random bytes (128 bits) with the top bit cleared, never
    /// zero: at most 16 octets in DER.
    public static func randomSerial() -> Certificate.SerialNumber {
        // Two draws of the system generator (one getrandom(2) each), not sixteen.
        var generator = SystemRandomNumberGenerator()
        var bytes = withUnsafeBytes(of: (generator.next() as UInt64, generator.next() as UInt64)) { Array($0) }
        bytes[0] &= 0x7F
        if bytes.allSatisfy({ $0 == 0 }) { bytes[15] = 1 }
        return Certificate.SerialNumber(bytes: bytes)
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
            throw AuthorityError("bad_csr", "the CSR is not a DER PKCS#10 request: \(error)")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw AuthorityError("bad_csr_signature", "the CSR's signature does not verify with its public key")
        }
        try checkStrength(csr.publicKey)
        return csr.publicKey
    }

    /// The RSA modulus size of a CSR's key, read from the raw DER
    /// (CertificationRequestInfo -> SubjectPublicKeyInfo -> RSAPublicKey).
    static func rsaModulusBits(inCSR der: [UInt8]) -> Int? {
        guard let root = try? DER.parse(der), case .constructed(let request) = root.content,
              let info = request.first(where: { _ in true }), case .constructed(let infoNodes) = info.content else { return nil }
        let fields = Array(infoNodes)
        guard fields.count >= 3, case .constructed(let spki) = fields[2].content else { return nil }
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
        guard spiffeID.trustDomain == trustDomain else {
            throw AuthorityError("wrong_trust_domain", "\(spiffeID) is not in trust domain \(trustDomain)")
        }
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
        var serializer = DER.Serializer()
        try serializer.serialize(ASN1UTF8String(contentBytes: ArraySlice(attributesJSON)))
        let leaf = try Certificate(
            version: .v3, serialNumber: serial, publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-Self.backdate), notValidAfter: notAfter,
            issuer: certificate.subject,
            subject: Self.leafSubject,
            signatureAlgorithm: key.certificateSignatureAlgorithm,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames([.uniformResourceIdentifier(spiffeID.description)])
                try AuthorityKeyIdentifier(keyIdentifier: certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
                Certificate.Extension(oid: Self.attributesExtensionOID, critical: false, value: ArraySlice(serializer.serializedBytes))
            },
            issuerPrivateKey: key.certificateKey)
        var der = DER.Serializer()
        try der.serialize(leaf)
        return IssuedX509(certificate: leaf, der: der.serializedBytes)
    }

    /// A CRL (RFC 5280 section 5, version 2) signed by this authority,
    /// listing `revoked` (serial bytes and revocation time), valid from
    /// `now` until `nextUpdate`, with CRL number `number` and the
    /// authority's key identifier.
    public func crl(revoked: [(serial: [UInt8], at: Date)], number: UInt64, now: Date = Date(), nextUpdate: Date) throws -> [UInt8] {
        func time(_ date: Date) throws -> [UInt8] {
            let c = Calendar(identifier: .gregorian).dateComponents(in: TimeZone(identifier: "UTC")!, from: date)
            var s = DER.Serializer()
            // RFC 5280 section 5.1.2.4: UTCTime through 2049, GeneralizedTime after.
            if c.year! < 2050 {
                try s.serialize(try UTCTime(year: c.year!, month: c.month!, day: c.day!, hours: c.hour!, minutes: c.minute!, seconds: c.second!))
            } else {
                try s.serialize(try GeneralizedTime(year: c.year!, month: c.month!, day: c.day!, hours: c.hour!, minutes: c.minute!, seconds: c.second!,
                                                    fractionalSeconds: 0))
            }
            return s.serializedBytes
        }
        func sequence(_ content: [UInt8], tag: UInt8 = 0x30) -> [UInt8] { [tag] + Self.derLength(content.count) + content }
        func integer(_ bytes: [UInt8]) -> [UInt8] {
            var value = Array(bytes.drop { $0 == 0 })
            if value.isEmpty || value[0] & 0x80 != 0 { value.insert(0, at: 0) }
            return [0x02] + Self.derLength(value.count) + value
        }
        var issuer = DER.Serializer()
        try issuer.serialize(certificate.subject)
        var entries: [UInt8] = []
        for entry in revoked.sorted(by: { $0.serial.lexicographicallyPrecedes($1.serial) }) {
            entries += sequence(integer(entry.serial) + (try time(entry.at)))
        }
        var numberBytes = withUnsafeBytes(of: number.bigEndian) { Array($0) }
        numberBytes = Array(numberBytes.drop { $0 == 0 })
        var extensions: [UInt8] = []
        if let keyID = try certificate.extensions.subjectKeyIdentifier?.keyIdentifier {
            // authorityKeyIdentifier { [0] keyIdentifier }
            let aki = sequence([0x80] + Self.derLength(keyID.count) + Array(keyID))
            extensions += sequence([0x06, 0x03, 0x55, 0x1D, 0x23] + [0x04] + Self.derLength(aki.count) + aki)
        }
        // cRLNumber INTEGER
        let crlNumber = integer(numberBytes)
        extensions += sequence([0x06, 0x03, 0x55, 0x1D, 0x14] + [0x04] + Self.derLength(crlNumber.count) + crlNumber)
        var tbs: [UInt8] = [0x02, 0x01, 0x01] + key.algorithmIdentifierDER + issuer.serializedBytes + (try time(now)) + (try time(nextUpdate))
        if !entries.isEmpty { tbs += sequence(entries) }
        tbs += sequence(sequence(extensions), tag: 0xA0)
        let tbsDER = sequence(tbs)
        let signature = try key.x509Signature(for: tbsDER)
        return sequence(tbsDER + key.algorithmIdentifierDER + [0x03] + Self.derLength(signature.count + 1) + [0] + signature)
    }

    static func derLength(_ count: Int) -> [UInt8] {
        if count < 0x80 { return [UInt8(count)] }
        let bytes = withUnsafeBytes(of: UInt64(count).bigEndian) { Array($0) }.drop { $0 == 0 }
        return [0x80 | UInt8(bytes.count)] + bytes
    }

    /// Sorted-key JSON of string pairs (deterministic bytes).
    static func canonicalJSON(_ attributes: Attributes) -> [UInt8] { Array(JSONText.object(attributes).utf8) }
}

/// One issued X509-SVID.
public struct IssuedX509: Sendable {
    public let certificate: Certificate
    public let der: [UInt8]

    public var serialHex: String { Hex.encode(certificate.serialNumber.bytes) }
    public var fingerprintSHA256: String { Hex.encode(SHA256.hash(data: der)) }
    public var pem: String { PEMText.encode(der, label: "CERTIFICATE") }
}
