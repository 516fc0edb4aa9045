import Client
import ClusterHarness
import Foundation
import NIOCore
import NIOHTTP1
import Node
import Testing

private let jsonHeaders: [(String, String)] = [("content-type", "application/json")]
private let yamlHeaders: [(String, String)] = [("content-type", "application/yaml")]

/// Writes a policy document through `admin` and returns the response.
private func putPolicy(_ admin: HTTPConnection, _ name: String, _ yaml: String) async throws -> HTTPClientResponse {
    try await admin.request(.PUT, "/v1/documents/\(name)", headers: yamlHeaders, body: Array(yaml.utf8))
}

/// An issuer document for `provider` (GitHub method, its CA pinned).
func githubIssuerYAML(_ provider: TestIssuer, issuer: String? = nil) -> String {
    "method: github\nissuer: \(issuer ?? provider.issuer)\nca_pem: |\n" + provider.caPEM.split(separator: "\n").map { "  \($0)" }.joined(separator: "\n") + "\n"
}

private let deployRule = """
    issuer: github
    spiffe_id: spiffe://warrant.local/gh/{repository}/{workflow}
    ttl_max_seconds: 600
    conditions:
      repository_owner_id: "1342004"
      repository: acme/api
      ref: {glob: "refs/heads/*"}
      event_name: {not_one_of: [pull_request_target]}
    """

@Suite("Attested join on a running cluster", .serialized)
struct JoinTests {
    @Test("GitHub-style tokens join through a follower: verified against the issuer's JWKS over HTTPS, matched against rules, consumed once cluster-wide (also when raced on every node), explained when refused")
    func join() async throws {
        let provider = try TestIssuer(keys: [.rsa2048])
        try await provider.serve()
        defer { Task { await provider.stop() } }
        try await InProcessCluster.withReadyFollower(extraConfig: "join:\n  jwks_refetch_seconds: 2\n") { cluster, _, follower, admin, open in
            let dir = cluster.directory
            let audience = "warrant.local"
            // Bad policy documents are refused with where and why; nothing is written.
            let badIssuer = try await putPolicy(admin, "policy/issuers/github", "method: github\nissuer: https://x\nalgorithms: [HS256]\n")
            #expect(badIssuer.status == .badRequest && badIssuer.text.contains("bad_policy") && badIssuer.text.contains("algorithms"), "\(badIssuer.text)")
            // A rule saved before its issuer is linted as admitting nothing yet.
            let early = try await putPolicy(admin, "policy/join/deploy", deployRule)
            #expect(early.status == .ok && early.text.contains("not configured"), "\(early.text)")
            let issuer = try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(provider))
            #expect(issuer.status == .ok, "\(issuer.text)")
            // Claim names are checked against the issuer's platform.
            let typo = try await putPolicy(admin, "policy/join/deploy", deployRule.replacingOccurrences(of: "repository_owner_id", with: "owner_id"))
            #expect(typo.status == .badRequest && typo.text.contains("owner_id"), "\(typo.text)")
            let saved = try await putPolicy(admin, "policy/join/deploy", deployRule)
            #expect(saved.status == .ok && !saved.text.contains("warnings\":[\""), "a tight rule has no warnings: \(saved.text)")
            let loose = try await putPolicy(admin, "policy/join/loose", "issuer: github\nspiffe_id: spiffe://warrant.local/any\nconditions:\n  ref: refs/heads/nothing\n")
            #expect(loose.status == .ok && loose.text.contains("no repository owner") && loose.text.contains("pull_request_target"), "\(loose.text)")

            let csr = try opensslCSR(in: dir, name: "job")
            func join(_ token: String, via connection: HTTPConnection, ttl: Int? = nil, key: String? = nil) async throws -> HTTPClientResponse {
                var body: [String: Any] = ["token": token, "csr": csr]
                if let ttl { body["ttl_seconds"] = ttl }
                if let key { body["idempotency_key"] = key }
                return try await connection.request(.POST, "/v1/join", headers: jsonHeaders, body: json(body))
            }

            // Issued through a follower; the leader verified the token with keys it fetched once.
            // (Policy changes reach every node within a second.)
            try await Task.sleep(for: .seconds(1.1))
            let token = try provider.mint(provider.githubClaims(audience: audience))
            let issued = try await join(token, via: open, key: "job-1")
            #expect(issued.status == .ok, "\(issued.text)")
            #expect(object(issued)["spiffe_id"] as? String == "spiffe://warrant.local/gh/acme/api/deploy")
            let certificate = try #require(object(issued)["certificate"] as? String)
            try certificate.write(toFile: "\(dir)/job.pem", atomically: true, encoding: .utf8)
            try (object(issued)["bundle"] as? String ?? "").write(toFile: "\(dir)/bundle.pem", atomically: true, encoding: .utf8)
            let verified = try run(["openssl", "verify", "-CAfile", "\(dir)/bundle.pem", "\(dir)/job.pem"])
            #expect(verified.status == 0, "\(verified.output)")
            let text = try run(["openssl", "x509", "-in", "\(dir)/job.pem", "-noout", "-text", "-enddate"]).output
            for fragment in ["URI:spiffe://warrant.local/gh/acme/api/deploy", "0123456789abcdef0123456789abcdef01234567", "acme/api", "refs/heads/main",
                             "8110447001", "octocat", "\"rule\":\"deploy\""] {
                #expect(text.contains(fragment), "the identity carries \(fragment)")
            }
            #expect(provider.jwksFetches == 1 && provider.discoveryFetches == 1)
            // The same request again: the identity is replayed (same idempotency key), not issued twice.
            let again = try await join(token, via: open, key: "job-1")
            #expect(again.status == .ok && object(again)["replayed"] as? Bool == true && object(again)["certificate"] as? String == certificate)
            // Without it, the token is spent.
            let reused = try await join(token, via: open)
            #expect(reused.status == .forbidden && reused.text.contains("token_used"), "\(reused.text)")

            // A JWT-SVID from a platform token: the job's context in its warrant claim, verified by a node; the token is then spent for X.509 too.
            let jwtJoinToken = try provider.mint(provider.githubClaims(audience: audience))
            let jwtJoin = try await open.request(.POST, "/v1/join/jwt", headers: jsonHeaders,
                                                 body: json(["token": jwtJoinToken, "audience": ["sts.amazonaws.com"], "ttl_seconds": 300]))
            #expect(jwtJoin.status == .ok, "\(jwtJoin.text)")
            let jwtSVID = try #require(object(jwtJoin)["token"] as? String)
            let jwtVerdict = object(try await open.request(.POST, "/v1/verify", headers: jsonHeaders, body: json(["jwt": jwtSVID, "audience": "sts.amazonaws.com"])))
            #expect(jwtVerdict["valid"] as? Bool == true && jwtVerdict["spiffe_id"] as? String == "spiffe://warrant.local/gh/acme/api/deploy", "\(jwtVerdict)")
            let jwtContext = jwtVerdict["attributes"] as? [String: String] ?? [:]
            #expect(jwtContext["repository"] == "acme/api" && jwtContext["commit"] == "0123456789abcdef0123456789abcdef01234567" && jwtContext["rule"] == "deploy",
                    "\(jwtContext)")
            #expect(try await join(jwtJoinToken, via: open).text.contains("token_used"))

            // The TTL is capped by the rule.
            let long = try await join(try provider.mint(provider.githubClaims(audience: audience)), via: open, ttl: 601)
            #expect(long.status == .badRequest && long.text.contains("bad_ttl"))

            // One fresh token sent to all three nodes at the same moment joins once.
            let raced = try provider.mint(provider.githubClaims(audience: audience))
            let connections = [admin, try await cluster.connection(to: 1, admin: false), try await cluster.connection(to: 2, admin: false),
                               try await cluster.connection(to: 3, admin: false)].suffix(3)
            let statuses = try await withThrowingTaskGroup(of: UInt.self) { group in
                for connection in connections {
                    group.addTask { try await join(raced, via: connection).status.code }
                }
                return try await group.reduce(into: [UInt]()) { $0.append($1) }
            }
            #expect(statuses.sorted() == [200, 403, 403], "\(statuses)")
            for connection in connections { await connection.close() }

