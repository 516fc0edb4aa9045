import ClusterHarness
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Node
import Testing
import Yams

/// docs/openapi.yaml: which statuses each operation documents.
struct OpenAPIDocument {
    var operations: [String: Set<Int>] = [:] // "put /v1/documents/{name}" -> statuses

    init(path: String) throws {
        let root = try Yams.load(yaml: String(contentsOfFile: path, encoding: .utf8)) as? [String: Any]
        let paths = root?["paths"] as? [String: Any] ?? [:]
        for (template, item) in paths {
            for (method, operation) in item as? [String: Any] ?? [:] where ["get", "put", "post", "delete", "patch"].contains(method) {
                let responses = (operation as? [String: Any])?["responses"] as? [String: Any] ?? [:]
                operations["\(method) \(template)"] = Set(responses.keys.compactMap { Int($0) })
            }
        }
    }
}

@Suite("Node API over HTTPS", .serialized)
struct APITests {
    @Test("Every route is in docs/openapi.yaml and nothing else is")
    func openAPIMatchesRoutes() throws {
        let document = try OpenAPIDocument(path: "\(repositoryRoot)/docs/openapi.yaml")
        let routes = Set(NodeAPI.routes.map { "\($0.method.rawValue.lowercased()) \($0.template)" })
        #expect(Set(document.operations.keys) == routes)
    }

    @Test("Documents, forwarding, compare-and-set, reads, audit, metrics and every refusal, each status as documented")
    func scenario() async throws {
        let cluster = try await InProcessCluster.start()
        let document = try OpenAPIDocument(path: "\(repositoryRoot)/docs/openapi.yaml")
        var undocumented: [String] = []
        func call(_ connection: HTTPConnection, _ method: HTTPMethod, _ uri: String, route: String, body: String = "",
                  type: String = "application/json", expect status: Int, sourceLocation: SourceLocation = #_sourceLocation) async throws -> HTTPClientResponse {
            let response = try await connection.request(method, uri, headers: [("content-type", type)], body: Array(body.utf8))
            #expect(Int(response.status.code) == status, "\(method) \(uri): \(response.text)", sourceLocation: sourceLocation)
            let operation = "\(method.rawValue.lowercased()) \(route)"
            // A wrong method or unknown path has no operation to document it under.
            let documentedElsewhere = document.operations[operation] == nil && [404, 405].contains(Int(response.status.code))
            if !documentedElsewhere, document.operations[operation]?.contains(Int(response.status.code)) != true {
                undocumented.append("\(operation) -> \(response.status.code)")
            }
            return response
        }
        do {
            let leader = try #require(await cluster.waitForLeader())
            let follower = try #require([UInt64(1), 2, 3].first { $0 != leader })
            let other = try #require([UInt64(1), 2, 3].first { $0 != leader && $0 != follower })
            let toFollower = try await cluster.connection(to: follower)
            let toLeader = try await cluster.connection(to: leader)
            let toOther = try await cluster.connection(to: other)
            let anonymous = try await cluster.connection(to: follower, admin: false)

            // Open endpoints answer without a certificate; admin ones do not.
            _ = try await call(anonymous, .GET, "/healthz", route: "/healthz", expect: 200)
            #expect(try await eventually { try await anonymous.request(.GET, "/readyz").status == .ok })
            _ = try await call(anonymous, .GET, "/readyz", route: "/readyz", expect: 200)
            let unauthenticated = try await call(anonymous, .GET, "/v1/cluster/status", route: "/v1/cluster/status", expect: 401)
            #expect(unauthenticated.text.contains("unauthenticated"))
            _ = try await call(anonymous, .PUT, "/v1/documents/a", route: "/v1/documents/{name}", body: "{}", expect: 401)

            // Status on the leader lists every member with its match index.
            let status = try await call(toLeader, .GET, "/v1/cluster/status", route: "/v1/cluster/status", expect: 200)
            let body = try APIJSON.decode(ClusterStatusBody.self, from: status.body)
            #expect(body.role == "leader" && body.members.map(\.id) == [1, 2, 3] && body.members.allSatisfy { $0.role == "voter" && $0.matchIndex != nil })

            // A write sent to a follower is forwarded; the answer names the leader.
            let created = try await call(toFollower, .PUT, "/v1/documents/policies/ci?expected_version=0", route: "/v1/documents/{name}",
                                         body: "{\"allow\": [\"repo:acme/*\"]}", expect: 200)
            #expect(created.headers.first(name: "warrant-leader") == String(leader))
            #expect(created.headers.first(name: "warrant-forwarded-by") == String(follower))
            #expect(try APIJSON.decode(WriteResultBody.self, from: created.body).version == 1)
            // A linearizable read on the third node sees it at once.
            let read = try await call(toOther, .GET, "/v1/documents/policies/ci", route: "/v1/documents/{name}", expect: 200)
            #expect(try APIJSON.decode(DocumentBody.self, from: read.body).content == "{\"allow\": [\"repo:acme/*\"]}")
            #expect(await eventually {
                (try? await toOther.request(.GET, "/v1/documents/policies/ci?consistency=serializable"))?.status == .ok
            })

