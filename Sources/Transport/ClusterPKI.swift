import Crypto
import Foundation
import NIOSSL
import Raft
import SwiftASN1
import X509

/// The cluster-internal CA made at cluster creation. It signs one
/// certificate per node, naming the node in a URI SAN
/// `warrant-node://<cluster id>/<node id>`; nodes trust only this CA, so a
/// peer from another cluster fails the TLS handshake.
public struct ClusterCA: Sendable {
    public let clusterID: String
    public let certificate: Certificate
    private let key: P256.Signing.PrivateKey

    /// How far before its issue each cluster-internal certificate is valid:
    /// a node whose clock is behind by less still accepts its peers (with a
    /// minute, a node a few minutes behind could not join a cluster made
    /// moments before, as the chaos suite's clock-skew fault showed).
    public static let backdate: TimeInterval = 3_600

    public static func create(clusterID: String, now: Date = Date(), validity: TimeInterval = 10 * 365 * 86_400) throws -> ClusterCA {
        let key = P256.Signing.PrivateKey(compactRepresentable: false)
        let serial = randomSerial()
        // A unique Subject per CA (real verifiers trip over shared ones).
        let name = try DistinguishedName {
            OrganizationName("Warrant")
            CommonName("Warrant cluster \(clusterID) internal CA \(serial.hexDigits)")
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: serial, publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-Self.backdate), notValidAfter: now.addingTimeInterval(validity),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            },
            issuerPrivateKey: .init(key))
        return ClusterCA(clusterID: clusterID, certificate: certificate, key: key)
    }

    /// A certificate for node `id`, valid for both ends of a connection.
    /// `hosts` (IP addresses or DNS names where the node serves its API)
    /// go in the SAN too, so ordinary HTTPS clients can verify the node.
    public func issueNodeIdentity(_ id: NodeID, hosts: [String] = [], now: Date = Date(), validity: TimeInterval = 365 * 86_400) throws -> NodeIdentity {
        let key = P256.Signing.PrivateKey(compactRepresentable: false)
        let certificate = try Certificate(
            version: .v3, serialNumber: Self.randomSerial(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-Self.backdate), notValidAfter: min(now.addingTimeInterval(validity), self.certificate.notValidAfter),
            issuer: self.certificate.subject,
            subject: try DistinguishedName { CommonName("warrant node \(id)") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames([.uniformResourceIdentifier(Self.nodeURI(clusterID: clusterID, node: id))] + hosts.map(Self.generalName))
            },
            issuerPrivateKey: .init(self.key))
        return NodeIdentity(clusterID: clusterID, nodeID: id, certificate: certificate, privateKey: key, caCertificate: self.certificate)
    }

    /// The longest an admin certificate may be valid (a rule revoking
    /// admin certificates by name is kept this long: by then everything it
    /// covers has expired).
    public static let adminValidityMax: TimeInterval = 365 * 86_400
    public static let adminNameBytesMax = 64

    /// Why `name` cannot name an admin, or nil: 1 to 64 printable ASCII
    /// characters, no '/' and no space.
    public static func invalidAdminName(_ name: String) -> String? {
        guard !name.isEmpty, name.utf8.count <= adminNameBytesMax, name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "/") }) else {
            return "an admin name is 1 to \(adminNameBytesMax) printable ASCII characters without spaces or '/'"
        }
        return nil
    }

    /// A client certificate for an operator: it names `name` in a URI SAN
    /// `warrant-admin://<cluster id>/<name>` and is good only for clientAuth.
    public func issueAdminIdentity(name: String, now: Date = Date(), validity: TimeInterval = ClusterCA.adminValidityMax) throws -> (certificate: Certificate, privateKey: P256.Signing.PrivateKey) {
        if let reason = Self.invalidAdminName(name) { throw PeerIdentityError(reason: reason) }
        guard validity > 0, validity <= Self.adminValidityMax else {
            throw PeerIdentityError(reason: "an admin certificate is valid for 1 second to \(Int(Self.adminValidityMax) / 86_400) days")
        }
        // Whole seconds, down: a certificate's times are whole seconds, and
        // a rule revoking an admin's certificates by name goes by its
        // notBefore (rounded to the nearest second, one made just before
        // the rule could look made after it).
        let now = Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.down))
        let key = P256.Signing.PrivateKey(compactRepresentable: false)
        let certificate = try Certificate(
            version: .v3, serialNumber: Self.randomSerial(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-Self.backdate), notValidAfter: min(now.addingTimeInterval(validity), self.certificate.notValidAfter),
            issuer: self.certificate.subject,
            subject: try DistinguishedName { CommonName("warrant admin \(name)") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.clientAuth])
                SubjectAlternativeNames([.uniformResourceIdentifier("warrant-admin://\(clusterID)/\(name)")])
            },
            issuerPrivateKey: .init(self.key))
        return (certificate, key)
    }

    /// The admin name in a `warrant-admin://<cluster>/<name>` URI of this cluster.
    public static func adminName(inURI uri: String, clusterID: String) -> String? {
        let prefix = "warrant-admin://\(clusterID)/"
        guard uri.hasPrefix(prefix) else { return nil }
        let name = String(uri.dropFirst(prefix.count))
        return invalidAdminName(name) == nil ? name : nil
    }

    /// The CA's key in PEM (to be stored encrypted).
    public var privateKeyPEM: String { key.pemRepresentation }

    /// A CA loaded from its certificate and key.
    public init(clusterID: String, certificate: Certificate, privateKey: P256.Signing.PrivateKey) throws {
        guard certificate.publicKey == Certificate.PublicKey(privateKey.publicKey) else {
            throw PeerIdentityError(reason: "the CA key does not match the CA certificate")
        }
        self.init(clusterID: clusterID, certificate: certificate, key: privateKey)
    }

    private init(clusterID: String, certificate: Certificate, key: P256.Signing.PrivateKey) {
        self.clusterID = clusterID
        self.certificate = certificate
        self.key = key
    }

    /// An IP address SAN for a literal address, a DNS name otherwise.
    static func generalName(_ host: String) -> GeneralName {
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            return .ipAddress(ASN1OctetString(contentBytes: withUnsafeBytes(of: &v4) { ArraySlice($0) }))
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            return .ipAddress(ASN1OctetString(contentBytes: withUnsafeBytes(of: &v6) { ArraySlice($0) }))
        }
        return .dnsName(host)
    }

    static func nodeURI(clusterID: String, node: NodeID) -> String { "warrant-node://\(clusterID)/\(node)" }

    /// Positive, 16 random bytes with the top bit cleared, never zero.
    static func randomSerial() -> Certificate.SerialNumber {
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255) }
        bytes[0] &= 0x7F
        if bytes.allSatisfy({ $0 == 0 }) { bytes[15] = 1 }
        return Certificate.SerialNumber(bytes: bytes)
    }
}

