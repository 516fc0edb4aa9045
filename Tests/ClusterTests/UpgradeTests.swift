import Foundation
import Ledger
import NIOHTTP1
@testable import Node
import Raft
import Testing

/// Finishing an upgrade: the cluster adopts newer ledger rules only once
/// every member's build knows them, and a node left on an older build
/// stops at the adopting entry instead of applying on differently.
@Suite("Ledger rules upgrades", .serialized)
struct UpgradeTests {
    @Test("Newer ledger rules are adopted only when every member's build knows them; then every node applies by them; an older build stops at the entry")
    func adoptRules() async throws {
        let cluster = try await InProcessCluster.start()
        do {
            let leader = try #require(await cluster.waitForLeader())
            let follower = try #require([UInt64(1), 2, 3].first { $0 != leader })
            let other = try #require([UInt64(1), 2, 3].first { $0 != leader && $0 != follower })
            let admin = try await cluster.connection(to: follower)
            defer { Task { await admin.close() } }
            func adopt(_ body: String) async throws -> HTTPClientResponse {
                try await admin.request(.POST, "/v1/cluster/rules", headers: [("content-type", "application/json")], body: Array(body.utf8))
            }
            func rules(_ id: UInt64) async -> [UInt32?] {
                let status = await cluster.status(id)
                return [status?.rulesInForce, status?.rulesKnown]
            }
            func setKnown(_ known: [UInt64: UInt32]) throws {
                for (id, version) in known { try #require(cluster.servers[id]?.store.ledger).setRulesKnownForTesting(version) }
            }
            for id in [UInt64(1), 2, 3] {
                #expect(await rules(id) == [LedgerRules.initial, LedgerRules.known], "node \(id)")
            }
            for (body, status, code) in [("{}", 400, "bad_request"), ("{\"version\": -1}", 400, "bad_request"),
                                         ("{\"version\": \(LedgerRules.known + 1)}", 409, "rules_unknown"),
                                         ("{\"version\": \(LedgerRules.initial)}", 409, "rules_in_force")] {
                let response = try await adopt(body)
                #expect(Int(response.status.code) == status && response.text.contains(code), "\(body): \(response.text)")
            }

            // The upgrade: every build knows version 2 but one member's.
            try setKnown([leader: 2, follower: 2, other: 1])
            let behind = try await adopt("{\"version\": 2}")
            #expect(behind.status == .conflict && behind.text.contains("member_behind") && behind.text.contains("node \(other)"), "\(behind.text)")
            #expect(await rules(leader) == [1, 2], "nothing adopted")
            try setKnown([other: 2])
            let adopted = try await adopt("{\"version\": 2}")
            #expect(adopted.status == .ok, "\(adopted.text)")
            let body = try APIJSON.decode(RulesBody.self, from: adopted.body)
            #expect(body.rulesInForce == 2 && body.membersKnow == ["1": 2, "2": 2, "3": 2], "\(adopted.text)")
            for id in [UInt64(1), 2, 3] {
                #expect(await eventually { await rules(id) == [2, 2] }, "node \(id) applies by version 2")
            }
            let audit = try await admin.request(.GET, "/v1/audit?limit=1000").text
            #expect(audit.contains("ledger.rules") && audit.contains("version 2"), "the adoption is audited")

            // A node added now must have a build that knows version 2: asked
            // at its API address (before it is a member, so through the open
            // /readyz), it must answer as itself, within 3 s.
            func address(_ port: Int) throws -> HostPort { try HostPort(parsing: "127.0.0.1:\(port)", at: "address") }
            let four = ClusterFiles.Member(id: 4, peer: try address(cluster.basePort + 3), api: try address(cluster.basePort + 103))
            try ClusterFiles.addNode(directory: cluster.directory, member: four, peers: try ClusterListing(directory: cluster.directory).members,
                                     electionTimeoutTicks: InProcessCluster.electionTimeoutTicks)
            try cluster.start(4)
            try setKnown([4: 1])
            #expect(await eventually {
                guard let open = try? await cluster.connection(to: 4, admin: false) else { return false }
                defer { Task { await open.close() } }
                return (try? await open.request(.GET, "/readyz")) != nil
            }, "node 4's API listens")
            func add(_ id: UInt64, api: HostPort) async throws -> HTTPClientResponse {
                try await admin.request(.POST, "/v1/cluster/members", headers: [("content-type", "application/json")],
                                        body: APIJSON.encode(AddMemberRequest(id: id, peerAddress: four.peer.description, apiAddress: api.description)))
            }
            let olderBuild = try await add(4, api: four.api)
            #expect(olderBuild.status == .conflict && olderBuild.text.contains("member_behind") && olderBuild.text.contains("node 4's build applies ledger rules up to version 1"),
                    "\(olderBuild.text)")
            let impostor = try await add(5, api: try address(cluster.basePort + 100 + Int(other) - 1))
            #expect(impostor.status == .serviceUnavailable && impostor.text.contains("member_unreachable") && impostor.text.contains("names node \(other), not node 5"),
                    "\(impostor.text)")
            let silent = try await add(5, api: try address(cluster.basePort + 104))
            #expect(silent.status == .serviceUnavailable && silent.text.contains("member_unreachable"), "\(silent.text)")
            #expect(await cluster.status(leader)?.members.map(\.id) == [1, 2, 3], "no one was added")
            try setKnown([4: 2])
            let added = try await add(4, api: four.api)
            #expect(added.status == .accepted, "\(added.text)")
            #expect(await eventually { await rules(4) == [2, 2] }, "node 4 applies by version 2")

            // A node left on an older build (the member check bypassed, as a
            // node downgraded after it would be) stops at the entry.
            try setKnown([leader: 3, follower: 3, 4: 3, other: 2])
            let leaderDriver = try #require(cluster.servers[leader]).driver
            let (outcome, _) = try await leaderDriver.write(LedgerCommand(timeMillis: 1, actor: "test", requestID: "adopt-3", operation: .adoptRules(version: 3)))
            #expect(outcome.result == .written(version: 2))
            let olderDriver = try #require(cluster.servers[other]).driver
            #expect(await eventually {
                do {
                    _ = try await olderDriver.linearizableReadIndex()
                    return false
                } catch DriverError.stopped {
                    return true
                } catch {
                    return false
                }
            }, "node \(other) stopped")
            #expect(try cluster.servers[other]?.store.ledger?.rules.inForce == 2, "node \(other) did not apply the entry")
            // It serves nothing from its frozen state, and says why.
            let stopped = try await cluster.connection(to: other, admin: false)
            defer { Task { await stopped.close() } }
            for path in ["/healthz", "/readyz", "/v1/bundle"] {
                let answer = try await stopped.request(.GET, path)
                #expect(answer.status == .serviceUnavailable && answer.text.contains("node_stopped") && answer.text.contains("rules version 3"),
                        "\(path): \(answer.text)")
            }
            #expect(try await stopped.request(.GET, "/metrics").status == .ok)
            #expect(await eventually { await rules(follower) == [3, 3] })
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }
}
