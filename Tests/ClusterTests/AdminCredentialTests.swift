import ClusterHarness
import Foundation
import NIOHTTP1
@testable import Node
import Authority
import Ledger
import Transport
import Testing
import X509

/// Admin certificates made offline from the cluster CA, and revoked
/// through the cluster: every node refuses a revoked one at once, the
/// leader too when a follower that has not applied the rule yet forwards
/// its write.
@Suite("Admin certificates", .serialized)
struct AdminCredentialTests {
    @Test("An admin certificate made with 'admin issue' works on every node until revoked; revoked by serial or by name, on every node; bad input writes nothing")
    func issueAndRevoke() async throws {
        let cluster = try await InProcessCluster.start()
        do {
            let leader = try #require(await cluster.waitForLeader())
            let follower = try #require([UInt64(1), 2, 3].first { $0 != leader })
            let directory = cluster.directory
            func credentials(_ name: String, in out: String = directory) -> (certificate: String, key: String) {
                ("\(out)/admin-\(name).pem", "\(out)/admin-\(name).key")
            }
            func status(_ id: UInt64, as who: (certificate: String, key: String)?, _ method: HTTPMethod = .GET,
                        _ path: String = "/v1/cluster/status") async throws -> (HTTPResponseStatus, String) {
                let connection = try await cluster.connection(to: id, credentials: who)
                defer { Task { await connection.close() } }
                let response = try await connection.request(method, path)
                return (response.status, response.text)
            }
            let alice = try ClusterFiles.issueAdmin(directory: directory, name: "alice", validity: 3_600, out: directory)
            let aliceSerial = Hex.encode(alice.serialNumber.bytes)
            #expect(alice.notValidAfter.timeIntervalSinceNow > 3_500 && alice.notValidAfter.timeIntervalSinceNow < 3_700)
            #expect(throws: FileProblem.self, "credentials are never overwritten") {
                try ClusterFiles.issueAdmin(directory: directory, name: "alice", validity: 60, out: directory)
            }
            let bobOut = directory + "/bob-laptop"
            try FileManager.default.createDirectory(atPath: bobOut, withIntermediateDirectories: true)
            _ = try ClusterFiles.issueAdmin(directory: directory, name: "bob", validity: 3_600, out: directory)
            _ = try ClusterFiles.issueAdmin(directory: directory, name: "bob", validity: 3_600, out: bobOut)
            for id in [UInt64(1), 2, 3] {
                #expect(try await status(id, as: credentials("alice")).0 == .ok, "alice on node \(id) before any rule")
            }

            // Bad input: a specific 4xx, and no list is written.
            let root = try await cluster.connection(to: follower)
            defer { Task { await root.close() } }
            // (The identity revocation below needs the trust domain's keys, which the first leader makes.)
            #expect(await eventually { (try? await root.request(.GET, "/readyz"))?.status == .ok }, "ready once the trust domain's keys exist")
            func revoke(_ body: String, on connection: HTTPConnection) async throws -> HTTPClientResponse {
                try await connection.request(.POST, "/v1/cluster/admin-revocations", headers: [("content-type", "application/json")], body: Array(body.utf8))
            }
            let long = String(repeating: "r", count: 257)
            for (body, code) in [("{}", "bad_request"), ("{\"serial\": \"\(aliceSerial)\", \"name\": \"alice\"}", "bad_request"),
                                 ("{\"serial\": \"xyz\"}", "bad_revocation"), ("{\"serial\": \"\(String(repeating: "a", count: 65))\"}", "bad_revocation"),
                                 ("{\"name\": \"a/b\"}", "bad_revocation"), ("{\"name\": \"\"}", "bad_revocation"),
                                 ("{\"name\": \"alice\", \"reason\": \"\(long)\"}", "bad_revocation"),
                                 ("{\"name\": \"alice\", \"reason\": \"a\\u0007b\"}", "bad_revocation"), ("[1]", "bad_request")] {
                let response = try await revoke(body, on: root)
                #expect(response.status == .badRequest && response.text.contains("\"\(code)\""), "\(body): \(response.text)")
            }
            let direct = try await root.request(.PUT, "/v1/documents/\(AdminRevocationList.documentName)", headers: [("content-type", "application/json")],
                                                body: Array("{\"rules\": []}".utf8))
            #expect(direct.status == .forbidden && direct.text.contains("reserved_name"), "\(direct.text)")
            let none = try await root.request(.GET, "/v1/documents/\(AdminRevocationList.documentName)")
            #expect(none.status == .notFound, "nothing was written: \(none.text)")

            // Alice by serial (colons and upper case as openssl prints it), through a follower.
            let colons = stride(from: 0, to: aliceSerial.count, by: 2).map { offset -> String in
                let start = aliceSerial.index(aliceSerial.startIndex, offsetBy: offset)
                return String(aliceSerial[start..<aliceSerial.index(start, offsetBy: 2)]).uppercased()
            }.joined(separator: ":")
            // An identity rule with a reason, which only operators are shown.
            let identityRule = try await root.request(.POST, "/v1/revocations", headers: [("content-type", "application/json")],
                                                      body: Array("{\"serial\": \"ab\", \"reason\": \"incident-4711\"}".utf8))
            #expect(identityRule.status == .ok && identityRule.text.contains("incident-4711"), "\(identityRule.text)")
            #expect(try await status(follower, as: credentials("alice"), .GET, "/v1/revocations").1.contains("incident-4711"), "an admin sees reasons")
            let revoked = try await revoke("{\"serial\": \"\(colons)\", \"reason\": \"laptop lost\"}", on: root)
            #expect(revoked.status == .ok && revoked.text.contains("laptop lost") && !revoked.text.contains("warning"), "\(revoked.text)")
            for id in [UInt64(1), 2, 3] {
                // A write is refused at once anywhere (the node catches up first); a read once the node has applied the rule.
                let (code, text) = try await status(id, as: credentials("alice"), .PUT, "/v1/documents/alice/write")
                #expect(code == .unauthorized && text.contains("certificate_revoked"), "alice's write on node \(id): \(text)")
                #expect(try await eventually(seconds: 30) { try await status(id, as: credentials("alice")).0 == .unauthorized }, "alice's read on node \(id)")
                // On an open route a revoked certificate is an anonymous caller: no reasons.
                // (The identity rules a node serves may be a second old.)
                var openText = ""
                #expect(try await eventually(seconds: 30) {
                    openText = try await status(id, as: credentials("alice"), .GET, "/v1/revocations").1
                    return openText.contains("\"ab\"")
                }, "node \(id) lists the identity rule")
                #expect(!openText.contains("incident-4711"), "\(openText)")
                #expect(try await status(id, as: credentials("bob")).0 == .ok, "bob is not covered by alice's rule")
                #expect(try await status(id, as: nil).0 == .ok, "the first admin is not covered")
            }
            // The same serial again changes nothing.
            let version = try await root.request(.GET, "/v1/documents/\(AdminRevocationList.documentName)").text
            #expect(try await revoke("{\"serial\": \"\(aliceSerial)\"}", on: root).status == .ok)
            #expect(try await root.request(.GET, "/v1/documents/\(AdminRevocationList.documentName)").text == version)

            // The leader judges a forwarded write by its own list: a member
            // node passing on alice's certificate (as one that has not
            // applied the rule yet would) is refused.
            let toLeader = try await cluster.connection(to: leader, asNode: follower)
            defer { Task { await toLeader.close() } }
            let aliceIssued = UInt64(alice.notValidBefore.addingTimeInterval(ClusterCA.backdate).timeIntervalSince1970 * 1000)
            func forwarded(_ certificate: String) async throws -> HTTPClientResponse {
                try await toLeader.request(.PUT, "/v1/documents/forwarded/write", headers: [
                    ("content-type", "application/json"), ("warrant-actor", "admin:alice"), ("warrant-admin-certificate", certificate),
                ], body: Array("{}".utf8))
            }
            let refused = try await forwarded("\(Revocation.canonicalSerial(aliceSerial)) \(aliceIssued) alice")
            #expect(refused.status == .unauthorized && refused.text.contains("certificate_revoked"), "\(refused.text)")
            let other = try await forwarded("ab12 \(aliceIssued) carol")
            #expect(other.status == .ok, "an admin no rule covers: \(other.text)")

            // Bob by name, by bob himself: both of his certificates, told so.
            // (Through a follower: the leader learns whose certificate asked from the forwarded request.)
            let bobConnection = try await cluster.connection(to: follower, credentials: credentials("bob", in: bobOut))
            defer { Task { await bobConnection.close() } }
            let byName = try await revoke("{\"name\": \"bob\", \"reason\": \"left\"}", on: bobConnection)
            #expect(byName.status == .ok && byName.text.contains("\"warning\""), "\(byName.text)")
            for id in [UInt64(1), 2, 3] {
                #expect(try await status(id, as: credentials("bob"), .PUT, "/v1/documents/bob/write").0 == .unauthorized, "bob's first certificate on node \(id)")
                #expect(try await status(id, as: credentials("bob", in: bobOut), .PUT, "/v1/documents/bob/write").0 == .unauthorized,
                        "bob's second certificate on node \(id)")
            }
            // One made within the clock margin after the rule is covered too;
            // one made past it is good.
            let margin = TimeInterval(AdminRevocation.clockMarginMillis) / 1000
            for (made, covered) in [(margin - 5, true), (margin + 5, false)] {
                let out = directory + "/bob-\(Int(made))"
                try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
                _ = try ClusterFiles.issueAdmin(directory: directory, name: "bob", validity: 600, out: out, now: Date().addingTimeInterval(made))
                #expect(try await status(follower, as: credentials("bob", in: out)).0 == (covered ? .unauthorized : .ok),
                        "bob's certificate made \(made) s after the rule")
            }

            // A follower that has not applied a rule made a moment ago
            // catches up before judging: it passes a document write on to the
            // leader as a command, which the leader cannot judge by certificate.
            let lagging = try #require([UInt64(1), 2, 3].first { $0 != leader && $0 != follower })
            let laggingNode = try #require(cluster.servers[lagging])
            _ = try ClusterFiles.issueAdmin(directory: directory, name: "carol", validity: 600, out: directory)
            let carol = try await cluster.connection(to: lagging, credentials: credentials("carol"))
            defer { Task { await carol.close() } }
            #expect(try await carol.request(.GET, "/v1/cluster/status").status == .ok)
            await laggingNode.driver.setDropIncoming { message in
                if case .appendEntries = message.body { return true }
                return false
            }
            let toLeaderAsAdmin = try await cluster.connection(to: leader)
            defer { Task { await toLeaderAsAdmin.close() } }
            let carolRule = try await revoke("{\"name\": \"carol\"}", on: toLeaderAsAdmin)
            #expect(carolRule.status == .ok, "\(carolRule.text)")
            let write = Task {
                try await carol.request(.PUT, "/v1/documents/carol/after-rule", headers: [("content-type", "application/json")], body: Array("{}".utf8))
            }
            try await Task.sleep(for: .milliseconds(200))
            await laggingNode.driver.setDropIncoming(nil)
            let carolWrite = try await write.value
            #expect(carolWrite.status == .unauthorized && carolWrite.text.contains("certificate_revoked"), "\(carolWrite.text)")
            #expect(try await root.request(.GET, "/v1/documents/carol/after-rule").status == .notFound, "nothing was written")

            // A node that cannot catch up refuses an admin's write, and
            // answers reads from the rules it has.
            await laggingNode.driver.setDropIncoming { message in
                if case .readIndexResponse = message.body { return true }
                return false
            }
            let unconfirmed = try await carol.request(.PUT, "/v1/documents/unconfirmed", headers: [("content-type", "application/json")],
                                                      body: Array("{}".utf8))
            let asRoot = try await cluster.connection(to: lagging)
            defer { Task { await asRoot.close() } }
            let rootWrite = try await asRoot.request(.PUT, "/v1/documents/unconfirmed", headers: [("content-type", "application/json")], body: Array("{}".utf8))
            let rootRead = try await asRoot.request(.GET, "/v1/cluster/status")
            await laggingNode.driver.setDropIncoming(nil)
            #expect(unconfirmed.status == .unauthorized, "carol's rule is applied there: \(unconfirmed.text)")
            #expect(rootWrite.status == .serviceUnavailable && rootWrite.text.contains("rules_unconfirmed"), "\(rootWrite.text)")
            #expect(rootRead.status == .ok, "\(rootRead.text)")
            #expect(try await root.request(.GET, "/v1/documents/unconfirmed").status == .notFound, "nothing was written")

            let list = try await root.request(.GET, "/v1/cluster/admin-revocations")
            let rules = try APIJSON.decode(AdminRevocationsBody.self, from: list.body).revocations
            #expect(rules.map(\.kind) == ["serial", "name", "name"] && rules.map(\.value) == [Revocation.canonicalSerial(aliceSerial), "bob", "carol"],
                    "\(list.text)")
            #expect(rules.map(\.actor) == ["admin:admin", "admin:bob", "admin:admin"] && rules.map(\.reason) == ["laptop lost", "left", ""], "\(list.text)")
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }

    @Test("An admin certificate that expires while its connection is kept alive stops counting then: the next request on that connection is anonymous")
    func expiresOnOpenConnection() async throws {
        let cluster = try await InProcessCluster.start()
        do {
            let leader = try #require(await cluster.waitForLeader())
            let directory = cluster.directory
            // 10 s: the connection and its first request fit in it on a busy machine.
            _ = try ClusterFiles.issueAdmin(directory: directory, name: "brief", validity: 10, out: directory)
            let connection = try await cluster.connection(to: leader, credentials: ("\(directory)/admin-brief.pem", "\(directory)/admin-brief.key"))
            defer { Task { await connection.close() } }
            #expect(try await connection.request(.GET, "/v1/cluster/status").status == .ok)
            try await Task.sleep(for: .seconds(11))
            let after = try await connection.request(.GET, "/v1/cluster/status")
            #expect(after.status == .unauthorized, "\(after.text)")
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }
}
