import Attestation
import Authority
import Policy
import Testing

let trustDomain = "example.org"

func githubIssuer() throws -> IssuerConfig {
    try IssuerConfig(name: "github", document: "profile: github\n", defaultAudience: trustDomain)
}

func rule(_ yaml: String, name: String = "deploy", method: JoinMethod? = .github) throws -> JoinRule {
    try JoinRule(name: name, document: yaml, method: method, trustDomain: trustDomain)
}

let jobClaims: [String: String] = [
    "repository": "acme/api", "repository_owner": "acme", "repository_owner_id": "1342004", "repository_id": "72855771",
    "ref": "refs/heads/main", "sha": "0123abcd", "workflow": "deploy", "event_name": "push", "environment": "production",
    "workflow_ref": "acme/api/.github/workflows/deploy.yml@refs/heads/main", "run_id": "811", "run_attempt": "1", "actor": "octocat",
]

@Suite("Join rules")
struct PolicyTests {
    @Test("An issuer's fingerprint follows whose tokens it takes and how it knows their keys (method, iss, inline JWKS, pinned CA), not the checks on a token at its join")
    func issuerFingerprint() throws {
        func issuer(_ yaml: String) throws -> IssuerConfig { try IssuerConfig(name: "ci", document: yaml, defaultAudience: trustDomain) }
        let base = "method: oidc\nissuer: https://ci.example.com\n"
        let fingerprint = try issuer(base).fingerprint
        #expect(try issuer(base + "audience: other\nmax_token_age_seconds: 60\n").fingerprint == fingerprint)
        #expect(try issuer("method: oidc\nissuer: https://ci2.example.com\n").fingerprint != fingerprint)
        #expect(try issuer(base.replacingOccurrences(of: "oidc", with: "github")).fingerprint != fingerprint)
    }

