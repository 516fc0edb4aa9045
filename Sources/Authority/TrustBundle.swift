import Crypto
import Encoding
import Foundation
import SwiftASN1
@_spi(FixedExpiryValidationTime) import X509

/// The keys a relying party trusts for one trust domain
/// (SPIFFE_Trust_Domain_and_Bundle.md): X.509 authorities for X509-SVIDs
/// and JWT keys for JWT-SVIDs, with a sequence number and refresh hint.
public struct TrustBundle: Sendable {
    public var trustDomain: String
    public var x509Authorities: [Certificate] {
        didSet { roots = CertificateStore(x509Authorities) }
    }
    /// The authorities as path validation's roots, made once per bundle
    /// (grouping them by subject was ~1% of verifying a chain).
    private var roots: CertificateStore
    public var jwtKeys: [String: VerificationKey]
    public var sequence: UInt64
    public var refreshHintSeconds: Int
    /// How often relying parties are told to fetch the bundle again.
    public static let refreshHintDefault = 60
    /// Refresh intervals a prepared authority is published before it may
    /// sign (SPIFFE federation recommends 3 to 5): 300 s at the default hint.
    public static let refreshesBeforeActivation = 5

    public init(trustDomain: String, x509Authorities: [Certificate], jwtKeys: [String: VerificationKey], sequence: UInt64,
                refreshHintSeconds: Int = TrustBundle.refreshHintDefault) {
        self.trustDomain = trustDomain
        self.x509Authorities = x509Authorities
        roots = CertificateStore(x509Authorities)
        self.jwtKeys = jwtKeys
        self.sequence = sequence
        self.refreshHintSeconds = refreshHintSeconds
    }

    /// The SPIFFE bundle as a JWKS: `x509-svid` keys (no kid, the CA
    /// certificate as the only x5c entry) and `jwt-svid` keys (with kid).
    public func jwks() throws -> [UInt8] {
        var keys: [[String: Any]] = []
        for certificate in x509Authorities {
            guard let key = VerificationKey(certificate.publicKey) else { continue }
            var der = DER.Serializer()
            try der.serialize(certificate)
            var jwk = key.jwk()
            jwk["use"] = "x509-svid"
            jwk["x5c"] = [Data(der.serializedBytes).base64EncodedString()]
            keys.append(jwk)
        }
        for (kid, key) in jwtKeys.sorted(by: { $0.key < $1.key }) {
            var jwk = key.jwk()
            jwk["use"] = "jwt-svid"
            jwk["kid"] = kid
            keys.append(jwk)
        }
        let bundle: [String: Any] = ["keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": refreshHintSeconds]
        return Array(try JSONSerialization.data(withJSONObject: bundle, options: [.sortedKeys, .withoutEscapingSlashes]))
    }

    /// The JWT keys as an OIDC JWKS (`use: sig`, `alg` pinned per key), for
    /// cloud federation through the discovery document.
    public func oidcJWKS() throws -> [UInt8] {
        let keys: [[String: Any]] = jwtKeys.sorted(by: { $0.key < $1.key }).map { kid, key in
            var jwk = key.jwk()
            jwk["use"] = "sig"
            jwk["alg"] = key.jwsAlgorithm
            jwk["kid"] = kid
            return jwk
        }
        return Array(try JSONSerialization.data(withJSONObject: ["keys": keys], options: [.sortedKeys, .withoutEscapingSlashes]))
    }

    /// The X.509 authorities in PEM, for `openssl verify -CAfile`.
    public func pem() throws -> String {
        try x509Authorities.map { try $0.serializeAsPEM().pemString + "\n" }.joined()
    }

    /// The JWS algorithms the JWT keys use, for the discovery document.
    public var jwtAlgorithms: [String] { Array(Set(jwtKeys.values.map(\.jwsAlgorithm))).sorted() }

    /// Checks an X509-SVID chain (leaf first, then any intermediates)
    /// against this bundle's authorities: RFC 5280 path validation at
    /// `now`, then the X509-SVID rules on the leaf.
    public func verifyX509(chain: [Certificate], now: Date = Date()) async throws(AuthorityError) -> VerifiedX509 {
        try await validate(chain: chain, now: now).verified
    }

    /// A verified chain and when its path is valid (the latest notBefore
    /// and the earliest notAfter along it): all of RFC 5280 that depends
    /// on the time.
    public struct MemoizedX509: Sendable {
        public let verified: VerifiedX509
        public let validFrom: Date
        public let validUntil: Date
    }