            // Refused: another repository. The error, the explanation and the audit say why, with the claim's value.
            let stranger = try provider.mint(provider.githubClaims(audience: audience, repository: "evil/api", ownerID: "666"))
            let denied = try await join(stranger, via: open)
            #expect(denied.status == .forbidden && denied.text.contains("join_denied") && denied.text.contains("evil/api")
                    && denied.text.contains("repository_owner_id equals"), "\(denied.text)")
            let explained = object(try await admin.request(.POST, "/v1/join/explain", headers: jsonHeaders, body: json(["token": stranger])))
            #expect(explained["verified"] as? Bool == true && explained["issuer"] as? String == "github")
            let rules = explained["rules"] as? [[String: Any]] ?? []
            #expect(rules.map { $0["rule"] as? String ?? "" } == ["deploy", "loose"])
            #expect((rules.first?["failures"] as? [String])?.contains { $0.contains("\"666\"") } == true, "\(rules)")
            #expect((explained["decision"] as? String)?.hasPrefix("refused") == true)
            let allowedExplain = object(try await admin.request(.POST, "/v1/join/explain", headers: jsonHeaders,
                                                               body: json(["token": try provider.mint(provider.githubClaims(audience: audience))])))
            #expect(allowedExplain["decision"] as? String == "allowed by rule deploy: spiffe://warrant.local/gh/acme/api/deploy", "\(allowedExplain)")
            // A spent token is explained as such.
            let spentExplain = object(try await admin.request(.POST, "/v1/join/explain", headers: jsonHeaders, body: json(["token": token])))
            #expect((spentExplain["decision"] as? String)?.contains("already used") == true, "\(spentExplain)")
            // Explain is for operators only and consumes nothing.
            #expect(try await open.request(.POST, "/v1/join/explain", headers: jsonHeaders, body: json(["token": stranger])).status == .unauthorized)
            let expiredExplain = object(try await admin.request(.POST, "/v1/join/explain", headers: jsonHeaders,
                                                               body: json(["token": try provider.mint(provider.githubClaims(audience: audience, now: Int64(Date().timeIntervalSince1970) - 1_000))])))
            #expect(expiredExplain["verified"] as? Bool == false && (expiredExplain["error"] as? [String: Any])?["code"] as? String == "token_expired")
            let audit = object(try await admin.request(.GET, "/v1/audit?limit=1000"))["records"] as? [[String: Any]] ?? []
            #expect(audit.contains { ($0["action"] as? String) == "identity.deny" && ($0["result"] as? String ?? "").contains("evil/api") })
            #expect(audit.contains { ($0["action"] as? String) == "identity.issue" && ($0["result"] as? String ?? "").contains("platform_token=")
                    && ($0["actor"] as? String ?? "").hasPrefix("github:github:repo:acme/api") })
            #expect(!audit.contains { ($0["result"] as? String ?? "").contains(token) }, "the token never reaches the audit")
            // Another audience, and a token for a key the provider has not published.
            let otherAudience = try await join(try provider.mint(provider.githubClaims(audience: "sts.amazonaws.com")), via: open)
            #expect(otherAudience.status == .unauthorized && otherAudience.text.contains("wrong_audience"))
            // The same, from the command line: explain says which condition failed and exits 1; lint lists the loose rule and exits 2.
            let binary = try #require(warrantBinary())
            try stranger.write(toFile: "\(dir)/stranger.jwt", atomically: true, encoding: .utf8)
            let cli = try run(["join", "explain", "--dir", dir, "--token", "\(dir)/stranger.jwt"], executable: binary)
            #expect(cli.status == 1 && cli.output.contains("rule deploy: does not match") && cli.output.contains("\"evil/api\""), "\(cli.output)")
            let cliLint = try run(["join", "lint", "--dir", dir], executable: binary)
            #expect(cliLint.status == 2 && cliLint.output.contains("rule loose (issuer github): 2 warning(s)"), "\(cliLint.output)")
            let missing = try run(["join", "explain", "--dir", dir, "--token", "\(dir)/nope.jwt"], executable: binary)
            #expect(missing.status != 0 && missing.output.contains("the token file \(dir)/nope.jwt does not exist"), "\(missing.output)")
            let lint = object(try await admin.request(.GET, "/v1/join/lint"))
            #expect(((lint["rules"] as? [[String: Any]])?.first { $0["rule"] as? String == "loose" }?["warnings"] as? [String])?.isEmpty == false)

            // Keys: a new provider key is picked up by one refetch once the interval passed; unknown kids cannot force more.
            let fetches = provider.jwksFetches
            let rogue = try TestIssuer(keys: [.rsa2048])
            let unknownKid = try rogue.mint(provider.githubClaims(audience: audience), header: [("kid", .string("key-9"))])
            let unknownStarted = ContinuousClock.now
            for _ in 0..<5 { #expect(try await join(unknownKid, via: open).text.contains("unknown_key")) }
            // One refetch per 2 s interval at most: five joins take well under one, but a loaded CI machine once took longer.
            let intervals = Int(unknownStarted.duration(to: .now) / .seconds(2))
            #expect(provider.jwksFetches <= fetches + 1 + intervals,
                    "five unknown kids over \(intervals + 1) interval(s) fetched \(provider.jwksFetches - fetches) times")
            let newKid = try provider.addKey(.ecdsaP256)
            try await Task.sleep(for: .seconds(2.2))
            let rotated = try await join(try provider.mint(provider.githubClaims(audience: audience), kid: newKid), via: open)
            #expect(rotated.status == .unauthorized && rotated.text.contains("algorithm_not_allowed"),
                    "an ES256 key for an RS256-only issuer is left out: \(rotated.text)")
            let rsaKid = try provider.addKey(.rsa2048)
            try await Task.sleep(for: .seconds(2.2))
            #expect(try await join(try provider.mint(provider.githubClaims(audience: audience), kid: rsaKid), via: open).status == .ok)

            // A JWKS with duplicate kids is refused whole; the last good keys keep serving.
            provider.overrideJWKS(Array(#"{"keys":[{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"},{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"}]}"#.utf8))
            try await Task.sleep(for: .seconds(2.2))
            #expect(try await join(unknownKid, via: open).text.contains("unknown_key"))
            #expect(try await join(try provider.mint(provider.githubClaims(audience: audience), kid: rsaKid), via: open).status == .ok,
                    "last known good keys after a bad JWKS")
            provider.overrideJWKS(nil)

            // Plain HTTP and redirects are refused.
            let insecure = try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(provider, issuer: provider.issuer.replacingOccurrences(of: "https:", with: "http:")))
            #expect(insecure.status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            let insecureToken = try provider.mint(replacingIssuer(provider.githubClaims(audience: audience), provider.issuer.replacingOccurrences(of: "https:", with: "http:")))
            // The open endpoint says only that the keys cannot be had (no URL, no network error); an operator's explain says why.
            let plain = try await join(insecureToken, via: open)
            #expect(plain.status == .serviceUnavailable && plain.text.contains("keys_unavailable") && !plain.text.contains("plain HTTP")
                    && !plain.text.contains("http://"), "\(plain.text)")
            let plainExplained = try await admin.request(.POST, "/v1/join/explain", headers: jsonHeaders, body: json(["token": insecureToken]))
            #expect(plainExplained.text.contains("plain HTTP"), "\(plainExplained.text)")
            _ = try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(provider, issuer: provider.issuer + "/redirect"))
            try await Task.sleep(for: .seconds(1.1))
            let redirected = try await join(try provider.mint(replacingIssuer(provider.githubClaims(audience: audience), provider.issuer + "/redirect")), via: open)
            #expect(redirected.status == .serviceUnavailable && redirected.text.contains("keys_unavailable") && !redirected.text.contains("/redirect"),
                    "\(redirected.text)")
            let redirectExplained = try await admin.request(.POST, "/v1/join/explain", headers: jsonHeaders,
                                                            body: json(["token": try provider.mint(replacingIssuer(provider.githubClaims(audience: audience), provider.issuer + "/redirect"))]))
            #expect(redirectExplained.text.contains("redirects are not followed"), "\(redirectExplained.text)")
            _ = follower
        }
    }
}

