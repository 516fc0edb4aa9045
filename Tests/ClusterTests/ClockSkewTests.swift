import ClusterHarness
import Foundation
import Node
import Testing

/// Real node processes, some under libfaketime: a node whose wall clock is
/// off signs no identity, and a leader with such a clock hands over.
@Suite("Clock skew between real nodes", .serialized)
struct ClockSkewTests {
    /// A ready 3-node cluster of real processes and the libfaketime
    /// library, for `body`; closed and removed after.
    private func withCluster(_ body: (LocalProcessCluster, _ library: String) async throws -> Void) async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let library = try #require(LocalProcessCluster.fakeTimeLibrary, "libfaketime is not installed (scripts/setup.sh installs faketime)")
        try await withClusterSlot {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-clock-\(UUID().uuidString.prefix(8))").path
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
            // A minute: at the start of a test run, suites of CPU-bound unit
            // tests share the two cores with these three processes (a CI run
            // saw an in-process cluster take 50 s to elect then, and this
            // one not elect within 20 s).
            #expect(await cluster.waitForLeader(seconds: 60) != nil)
            #expect(await cluster.waitUntilReady(), "\(cluster.notReadyReason())")
            do {
                try await body(cluster, library)
            } catch {
                Issue.record(error)
            }
            await cluster.close()
        }
    }

    /// Restarts `id` with its wall clock shifted by `seconds`.
    private func skew(_ cluster: LocalProcessCluster, _ id: UInt64, by seconds: Int, library: String) async throws {
        _ = await cluster.terminate(id)
        try cluster.start(id, extraEnvironment: ["LD_PRELOAD": library, "FAKETIME": "\(seconds > 0 ? "+" : "")\(seconds)s",
                                                 "FAKETIME_DONT_FAKE_MONOTONIC": "1"])
        #expect(await cluster.waitUntilReady(seconds: 30), "\(cluster.notReadyReason())")
    }

    private func metrics(_ cluster: LocalProcessCluster, _ id: UInt64) async -> [Substring] {
        ((try? await cluster.client.request(at: cluster.endpointIndex(of: id), .GET, "/metrics", timeout: .seconds(5)))?.text ?? "").split(separator: "\n")
    }

    /// Whether node `id` says its clock disagrees with the cluster's.
    private func disagrees(_ cluster: LocalProcessCluster, _ id: UInt64) async -> Bool? {
        switch await metrics(cluster, id).first(where: { $0.hasPrefix("warrant_clock_disagrees ") }) {
        case "warrant_clock_disagrees 1": return true
        case "warrant_clock_disagrees 0": return false
        default: return nil
        }
    }

    /// Every node's last log lines, for a failure's record.
    private func logs(_ cluster: LocalProcessCluster) -> String {
        [UInt64(1), 2, 3].map { "node \($0):\n" + cluster.logTail(of: $0, lines: 30) }.joined(separator: "\n")
    }

    /// A join token for a JWT-SVID (made through any node whose clock agrees).
    private func token(_ cluster: LocalProcessCluster) async throws -> String {
        let made = try await cluster.client.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                    body: Array(#"{"spiffe_id": "spiffe://warrant.local/ci/clock"}"#.utf8))
        #expect(made.status == .created || made.status == .ok, "\(made.text)")
        return try #require((try JSONSerialization.jsonObject(with: Data(made.body)) as? [String: Any])?["token"] as? String)
    }

    private func jwtRequest(_ token: String) -> [UInt8] {
        Array(#"{"token": "\#(token)", "audience": ["clock-test"]}"#.utf8)
    }

    @Test("A leader whose clock runs two minutes behind hands leadership to a node on time; identities issued after carry the cluster's time")
    func skewedLeaderHandsOver() async throws {
        try await withCluster { cluster, library in
            let first = try #require(await cluster.waitForLeader(seconds: 20))
            let victim = try #require([UInt64(1), 2, 3].first { $0 != first })
            try await skew(cluster, victim, by: -120, library: library)
            let onTime = try #require([UInt64(1), 2, 3].first { $0 != victim })
            // Both sides see it: the victim disagrees, its peers read it two minutes behind.
            #expect(await eventually(seconds: 20) { await disagrees(cluster, victim) == true })
            var line: Substring?
            let seen = await eventually(seconds: 20) {
                line = await metrics(cluster, onTime).first { $0.hasPrefix("warrant_clock_peer_offset_seconds{peer=\"\(victim)\"}") }
                return line.flatMap { Double($0.split(separator: " ").last ?? "") }.map { abs($0 + 120) < 5 } ?? false
            }
            #expect(seen, "node \(onTime) reads node \(victim)'s clock as: \(line.map(String.init) ?? "no offset line")")
            #expect(await disagrees(cluster, onTime) == false)

            // Hand the victim leadership; it passes it on to a node on time.
            var handedOver = false
            for _ in 0..<5 where !handedOver {
                _ = try? await cluster.client.request(.POST, "/v1/cluster/leader", headers: [("content-type", "application/json")],
                                                      body: Array(#"{"to": \#(victim)}"#.utf8))
                handedOver = await eventually(seconds: 5) {
                    cluster.logTail(of: victim, lines: 400).contains("handing leadership over: this node's clock disagrees")
                }
            }
            #expect(handedOver, "node \(victim) never led and handed over:\n\(cluster.logTail(of: victim, lines: 40))")
            var next: UInt64?
            #expect(await eventually(seconds: 20) {
                next = await cluster.waitForLeader(seconds: 5)
                return next != nil && next != victim
            }, "leader \(String(describing: next))")

            // Asked at the skewed node, the JWT-SVID comes from the leader on time.
            let secret = try await token(cluster)
            let answer = try await cluster.client.request(at: cluster.endpointIndex(of: victim), .POST, "/v1/svid/jwt",
                                                          headers: [("content-type", "application/json")], body: jwtRequest(secret))
            #expect(answer.status == .ok, "\(answer.text)")
            let jwt = (try? JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any])?["token"] as? String ?? ""
            let payload = jwt.split(separator: ".").dropFirst().first.map(String.init) ?? ""
            var base64 = payload.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
            base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
            let claims = Data(base64Encoded: base64).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
            let issuedAt = (claims?["iat"] as? NSNumber)?.doubleValue ?? 0
            #expect(abs(issuedAt - Date().timeIntervalSince1970) < 30, "iat \(issuedAt) is not the cluster's time")
            // A revocation asked at the skewed node is passed to the leader and stamped with its time, not the skewed one.
            let revoked = try await cluster.client.request(at: cluster.endpointIndex(of: victim), .POST, "/v1/revocations",
                                                           headers: [("content-type", "application/json")],
                                                           body: Array(#"{"spiffe_id": "spiffe://warrant.local/ci/clock", "reason": "skew test"}"#.utf8))
            #expect(revoked.status == .ok, "\(revoked.status) \(revoked.text.prefix(300))")
            let rules = (try? JSONSerialization.jsonObject(with: Data(revoked.body)) as? [String: Any])?["revocations"] as? [[String: Any]] ?? []
            let stamped = rules.first { $0["value"] as? String == "spiffe://warrant.local/ci/clock" }?["revoked_at"] as? String ?? ""
            let stampedAt = ISO8601DateFormatter().date(from: stamped)?.timeIntervalSince1970 ?? 0
            #expect(abs(stampedAt - Date().timeIntervalSince1970) < 30, "the rule is stamped \(stamped), not the cluster's time")
        }
    }

    @Test("When no two clocks agree, no node signs or judges: issuance, CRLs, revocations, join tokens and verification answer 503 clock_skew naming how far off the clock is")
    func noAgreementNoSigning() async throws {
        try await withCluster { cluster, library in
            let secret = try await token(cluster)
            try await skew(cluster, 2, by: 120, library: library)
            try await skew(cluster, 3, by: -120, library: library)
            let leader = try #require(await cluster.waitForLeader(seconds: 20))
            let judged = await eventually(seconds: 20) { await disagrees(cluster, leader) == true }
            let clockLines = await metrics(cluster, leader).filter { $0.hasPrefix("warrant_clock") }
            #expect(judged, "leader \(leader): \(clockLines)\n\(logs(cluster))")
            let answer = try await cluster.client.request(at: cluster.endpointIndex(of: leader), .POST, "/v1/svid/jwt",
                                                          headers: [("content-type", "application/json")], body: jwtRequest(secret))
            #expect(answer.status == .serviceUnavailable, "\(answer.status) \(answer.text)")
            #expect(answer.text.contains("\"clock_skew\"") && answer.text.contains(" s ") && answer.text.contains("signs no identity"), "\(answer.text)")
            // Nor a CRL, nor a revocation rule stamped with a clock nobody shares.
            let crl = try await cluster.client.request(at: cluster.endpointIndex(of: leader), .GET, "/v1/crl.pem")
            #expect(crl.status == .serviceUnavailable && crl.text.contains("signs no CRL"), "\(crl.status) \(crl.text.prefix(300))")
            let revocation = try await cluster.client.request(at: cluster.endpointIndex(of: leader), .POST, "/v1/revocations",
                                                              headers: [("content-type", "application/json")],
                                                              body: Array(#"{"spiffe_id": "spiffe://warrant.local/ci/clock"}"#.utf8))
            #expect(revocation.status == .serviceUnavailable && revocation.text.contains("records no revocation"),
                    "\(revocation.status) \(revocation.text.prefix(300))")
            // Nor a join token, whose expiry would come from this clock.
            let made = try await cluster.client.request(at: cluster.endpointIndex(of: leader), .POST, "/v1/tokens",
                                                        headers: [("content-type", "application/json")],
                                                        body: Array(#"{"spiffe_id": "spiffe://warrant.local/ci/clock-late"}"#.utf8))
            #expect(made.status == .serviceUnavailable && made.text.contains("makes no join token"), "\(made.status) \(made.text.prefix(300))")
            // Nor a verdict: an identity's expiry, and its authority's retirement, would be judged by this clock.
            let verdict = try await cluster.client.request(at: cluster.endpointIndex(of: leader), .POST, "/v1/verify",
                                                           headers: [("content-type", "application/json")],
                                                           body: Array(#"{"jwt": "a.b.c", "audience": "x"}"#.utf8))
            #expect(verdict.status == .serviceUnavailable && verdict.text.contains("gives no verdict"), "\(verdict.status) \(verdict.text.prefix(300))")
            // Nothing was signed or recorded: the audit has no issuance and no revocation.
            let audit = try await cluster.client.request(.GET, "/v1/audit?limit=50")
            #expect(audit.status == .ok && audit.text.contains("token.create"), "\(audit.status) \(audit.text.prefix(300))")
            #expect(!audit.text.contains("identity.issue") && !audit.text.contains("identity.revoke") && !audit.text.contains("clock-late"),
                    "\(audit.text.prefix(600))")
        }
    }
}