    /// Chains in PEM at most this long (eight certificates of a few KiB).
    public static let chainPEMBytesMax = 64 << 10
    /// Certificates in a chain at most (the leaf and its intermediates).
    public static let chainCertificatesMax = 8

    /// Verifies a chain given in PEM (leaf first). With a memo, a chain
    /// whose PEM verified before under this bundle is answered from it:
    /// nothing is parsed or checked again but the time, against the
    /// validity of the whole path it was validated on. With the issuance
    /// records, a leaf they hold is not path-validated (see
    /// `recordedPath`). Revocation is the caller's to check every time.
    public func verifyX509(chainPEM: String, memo: VerificationMemo<MemoizedX509>?, issued: IssuedLookup? = nil,
                           now: Date = Date()) async throws -> VerifiedX509 {
        guard chainPEM.utf8.count <= Self.chainPEMBytesMax else {
            throw AuthorityError("bad_chain", "the chain is larger than \(Self.chainPEMBytesMax) bytes")
        }
        let digest = MemoDigest(UTF8Text.withBytes(of: chainPEM) { SHA256.digest(UnsafeRawBufferPointer($0)) })
        if let known = memo?.value(for: digest) {
            try Self.checkTime(known, now)
            var verified = known.verified
            verified.signature = .remembered
            return verified
        }
        let blocks: [[UInt8]]
        do {
            blocks = try PEMText.decodeAll(chainPEM, label: "CERTIFICATE", limit: Self.chainCertificatesMax)
        } catch {
            throw AuthorityError("bad_chain", "the chain is not PEM certificates: \(error)")
        }
        guard !blocks.isEmpty else { throw AuthorityError("bad_chain", "give 1 to \(Self.chainCertificatesMax) PEM certificates") }
        let chain = try blocks.map { try Certificate(derEncoded: $0) }
        let validated: MemoizedX509
        if let issued, let recorded = try recordedPath(chain[0], der: blocks[0], issued) {
            try Self.checkTime(recorded, now)
            validated = recorded
        } else {
            validated = try await validate(chain: chain, now: now)
        }
        memo?.remember(validated, for: digest)
        return validated.verified
    }

    private static func checkTime(_ path: MemoizedX509, _ now: Date) throws(AuthorityError) {
        try checkTime(validFrom: path.validFrom, validUntil: path.validUntil, now, "the chain")
    }

    /// `expired` or `not_yet_valid` (not `untrusted`: the relying party
    /// learns what is wrong, and the caller does not look for a newer
    /// bundle that could not help).
    private static func checkTime(validFrom: Date, validUntil: Date, _ now: Date, _ what: String) throws(AuthorityError) {
        guard now >= validFrom else { throw AuthorityError("not_yet_valid", "\(what) is not valid until \(validFrom)") }
        guard now <= validUntil else { throw AuthorityError("expired", "\(what) expired at \(validUntil)") }
    }

    /// A leaf whose SHA-256 the issuance records hold (under its serial and
    /// expiry) is bytes the leader built and signed with the authority its
    /// issuer names (every authority has a subject of its own): validating
    /// its path would repeat the leader's work. What is left to check: that
    /// authority is still in this bundle, the time (against the leaf's and
    /// the authority's validity), and the X509-SVID rules, which also read
    /// its SPIFFE ID and attributes. Nil when the records do not hold it.
    private func recordedPath(_ leaf: Certificate, der: [UInt8], _ issued: IssuedLookup) throws(AuthorityError) -> MemoizedX509? {
        guard let authority = x509Authorities.first(where: { $0.subject == leaf.issuer }),
              issued(.x509, Hex.encode(leaf.serialNumber.bytes), UInt64(max(0, leaf.notValidAfter.timeIntervalSince1970 * 1000)),
                     Hex.encode(SHA256.hash(data: der))) else { return nil }
        var verified = try Self.checkLeaf(leaf, trustDomain: trustDomain)
        verified.signature = .recorded
        return MemoizedX509(verified: verified, validFrom: max(leaf.notValidBefore, authority.notValidBefore),
                            validUntil: min(leaf.notValidAfter, authority.notValidAfter))
    }

