import Crypto
import Foundation
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
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(validity),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
            },
            issuerPrivateKey: .init(key))
        return ClusterCA(clusterID: clusterID, certificate: certificate, key: key)
    }

    /// A certificate for node `id`, valid for both ends of a connection.
    public func issueNodeIdentity(_ id: NodeID, now: Date = Date(), validity: TimeInterval = 365 * 86_400) throws -> NodeIdentity {
        let key = P256.Signing.PrivateKey(compactRepresentable: false)
        let certificate = try Certificate(
            version: .v3, serialNumber: Self.randomSerial(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: min(now.addingTimeInterval(validity), self.certificate.notValidAfter),
            issuer: self.certificate.subject,
            subject: try DistinguishedName { CommonName("warrant node \(id)") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames([.uniformResourceIdentifier(Self.nodeURI(clusterID: clusterID, node: id))])
            },
            issuerPrivateKey: .init(self.key))
        return NodeIdentity(clusterID: clusterID, nodeID: id, certificate: certificate, privateKey: key, caCertificate: self.certificate)
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
