import Foundation
import NIOCore
import NIOHTTP1
import Node
import Testing

/// A P-256 CSR made by openssl (a real peer, not our own code).
func opensslCSR(in directory: String, name: String = "job") throws -> String {
    try run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "\(directory)/\(name).key", "-subj", "/CN=ignored", "-out", "\(directory)/\(name).csr"])
    return try String(contentsOfFile: "\(directory)/\(name).csr", encoding: .utf8)
}

func json(_ object: [String: Any]) -> [UInt8] { Array((try? JSONSerialization.data(withJSONObject: object)) ?? Data()) }
func object(_ response: HTTPClientResponse) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
}

@Suite("Issuance on a running cluster", .serialized)
struct IssuanceTests {
    @Test("Join token to X509-SVID through a follower: audited, verified by openssl and by every node, replayed by idempotency key, refused on reuse")
    func x509() async throws {
        try await InProcessCluster.withReadyFollower { cluster, leader, _, admin, anonymous in

            // Tokens: only admins make them; the SPIFFE ID must be canonical and in the trust domain.
            let refusedToken = try await anonymous.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                           body: json(["spiffe_id": "spiffe://warrant.local/x"]))
            #expect(refusedToken.status == .unauthorized)
            for (id, code) in [("spiffe://Warrant.local/x", "bad_spiffe_id"), ("spiffe://other.org/x", "wrong_trust_domain"),
                               ("spiffe://warrant.local/a/../b", "bad_spiffe_id"), ("spiffe://warrant.local", "bad_spiffe_id")] {
                let response = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")], body: json(["spiffe_id": id]))
                #expect(response.status == .badRequest && response.text.contains(code), "\(id): \(response.text)")
            }
            let created = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                  body: json(["spiffe_id": "spiffe://warrant.local/ci/acme/build", "ttl_seconds": 900]))
            #expect(created.status == .created, "\(created.text)")
            let token = try #require(object(created)["token"] as? String)