    private func validate(chain: [Certificate], now: Date) async throws(AuthorityError) -> MemoizedX509 {
        guard let leaf = chain.first else { throw AuthorityError("empty_chain", "no certificate was given") }
        guard !x509Authorities.isEmpty else { throw AuthorityError("untrusted", "the bundle trusts no X.509 authority") }
        // Path validation would refuse it too, but only as untrusted.
        try Self.checkTime(validFrom: leaf.notValidBefore, validUntil: leaf.notValidAfter, now, "the leaf")
        var verifier = Verifier(rootCertificates: roots) {
            RFC5280Policy(fixedExpiryValidationTime: now)
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(Array(chain.dropFirst())))
        guard case .validCertificate(let path) = result else {
            if case .couldNotValidate(let failures) = result {
                throw AuthorityError("untrusted", "the chain does not lead to a trusted authority: \(failures.first.map { "\($0.policyFailureReason)" } ?? "no path")")
            }
            throw AuthorityError("untrusted", "the chain does not verify")
        }
        let verified = try Self.checkLeaf(leaf, trustDomain: trustDomain)
        return MemoizedX509(verified: verified, validFrom: path.map(\.notValidBefore).max() ?? leaf.notValidBefore,
                            validUntil: path.map(\.notValidAfter).min() ?? leaf.notValidAfter)
    }

    /// The X509-SVID rules: one URI SAN naming a SPIFFE ID of this trust
    /// domain, not a CA, KeyUsage present with digitalSignature and without
    /// keyCertSign or cRLSign.
    public static func checkLeaf(_ leaf: Certificate, trustDomain: String) throws(AuthorityError) -> VerifiedX509 {
        let extensions = leaf.extensions
        let uris: [String]
        do {
            uris = (try extensions.subjectAlternativeNames.map { Array($0) } ?? []).compactMap {
                if case .uniformResourceIdentifier(let uri) = $0 { return uri }
                return nil
            }
        } catch {
            throw AuthorityError("bad_svid", "the SAN extension does not parse")
        }
        guard uris.count == 1 else { throw AuthorityError("bad_svid", "an X509-SVID has exactly one URI SAN; this has \(uris.count)") }
        let spiffeID: SpiffeID
        do {
            spiffeID = try SpiffeID(parsing: uris[0])
        } catch {
            throw AuthorityError("bad_svid", "the URI SAN is not a SPIFFE ID: \(error)")
        }
        guard spiffeID.trustDomain == trustDomain else { throw AuthorityError("wrong_trust_domain", "\(spiffeID) is not in \(trustDomain)") }
        guard spiffeID.namesWorkload else { throw AuthorityError("bad_svid", "a leaf's SPIFFE ID has a path (X509-SVID 3.1); this one is the bare trust domain ID") }
        guard let constraints = try? extensions.basicConstraints, case .notCertificateAuthority = constraints else {
            throw AuthorityError("bad_svid", "a leaf must carry BasicConstraints with CA false")
        }
        guard let usage = try? extensions.keyUsage, usage.digitalSignature, !usage.keyCertSign, !usage.cRLSign else {
            throw AuthorityError("bad_svid", "a leaf must carry KeyUsage with digitalSignature and without keyCertSign or cRLSign")
        }
        var attributes: Attributes = [:]
        if let ext = extensions[oid: X509Authority.attributesExtensionOID], let text = try? ASN1UTF8String(derEncoded: ext.value) {
            // Read by hand (flat strings, as written); JSONDecoder for anything else.
            var strings: Attributes? = [:]
            for (name, value) in JSONText.parseFlatObject(Array(text.bytes), membersMax: 256) ?? [:] {
                if case .string(let string) = value { strings?[name] = string } else { strings = nil }
            }
            if let strings, !strings.isEmpty { attributes = strings } else if let decoded = try? JSONDecoder().decode(Attributes.self, from: Data(text.bytes)) { attributes = decoded }
        }
        return VerifiedX509(spiffeID: spiffeID, serialHex: Hex.encode(leaf.serialNumber.bytes), notBefore: leaf.notValidBefore,
                            notAfter: leaf.notValidAfter, attributes: attributes)
    }
}

public struct VerifiedX509: Sendable {
    public let spiffeID: SpiffeID
    public let serialHex: String
    public let notBefore: Date
    public let notAfter: Date
    public let attributes: Attributes
    /// How its signatures were known to be good.
    public internal(set) var signature: SignatureCheck = .checked
}