            // Compare-and-set.
            _ = try await call(toLeader, .PUT, "/v1/documents/policies/ci?expected_version=0", route: "/v1/documents/{name}", body: "{}", expect: 409)
            _ = try await call(toLeader, .PUT, "/v1/documents/policies/ci?expected_version=1", route: "/v1/documents/{name}",
                               body: "allow: [repo:acme/*]\n", type: "application/yaml", expect: 200)
            _ = try await call(toFollower, .DELETE, "/v1/documents/policies/ci?expected_version=1", route: "/v1/documents/{name}", expect: 409)
            _ = try await call(toFollower, .DELETE, "/v1/documents/policies/ci?expected_version=2", route: "/v1/documents/{name}", expect: 200)
            _ = try await call(toOther, .GET, "/v1/documents/policies/ci", route: "/v1/documents/{name}", expect: 404)
            _ = try await call(toLeader, .DELETE, "/v1/documents/policies/ci", route: "/v1/documents/{name}", expect: 404)
            _ = try await call(toLeader, .PUT, "/v1/documents/roles/a", route: "/v1/documents/{name}", body: "{\"r\":1}", expect: 200)
            let list = try await call(toOther, .GET, "/v1/documents?prefix=roles/", route: "/v1/documents", expect: 200)
            #expect(try APIJSON.decode(DocumentListBody.self, from: list.body).documents.map(\.name) == ["roles/a"])

            // Bad input: a specific error, and nothing changes (the audit chain does not grow).
            let before = try APIJSON.decode(AuditVerifyBody.self, from: try await call(toLeader, .GET, "/v1/audit/verify", route: "/v1/audit/verify", expect: 200).body)
            let refusals: [(HTTPMethod, String, String, String, String, Int, String)] = [
                (.PUT, "/v1/documents/bad", "/v1/documents/{name}", "{not json", "application/json", 400, "not valid JSON"),
                (.PUT, "/v1/documents/bad", "/v1/documents/{name}", "a: [1, 2", "application/yaml", 400, "not valid YAML"),
                (.PUT, "/v1/documents/bad", "/v1/documents/{name}", "{}", "text/plain", 415, "content-type must be"),
                (.PUT, "/v1/documents/Bad", "/v1/documents/{name}", "{}", "application/json", 400, "may hold only"),
                (.PUT, "/v1/documents/a/../b", "/v1/documents/{name}", "{}", "application/json", 400, "segment"),
                (.PUT, "/v1/documents/cluster/members/9", "/v1/documents/{name}", "{}", "application/json", 403, "reserved_name"),
                (.PUT, "/v1/documents/bad?expected_version=x", "/v1/documents/{name}", "{}", "application/json", 400, "expected_version"),
                (.PUT, "/v1/documents/bad", "/v1/documents/{name}", "\"" + String(repeating: "x", count: 300 << 10) + "\"", "application/json", 413, "limit"),
                (.PUT, "/v1/documents/bad", "/v1/documents/{name}", String(repeating: "x", count: 600 << 10), "application/json", 413, "larger than"),
                (.GET, "/v1/documents/bad?consistency=eventual", "/v1/documents/{name}", "", "application/json", 400, "consistency"),
                (.GET, "/v1/audit?limit=5000", "/v1/audit", "", "application/json", 400, "limit"),
                (.POST, "/v1/cluster/members", "/v1/cluster/members", "{\"id\": 2}", "application/json", 400, "expected"),
                (.POST, "/v1/cluster/members", "/v1/cluster/members", "{\"id\": 2, \"peer_address\": \"127.0.0.1:1\", \"api_address\": \"127.0.0.1:2\"}", "application/json", 409, "already a member"),
                (.DELETE, "/v1/cluster/members/99", "/v1/cluster/members/{id}", "", "application/json", 409, "not a member"),
                (.DELETE, "/v1/cluster/members/x", "/v1/cluster/members/{id}", "", "application/json", 400, "not a node id"),
                (.POST, "/v1/cluster/leader", "/v1/cluster/leader", "{\"to\": 42}", "application/json", 409, "not a voter"),
            ]
            // The oversized body closes the connection: send each refusal on a fresh one.
            for (method, uri, route, body, type, status, needle) in refusals {
                let connection = try await cluster.connection(to: follower)
                let response = try await call(connection, method, uri, route: route, body: body, type: type, expect: status)
                #expect(response.text.contains(needle), "\(method) \(uri): \(response.text)")
                await connection.close()
            }
            _ = try await call(toFollower, .GET, "/v1/nothing", route: "/v1/nothing", expect: 404)
            _ = try await call(toFollower, .POST, "/v1/documents/a", route: "/v1/documents/{name}", expect: 405)
            let after = try APIJSON.decode(AuditVerifyBody.self, from: try await call(toLeader, .GET, "/v1/audit/verify", route: "/v1/audit/verify", expect: 200).body)
            #expect(after.records == before.records && after.headHash == before.headHash, "refused requests appended audit records")

