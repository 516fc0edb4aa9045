import Authority
import Crypto
import Foundation
import Ledger
@testable import Node
import Raft
import Testing
import X509

/// `count` join token secrets for `spiffeID`, made by an admin.
private func joinTokens(_ count: Int, for spiffeID: String, _ admin: HTTPConnection) async throws -> [String] {
    var tokens: [String] = []
    for _ in 0..<count {
        tokens.append(try #require(object(try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                                  body: json(["spiffe_id": spiffeID])))["token"] as? String))
    }
    return tokens
}

@Suite("What an issuance writes to the log", .serialized)
struct IssuanceLogTests {
    @Test("The identity itself travels in the log only when an idempotency key asks for it to be kept, a JWT-SVID sealed with the KEK in the log and in every node's ledger; a retry with the key gets it back")
    func artifactOnlyWithIdempotencyKey() async throws {
        try await InProcessCluster.withReadyFollower { cluster, leader, follower, admin, open in
            let tokens = try await joinTokens(3, for: "spiffe://warrant.local/ci/log", admin)
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
            // The kept JWT-SVID is a bearer token: sealed, its claims nowhere in the clear, opened by any node's KEK.
            let kept = issuances.filter { !$0.idempotencyKey.isEmpty }.map(\.artifact)
            #expect(kept.count == 1 && kept[0].starts(with: Array("WSA1".utf8)), "the kept JWT-SVID is not sealed")
            let claims = Array(jwt.split(separator: ".")[1].utf8)
            #expect(!String(decoding: kept[0], as: UTF8.self).contains(String(decoding: claims, as: UTF8.self)))
            #expect(try #require(cluster.servers[leader]).authority.openKept(kept[0]) == Array(jwt.utf8))
            let followerServer = try #require(cluster.servers[follower])
            #expect(await eventually { (try? followerServer.store.ledgerAppliedIndex()) ?? 0 >= applied })
            let document = try #require(try followerServer.store.document(named: AuthorityDocuments.idempotency(AuthorityService.hash("deploy-7"))))
            let answer = try JSONDecoder().decode(IdempotentAnswer.self, from: Data(document.content))
            #expect(try followerServer.authority.openKept(Array(answer.artifact)) == Array(jwt.utf8), "a follower (a leader after a failover) opens it too")
            // A JWT kept before sealing began is its own bytes, and opens as itself; a sealed one altered opens as nothing.
            #expect(try followerServer.authority.openKept(Array(jwt.utf8)) == Array(jwt.utf8))
            var altered = kept[0]
            altered[altered.count - 1] ^= 1
            #expect(throws: AuthorityError.self) { try followerServer.authority.openKept(altered) }
        }
    }

    @Test("A follower verifies an identity the cluster issued by its record (the SHA-256 the log carried), without checking its signature; one the same key signed outside the records gets its signature checked")
    func verifiedByRecord() async throws {
        try await InProcessCluster.withReadyFollower { cluster, leader, follower, admin, open in
            let tokens = try await joinTokens(2, for: "spiffe://warrant.local/ci/recorded", admin)
            let issued = try await open.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                                body: json(["token": tokens[0], "audience": ["a"]]))
            let jwt = try #require(object(issued)["token"] as? String)
            let issuedX509 = try await open.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                                    body: json(["token": tokens[1], "csr": try opensslCSR(in: cluster.directory, name: "recorded")]))
            let certificate = try #require(object(issuedX509)["certificate"] as? String)
            // The follower has the record once it applied what the leader did.
            let leaderApplied = try #require(cluster.servers[leader]).store.ledgerAppliedIndex()
            let followerStore = try #require(cluster.servers[follower]).store
            #expect(await eventually { (try? followerStore.ledgerAppliedIndex()) ?? 0 >= leaderApplied })

            func counters() async throws -> (checked: Int, recorded: Int) {
                let text = (try await open.request(.GET, "/metrics")).text
                func value(_ name: String) -> Int {
                    text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Int($0.split(separator: " ").last ?? "") } ?? -1
                }
                return (value("warrant_verify_signatures_checked_total"), value("warrant_verify_recorded_total"))
            }
            func verify(_ body: [String: Any]) async throws -> [String: Any] {
                object(try await open.request(.POST, "/v1/verify", headers: [("content-type", "application/json")], body: json(body)))
            }
            let before = try await counters()
            #expect(try await verify(["jwt": jwt, "audience": "a"])["spiffe_id"] as? String == "spiffe://warrant.local/ci/recorded")
            #expect(try await verify(["x509_chain": certificate])["spiffe_id"] as? String == "spiffe://warrant.local/ci/recorded")
            let afterRecorded = try await counters()
            #expect(afterRecorded.recorded == before.recorded + 2 && afterRecorded.checked == before.checked, "\(before) -> \(afterRecorded)")

            // Signed by the active keys, never recorded: valid, by their signatures.
            let keys = try #require(try cluster.servers[follower]!.authority.keys())
            let outsideID = try SpiffeID(parsing: "spiffe://warrant.local/ci/outside")
            let outsideJWT = try keys.jwt.issue(spiffeID: outsideID, audiences: ["a"], ttl: 60, attributes: [:])
            let outsideX509 = try keys.x509.issue(spiffeID: outsideID, publicKey: .init(P256.Signing.PrivateKey().publicKey), ttl: 60, attributes: [:])
            #expect(try await verify(["jwt": outsideJWT.token, "audience": "a"])["valid"] as? Bool == true)
            #expect(try await verify(["x509_chain": outsideX509.pem])["valid"] as? Bool == true)
            let afterOutside = try await counters()
            #expect(afterOutside.checked == afterRecorded.checked + 2 && afterOutside.recorded == afterRecorded.recorded, "\(afterRecorded) -> \(afterOutside)")
        }
    }

    @Test("Past storage.identity_records_max kept records the leader signs nothing (503 ledger_full, the token left unused) until the first expires; then an issuance forgets expired records and goes ahead")
    func identityRecordsLimit() async throws {
        // Indented: it continues the storage section the test cluster's configuration ends with.
        try await InProcessCluster.withReadyFollower(extraConfig: "  identity_records_max: 2\n") { cluster, leader, follower, admin, open in
            let tokens = try await joinTokens(4, for: "spiffe://warrant.local/ci/full", admin)
            func issue(_ token: String) async throws -> HTTPClientResponse {
                try await open.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                       body: json(["token": token, "audience": ["a"], "ttl_seconds": 12]))
            }
            for token in tokens[..<2] {
                let issued = try await issue(token)
                #expect(issued.status == .ok, "\(issued.text)")
            }
            let store = try #require(cluster.servers[leader]).store
            #expect(try store.issuedRecordCount() == 2)
            let applied = try store.ledgerAppliedIndex()
            let refused = try await issue(tokens[2])
            #expect(refused.status == .serviceUnavailable && refused.text.contains("\"ledger_full\"") && refused.text.contains("identity_records_max"),
                    "\(refused.text)")
            // Expiry is in whole seconds, 11 to 12 s after issue (iat is the
            // second it began). (12 s, not 4: a busy machine held this test
            // seconds between the issuances and the refusal.)
            #expect(refused.headers.first(name: "retry-after").flatMap(Int.init).map { (1...13).contains($0) } == true)
            #expect(await eventually {
                let metrics = (try? await admin.request(.GET, "/metrics").text) ?? ""
                return metrics.contains("warrant_ledger_identity_records 2\n") && metrics.contains("warrant_ledger_identity_records_max 2\n")
            }, "a follower counts the records it applied too")
            #expect(try store.ledgerAppliedIndex() == applied, "nothing was proposed")
            // The refused token was not used: once the first record has
            // expired it is accepted, and the expired records go.
            #expect(await eventually(seconds: 60) { (try? await issue(tokens[2]))?.status == .ok })
            #expect(try store.issuedRecordCount() <= 2)
            #expect(await eventually(seconds: 60) { (try? await issue(tokens[3]))?.status == .ok })
            #expect(try store.issuedRecordCount() <= 2, "the limit holds")
            let followerStore = try #require(cluster.servers[follower]).store
            #expect(await eventually { (try? followerStore.issuedRecordCount()) == (try? store.issuedRecordCount()) })
        }
    }
}