/// One node's certificate and key, and the CA it trusts.
public struct NodeIdentity: Sendable {
    public let clusterID: String
    public let nodeID: NodeID
    public let certificate: Certificate
    public let privateKey: P256.Signing.PrivateKey
    public let caCertificate: Certificate

    public init(clusterID: String, nodeID: NodeID, certificate: Certificate, privateKey: P256.Signing.PrivateKey, caCertificate: Certificate) {
        self.clusterID = clusterID
        self.nodeID = nodeID
        self.certificate = certificate
        self.privateKey = privateKey
        self.caCertificate = caCertificate
    }

    /// The certificate in DER.
    public var certificateDER: [UInt8] {
        get throws {
            var serializer = DER.Serializer()
            try serializer.serialize(certificate)
            return serializer.serializedBytes
        }
    }

    /// The DNS names and IP addresses a certificate's SAN lists (its
    /// node URI left out), as `issueNodeIdentity` takes them; throws if the
    /// extension does not parse.
    public static func hosts(in certificate: Certificate) throws -> [String] {
        let names = try certificate.extensions.subjectAlternativeNames.map { Array($0) } ?? []
        return names.compactMap { name -> String? in
            switch name {
            case .dnsName(let host): return host
            case .ipAddress(let bytes):
                let raw = Array(bytes.bytes)
                var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                let family = raw.count == 4 ? AF_INET : (raw.count == 16 ? AF_INET6 : -1)
                guard family != -1, inet_ntop(family, raw, &text, socklen_t(text.count)) != nil else { return nil }
                return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            default: return nil
            }
        }
    }