            let scratch = cluster.directory
            let csr = try opensslCSR(in: scratch)
            // Bad CSRs are refused before anything is signed or written.
            var tampered = Array(csr.utf8)
            if let index = tampered.lastIndex(of: UInt8(ascii: "A")) { tampered[index] = UInt8(ascii: "B") }
            let badCSR = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                                     body: json(["token": token, "csr": String(decoding: tampered, as: UTF8.self)]))
            #expect(badCSR.status == .badRequest, "\(badCSR.text)")
            let tooLong = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                                      body: json(["token": token, "csr": csr, "ttl_seconds": 901]))
            #expect(tooLong.status == .badRequest && tooLong.text.contains("bad_ttl"))
            let unknown = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                                      body: json(["token": "wjt.nope", "csr": csr]))
            #expect(unknown.status == .unauthorized && unknown.text.contains("invalid_token"))
            // A request id the log would not take: refused, audited, and the token still unused (issued below).
            let longID = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json"),
                                                                                       ("warrant-request-id", String(repeating: "r", count: 129))],
                                                     body: json(["token": token, "csr": csr]))
            #expect(longID.status == .badRequest && longID.text.contains("bad_request_id"), "\(longID.text)")
            // Nor one that would put separators into the audit text.
            let forgedID = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json"),
                                                                                         ("warrant-request-id", "x context=repository=acme/prod")],
                                                       body: json(["token": token, "csr": csr]))
            #expect(forgedID.status == .badRequest && forgedID.text.contains("bad_request_id"), "\(forgedID.text)")
            // A body over the API's limit: refused by the HTTP server before
            // any handler runs (the connection then closes), and audited too.
            let fresh = try await cluster.connection(to: leader, admin: false)
            let oversized = try await fresh.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                                    body: [UInt8](repeating: UInt8(ascii: " "), count: (512 << 10) + 1))
            await fresh.close()
            #expect(oversized.status == .payloadTooLarge && oversized.text.contains("too_large"), "\(oversized.status) \(oversized.text)")

            // Issued through a follower; the leader signed it.
            let request = json(["token": token, "csr": csr, "idempotency_key": "build-42"])
            let issued = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json"), ("warrant-request-id", "ci-run.42:a_b")],
                                                     body: request)
            #expect(issued.status == .ok, "\(issued.text)")
            #expect(issued.headers.first(name: "warrant-leader") == String(leader))
            let body = object(issued)
            let certificate = try #require(body["certificate"] as? String)
            let serial = try #require(body["serial"] as? String)
            #expect(body["spiffe_id"] as? String == "spiffe://warrant.local/ci/acme/build" && body["replayed"] as? Bool == false)
            try certificate.write(toFile: "\(scratch)/svid.pem", atomically: true, encoding: .utf8)
            try (body["bundle"] as! String).write(toFile: "\(scratch)/bundle.pem", atomically: true, encoding: .utf8)
            let verified = try run(["openssl", "verify", "-CAfile", "\(scratch)/bundle.pem", "\(scratch)/svid.pem"])
            #expect(verified.status == 0 && verified.output.contains("OK"), "\(verified.output)")

            // Retried with the same key: the same certificate, not a second one.
            let again = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")], body: request)
            #expect(again.status == .ok && object(again)["serial"] as? String == serial && object(again)["replayed"] as? Bool == true)
            // The same token and key asking for a JWT-SVID: a conflict, not the certificate's bytes as a token.
            let otherKind = try await anonymous.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                                        body: json(["token": token, "audience": ["x"], "idempotency_key": "build-42"]))
            #expect(otherKind.status == .conflict && otherKind.text.contains("idempotency_conflict"), "\(otherKind.status) \(otherKind.text)")
            // A JWT-SVID's key asked again for other audiences: a conflict, not the token for the first ones.
            let jwtToken = try #require(object(try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                                       body: json(["spiffe_id": "spiffe://warrant.local/ci/acme/deploy"])))["token"] as? String)
            func jwt(_ audiences: [String]) async throws -> HTTPClientResponse {
                try await anonymous.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                            body: json(["token": jwtToken, "audience": audiences, "idempotency_key": "deploy-1"]))
            }
            let firstJWT = try await jwt(["a", "b"])
            #expect(firstJWT.status == .ok, "\(firstJWT.text)")
            let otherAudiences = try await jwt(["c"])
            #expect(otherAudiences.status == .conflict && otherAudiences.text.contains("other audiences (a, b)"), "\(otherAudiences.text)")
            let sameAudiences = try await jwt(["b", "a"])
            #expect(object(sameAudiences)["token"] as? String == object(firstJWT)["token"] as? String && object(sameAudiences)["replayed"] as? Bool == true)
            // What the answer keeps for a retry is listed but not served, even to an admin.
            let kept = object(try await admin.request(.GET, "/v1/documents?prefix=authority/idempotency/"))["documents"] as? [[String: Any]] ?? []
            let keptName = try #require(kept.first?["name"] as? String, "\(kept)")
            let withheld = try await admin.request(.GET, "/v1/documents/\(keptName)")
            #expect(withheld.status == .forbidden && withheld.text.contains("withheld"), "\(withheld.status) \(withheld.text)")
            // Without the key the token is spent.
            let reuse = try await anonymous.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                                    body: json(["token": token, "csr": csr]))
            #expect(reuse.status == .forbidden && reuse.text.contains("token_used"), "\(reuse.text)")

            // Every node verifies it (followers too), and the audit chain names it.
            for node in [UInt64(1), 2, 3] {
                let connection = try await cluster.connection(to: node, admin: false)
                let verdict = object(try await connection.request(.POST, "/v1/verify", headers: [("content-type", "application/json")],
                                                                  body: json(["x509_chain": certificate])))
                #expect(verdict["valid"] as? Bool == true && verdict["spiffe_id"] as? String == "spiffe://warrant.local/ci/acme/build", "node \(node): \(verdict)")
                await connection.close()
            }
            // The refusals were audited too (recorded without delaying the answers).
            var denials: [[String: Any]] = []
            #expect(await eventually {
                guard let response = try? await admin.request(.GET, "/v1/audit?limit=1000") else { return false }
                let records = object(response)["records"] as? [[String: Any]] ?? []
                denials = records.filter { $0["action"] as? String == "identity.deny" }
                return denials.count >= 6
            }, "denials: \(denials)")
            for code in ["bad_csr", "bad_ttl", "invalid_token", "token_used", "bad_request_id", "too_large"] {
                #expect(denials.contains { ($0["result"] as? String ?? "").contains(code) }, "no denial record for \(code): \(denials)")
            }
            let audit = object(try await admin.request(.GET, "/v1/audit?limit=1000"))
            let records = audit["records"] as? [[String: Any]] ?? []
            let issuances = records.filter { $0["action"] as? String == "identity.issue" && $0["target"] as? String == "spiffe://warrant.local/ci/acme/build" }
            #expect(issuances.count == 1 && (issuances.first?["result"] as? String)?.contains("serial=\(serial)") == true, "\(issuances)")
            // The client's request id, and the node's own after it (so that no other request shares it).
            let requestField = (issuances.first?["result"] as? String ?? "").split(separator: " ").first { $0.hasPrefix("request=") } ?? ""
            #expect(requestField.hasPrefix("request=ci-run.42:a_b/") && requestField.count == "request=ci-run.42:a_b/".count + 36, "\(requestField)")
            #expect(!records.contains { ($0["result"] as? String ?? "").contains(token) }, "the token secret reached the audit log")
        }
    }

    @Test("A refusal on a node that knows of no leader is still audited, once, when a leader is back: its record's write is tried again")
    func denialOutlivesAnElection() async throws {
        try await InProcessCluster.withReadyFollower { cluster, leader, follower, admin, anonymous in
            for other in [UInt64(1), 2, 3] where other != follower { await cluster.stop(other) }
            #expect(await eventually { await cluster.status(follower)?.leader == 0 }, "the follower still names a leader")
            let refused = try await anonymous.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")], body: Array("{".utf8))
            #expect(refused.status == .badRequest, "\(refused.status) \(refused.text)")
            // The record's first write waits 2 s for a leader, then fails:
            // the others come back only after that.
            try await Task.sleep(for: .seconds(3))
            for other in [UInt64(1), 2, 3] where other != follower { try cluster.start(other) }
            var denials: [[String: Any]] = []
            #expect(await eventually(seconds: 30) {
                guard let response = try? await admin.request(.GET, "/v1/audit?limit=1000"), response.status == .ok else { return false }
                denials = (object(response)["records"] as? [[String: Any]] ?? []).filter { $0["action"] as? String == "identity.deny" }
                return !denials.isEmpty
            }, "no denial record")
            #expect(denials.count == 1 && (denials.first?["result"] as? String ?? "").contains("bad_request"), "\(denials)")
            _ = leader
        }
    }

    @Test("One token presented to two nodes at the same moment yields exactly one identity")
    func tokenWorksOnceClusterWide() async throws {
        let cluster = try await InProcessCluster.start()
        do {
            _ = try #require(await cluster.waitForLeader())
            let admin = try await cluster.connection(to: 1)
            #expect(await eventually { (try? await admin.request(.GET, "/readyz"))?.status == .ok })
            let csr = try opensslCSR(in: cluster.directory)
            var successes = 0
            for round in 0..<5 {
                let created = try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                      body: json(["spiffe_id": "spiffe://warrant.local/race/\(round)"]))
                let token = try #require(object(created)["token"] as? String)
                let statuses = try await withThrowingTaskGroup(of: HTTPResponseStatus.self) { group in
                    for node in [UInt64(1), 2, 3] {
                        group.addTask {
                            let connection = try await cluster.connection(to: node, admin: false)
                            defer { Task { await connection.close() } }
                            return try await connection.request(.POST, "/v1/svid/x509", headers: [("content-type", "application/json")],
                                                                body: json(["token": token, "csr": csr])).status
                        }
                    }
                    var all: [HTTPResponseStatus] = []
                    for try await status in group { all.append(status) }
                    return all
                }
                #expect(statuses.filter { $0 == .ok }.count == 1, "round \(round): \(statuses)")
                #expect(statuses.filter { $0 != .ok }.allSatisfy { $0 == .forbidden }, "round \(round): \(statuses)")
                successes += statuses.filter { $0 == .ok }.count
            }
            #expect(successes == 5)
            // Each refusal is in the audit chain once: a denial record, or the ledger's own rejected issuance (a loser whose
            // command reached the log), not both.
            func refusals() async throws -> (denied: Int, rejected: Int) {
                let records = object(try await admin.request(.GET, "/v1/audit?limit=1000"))["records"] as? [[String: Any]] ?? []
                return (records.filter { $0["action"] as? String == "identity.deny" && ($0["result"] as? String ?? "").contains("token_used") }.count,
                        records.filter { $0["action"] as? String == "identity.issue" && ($0["result"] as? String ?? "").hasPrefix("rejected") }.count)
            }
            #expect(await eventually { let (denied, rejected) = (try? await refusals()) ?? (0, 0); return denied + rejected >= 10 })
            try await Task.sleep(for: .seconds(1)) // denial records are written in the background
            let (denied, rejected) = try await refusals()
            #expect(denied + rejected == 10, "10 refusals: \(denied) denial records and \(rejected) rejected issuances")
            await admin.close()
        } catch {
            Issue.record(error)
        }
        await cluster.shutdown()
    }

    @Test("JWT-SVIDs, the bundle, OIDC discovery and verification, from a follower; the configured issuer is every token's iss and discovery's issuer, and PyJWT checks it")
    func jwtAndBundles() async throws {
        let issuer = "https://warrant.example.com/trust"
        try await InProcessCluster.withReadyFollower(extraConfig: "jwt_issuer: \(issuer)\n") { cluster, _, follower, admin, open in
            let token = try #require(object(try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                                    body: json(["spiffe_id": "spiffe://warrant.local/deploy"])))["token"] as? String)
            let issued = try await open.request(.POST, "/v1/svid/jwt", headers: [("content-type", "application/json")],
                                                body: json(["token": token, "audience": ["sts.amazonaws.com"]]))
            #expect(issued.status == .ok, "\(issued.text)")
            let jwt = try #require(object(issued)["token"] as? String)
            let good = object(try await open.request(.POST, "/v1/verify", headers: [("content-type", "application/json")],
                                                     body: json(["jwt": jwt, "audience": "sts.amazonaws.com"])))
            #expect(good["valid"] as? Bool == true && good["spiffe_id"] as? String == "spiffe://warrant.local/deploy")
            let wrong = object(try await open.request(.POST, "/v1/verify", headers: [("content-type", "application/json")],
                                                      body: json(["jwt": jwt, "audience": "someone-else"])))
            #expect(wrong["valid"] as? Bool == false && wrong["code"] as? String == "wrong_audience")

            let bundle = object(try await open.request(.GET, "/v1/bundle"))
            let keys = bundle["keys"] as? [[String: Any]] ?? []
            #expect(keys.contains { $0["use"] as? String == "x509-svid" } && keys.contains { $0["use"] as? String == "jwt-svid" })
            #expect(bundle["spiffe_sequence"] as? Int != nil)
            let discovery = object(try await open.request(.GET, "/.well-known/openid-configuration"))
            #expect(discovery["issuer"] as? String == issuer && discovery["jwks_uri"] as? String == "\(issuer)/v1/keys", "\(discovery)")
            #expect((discovery["claims_supported"] as? [String])?.contains("iss") == true)
            // The token says who issued it, as a cloud provider's token exchange requires; PyJWT holds it to that.
            let script = """
                import json, ssl, sys, urllib.request, jwt
                base, token, ca, issuer = sys.argv[1:5]
                context = ssl.create_default_context(cafile=ca)
                context.check_hostname = False
                keys = jwt.PyJWKSet.from_dict(json.load(urllib.request.urlopen(base + "/v1/keys", context=context)))
                key = next(k for k in keys.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
                claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com", issuer=issuer)
                assert claims["iss"] == issuer and len(claims["jti"]) == 32, claims
                try:
                    jwt.decode(token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com", issuer="https://someone.else")
                    print("accepted another issuer"); sys.exit(1)
                except jwt.InvalidIssuerError:
                    pass
                print("ok")
                """
            let python = try run(["python3", "-c", script, "https://127.0.0.1:\(cluster.basePort + 100 + Int(follower) - 1)", jwt,
                                  "\(cluster.directory)/ca.pem", issuer])
            #expect(python.status == 0 && python.output.contains("ok"), "\(python.output)")
            let oidc = object(try await open.request(.GET, "/v1/keys"))
            #expect((oidc["keys"] as? [[String: Any]])?.first?["alg"] as? String == "ES256")
            let pem = try await open.request(.GET, "/v1/bundle.pem")
            #expect(pem.text.hasPrefix("-----BEGIN CERTIFICATE-----"))
            let nonsense = try await open.request(.POST, "/v1/verify", headers: [("content-type", "application/json")], body: json(["jwt": "x"]))
            #expect(nonsense.status == .badRequest)

            // The CLI takes a join token from a file, standard input or WARRANT_JOIN_TOKEN, never from its command line.
            let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
            func cliToken() async throws -> String {
                try #require(object(try await admin.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                            body: json(["spiffe_id": "spiffe://warrant.local/cli"])))["token"] as? String)
            }
            let endpoint = "127.0.0.1:\(cluster.basePort + 100 + Int(follower) - 1)"
            let common = ["svid", "jwt", "--dir", cluster.directory, "--endpoints", endpoint, "--audience", "a"]
            let fileToken = try await cliToken()
            try fileToken.write(toFile: "\(cluster.directory)/join-token.txt", atomically: true, encoding: .utf8)
            let fromFile = try run(common + ["--token-file", "\(cluster.directory)/join-token.txt"], executable: binary)
            #expect(fromFile.status == 0 && fromFile.output.contains("spiffe://warrant.local/cli"), "\(fromFile.output)")
            let fromStdin = try run(["sh", "-c", "token=$1 bin=$2; shift 2; printf '%s\\n' \"$token\" | \"$bin\" \"$@\"", "sh", try await cliToken(), binary]
                                    + common + ["--token-file", "-"])
            #expect(fromStdin.status == 0 && fromStdin.output.contains("spiffe://warrant.local/cli"), "\(fromStdin.output)")
            let fromEnvironment = try run(common, executable: binary, environment: ["WARRANT_JOIN_TOKEN": try await cliToken()])
            #expect(fromEnvironment.status == 0 && fromEnvironment.output.contains("spiffe://warrant.local/cli"), "\(fromEnvironment.output)")
            let onArgv = try await cliToken()
            let refused = try run(common + ["--token", onArgv], executable: binary)
            #expect(refused.status != 0 && refused.output.contains("--token is not taken") && !refused.output.contains(onArgv), "\(refused.output)")
            let none = try run(common, executable: binary, environment: [:])
            #expect(none.status != 0 && none.output.contains("no join token"), "\(none.output)")
        }
    }
}

/// Runs a program (found on PATH unless `executable` is given) to its end;
/// stdout and stderr together.
@discardableResult
func run(_ arguments: [String], executable: String = "/usr/bin/env", environment: [String: String]? = nil) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let environment { process.environment = environment }
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}