    @Test("A rule's fingerprint follows what it admits: not its description, layout or the order of its conditions or values; any issuer, template, TTL cap, lifetime, operator or value changes it")
    func ruleFingerprint() throws {
        let base = "issuer: github\nspiffe_id: spiffe://example.org/gh/{repository}\nttl_max_seconds: 600\nconditions:\n  repository: acme/api\n  ref: {one_of: [refs/heads/main, refs/heads/dev]}\n"
        let same = [
            "description: deploys\n" + base,
            "conditions:\n  ref: {one_of: [refs/heads/dev, refs/heads/main]}\n  repository: \"acme/api\"\nttl_max_seconds: 600\nspiffe_id: spiffe://example.org/gh/{repository}\nissuer: github\n",
        ]
        let different = [
            base.replacingOccurrences(of: "issuer: github", with: "issuer: github2"),
            base.replacingOccurrences(of: "gh/{repository}", with: "ci/{repository}"),
            base.replacingOccurrences(of: "600", with: "601"),
            base + "max_lifetime_seconds: 30000\n",
            base.replacingOccurrences(of: "one_of", with: "not_one_of"),
            base.replacingOccurrences(of: "refs/heads/dev]", with: "refs/heads/de]"),
            base + "  event_name: push\n",
        ]
        let single = "issuer: github\nspiffe_id: spiffe://example.org/gh/{repository}\nconditions:\n  ref: refs/heads/main\n"
        for yaml in ["ref: [refs/heads/main]", "ref: {one_of: [refs/heads/main, refs/heads/main]}", "ref: {glob: refs/heads/main}", "ref: {equals: refs/heads/main}"] {
            #expect(try rule(single.replacingOccurrences(of: "ref: refs/heads/main", with: yaml)).fingerprint == rule(single).fingerprint, "\(yaml)")
        }
        #expect(try rule(single.replacingOccurrences(of: "ref: refs/heads/main", with: "ref: {glob: refs/heads/*}")).fingerprint != rule(single).fingerprint)
        #expect(try rule(single.replacingOccurrences(of: "ref: refs/heads/main", with: "ref: {not_equals: refs/heads/main}")).fingerprint
                != rule(single).fingerprint)
        let fingerprint = try rule(base).fingerprint
        #expect(fingerprint.count == 16 && fingerprint.allSatisfy(\.isHexDigit))
        for yaml in same { #expect(try rule(yaml).fingerprint == fingerprint, "\(yaml)") }
        for yaml in different { #expect(try rule(yaml).fingerprint != fingerprint, "\(yaml)") }
        #expect(Set(try different.map { try rule($0).fingerprint }).count == different.count)
    }

    @Test("Globs are anchored to the whole value and '*' never crosses '/' or ':'")
    func globs() {
        #expect(Glob.matches(pattern: "refs/heads/*", "refs/heads/main"))
        #expect(!Glob.matches(pattern: "refs/heads/*", "refs/heads/feature/x"))
        #expect(!Glob.matches(pattern: "refs/heads/*", "xrefs/heads/main"))
        #expect(!Glob.matches(pattern: "refs/heads/ma", "refs/heads/main"))
        #expect(Glob.matches(pattern: "acme/*", "acme/api"))
        #expect(!Glob.matches(pattern: "acme/*", "acme/api/../../evil"))
        #expect(!Glob.matches(pattern: "repo:acme/*", "repo:acme/api:ref:x"))
        #expect(Glob.matches(pattern: "*/*", "a/b") && !Glob.matches(pattern: "*", "a/b"))
        #expect(Glob.matches(pattern: "v*.*", "v1.2") && Glob.matches(pattern: "*", ""))
        #expect(!Glob.matches(pattern: "acme/*", "аcme/api"), "a Cyrillic 'а' is another byte sequence")
        #expect(Glob.matches(pattern: "a*b*c", "aXbYbZc") && !Glob.matches(pattern: "a*b*c", "aXbYbZ"))
    }

    @Test("Operators: equals, one_of, glob and their negations; all conditions must hold; a missing claim satisfies nothing, not even a negation")
    func operators() throws {
        let r = try rule("""
            issuer: github
            spiffe_id: spiffe://example.org/gh/{repository}/{workflow}
            conditions:
              repository_owner_id: "1342004"
              repository: [acme/api, acme/web]
              ref: {glob: "refs/heads/*"}
              event_name: {not_one_of: [pull_request_target, pull_request]}
              environment: {not_equals: staging}
              workflow: {not_glob: "test-*"}
            """)
        #expect(r.conditions.map(\.op) == [.equals, .oneOf, .glob, .notOneOf, .notEquals, .notGlob])
        let policy = JoinPolicy(issuers: ["github": try githubIssuer()], rules: [r])
        let allowed = policy.evaluate(issuer: try githubIssuer(), claims: jobClaims)
        #expect(allowed.grant?.spiffeID.description == "spiffe://example.org/gh/acme/api/deploy")
        #expect(allowed.grant?.context["commit"] == "0123abcd" && allowed.grant?.context["repository"] == "acme/api")
        for (claim, value) in [("repository_owner_id", "1342005"), ("repository", "acme/infra"), ("ref", "refs/heads/a/b"),
                               ("event_name", "pull_request_target"), ("environment", "staging"), ("workflow", "test-unit"),
                               ("repository", "ACME/api"), ("repository", "acme/api "), ("repository", "\u{430}cme/api"),
                               ("repository", "acme\u{2215}api"), ("repository_owner_id", "１342004")] {
            var claims = jobClaims
            claims[claim] = value
            let decision = policy.evaluate(issuer: try githubIssuer(), claims: claims)
            #expect(decision.grant == nil, "\(claim)=\(value) was admitted")
            #expect(decision.denial.contains(claim) && decision.denial.contains(value), "\(decision.denial)")
        }
        var missing = jobClaims
        missing["environment"] = nil
        let decision = policy.evaluate(issuer: try githubIssuer(), claims: missing)
        #expect(decision.grant == nil && decision.denial.contains("no such claim"))
    }

    @Test("Any rule may allow; the first by name wins; explanations name every rule's failed conditions with the claim's value")
    func explain() throws {
        let main = try rule("issuer: github\nspiffe_id: spiffe://example.org/main\nconditions:\n  ref: refs/heads/main\n  repository_owner_id: \"1342004\"\n", name: "b-main")
        let release = try rule("issuer: github\nspiffe_id: spiffe://example.org/release\nconditions:\n  ref: {glob: \"refs/tags/v*\"}\n  repository_owner_id: \"1342004\"\n", name: "a-release")
        let other = try rule("issuer: gitlab\nspiffe_id: spiffe://example.org/gl\nconditions:\n  sub: x\n", name: "c-gitlab", method: nil)
        let policy = JoinPolicy(issuers: ["github": try githubIssuer()], rules: [main, release, other])
        let decision = policy.evaluate(issuer: try githubIssuer(), claims: jobClaims)
        #expect(decision.grant?.rule.name == "b-main")
        #expect(decision.explanations.map(\.rule) == ["a-release", "b-main"], "rules of other issuers are not considered")
        #expect(decision.explanations[0].failures == ["ref glob \"refs/tags/v*\" failed: the token has \"refs/heads/main\""])
        var tag = jobClaims
        tag["ref"] = "refs/tags/v1.2"
        #expect(policy.evaluate(issuer: try githubIssuer(), claims: tag).grant?.spiffeID.description == "spiffe://example.org/release")
    }

    @Test("SPIFFE ID templates: a missing claim or one with characters outside a SPIFFE path denies rather than escapes")
    func templates() throws {
        #expect(try Template.fill("spiffe://example.org/gh/{repository}/{workflow}", claims: jobClaims).description == "spiffe://example.org/gh/acme/api/deploy")
        for (claim, value) in [("workflow", "Deploy to prod"), ("workflow", "../../admin"), ("workflow", "a%2Fb"), ("workflow", ""),
                               ("workflow", "a//b"), ("workflow", "é"), ("workflow", "x?y"), ("workflow", "a/./b")] {
            var claims = jobClaims
            claims[claim] = value
            #expect(throws: Template.Failure.self, "\(value)") { try Template.fill("spiffe://example.org/gh/{repository}/{workflow}", claims: claims) }
        }
        #expect(throws: Template.Failure.self) { try Template.fill("spiffe://example.org/{nope}", claims: jobClaims) }
        #expect(throws: PolicyError.self) { try rule("issuer: github\nspiffe_id: spiffe://other.org/{repository}\nconditions:\n  repository: a/b\n") }
        #expect(throws: PolicyError.self) { try rule("issuer: github\nspiffe_id: spiffe://example.org/{repo}\nconditions:\n  repository: a/b\n") }
        #expect(throws: PolicyError.self) { try rule("issuer: github\nspiffe_id: spiffe://example.org/{Repository\nconditions:\n  repository: a/b\n") }
        // A claim used twice reads (it once stopped the process, on the node that checked the document).
        let twice = try rule("issuer: github\nspiffe_id: spiffe://example.org/{repository}/x/{repository}\nconditions:\n  repository: acme/api\n")
        #expect(try Template.fill(twice.spiffeIDTemplate, claims: jobClaims).description == "spiffe://example.org/acme/api/x/acme/api")
    }

    @Test("Documents that do not read are refused with where and why: unknown keys and operators, typos in claim names, duplicates, empty conditions")
    func parsing() throws {
        func problem(_ yaml: String, method: JoinMethod? = .github) -> String? {
            do { _ = try rule(yaml, method: method); return nil } catch { return "\(error)" }
        }
        let head = "issuer: github\nspiffe_id: spiffe://example.org/x\n"
        #expect(problem(head + "conditions:\n  repo: acme/api\n")?.contains("did you mean 'repository") == true)
        #expect(problem(head + "conditions:\n  repo: acme/api\n", method: .oidc) == nil, "oidc issuers take any claim")
        #expect(problem(head + "conditions:\n  ref: {regex: \".*\"}\n")?.contains("unknown key 'regex'") == true)
        #expect(problem(head + "conditions:\n  ref: {equals: a, glob: b}\n")?.contains("exactly one") == true)
        #expect(problem(head + "conditions:\n  ref: a\n  ref: b\n") != nil)
        #expect(problem(head + "conditions: {}\n")?.contains("at least one") == true)
        #expect(problem(head)?.contains("conditions") == true)
        #expect(problem(head + "ttl_max_seconds: 0\nconditions:\n  ref: a\n")?.contains("ttl_max_seconds") == true)
        #expect(problem(head + "colour: blue\nconditions:\n  ref: a\n")?.contains("unknown key 'colour'") == true)
        #expect(problem("{\"issuer\":\"github\",\"spiffe_id\":\"spiffe://example.org/x\",\"conditions\":{\"ref\":\"a\"}}") == nil, "JSON reads too")
        #expect(throws: PolicyError.self) { try IssuerConfig(name: "x", document: "method: github\n", defaultAudience: trustDomain) }
        #expect(throws: PolicyError.self) { try IssuerConfig(name: "x", document: "profile: github\nalgorithms: [HS256]\n", defaultAudience: trustDomain) }
        #expect(throws: PolicyError.self) { try IssuerConfig(name: "x", document: "method: token\nissuer: https://a\n", defaultAudience: trustDomain) }
        #expect(throws: PolicyError.self) { try IssuerConfig(name: "x", document: "method: oidc\nissuer: https://a\njwks: '{\"keys\":[]}'\n", defaultAudience: trustDomain) }
        let github = try githubIssuer()
        #expect(github.requirements.issuer == "https://token.actions.githubusercontent.com")
        #expect(github.requirements.audience == trustDomain && github.requirements.algorithms == ["RS256"])
        #expect(github.discoveryURL == "https://token.actions.githubusercontent.com/.well-known/openid-configuration")
    }

    @Test("Lint warns about rules that trust too much: no owner bound, an org-wide wildcard, pull_request_target, unpinned workflow refs")
    func lint() throws {
        func warnings(_ conditions: String, method: JoinMethod = .github) throws -> [String] {
            PolicyLint.warnings(for: try rule("issuer: x\nspiffe_id: spiffe://example.org/x\nconditions:\n" + conditions, method: method), method: method)
        }
        let tight = try warnings("""
              repository_owner_id: "1342004"
              repository: acme/api
              event_name: push
              job_workflow_ref: acme/api/.github/workflows/deploy.yml@refs/heads/main

            """)
        #expect(tight.isEmpty, "\(tight)")
        #expect(try warnings("  ref: refs/heads/main\n").contains { $0.contains("no repository owner") })
        #expect(try warnings("  repository_owner: acme\n  event_name: push\n").contains { $0.contains("names can be renamed") })
        #expect(try warnings("  repository_owner_id: \"1\"\n  repository: {glob: \"*/api\"}\n").contains { $0.contains("wildcard") })
        #expect(try warnings("  repository_owner_id: \"1\"\n  event_name: push\n  repository: {glob: \"acme/*\"}\n").contains { $0.contains("wildcard") })
        #expect(try warnings("  repository_owner_id: \"1\"\n  event_name: push\n  repository: {glob: \"acme/api\"}\n").isEmpty)
        #expect(try warnings("  repository_owner_id: \"1\"\n").contains { $0.contains("pull_request_target") })
        #expect(try warnings("  repository_owner_id: \"1\"\n  event_name: {not_equals: pull_request}\n").contains { $0.contains("pull_request_target") })
        #expect(try warnings("  repository_owner_id: \"1\"\n  event_name: push\n  job_workflow_ref: {glob: \"acme/ci/.github/workflows/d.yml@*\"}\n")
            .contains { $0.contains("does not pin the workflow") })
        #expect(try warnings("  repository_owner_id: \"1\"\n  event_name: push\n  job_workflow_ref: {glob: \"acme/ci/.github/workflows/d.yml@*\"}\n  job_workflow_sha: abc\n")
            .isEmpty)
        #expect(try warnings("  ref: main\n", method: .gitlab).contains { $0.contains("no namespace or project") })
        #expect(try warnings("  service_account: api\n", method: .kubernetes).contains { $0.contains("no namespace") })
        #expect(try warnings("  repository_owner_id: {not_equals: \"1\"}\n").contains { $0.contains("negation") })
    }
}