    /// An identity read from PEM files: the cluster and node come from the
    /// certificate's `warrant-node://` URI, which must be the only one.
    public init(certificatePEM: String, privateKeyPEM: String, caCertificatePEM: String) throws {
        let certificate = try Certificate(pemEncoded: certificatePEM)
        let key = try P256.Signing.PrivateKey(pemRepresentation: privateKeyPEM)
        let ca = try Certificate(pemEncoded: caCertificatePEM)
        guard certificate.publicKey == Certificate.PublicKey(key.publicKey) else {
            throw PeerIdentityError(reason: "the private key does not match the certificate")
        }
        guard certificate.issuer == ca.subject else {
            throw PeerIdentityError(reason: "the certificate was not issued by the given CA (issuer \(certificate.issuer), CA \(ca.subject))")
        }
        let names = try certificate.extensions.subjectAlternativeNames.map { Array($0) } ?? []
        let uris = names.compactMap { name -> String? in
            if case .uniformResourceIdentifier(let uri) = name { return uri }
            return nil
        }
        guard let uri = uris.first(where: { $0.hasPrefix("warrant-node://") }), uris.count == 1 else {
            throw PeerIdentityError(reason: "the certificate names no single warrant-node://<cluster>/<id> URI")
        }
        let parts = uri.dropFirst("warrant-node://".count).split(separator: "/")
        guard parts.count == 2, let id = NodeID(parts[1]), id != noNode else {
            throw PeerIdentityError(reason: "'\(uri)' is not warrant-node://<cluster>/<id>")
        }
        self.init(clusterID: String(parts[0]), nodeID: id, certificate: certificate, privateKey: key, caCertificate: ca)
    }

    public var nioCertificate: NIOSSLCertificate {
        get throws { try NIOSSLCertificate(bytes: Array(try certificate.serializeAsPEM().pemString.utf8), format: .pem) }
    }

    public var nioCACertificate: NIOSSLCertificate {
        get throws { try NIOSSLCertificate(bytes: Array(try caCertificate.serializeAsPEM().pemString.utf8), format: .pem) }
    }

    public var nioPrivateKey: NIOSSLPrivateKey {
        get throws { try NIOSSLPrivateKey(bytes: Array(privateKey.pemRepresentation.utf8), format: .pem) }
    }

    /// Why a server's certificate (DER, nil if none) is not `node`'s of
    /// this cluster, or nil if it is: any node certificate the cluster CA
    /// signed passes TLS, so a client reaching a given node checks this.
    public static func refusal(ofServer der: [UInt8]?, expecting node: NodeID, clusterID: String) -> String? {
        let named = der.flatMap { nodeID(inCertificateDER: $0, clusterID: clusterID) }
        return named == node ? nil : "its certificate names \(named.map { "node \($0)" } ?? "no node of cluster \(clusterID)"), not node \(node)"
    }

    /// The node a peer certificate (DER) names in this cluster, if any.
    public static func nodeID(inCertificateDER der: [UInt8], clusterID: String) -> NodeID? {
        guard let certificate = try? Certificate(derEncoded: der),
              let names = try? certificate.extensions.subjectAlternativeNames else { return nil }
        let prefix = "warrant-node://\(clusterID)/"
        for name in names {
            if case .uniformResourceIdentifier(let uri) = name, uri.hasPrefix(prefix), let id = NodeID(uri.dropFirst(prefix.count)), id != noNode {
                return id
            }
        }
        return nil
    }
}

extension Certificate.SerialNumber {
    var hexDigits: String { bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined() }
}

private extension String {
    func leftPadded(to length: Int) -> String { count >= length ? self : String(repeating: "0", count: length - count) + self }
}