            // The audit chain: every change, by whom; identical on every node.
            let tail = try await call(toOther, .GET, "/v1/audit?after=0&limit=100", route: "/v1/audit", expect: 200)
            let records = try APIJSON.decode(AuditPageBody.self, from: tail.body).records
            #expect(records.first?.action == "membership.change")
            #expect(records.contains { $0.action == "document.put" && $0.target == "policies/ci" && $0.actor == "admin:admin" && $0.result == "ok: version 1" })
            #expect(records.contains { $0.action == "document.put" && $0.result.hasPrefix("rejected: version conflict") })
            #expect(try await eventually {
                var heads: Set<String> = []
                for connection in [toLeader, toFollower, toOther] {
                    let body = try APIJSON.decode(AuditVerifyBody.self, from: try await connection.request(.GET, "/v1/audit/verify").body)
                    guard body.intact else { return false }
                    heads.insert(body.headHash ?? "")
                }
                return heads.count == 1
            })

            // Metrics, without a certificate.
            let metrics = try await call(anonymous, .GET, "/metrics", route: "/metrics", expect: 200).text
            for name in ["warrant_raft_term ", "warrant_raft_role{role=\"follower\"} 1", "warrant_raft_commit_index ", "warrant_storage_write_seconds_bucket",
                         "warrant_raft_messages_received_total ", "warrant_api_forwarded_writes_total "] {
                #expect(metrics.contains(name), "missing \(name)")
            }
            // When this node's certificate expires: a year from the cluster's making.
            let expiry = try #require(metrics.firstMatch(of: /warrant_node_certificate_expiry_timestamp_seconds (\d+)/).flatMap { Double($0.output.1) })
            #expect(abs(expiry - Date().addingTimeInterval(365 * 86_400).timeIntervalSince1970) < 3_600, "\(expiry)")
            let leaderMetrics = try await call(toLeader, .GET, "/metrics", route: "/metrics", expect: 200).text
            #expect(leaderMetrics.contains("warrant_raft_role{role=\"leader\"} 1"))
            #expect(!leaderMetrics.contains("warrant_raft_commit_seconds_count 0\n"))
            for connection in [toLeader, toFollower, toOther, anonymous] { await connection.close() }
        } catch {
            Issue.record(error)
        }
        #expect(undocumented.isEmpty, "statuses missing from docs/openapi.yaml: \(undocumented)")
        await cluster.shutdown()
    }

    @Test("Membership: a node joins as a learner through a snapshot streamed in pieces, is promoted once caught up, takes leadership, and a founding node is removed")
    func membership() async throws {
        let cluster = try await InProcessCluster.start(snapshotEveryEntries: 100)
        do {
            let first = try #require(await cluster.waitForLeader())
            // 20 KB documents, enough for a snapshot of more than one 1 MiB piece.
            let large = Array("{\"pad\":\"\(String(repeating: "x", count: 20_000))\"}".utf8)
            for i in 0..<150 {
                let response = try await cluster.client.request(.PUT, "/v1/documents/seed/\(i)", headers: [("content-type", "application/json")], body: large)
                #expect(response.status == .ok)
            }
            #expect(await eventually { await cluster.status(first)?.snapshotIndex ?? 0 >= 100 }, "the leader compacted its log")
            let peer = try HostPort(parsing: "127.0.0.1:\(cluster.basePort + 3)", at: "peer")
            let api = try HostPort(parsing: "127.0.0.1:\(cluster.basePort + 103)", at: "api")
            let listing = try ClusterListing(directory: cluster.directory)
            try ClusterFiles.addNode(directory: cluster.directory, member: .init(id: 4, peer: peer, api: api), peers: listing.members)
            try cluster.start(4)
            let add = try await cluster.client.request(.POST, "/v1/cluster/members", headers: [("content-type", "application/json")],
                                                       body: APIJSON.encode(AddMemberRequest(id: 4, peerAddress: peer.description, apiAddress: api.description)))
            #expect(add.status == .accepted, "\(add.text)")
            #expect(await eventually {
                guard let status = await cluster.status(first) else { return false }
                return status.members.first { $0.id == 4 }?.role == "voter"
            }, "node 4 was not promoted")
            // Node 4 has the data, and can lead.
            #expect(await eventually { await cluster.status(4)?.appliedIndex ?? 0 >= 152 })
            let toFour = try await cluster.connection(to: 4)
            let seed = try await toFour.request(.GET, "/v1/documents/seed/7?consistency=serializable")
            #expect(seed.status == .ok && seed.body.count > 10_000)
            let metrics = try await toFour.request(.GET, "/metrics").text
            #expect(metrics.contains("warrant_raft_snapshots_installed_total 1"), "node 4 caught up through a snapshot")
            let staged = metrics.split(separator: "\n").first { $0.hasPrefix("warrant_raft_snapshot_bytes_staged_total ") }
                .flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
            #expect(staged > 1 << 20, "streamed in more than one 1 MiB piece: \(staged) bytes staged")
            let currentLeader = try #require(await cluster.waitForLeader())
            let transfer = try await cluster.client.request(.POST, "/v1/cluster/leader", headers: [("content-type", "application/json")],
                                                            body: APIJSON.encode(TransferRequest(to: 4)), startingAt: Int(currentLeader) - 1)
            #expect(transfer.status == .ok, "\(transfer.text)")
            #expect(await eventually { await cluster.status(4)?.role == "leader" })
            // Node 1's certificate speaks for a node while node 1 is a member, and for no one once it is removed.
            func auditAsNodeOne() async throws -> HTTPResponseStatus {
                let connection = try await cluster.connection(to: 4, asNode: 1)
                defer { Task { await connection.close() } }
                return try await connection.request(.GET, "/v1/audit?limit=1").status
            }
            #expect(try await auditAsNodeOne() == .ok, "a member's certificate")
            // Remove founding node 1; the cluster keeps working without it.
            let remove = try await toFour.request(.DELETE, "/v1/cluster/members/1")
            #expect(remove.status == .ok, "\(remove.text)")
            #expect(await eventually { await cluster.status(4)?.members.map(\.id) == [2, 3, 4] })
            #expect(try await auditAsNodeOne() == .unauthorized, "a removed node's certificate")
            // Nor does its actor header reach the audit through a refusal the HTTP layer makes itself (a body over the limit).
            let asRemoved = try await cluster.connection(to: 4, asNode: 1)
            let oversized = try await asRemoved.request(.POST, "/v1/join", headers: [("content-type", "application/json"), ("warrant-actor", "admin:alice")],
                                                        body: [UInt8](repeating: 0x20, count: 600_000))
            #expect(oversized.status == .payloadTooLarge)
            await asRemoved.close()
            func denials() async throws -> [String] {
                let page = try await toFour.request(.GET, "/v1/audit?limit=1000")
                let records = (try? JSONSerialization.jsonObject(with: Data(page.body)) as? [String: Any])?["records"] as? [[String: Any]] ?? []
                return records.filter { $0["action"] as? String == "identity.deny" && ($0["result"] as? String ?? "").contains("too_large") }
                    .map { $0["actor"] as? String ?? "" }
            }
            let denied = try await eventually { try await denials() == ["anonymous"] }
            let actors = try await denials()
            #expect(denied, "\(actors)")
            let write = try await toFour.request(.PUT, "/v1/documents/after/removal", headers: [("content-type", "application/json")], body: Array("{}".utf8))
            #expect(write.status == .ok, "\(write.text)")
            await toFour.close()
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }

    @Test("'warrant audit verify' passes when every node's chain verifies and they agree, and fails when a node could not be checked")
    func auditVerifyNeedsEveryNode() async throws {
        let cluster = try await InProcessCluster.start()
        do {
            _ = try #require(await cluster.waitForLeader())
            for i in 0..<3 {
                let response = try await cluster.client.request(.PUT, "/v1/documents/verify/\(i)", headers: [("content-type", "application/json")], body: Array("{}".utf8))
                #expect(response.status == .ok)
            }
            let binary = try #require(warrantBinary())
            let apis = (1...3).map { "127.0.0.1:\(cluster.basePort + 100 + $0 - 1)" }
            let verified = try run(["audit", "verify", "--dir", cluster.directory, "--endpoints", apis.joined(separator: ",")], executable: binary)
            #expect(verified.status == 0 && verified.output.contains("all 3 nodes agree"), "\(verified.output)")
            let dead = "127.0.0.1:\(LocalProcessCluster.pickBasePort())"
            let partial = try run(["audit", "verify", "--dir", cluster.directory, "--endpoints", (apis + [dead]).joined(separator: ",")], executable: binary)
            #expect(partial.status != 0 && partial.output.contains("\(dead): NOT VERIFIED"), "\(partial.output)")
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }

    @Test("A node that started before and finds its data directory empty refuses to start from nothing; a node's first start, or one before the record was kept, is recorded")
    func emptiedDataDirectoryIsRefused() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-emptied-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let basePort = LocalProcessCluster.pickBasePort()
        let peer = try HostPort(parsing: "127.0.0.1:\(basePort)", at: "peer"), api = try HostPort(parsing: "127.0.0.1:\(basePort + 100)", at: "api")
        try ClusterFiles.initialize(directory: directory, clusterID: "emptied", members: [ClusterFiles.Member(id: 1, peer: peer, api: api)])
        let configPath = "\(directory)/node-1/config.yaml"
        let config = try NodeConfig(yaml: try String(contentsOfFile: configPath, encoding: .utf8))
        let marker = "\(directory)/node-1/data.started"
        #expect(try NodeServer.openStore(config, configPath: configPath).hasState)
        #expect(FileManager.default.fileExists(atPath: marker), "the first start is recorded")
        // The data disk is not there at the next start.
        try FileManager.default.removeItem(atPath: "\(directory)/node-1/data")
        let refused = try #require(throws: FileProblem.self) { try NodeServer.openStore(config, configPath: configPath) }
        #expect(refused.problem.contains("started here before"), "\(refused.problem)")
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/node-1/data/wal"), "no Raft state was started")
        // A node started before the record was kept gets one; a brand-new start once it is deleted.
        try FileManager.default.removeItem(atPath: marker)
        #expect(try NodeServer.openStore(config, configPath: configPath).hasState)
        try FileManager.default.removeItem(atPath: marker)
        #expect(try NodeServer.openStore(config, configPath: configPath).hasState)
        #expect(FileManager.default.fileExists(atPath: marker))
    }

    @Test("A node whose peer or API port is taken stops with an error naming the address, and never serves", arguments: ["peer", "api"])
    func portTaken(which: String) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-port-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let basePort = LocalProcessCluster.pickBasePort()
        let peer = try HostPort(parsing: "127.0.0.1:\(basePort)", at: "peer"), api = try HostPort(parsing: "127.0.0.1:\(basePort + 100)", at: "api")
        try ClusterFiles.initialize(directory: directory, clusterID: "porttest", members: [ClusterFiles.Member(id: 1, peer: peer, api: api)])
        let taken = which == "peer" ? peer : api
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let holder = try await ServerBootstrap(group: group).bind(host: taken.host, port: taken.port).get()
        let server = try NodeServer(configPath: "\(directory)/node-1/config.yaml")
        let run = Task { try await server.run(handleSignals: false) }
        let outcome = await withTaskGroup(of: Result<Void, any Error>?.self) { group in
            group.addTask { await run.result }
            group.addTask {
                // A node that starts anyway is stopped, so the test ends.
                try? await Task.sleep(for: .seconds(20))
                server.stop()
                return nil
            }
            let first = await group.next()!
            group.cancelAll()
            return first
        }
        switch outcome {
        case .failure(let error as NodeStartError):
            let expected = which == "peer" ? "cannot listen for peers on \(peer)" : "cannot serve the API on \(api)"
            #expect(error.message.hasPrefix(expected), "\(error.message)")
        default:
            Issue.record("run() should have thrown a NodeStartError, got \(String(describing: outcome))")
        }
        if which == "peer" {
            // The API was never opened: nothing answers on its port.
            await #expect(throws: (any Error).self) {
                let channel = try await ClientBootstrap(group: group).connect(host: api.host, port: api.port).get()
                try await channel.close()
            }
        }
        try await holder.close()
        try await group.shutdownGracefully()
    }
}

@Suite("API bodies")
struct APIBodyTests {
    @Test("The hand-written write answer is exactly what the JSON encoder writes", arguments: [UInt64?.some(3), nil])
    func writeResultJSON(version: UInt64?) {
        let body = WriteResultBody(name: "policies/ci-1.yaml", version: version, deleted: version == nil, logIndex: 42, leader: 2)
        #expect(String(decoding: body.json, as: UTF8.self) == String(decoding: APIJSON.encode(body), as: UTF8.self))
    }
}
