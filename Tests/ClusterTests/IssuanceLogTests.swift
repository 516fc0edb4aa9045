import Foundation
import Ledger
@testable import Node
import Raft
import Testing

@Suite("What an issuance writes to the log", .serialized)
struct IssuanceLogTests {
    @Test("The identity itself travels in the log only when an idempotency key asks for it to be kept; a retry with the key gets it back")
    func artifactOnlyWithIdempotencyKey() async throws {
        try await InProcessCluster.withReadyFollower { cluster, leader, _, admin, open in
            var tokens: [String] = []
            for _ in 0..<3 {
                tokens.append(try #require(object(try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                                          body: json(["spiffe_id": "spiffe://warrant.local/ci/log"])))["token"] as? String))
            }
            let csr = try opensslCSR(in: cluster.directory, name: "log")
            let plain = try await open.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                               body: json(["token": tokens[0], "csr": csr]))
            #expect(plain.status == .ok, "\(plain.text)")
            let plainJWT = try await open.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                                  body: json(["token": tokens[1], "audience": ["a"]]))
            #expect(plainJWT.status == .ok, "\(plainJWT.text)")
            let keyed = json(["token": tokens[2], "audience": ["a"], "idempotency_key": "deploy-7"])
            let first = try await open.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")], body: keyed)
            let again = try await open.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")], body: keyed)
            let jwt = try #require(object(first)["token"] as? String)
            #expect(object(again)["token"] as? String == jwt && object(again)["replayed"] as? Bool == true)

            let store = try #require(cluster.servers[leader]).store
            let applied = try store.ledgerAppliedIndex()
            var issuances: [Issuance] = []
            for entry in try store.logEntries(from: 1, through: applied) {
                guard case .command(let bytes) = entry.payload, case .recordIssuance(let issuance) = try LedgerCommand(decoding: bytes).operation else { continue }
                issuances.append(issuance)
            }
            #expect(issuances.count == 3, "one entry per identity issued; the retry wrote none")
            let withoutKey = issuances.filter { $0.idempotencyKey.isEmpty }
            #expect(withoutKey.count == 2 && withoutKey.allSatisfy { $0.artifact.isEmpty && !$0.fingerprint.isEmpty && !$0.serial.isEmpty })
            #expect(issuances.filter { !$0.idempotencyKey.isEmpty }.map(\.artifact) == [Array(jwt.utf8)])
        }
    }
}
