import Foundation
@testable import Node
import Testing

@Suite("Hand-written response bodies")
struct APIBodyTests {
    private func parsed(_ bytes: [UInt8]) throws -> NSDictionary {
        try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? NSDictionary)
    }

    @Test("Issuance and verification bodies written by hand say exactly what JSONEncoder would")
    func sameAsEncoder() throws {
        let bodies: [any Encodable & HandEncodedJSON] = [
            X509SVIDBody(spiffeId: "spiffe://a/b", certificate: "-----BEGIN CERTIFICATE-----\nMII\n", bundle: "x\"y\\z", serial: "0a",
                         expiresAt: "2026-11-23T00:00:00Z", replayed: true),
            JWTSVIDBody(spiffeId: "spiffe://a/b", token: "h.c.s", expiresAt: "2026-11-23T00:00:00Z", replayed: false),
            VerifyBody(valid: true, spiffeId: "spiffe://a/b", serial: "ff", attributes: ["repo": "acme/api", "ctl": "\u{1}\t"], expiresAt: "t",
                       code: nil, reason: nil),
            VerifyBody(valid: false, spiffeId: nil, serial: nil, attributes: nil, expiresAt: nil, code: "revoked", reason: "by serial ff: \"leak\""),
        ]
        for body in bodies {
            #expect(try parsed(Array(body.json.utf8)) == parsed(APIJSON.encode(body)), "\(body.json)")
        }
    }
}