extension JoinTests {
    @Test("Nothing derives from a platform-token identity (renewals, JWT-SVIDs) once the rule that admitted it admits something else, is removed or loses its issuer: 403 policy_changed, so the holder joins again under the rules as they are; a new description, or the rule put back as it was, changes nothing")
    func derivationFollowsTheRule() async throws {
        let provider = try TestIssuer(keys: [.rsa2048])
        try await provider.serve()
        defer { Task { await provider.stop() } }
        try await InProcessCluster.withReadyFollower { cluster, _, follower, admin, open in
            let dir = cluster.directory
            #expect(try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(provider)).status == .ok)
            #expect(try await putPolicy(admin, "policy/join/deploy", deployRule).status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            let joined = try await open.request(.POST, "/v1/join", headers: jsonHeaders,
                                                body: json(["token": try provider.mint(provider.githubClaims(audience: "warrant.local")),
                                                            "csr": try opensslCSR(in: dir, name: "held")]))
            #expect(joined.status == .ok, "\(joined.text)")
            try (object(joined)["certificate"] as? String ?? "").write(toFile: "\(dir)/held.pem", atomically: true, encoding: .utf8)
            let holder = try await workloadConnection(cluster, to: follower, certificate: "\(dir)/held.pem", key: "\(dir)/held.key")
            let next = try opensslCSR(in: dir, name: "held-next")
            func renew() async throws -> HTTPClientResponse {
                try await holder.request(.POST, "/v1/svid/x509/renew", headers: jsonHeaders, body: json(["csr": next]))
            }
            func jwt() async throws -> HTTPClientResponse {
                try await holder.request(.POST, "/v1/svid/jwt/workload", headers: jsonHeaders, body: json(["audience": ["svc"]]))
            }
            /// Puts the rule (or deletes it, nil) and waits for every node to read it.
            func rule(_ yaml: String?) async throws {
                let response = if let yaml { try await putPolicy(admin, "policy/join/deploy", yaml) }
                    else { try await admin.request(.DELETE, "/v1/documents/policy/join/deploy") }
                #expect(response.status == .ok, "\(response.text)")
                try await Task.sleep(for: .seconds(1.1))
            }
            func expectRefused(_ why: String) async throws {
                for response in [try await renew(), try await jwt()] {
                    #expect(response.status == .forbidden && response.text.contains("policy_changed") && response.text.contains(why), "\(response.text)")
                }
            }
            #expect(try await renew().status == .ok)
            try await rule("description: deploys from main\n" + deployRule)
            #expect(try await renew().status == .ok, "a new description changes nothing")
            #expect(try await jwt().status == .ok)
            try await rule(deployRule.replacingOccurrences(of: "refs/heads/*", with: "refs/heads/main"))
            try await expectRefused("admits something else since")
            try await rule(deployRule)
            #expect(try await renew().status == .ok, "the rule put back as it was admits it again")
            try await rule(nil)
            try await expectRefused("removed since")
            try await rule(deployRule)
            #expect(try await admin.request(.DELETE, "/v1/documents/policy/issuers/github").status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            try await expectRefused("no longer configured")
            // Put back, then shadowed by another issuer with its iss (sorting first: it takes the tokens).
            #expect(try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(provider)).status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            #expect(try await renew().status == .ok, "the issuer put back as it was")
            #expect(try await putPolicy(admin, "policy/issuers/a-github", githubIssuerYAML(provider)).status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            try await expectRefused("takes no tokens")
            #expect(try await admin.request(.DELETE, "/v1/documents/policy/issuers/a-github").status == .ok)
            // The issuer taking another iss's tokens: its identities no longer derive.
            #expect(try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(provider, issuer: provider.issuer + "/other")).status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            try await expectRefused("admits something else since")
            let audit = object(try await admin.request(.GET, "/v1/audit?limit=1000"))["records"] as? [[String: Any]] ?? []
            #expect(audit.contains { ($0["result"] as? String ?? "").contains("policy_changed") }, "the refusals are audited as denials")
            await holder.close()
        }
    }

    @Test("warrant join inside simulated GitHub Actions and GitLab CI jobs: the identity names the repository and commit; failover past a dead endpoint; bad input gets one clear line, exit 1, nothing written")
    func joinCommand() async throws {
        let github = try TestIssuer(keys: [.rsa2048])
        try await github.serve()
        let gitlab = try TestIssuer(keys: [.rsa2048])
        try await gitlab.serve()
        defer { Task { await github.stop(); await gitlab.stop() } }
        try await InProcessCluster.withReadyFollower { cluster, _, follower, admin, _ in
            let dir = cluster.directory
            #expect(try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(github)).status == .ok)
            #expect(try await putPolicy(admin, "policy/join/deploy", deployRule).status == .ok)
            let gitlabIssuer = "method: gitlab\nissuer: \(gitlab.issuer)\nca_pem: |\n" + gitlab.caPEM.split(separator: "\n").map { "  \($0)" }.joined(separator: "\n") + "\n"
            #expect(try await putPolicy(admin, "policy/issuers/gitlab", gitlabIssuer).status == .ok)
            let gitlabRule = "issuer: gitlab\nspiffe_id: spiffe://warrant.local/gl/{project_path}\nconditions:\n  namespace_id: \"72\"\n  project_id: \"22\"\n"
            #expect(try await putPolicy(admin, "policy/join/gitlab", gitlabRule).status == .ok)
            try await Task.sleep(for: .seconds(1.1))
            let binary = try #require(warrantBinary())
            try github.caPEM.write(toFile: "\(dir)/github-ca.pem", atomically: true, encoding: .utf8)
            let api = "127.0.0.1:\(cluster.basePort + 100 + Int(follower) - 1)"
            let dead = "127.0.0.1:\(LocalProcessCluster.pickBasePort())"
            /// `warrant join` with only PATH and `environment` in its environment.
            func join(_ arguments: [String], environment: [String: String]) throws -> (status: Int32, output: String) {
                try run(["join"] + arguments, executable: binary,
                        environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(environment) { $1 })
            }
            let runner = ["GITHUB_ACTIONS": "true", "ACTIONS_ID_TOKEN_REQUEST_URL": "\(github.issuer)/actions/token?api-version=2.0",
                          "ACTIONS_ID_TOKEN_REQUEST_TOKEN": github.actionsRequestToken]
            // GitHub Actions: the token source is detected; the first endpoint is dead.
            let out = "\(dir)/identity"
            let ok = try join(["--endpoint", dead, "--endpoint", api, "--ca-file", "\(dir)/ca.pem", "--audience", "warrant.local",
                               "--token-request-ca", "\(dir)/github-ca.pem", "--out", out], environment: runner)
            #expect(ok.status == 0, "\(ok.output)")
            #expect(ok.output.contains("getting the job's token from GitHub Actions") && ok.output.contains("spiffe://warrant.local/gh/acme/api/deploy"), "\(ok.output)")
            let keyMode = IdentityFilesTests.mode("\(out)/svid.key")
            #expect(keyMode == 0o600)
            #expect(try run(["openssl", "verify", "-CAfile", "\(out)/bundle.pem", "\(out)/svid.pem"]).status == 0)
            let text = try run(["openssl", "x509", "-in", "\(out)/svid.pem", "-noout", "-text"]).output
            #expect(text.contains("acme/api") && text.contains("0123456789abcdef0123456789abcdef01234567"), "the identity names the repository and commit")
            let check = try run(["openssl", "pkey", "-in", "\(out)/svid.key", "-pubout"]).output
            #expect(check.contains("PUBLIC KEY"))
            #expect(try IdentityFilesTests.layout(out) == ["bundle.pem", "svid.key", "svid.pem"], "nothing temporary or older left")

            // The same from a configuration file; a key it does not know is refused by name.
            try "endpoints: [\"\(dead)\", \"\(api)\"]\nca_file: \(dir)/ca.pem\naudience: warrant.local\ntoken_request_ca: \(dir)/github-ca.pem\nout: \(dir)/from-config\n"
                .write(toFile: "\(dir)/join.yaml", atomically: true, encoding: .utf8)
            let configured = try join(["--config", "\(dir)/join.yaml", "--jwt-audience", "sts.amazonaws.com"], environment: runner)
            #expect(configured.status == 0 && FileManager.default.fileExists(atPath: "\(dir)/from-config/svid.pem"), "\(configured.output)")
            let jwtMode = IdentityFilesTests.mode("\(dir)/from-config/jwt-sts.amazonaws.com.token")
            #expect(jwtMode == 0o600, "one JWT-SVID file per audience, private")
            try "endpoint: x\n".write(toFile: "\(dir)/bad.yaml", atomically: true, encoding: .utf8)
            let badConfig = try join(["--config", "\(dir)/bad.yaml"], environment: runner)
            #expect(badConfig.status == 1 && badConfig.output.contains("unknown key 'endpoint'"), "\(badConfig.output)")

            // GitLab CI: the id_tokens variable.
            let gitlabToken = try gitlab.mint(gitlab.gitlabClaims(audience: "warrant.local"))
            let gl = try join(["--endpoint", api, "--ca-file", "\(dir)/ca.pem", "--out", "\(dir)/gl"],
                              environment: ["GITLAB_CI": "true", "WARRANT_ID_TOKEN": gitlabToken])
            #expect(gl.status == 0 && gl.output.contains("spiffe://warrant.local/gl/acme/platform/api"), "\(gl.output)")
            let glText = try run(["openssl", "x509", "-in", "\(dir)/gl/svid.pem", "-noout", "-text"]).output
            #expect(glText.contains("fedcba9876543210fedcba9876543210fedcba98"))

            // Bad input: one line saying what is wrong, exit 1, nothing written.
            try gitlab.mint(gitlab.gitlabClaims(audience: "sts.amazonaws.com")).write(toFile: "\(dir)/other.jwt", atomically: true, encoding: .utf8)
            try "not a directory".write(toFile: "\(dir)/plain-file", atomically: true, encoding: .utf8)
            let cases: [([String], [String: String], String)] = [
                (["--token-source", "file", "--token-file", "\(dir)/missing.jwt"], [:], "does not exist"),
                // A file that never ends is read only past the bound.
                (["--token-source", "file", "--token-file", "/dev/zero"], [:], "the token file /dev/zero is larger than 16384 bytes"),
                (["--token-source", "github", "--audience", "warrant.local"], [:], "id-token: write"),
                (["--token-source", "gitlab"], [:], "WARRANT_ID_TOKEN is not set"),
                (["--token-source", "file", "--token-file", "\(dir)/other.jwt"], [:], "wrong_audience"),
                (["--token-source", "file", "--token-file", "\(dir)/other.jwt", "--out", "\(dir)/plain-file/identity"], [:], "is not a directory"),
                (["--token-source", "carrier-pigeon"], [:], "unknown token source"),
            ]
            for (index, (arguments, environment, expected)) in cases.enumerated() {
                let target = "\(dir)/bad-\(index)"
                let result = try join(["--endpoint", api, "--ca-file", "\(dir)/ca.pem", "--out", target] + arguments, environment: environment)
                #expect(result.status == 1 && result.output.contains("warrant join: ") && result.output.contains(expected), "\(arguments): \(result.output)")
                #expect(!FileManager.default.fileExists(atPath: target), "\(arguments) left \(target) behind")
            }
            let noCA = try join(["--endpoint", api, "--ca-file", "\(dir)/nope.pem"], environment: runner)
            #expect(noCA.status == 1 && noCA.output.contains("CA file"))

            // warrant exec: the command runs with the identity and its status is ours; the private directory is gone afterwards.
            // An endpoint whose name does not resolve is that endpoint's failure only (it used to fail the client).
            let common = ["--endpoint", dead, "--endpoint", api, "--endpoint", "warrant-gone.invalid:8443", "--ca-file", "\(dir)/ca.pem", "--audience", "warrant.local", "--token-request-ca", "\(dir)/github-ca.pem"]
            let script = "echo \"$WARRANT_IDENTITY_DIR\" > \(dir)/exec-dir; openssl verify -CAfile \"$WARRANT_BUNDLE_FILE\" \"$WARRANT_SVID_FILE\" > /dev/null && test \"$WARRANT_SPIFFE_ID\" = spiffe://warrant.local/gh/acme/api/deploy && exit 7"
            let exec = try run(["exec"] + common + ["--", "sh", "-c", script], executable: binary,
                               environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            #expect(exec.status == 7, "\(exec.output)")
            let execDir = try String(contentsOfFile: "\(dir)/exec-dir", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(!execDir.isEmpty && !FileManager.default.fileExists(atPath: execDir), "the private identity directory is removed")
            // Renewed over mutual TLS at half its lifetime while the command runs.
            // (Each script polls, 30 s at most, for the change it waits for: a
            // busy machine can take longer than a fixed sleep.)
            let renewing = "a=$(openssl x509 -serial -noout -in \"$WARRANT_SVID_FILE\"); for i in $(seq 1 120); do sleep 0.25; "
                + "b=$(openssl x509 -serial -noout -in \"$WARRANT_SVID_FILE\"); test \"$a\" != \"$b\" && break; done; "
                + "test \"$a\" != \"$b\" && openssl verify -CAfile \"$WARRANT_BUNDLE_FILE\" \"$WARRANT_SVID_FILE\""
            let renewed = try run(["exec"] + common + ["--ttl", "4", "--", "sh", "-c", renewing], executable: binary,
                                  environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            #expect(renewed.status == 0 && renewed.output.contains("renewed: spiffe://warrant.local/gh/acme/api/deploy"), "\(renewed.output)")
            // JWT-SVIDs living shorter than the X509-SVID are fetched again at half their own lifetime.
            let jwtRefresh = "a=$(cat \"$WARRANT_JWT_FILE\"); for i in $(seq 1 120); do sleep 0.25; b=$(cat \"$WARRANT_JWT_FILE\"); test -n \"$b\" && test \"$a\" != \"$b\" && break; done; "
                + "test -n \"$a\" && test -n \"$b\" && test \"$a\" != \"$b\""
            let jwtRefreshed = try run(["exec"] + common + ["--ttl", "60", "--jwt-audience", "svc", "--jwt-ttl", "2", "--", "sh", "-c", jwtRefresh], executable: binary,
                                       environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            #expect(jwtRefreshed.status == 0 && !jwtRefreshed.output.contains("renewed:"), "the JWT-SVID changed while the X509-SVID stayed: \(jwtRefreshed.output)")
            // Revoked while its JWT-SVIDs refresh: the refused refresh hands over to the renewal, which joins again (before, the loop spun without renewing).
            // (A 300 s identity: no renewal at half its life can stand in for
            // the join again within the script's 45 s.)
            let revokedScript = "openssl x509 -serial -noout -in \"$WARRANT_SVID_FILE\" | cut -d= -f2 > \(dir)/revoke-serial; a=$(cat \(dir)/revoke-serial); "
                + "for i in $(seq 1 180); do sleep 0.25; b=$(openssl x509 -serial -noout -in \"$WARRANT_SVID_FILE\" | cut -d= -f2); test -n \"$b\" && test \"$a\" != \"$b\" && break; done; "
                + "test \"$a\" != \"$b\" && openssl verify -CAfile \"$WARRANT_BUNDLE_FILE\" \"$WARRANT_SVID_FILE\""
            let revokedRun = Task.detached {
                try run(["exec"] + common + ["--ttl", "300", "--jwt-audience", "svc", "--jwt-ttl", "2", "--", "sh", "-c", revokedScript], executable: binary,
                        environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            }
            #expect(await eventually(seconds: 30) { ((try? String(contentsOfFile: "\(dir)/revoke-serial", encoding: .utf8)) ?? "").count > 8 })
            let serial = try String(contentsOfFile: "\(dir)/revoke-serial", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            let revoked = try await admin.request(.POST, "/v1/revocations", headers: jsonHeaders, body: json(["serial": serial, "reason": "test"]))
            #expect(revoked.status == .ok, "\(revoked.text)")
            let revokedResult = try await revokedRun.value
            #expect(revokedResult.status == 0 && revokedResult.output.contains("renewing now") && revokedResult.output.contains("joining again"), "\(revokedResult.output)")
            // JWT-SVIDs for the job over mutual TLS, handed to unchanged AWS tooling through its web-identity variables.
            let aws = "test \"$AWS_ROLE_ARN\" = arn:aws:iam::123456789012:role/deploy && cp \"$AWS_WEB_IDENTITY_TOKEN_FILE\" \(dir)/aws.jwt && test \"$WARRANT_JWT_FILE\" = \"$AWS_WEB_IDENTITY_TOKEN_FILE\""
            let awsRun = try run(["exec"] + common + ["--jwt-audience", "sts.amazonaws.com", "--aws-role-arn", "arn:aws:iam::123456789012:role/deploy",
                                                      "--", "sh", "-c", aws], executable: binary,
                                 environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            #expect(awsRun.status == 0, "\(awsRun.output)")
            let awsJWT = try String(contentsOfFile: "\(dir)/aws.jwt", encoding: .utf8)
            let awsVerdict = object(try await admin.request(.POST, "/v1/verify", headers: jsonHeaders, body: json(["jwt": awsJWT, "audience": "sts.amazonaws.com"])))
            #expect(awsVerdict["valid"] as? Bool == true && awsVerdict["spiffe_id"] as? String == "spiffe://warrant.local/gh/acme/api/deploy", "\(awsVerdict)")
            #expect((awsVerdict["attributes"] as? [String: String])?["repository"] == "acme/api")
            // Without a workload certificate there is no JWT-SVID.
            let anonymous = try await cluster.connection(to: follower, admin: false)
            #expect(try await anonymous.request(.POST, "/v1/svid/jwt/workload", headers: jsonHeaders, body: json(["audience": ["x"]])).status == .unauthorized)
            await anonymous.close()
            // A per-step identity: the job's SPIFFE ID extended, audited as coming from the job's identity, closed with the exit status.
            // Nor the means to the job's own identity: the runner's token request variables are withheld.
            #expect(runner["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] != nil && runner["ACTIONS_ID_TOKEN_REQUEST_URL"] != nil)
            let stepScript = "test -z \"$ACTIONS_ID_TOKEN_REQUEST_TOKEN$ACTIONS_ID_TOKEN_REQUEST_URL\" && "
                + "test \"$WARRANT_SPIFFE_ID\" = spiffe://warrant.local/gh/acme/api/deploy/step/terraform-apply && "
                + "openssl x509 -in \"$WARRANT_SVID_FILE\" -noout -text | grep -q '\"step\":\"terraform-apply\"' && exit 3"
            let stepRun = try run(["exec"] + common + ["--step", "terraform-apply", "--", "sh", "-c", stepScript], executable: binary,
                                  environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            #expect(stepRun.status == 3 && stepRun.output.contains("step terraform-apply closed with exit status 3"), "\(stepRun.output)")
            #expect(stepRun.output.contains("withheld from the step's command: ACTIONS_ID_TOKEN_REQUEST_TOKEN, ACTIONS_ID_TOKEN_REQUEST_URL"), "\(stepRun.output)")
            let records = object(try await admin.request(.GET, "/v1/audit?limit=1000"))["records"] as? [[String: Any]] ?? []
            let stepIssue = records.last { ($0["action"] as? String) == "identity.issue" && ($0["target"] as? String ?? "").hasSuffix("/step/terraform-apply") }
            let stepClose = records.last { ($0["action"] as? String) == "step.close" }
            let stepIssueResult = stepIssue?["result"] as? String ?? ""
            let stepCloseResult = stepClose?["result"] as? String ?? "", stepCloseTarget = stepClose?["target"] as? String ?? ""
            #expect(stepIssueResult.contains("renewed_from="), "the step's record names the job identity it came from")
            #expect(stepCloseResult.contains("exit_status=3") && stepCloseTarget.hasSuffix("/step/terraform-apply"), "\(String(describing: stepClose))")
            let badStep = try run(["exec"] + common + ["--step", "Bad Name", "--", "true"], executable: binary,
                                  environment: ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin"].merging(runner) { $1 })
            #expect(badStep.status == 1 && badStep.output.contains("bad_step"), "\(badStep.output)")
            let noCommand = try run(["exec"] + common, executable: binary, environment: runner)
            #expect(noCommand.status == 1 && noCommand.output.contains("give the command to run after --"), "\(noCommand.output)")
        }
    }
}

extension JoinTests {
    /// A ready cluster, a simulated GitHub job, and the arguments of
    /// `warrant exec` for a 4-second identity with every node as an
    /// endpoint, the leader first.
    func withFourSecondExec(_ body: (InProcessCluster, _ leader: UInt64, _ binary: String, _ environment: [String: String], _ arguments: [String]) async throws -> Void) async throws {
        try await withGitHubJob { cluster, leader, _, _, _, binary, environment in
            let dir = cluster.directory
            var arguments = ["exec", "--ca-file", "\(dir)/ca.pem", "--audience", "warrant.local", "--token-request-ca", "\(dir)/github-ca.pem", "--ttl", "4"]
            for id in [leader] + [UInt64(1), 2, 3].filter({ $0 != leader }) { arguments += ["--endpoint", "127.0.0.1:\(cluster.basePort + 100 + Int(id) - 1)"] }
            try await body(cluster, leader, binary, environment, arguments)
        }
    }

    @Test("Killing the leader while warrant exec renews a short-lived identity: the command never sees an expired or missing identity")
    func renewalAcrossLeaderLoss() async throws {
        try await withFourSecondExec { cluster, leader, binary, environment, arguments in
            // An 8-second identity here (renewed every 4 s), so that the
            // election and a renewal after the loss fit in its life on a busy
            // machine. Every half second for 24 s: the certificate is
            // unexpired and the key is there.
            let arguments = arguments.map { $0 == "4" ? "8" : $0 }
            let watch = "for i in $(seq 1 48); do openssl x509 -checkend 0 -noout -in \"$WARRANT_SVID_FILE\" > /dev/null || exit 9; "
                + "test -s \"$WARRANT_KEY_FILE\" || exit 8; sleep 0.5; done"
            let execution = Task.detached { try run(arguments + ["--", "sh", "-c", watch], executable: binary, environment: environment) }
            try await Task.sleep(for: .seconds(6))
            await cluster.stop(leader)
            let result = try await execution.value
            #expect(result.status == 0, "\(result.output)")
            #expect(result.output.components(separatedBy: "renewed:").count - 1 >= 3, "renewed across the leader's loss: \(result.output)")
        }
    }

    @Test("warrant exec joins again, with a fresh platform token, once its identity expired while every node was down (no renewal can work then): the command gets a valid identity back")
    func joinAgainAfterExpiry() async throws {
        try await withFourSecondExec { cluster, _, binary, environment, arguments in
            let dir = cluster.directory
            // Says it runs (the job has joined); waits (20 s at most) until the expired identity is removed, then (40 s at most) for a valid one.
            let started = "\(dir)/exec-started"
            let watch = "touch \(started); for i in $(seq 1 80); do test -s \"$WARRANT_SVID_FILE\" || break; sleep 0.25; done; test -s \"$WARRANT_SVID_FILE\" && exit 5; "
                + "for i in $(seq 1 160); do openssl x509 -checkend 0 -noout -in \"$WARRANT_SVID_FILE\" > /dev/null 2>&1 && exit 0; sleep 0.25; done; exit 9"
            let execution = Task.detached { try run(arguments + ["--", "sh", "-c", watch], executable: binary, environment: environment) }
            #expect(await eventually(seconds: 30) { FileManager.default.fileExists(atPath: started) }, "the job joined")
            for id in [UInt64(1), 2, 3] { await cluster.stop(id) }
            try await Task.sleep(for: .seconds(6))
            for id in [UInt64(1), 2, 3] { try cluster.start(id) }
            let result = try await execution.value
            #expect(result.status == 0, "\(result.output)")
            #expect(result.output.contains("renewal impossible, the identity expired") && result.output.contains("joining again"), "\(result.output)")
            #expect(result.output.contains("the identity expired; the files are removed"), "\(result.output)")
        }
    }
}

extension JoinTests {
    @Test("warrant agent serves the SPIFFE Workload API: py-spiffe fetches X.509 and JWT SVIDs and bundles and validates a JWT-SVID; a call without the header gets INVALID_ARGUMENT; a socket in use is refused")
    func workloadAPI() async throws {
        try await withGitHubJob { cluster, _, follower, admin, _, binary, environment in
            let dir = cluster.directory
            let socket = "\(dir)/agent.sock"
            let arguments = ["agent", "--endpoint", "127.0.0.1:\(cluster.basePort + 100 + Int(follower) - 1)", "--ca-file", "\(dir)/ca.pem",
                             "--audience", "warrant.local", "--token-request-ca", "\(dir)/github-ca.pem", "--socket", socket, "--exit-after", "300",
                             "--bundle-refresh", "1", "--out", "\(dir)/agent-out"]
            let agent = Process()
            agent.executableURL = URL(fileURLWithPath: binary)
            agent.arguments = arguments
            agent.environment = environment
            let log = Pipe()
            agent.standardError = log
            agent.standardOutput = log
            try agent.run()
            defer { if agent.isRunning { kill(agent.processIdentifier, SIGTERM) } }
            #expect(await eventually(seconds: 30) { FileManager.default.fileExists(atPath: socket) }, "the agent makes its socket")
            let mode = try FileManager.default.attributesOfItem(atPath: socket)[.posixPermissions] as? Int
            #expect(mode == 0o600, "only the agent's user may connect")
            let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("python/workload_api_client.py").path
            let python = try run(["python3", script, socket, "spiffe://warrant.local/gh/acme/api/deploy"])
            #expect(python.status == 0 && python.output.contains("py-spiffe ok") && python.output.contains("INVALID_ARGUMENT"), "\(python.output)")
            // A CA prepared by a rotation reaches the Workload API's bundles within the refresh interval, not at the next renewal.
            let countAuthorities = """
                from spiffe import WorkloadApiClient, TrustDomain
                with WorkloadApiClient(socket_path="unix://\(socket)", default_timeout=10) as client:
                    print("authorities", len(client.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain("warrant.local")).x509_authorities))
                """
            let before = try run(["python3", "-c", countAuthorities])
            let authorities = try #require(before.output.firstMatch(of: /authorities (\d+)/).flatMap { Int($0.output.1) }, "\(before.output)")
            let rotated = try await admin.request(.POST, "/v1/ca/rotate", headers: jsonHeaders, body: json([:]))
            #expect(rotated.status == .ok, "\(rotated.text)")
            #expect(await eventually(seconds: 15) {
                (try? run(["python3", "-c", countAuthorities]))?.output.contains("authorities \(authorities + 1)") == true
            }, "the prepared authority is served by the agent")
            // And reaches bundle.pem, for programs that read the files.
            #expect(await eventually(seconds: 15) {
                ((try? String(contentsOfFile: "\(dir)/agent-out/bundle.pem", encoding: .utf8))?.components(separatedBy: "BEGIN CERTIFICATE").count ?? 0) - 1 == authorities + 1
            }, "the prepared authority is in bundle.pem: \((try? String(contentsOfFile: "\(dir)/agent-out/bundle.pem", encoding: .utf8)) ?? "none")")
            // A bundle.pem gone (or not as published) is put back at the next refresh.
            let published = try String(contentsOfFile: "\(dir)/agent-out/bundle.pem", encoding: .utf8)
            try FileManager.default.removeItem(atPath: "\(dir)/agent-out/bundle.pem")
            #expect(await eventually(seconds: 15) { (try? String(contentsOfFile: "\(dir)/agent-out/bundle.pem", encoding: .utf8)) == published },
                    "bundle.pem written again")
            // A raw call claiming to be another process in its own metadata is judged on the kernel's word.
            let forged = try run(["python3", "-c", """
                import grpc, sys
                channel = grpc.insecure_channel("unix:\(socket)")
                call = channel.unary_stream("/SpiffeWorkloadAPI/FetchJWTBundles", request_serializer=lambda x: x, response_deserializer=lambda x: x)
                try:
                    next(iter(call(b"", timeout=10, metadata=[("workload.spiffe.io", "true"), ("x-warrant-peer", "pid=1,uid=4242,gid=0")])))
                    print("ANSWERED")
                except grpc.RpcError as error:
                    print(error.code())
                """])
            #expect(forged.output.contains("ANSWERED"), "the caller's real uid is allowed whatever it claims: \(forged.output)")
            // A second agent on the same socket is refused with a clear line.
            let second = try run(arguments, executable: binary, environment: environment)
            #expect(second.status == 1 && second.output.contains("already in use"), "\(second.output)")
            kill(agent.processIdentifier, SIGTERM)
            agent.waitUntilExit()
            #expect(agent.terminationStatus == 0 && !FileManager.default.fileExists(atPath: socket), "SIGTERM stops the agent and removes its socket")

            // An agent whose rules admit only another user refuses this process, even when it claims that user.
            let strict = "\(dir)/strict.sock"
            let strictArguments = arguments.map { $0 == socket ? strict : $0 } + ["--allow", "uid=4242", "--allow", "uid=4243,exe=/bin/false"]
            let strictAgent = Process()
            strictAgent.executableURL = URL(fileURLWithPath: binary)
            strictAgent.arguments = strictArguments
            strictAgent.environment = environment
            strictAgent.standardError = FileHandle.nullDevice
            strictAgent.standardOutput = FileHandle.nullDevice
            try strictAgent.run()
            defer { if strictAgent.isRunning { kill(strictAgent.processIdentifier, SIGTERM) } }
            #expect(await eventually(seconds: 30) { FileManager.default.fileExists(atPath: strict) })
            let refused = try run(["python3", "-c", """
                import grpc
                channel = grpc.insecure_channel("unix:\(strict)")
                for claimed in [None, "pid=1,uid=4242,gid=0"]:
                    metadata = [("workload.spiffe.io", "true")] + ([("x-warrant-peer", claimed)] if claimed else [])
                    try:
                        next(iter(channel.unary_stream("/SpiffeWorkloadAPI/FetchJWTBundles", request_serializer=lambda x: x, response_deserializer=lambda x: x)(b"", timeout=10, metadata=metadata)))
                        print("ANSWERED")
                    except grpc.RpcError as error:
                        print(error.code())
                """])
            #expect(refused.output.components(separatedBy: "PERMISSION_DENIED").count - 1 == 2 && !refused.output.contains("ANSWERED"), "\(refused.output)")
            let badRule = try run(arguments.map { $0 == socket ? "\(dir)/other.sock" : $0 } + ["--allow", "uid=me"], executable: binary, environment: environment)
            #expect(badRule.status == 1 && badRule.output.contains("--allow uid=me"), "\(badRule.output)")
            var badRefresh = arguments.map { $0 == socket ? "\(dir)/other.sock" : $0 }
            badRefresh[try #require(badRefresh.firstIndex(of: "--bundle-refresh")) + 1] = "0"
            let refreshRefused = try run(badRefresh, executable: binary, environment: environment)
            #expect(refreshRefused.status == 1 && refreshRefused.output.contains("--bundle-refresh must be between 1 and 3600"), "\(refreshRefused.output)")
            #expect(!FileManager.default.fileExists(atPath: "\(dir)/other.sock"))
        }
    }
}

/// A ready cluster with a simulated GitHub job set up (`simulatedGitHubJob`):
/// the cluster, its leader, a follower, an admin connection, the issuer,
/// the warrant binary and the job's environment.
func withGitHubJob(_ body: (InProcessCluster, _ leader: UInt64, _ follower: UInt64, HTTPConnection, TestIssuer, _ binary: String,
                            _ environment: [String: String]) async throws -> Void) async throws {
    let github = try TestIssuer(keys: [.rsa2048])
    try await github.serve()
    defer { Task { await github.stop() } }
    try await InProcessCluster.withReadyFollower { cluster, leader, follower, admin, _ in
        let (binary, environment) = try await simulatedGitHubJob(admin, github, directory: cluster.directory)
        try await body(cluster, leader, follower, admin, github, binary, environment)
    }
}

/// Configures the GitHub issuer (backed by `github`) and the deploy rule,
/// writes the provider's CA to `directory/github-ca.pem`, and returns the
/// warrant binary and a simulated GitHub Actions runner's environment.
private func simulatedGitHubJob(_ admin: HTTPConnection, _ github: TestIssuer, directory: String) async throws -> (String, [String: String]) {
    #expect(try await putPolicy(admin, "policy/issuers/github", githubIssuerYAML(github)).status == .ok)
    #expect(try await putPolicy(admin, "policy/join/deploy", deployRule).status == .ok)
    try await Task.sleep(for: .seconds(1.1))
    let binary = try #require(warrantBinary())
    try github.caPEM.write(toFile: "\(directory)/github-ca.pem", atomically: true, encoding: .utf8)
    return (binary, ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin", "GITHUB_ACTIONS": "true",
                     "ACTIONS_ID_TOKEN_REQUEST_URL": "\(github.issuer)/actions/token", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": github.actionsRequestToken])
}

extension JoinTests {
    @Test("A signal to warrant exec once its command ended stops the step's closing at once, instead of being ignored until a cluster that does not answer times out: exec says the step may not be closed and exits with the command's status")
    func execSignalWhileClosing() async throws {
        try await withGitHubJob { cluster, leader, _, _, _, binary, environment in
            let dir = cluster.directory
            // The cluster through a proxy that can stop answering.
            let proxy = FaultProxy(target: try SocketAddress(ipAddress: "127.0.0.1", port: cluster.basePort + 100 + Int(leader) - 1))
            let port = try await proxy.start()
            defer { Task { await proxy.stop() } }
            let (started, release, log) = ("\(dir)/closing.started", "\(dir)/closing.release", "\(dir)/closing.log")
            #expect(FileManager.default.createFile(atPath: log, contents: nil))
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["exec", "--endpoint", "127.0.0.1:\(port)", "--ca-file", "\(dir)/ca.pem", "--audience", "warrant.local",
                                 "--token-request-ca", "\(dir)/github-ca.pem", "--step", "closing", "--",
                                 "sh", "-c", "touch \(started); for i in $(seq 1 240); do test -f \(release) && exit 5; sleep 0.25; done; exit 9"]
            process.environment = environment
            process.standardOutput = FileHandle.nullDevice
            process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
            try process.run()
            defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
            func said() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
            #expect(await eventually(seconds: 30) { FileManager.default.fileExists(atPath: started) }, "\(said())")
            // From now on nothing the job sends gets an answer; the command then ends.
            proxy.set(.stall)
            #expect(FileManager.default.createFile(atPath: release, contents: nil))
            #expect(await eventually(seconds: 30) { said().contains("closing step closing in the audit") }, "\(said())")
            kill(process.processIdentifier, SIGTERM)
            // Without the signal the close would wait out the client's 10 s timeout.
            #expect(await eventually(seconds: 30) { !process.isRunning }, "\(said())")
            process.waitUntilExit()
            #expect(process.terminationStatus == 5, "\(said())")
            #expect(said().contains("closing step closing stopped by a signal: it may not be closed in the audit"), "\(said())")
            #expect(!said().contains("could not close step"), "\(said())")
        }
    }

    @Test("The job-side client follows the leader: starting on a follower, it finds and then prefers the leader's endpoint; cancelled while a node holds its request, it stops there")
    func clientFollowsLeader() async throws {
        try await withGitHubJob { cluster, leader, _, _, github, _, _ in
            let followers = [UInt64(1), 2, 3].filter { $0 != leader }
            let order = followers + [leader]
            let endpoints = try order.map { try HostPort(parsing: "127.0.0.1:\(cluster.basePort + 100 + Int($0) - 1)", at: "test") }
            let client = try WarrantClient(endpoints: endpoints, caPEM: try String(contentsOfFile: "\(cluster.directory)/ca.pem", encoding: .utf8))
            let csr = try opensslCSR(in: cluster.directory, name: "follow")
            var forwarded: [Bool] = []
            for _ in 0..<4 {
                let token = try github.mint(github.githubClaims(audience: "warrant.local"))
                let response = try await client.request(.POST, "/v1/join", json: json(["token": token, "csr": csr]))
                #expect(response.status == .ok, "\(response.text)")
                forwarded.append(response.headers.first(name: "warrant-forwarded-by") != nil)
            }
            #expect(forwarded.first == true && forwarded.last == false, "\(forwarded)")
            #expect(client.preferredEndpoint == endpoints[2], "the leader's endpoint is preferred")
            await client.close()

            // Cancelled while a node that does not answer holds its request:
            // the caller gets the cancellation, not a failure of every node
            // (the next one is not asked).
            let proxy = FaultProxy(target: try SocketAddress(ipAddress: "127.0.0.1", port: endpoints[2].port))
            let port = try await proxy.start()
            defer { Task { await proxy.stop() } }
            proxy.set(.stall)
            let stalledFirst = try WarrantClient(endpoints: [try HostPort(parsing: "127.0.0.1:\(port)", at: "test"), endpoints[2]],
                                                 caPEM: try String(contentsOfFile: "\(cluster.directory)/ca.pem", encoding: .utf8))
            let asked = Task { try await stalledFirst.request(.GET, "/healthz") }
            try await Task.sleep(for: .milliseconds(300))
            asked.cancel()
            await #expect(throws: CancellationError.self) { _ = try await asked.value }
            await stalledFirst.close()
        }
    }
}

private func replacingIssuer(_ claims: [(String, TestIssuer.Claim)], _ issuer: String) -> [(String, TestIssuer.Claim)] {
    claims.map { $0.0 == "iss" ? ("iss", .string(issuer)) : $0 }
}

extension JoinTests {
    @Test("warrant exec's command starts with nothing blocked, SIGPIPE and the signals exec passes on at their defaults (but one exec was started ignoring, as under nohup) and no descriptor of exec's; a SIGTERM to exec reaches the command's own children; a SIGKILL to exec ends them through its watchdog")
    func execSignalsAndDescriptors() async throws {
        try await withGitHubJob { cluster, leader, _, _, _, binary, environment in
            let dir = cluster.directory
            let exec = [binary, "exec", "--endpoint", "127.0.0.1:\(cluster.basePort + 100 + Int(leader) - 1)", "--ca-file", "\(dir)/ca.pem",
                        "--audience", "warrant.local", "--token-request-ca", "\(dir)/github-ca.pem", "--"]
            // The command reads its own status: no shell between (dash
            // clears its signal mask when it starts, which would hide a
            // blocked one, and blocks every signal while it waits for a child).
            let signalProbe = exec + ["grep", "-E", "SigBlk|SigIgn", "/proc/self/status"]
            func ignoredSignals(_ output: String) throws -> UInt64 {
                try #require(output.firstMatch(of: /SigIgn:\t([0-9a-f]+)/).flatMap { UInt64($0.output.1, radix: 16) }, "\(output)")
            }
            let probed = try run(signalProbe, environment: environment)
            #expect(probed.status == 0 && probed.output.contains("SigBlk:\t0000000000000000"), "\(probed.output)")
            let ignored = try ignoredSignals(probed.output)
            for number in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE] { #expect(ignored & (1 << UInt64(number - 1)) == 0, "signal \(number) ignored: \(probed.output)") }
            let shell = try run(exec + ["sh", "-c", "yes | head -1 > /dev/null; echo descriptors $(ls -1 /proc/self/fd | wc -l)"], environment: environment)
            // (yes ends by SIGPIPE when head is done, as in any shell.)
            #expect(shell.status == 0 && !shell.output.contains("Broken pipe"), "\(shell.output)")
            // 0, 1, 2 and ls's own of the directory.
            #expect(shell.output.contains("descriptors 4"), "\(shell.output)")
            // Started ignoring SIGHUP (nohup): the command ignores it too.
            let underNohup = try run(["sh", "-c", "trap '' HUP; exec \"$@\"", "sh"] + signalProbe, environment: environment)
            #expect(try ignoredSignals(underNohup.output) & (1 << UInt64(SIGHUP - 1)) != 0, "\(underNohup.output)")

            // A command's child in the background: a SIGTERM to exec reaches it too.
            /// exec running `script` in the background, its output discarded.
            func startExec(_ script: String) throws -> Process {
                let process = Process()
                process.executableURL = URL(fileURLWithPath: binary)
                process.arguments = Array(exec.dropFirst()) + ["sh", "-c", script]
                process.environment = environment
                process.standardOutput = FileHandle.nullDevice
                process.standardError = FileHandle.nullDevice
                try process.run()
                return process
            }
            let pidFile = "\(dir)/sleeper.pid"
            let sleeper = try startExec("sleep 37 & echo $$ $! > \(pidFile); wait")
            defer { if sleeper.isRunning { kill(sleeper.processIdentifier, SIGKILL) } }
            #expect(await eventually(seconds: 30) { FileManager.default.fileExists(atPath: pidFile) && ((try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? "").hasSuffix("\n") })
            let sleeperPids = try String(contentsOfFile: pidFile, encoding: .utf8).split(whereSeparator: \.isWhitespace).compactMap { Int32($0) }
            try #require(sleeperPids.count == 2, "\(sleeperPids)")
            let sleeping = sleeperPids[1]
            // Running: there, and not a zombie (whoever adopts it may not reap it).
            func running(_ pid: Int32) -> Bool {
                guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
                return !stat[close...].hasPrefix(") Z")
            }
            /// exec's watchdog (started by exec before the join, told the
            /// command's group once it runs), if it runs.
            func watchdog(of exec: Int32) -> Int32? {
                for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
                    guard let pid = Int32(entry), let bytes = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline"),
                          let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { continue }
                    let words = bytes.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
                    // After the name: state, then the parent's pid.
                    let fields = stat[stat.index(after: close)...].split(separator: " ")
                    // (A fourth word: exec's private identity directory, removed if exec is killed.)
                    if words.count == 3 || words.count == 4, words[1] == "__exec-watchdog", words[2] == "0", fields.count > 1,
                       Int32(fields[1]) == exec, running(pid) { return pid }
                }
                return nil
            }
            #expect(running(sleeping), "the command's child runs")
            #expect(await eventually(seconds: 30) { watchdog(of: sleeper.processIdentifier) != nil }, "exec's watchdog runs beside the command")
            let sleeperWatchdog = watchdog(of: sleeper.processIdentifier)
            kill(sleeper.processIdentifier, SIGTERM)
            #expect(await eventually(seconds: 15) { !sleeper.isRunning }, "exec ends with its command")
            #expect(await eventually(seconds: 10) { !running(sleeping) }, "the command's child got the SIGTERM too")
            if running(sleeping) { kill(sleeping, SIGKILL) }
            #expect(await eventually(seconds: 15) { sleeperWatchdog.map { !running($0) } ?? true }, "the watchdog left once exec ended")

            // exec killed with SIGKILL (a runner ending the job's process
            // group): its watchdog ends the command's group, child and all.
            let killedFile = "\(dir)/killed.pids", killedDirectoryFile = "\(dir)/killed.directory"
            let killed = try startExec("echo \"$WARRANT_IDENTITY_DIR\" > \(killedDirectoryFile); sleep 41 & echo $$ $! > \(killedFile); wait")
            defer { if killed.isRunning { kill(killed.processIdentifier, SIGKILL) } }
            #expect(await eventually(seconds: 30) { ((try? String(contentsOfFile: killedFile, encoding: .utf8)) ?? "").hasSuffix("\n") })
            let pids = try String(contentsOfFile: killedFile, encoding: .utf8).split(whereSeparator: \.isWhitespace).compactMap { Int32($0) }
            try #require(pids.count == 2, "\(pids)")
            #expect(pids.allSatisfy(running), "the command and its child run")
            #expect(watchdog(of: killed.processIdentifier) != nil, "exec's watchdog runs beside the command")
            // exec tells the watchdog the command's group right after the
            // spawn, microseconds before the command's own shell has even
            // started; nothing shows it from outside, so a margin.
            try await Task.sleep(for: .milliseconds(200))
            let identityDirectory = try String(contentsOfFile: killedDirectoryFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(FileManager.default.fileExists(atPath: "\(identityDirectory)/svid.key"), "exec's private directory: \(identityDirectory)")
            kill(killed.processIdentifier, SIGKILL)
            #expect(await eventually(seconds: 15) { !pids.contains(where: running) }, "the command or its child outlived exec's SIGKILL")
            for pid in pids where running(pid) { kill(pid, SIGKILL) }
            // Nor does the identity's key outlive it in the temporary directory.
            #expect(await eventually(seconds: 15) { !FileManager.default.fileExists(atPath: identityDirectory) }, "\(identityDirectory) left behind")

            // exec killed with SIGKILL during the join (a cluster that
            // accepts connections and never answers): its directory, made
            // first, is gone too (the watchdog starts right after it).
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            try #require(listener >= 0)
            defer { close(listener) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) == 0 && listen(listener, 8) == 0 && getsockname(listener, $0, &length) == 0 }
            }
            try #require(bound, "a silent listener on loopback")
            let silentPort = Int(UInt16(bigEndian: address.sin_port))
            let temporaryDirectory = "\(dir)/exec-tmp"
            try FileManager.default.createDirectory(atPath: temporaryDirectory, withIntermediateDirectories: true)
            let joining = Process()
            joining.executableURL = URL(fileURLWithPath: binary)
            joining.arguments = ["exec", "--endpoint", "127.0.0.1:\(silentPort)", "--ca-file", "\(dir)/ca.pem", "--audience", "warrant.local",
                                 "--token-request-ca", "\(dir)/github-ca.pem", "--", "true"]
            joining.environment = environment.merging(["TMPDIR": temporaryDirectory]) { $1 }
            joining.standardOutput = FileHandle.nullDevice
            joining.standardError = FileHandle.nullDevice
            try joining.run()
            defer { if joining.isRunning { kill(joining.processIdentifier, SIGKILL) } }
            func madeDirectories() -> [String] {
                ((try? FileManager.default.contentsOfDirectory(atPath: temporaryDirectory)) ?? []).filter { $0.hasPrefix("warrant-exec-") }
            }
            #expect(await eventually(seconds: 30) { madeDirectories().count == 1 && watchdog(of: joining.processIdentifier) != nil },
                    "exec made its directory and started its watchdog before joining")
            #expect(joining.isRunning, "exec waits for the silent cluster")
            kill(joining.processIdentifier, SIGKILL)
            #expect(await eventually(seconds: 15) { madeDirectories().isEmpty }, "\(madeDirectories()) left behind by exec killed while joining")
        }
    }
}
