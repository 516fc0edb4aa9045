import Attestation
import Authority
import Encoding
import Foundation
import Ledger
import NIOHTTP1
import NIOPosix
import Policy

// Attested join: a platform's ID token (GitHub Actions, GitLab CI,
// Kubernetes, any OIDC issuer) for an X509-SVID, through the same audited
// issuance path as join tokens (docs/openapi.yaml, docs/join-rules.md).

struct StepRequest: Codable {
    var step: String
    var csr: String
    var ttlSeconds: UInt32?
    var idempotencyKey: String?
}

struct CloseStepRequest: Codable {
    var exitStatus: Int32
}

struct CloseStepBody: Codable {
    var spiffeId: String
    var serial: String
    var exitStatus: Int32
}

struct JoinExplainRequest: Codable {
    var token: String
}

struct RuleExplanationBody: Codable {
    var rule: String
    var matched: Bool
    var failures: [String]
    var spiffeId: String?
}

struct JoinExplainBody: Codable {
    var issuer: String?
    var method: String?
    /// Whether the token's signature, audience and times checked out.
    var verified: Bool
    var error: APIError.ErrorBody.Detail?
    var claims: [String: String]?
    var rules: [RuleExplanationBody]
    var decision: String
}

struct LintedRuleBody: Codable {
    var rule: String
    var issuer: String
    var warnings: [String]
}

struct JoinLintBody: Codable {
    var rules: [LintedRuleBody]
    var broken: [String: String]
}

extension NodeAPI {
    static let joinRoutes: [Route] = [
        Route(method: .POST, template: "/v1/join", access: .open, auditsDenials: true),
        Route(method: .POST, template: "/v1/join/jwt", access: .open, auditsDenials: true),
        Route(method: .POST, template: "/v1/join/explain", access: .admin),
        Route(method: .GET, template: "/v1/join/lint", access: .admin),
        Route(method: .POST, template: "/v1/svid/x509/step", access: .open, auditsDenials: true),
        Route(method: .POST, template: "/v1/steps/close", access: .open),
    ]

    /// The longest a per-step identity lives, whatever its job's allows.
    static let stepTTLMaxSeconds: UInt32 = 3_600

    func dispatchJoin(_ route: Route, _ request: HTTPRequest) async throws -> HTTPResponse? {
        switch (route.method, route.template) {
        case (.POST, "/v1/join"): return try await join(request)
        case (.POST, "/v1/join/jwt"): return try await joinJWT(request)
        case (.POST, "/v1/join/explain"): return try await explainJoin(request)
        case (.GET, "/v1/join/lint"): return try lintJoin()
        case (.POST, "/v1/svid/x509/step"): return try await issueStep(request)
        case (.POST, "/v1/steps/close"): return try await closeStep(request)
        default: return nil
        }
    }

    private func requireJoins() throws -> JoinService {
        guard let joins else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        return joins
    }

    func currentPolicy(_ joins: JoinService) throws -> JoinPolicy {
        if let policy = joins.cachedPolicy() { return policy }
        return try joins.policy() // the ledger is in memory: a few map reads
    }

    /// `detailed`: say why keys are unavailable (the fetch URL, the network
    /// error). Operators get that (`join explain`); a caller of the open
    /// join endpoints learns only that the issuer's keys cannot be had now.
    static func apiError(_ error: AttestationError, detailed: Bool = true) -> APIError {
        guard error.code == "keys_unavailable" else {
            return APIError(status: .unauthorized, code: error.code, message: "the platform token was refused: \(error.message)")
        }
        let message = detailed ? error.message
            : "the keys of the token's issuer cannot be fetched just now; retry later (an operator sees why with warrant join explain)"
        return APIError(status: .serviceUnavailable, code: error.code, message: "the platform token was refused: \(message)", headers: [("retry-after", "5")])
    }

    /// A verified platform token that a rule admits, ready to be signed.
    struct AdmittedJoin {
        var spiffeID: SpiffeID
        var template: Issuance
        var actor: String
        var earlier: IdempotentAnswer?
    }

    /// Verifies the token, replays an earlier answer for the same
    /// idempotency key, matches the rules, and settles the TTL and the
    /// identity's context; nothing is signed or written yet.
    private func admitJoin(token: String, idempotencyKey: String?, ttlSeconds: UInt32?, kind: Issuance.Kind) async throws -> AdmittedJoin {
        let joins = try requireJoins()
        let policy = try currentPolicy(joins)
        let now = Int64(Date().timeIntervalSince1970)
        let issuer: IssuerConfig, verified: VerifiedToken
        do {
            (issuer, verified) = try await joins.verify(token, policy: policy, now: now)
        } catch {
            throw Self.apiError(error, detailed: false)
        }
        let decision = policy.evaluate(issuer: issuer, claims: verified.claims)
        guard let grant = decision.grant else {
            throw APIError(status: .forbidden, code: "join_denied", message: decision.denial)
        }
        let subject = verified.claims["sub"].map { Self.oneLine(UTF8Text.prefix($0, bytes: 160)) } ?? ""
        let actor = Self.bounded(actor: "\(issuer.method.rawValue):\(issuer.name):\(subject)")
        var template = Issuance(kind: kind, spiffeID: grant.spiffeID.description, serial: "", fingerprint: "", issuedAtMillis: 0, notAfterMillis: 0,
                                ttlSeconds: 0, tokenHash: "", idempotencyKey: idempotencyKey.map(AuthorityService.hash) ?? "", node: id,
                                authority: "", attributes: [:], artifact: [])
        template.platformReplayKey = verified.replayKey
        template.platformExpiresAtMillis = UInt64(verified.expiresAt) * 1000
        if let earlier = try earlierAnswer(idempotencyKey, evidence: template.evidence, kind: kind) {
            return AdmittedJoin(spiffeID: grant.spiffeID, template: template, actor: actor, earlier: earlier)
        }
        let ttlCap = min(grant.rule.ttlMaxSeconds, AuthorityService.ttlMaxSeconds)
        let ttl = ttlSeconds ?? ttlCap
        guard ttl >= 1, ttl <= ttlCap else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "ttl_seconds must be 1...\(ttlCap) under rule \(grant.rule.name)")
        }
        var attributes = grant.context
        attributes["evidence"] = "platform_token"
        attributes["method"] = issuer.method.rawValue
        attributes["issuer"] = issuer.name
        attributes["rule"] = grant.rule.name
        attributes["rule_digest"] = policy.admissionDigest(grant.rule) ?? grant.rule.fingerprint + issuer.fingerprint
        attributes["evidence_expires"] = String(now + Int64(grant.rule.maxLifetimeSeconds))
        attributes["ttl_max"] = String(ttlCap)
        template.ttlSeconds = ttl
        template.attributes = attributes
        return AdmittedJoin(spiffeID: grant.spiffeID, template: template, actor: actor, earlier: nil)
    }

    /// A platform token and a CSR for an X509-SVID: the token is verified,
    /// matched against the join rules, and consumed in the issuance's Raft
    /// entry.
    private func join(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(X509SVIDRequest.self, request, expected: "{\"token\" (the platform's ID token), \"csr\" (PEM), \"ttl_seconds\"?, \"idempotency_key\"?}")
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        let keys = try requireKeys()
        var admitted = try await admitJoin(token: body.token, idempotencyKey: try Self.idempotencyKey(body.idempotencyKey), ttlSeconds: body.ttlSeconds,
                                           kind: .x509)
        if let earlier = admitted.earlier { return try x509Response(replaying: Array(earlier.artifact), keys: keys, spiffeID: admitted.spiffeID.description) }
        let publicKey = try Self.csrKey(body.csr)
        // The first serial names the line its renewals continue.
        let serial = X509Authority.randomSerial()
        admitted.template.attributes["lineage"] = Hex.encode(serial.bytes)
        return try await signAndRecordX509(admitted.template, spiffeID: admitted.spiffeID, publicKey: publicKey, serial: serial, keys: keys,
                                           actor: admitted.actor, request)
    }

    /// A platform token for a JWT-SVID (for the given audiences), the job's
    /// context in its `warrant` claim.
    private func joinJWT(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(JWTSVIDRequest.self, request, expected: "{\"token\" (the platform's ID token), \"audience\": [..], \"ttl_seconds\"?, \"idempotency_key\"?}")
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        let keys = try requireKeys()
        let admitted = try await admitJoin(token: body.token, idempotencyKey: try Self.idempotencyKey(body.idempotencyKey),
                                           ttlSeconds: body.ttlSeconds, kind: .jwt)
        if let earlier = admitted.earlier { return try jwtResponse(replaying: Array(earlier.artifact), audiences: body.audience) }
        return try await signAndRecordJWT(admitted.template, spiffeID: admitted.spiffeID, audiences: body.audience, keys: keys,
                                          actor: admitted.actor, request)
    }

    /// A job presenting its X509-SVID gets one for a step of it: the SPIFFE
    /// ID extends the job's (`<job>/step/<name>`), it lives no longer than
    /// the job's identity (nor an hour), carries the job's context plus
    /// `step` and `parent` (the job identity's serial), cannot be renewed
    /// past its own end, and its audit record names the job identity it
    /// came from. A step cannot start steps.
    private func issueStep(_ request: HTTPRequest) async throws -> HTTPResponse {
        let (current, keys) = try await verifiedWorkload(request)
        let body = try Self.decodeBody(StepRequest.self, request, expected: "{\"step\", \"csr\" (PEM), \"ttl_seconds\"?, \"idempotency_key\"?}")
        guard (1...64).contains(body.step.utf8.count),
              body.step.utf8.allSatisfy({ (0x61...0x7A).contains($0) || (0x30...0x39).contains($0) || $0 == 0x2D || $0 == 0x5F || $0 == 0x2E }),
              body.step != ".", body.step != ".." else {
            throw APIError(status: .badRequest, code: "bad_step", message: "a step name is 1 to 64 of a-z, 0-9, '-', '_', '.'")
        }
        guard current.attributes["step"] == nil else {
            throw APIError(status: .forbidden, code: "nested_step", message: "a step's identity cannot start another step")
        }
        let key = try Self.idempotencyKey(body.idempotencyKey)
        let spiffeID = try Self.spiffeID(current.spiffeID.description + "/step/" + body.step, trustDomain: keys.x509.trustDomain)
        let remaining = current.notAfter.timeIntervalSinceNow.rounded(.down)
        guard remaining >= 1 else { throw APIError(status: .forbidden, code: "expired", message: "the job's X509-SVID has expired") }
        let ttlCap = UInt32(min(remaining, Double(min(Self.stepTTLMaxSeconds, current.attributes["ttl_max"].flatMap(UInt32.init) ?? Self.stepTTLMaxSeconds))))
        let ttl = body.ttlSeconds ?? ttlCap
        guard ttl >= 1, ttl <= ttlCap else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "ttl_seconds must be 1...\(ttlCap) for this step (never past the job's identity)")
        }
        let publicKey = try Self.csrKey(body.csr)
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        if let earlier = try earlierAnswer(key, evidence: "renew:\(current.serialHex)", kind: .x509) {
            return try x509Response(replaying: Array(earlier.artifact), keys: keys, spiffeID: spiffeID.description)
        }
        let serial = X509Authority.randomSerial()
        var attributes = current.attributes
        attributes["step"] = body.step
        attributes["parent"] = current.serialHex
        // The step's own line (its renewals), and its job's: whose budget
        // for issuance on a presented X509-SVID the step's requests share.
        attributes["job_lineage"] = current.attributes["lineage"] ?? current.serialHex
        attributes["lineage"] = Hex.encode(serial.bytes)
        attributes["ttl_max"] = String(ttlCap)
        attributes["evidence_expires"] = String(Int64(Date().timeIntervalSince1970) + Int64(ttl))
        let template = issuance(from: current, kind: .x509, spiffeID: spiffeID.description, ttlSeconds: ttl,
                                idempotencyKey: key, attributes: attributes)
        return try await signAndRecordX509(template, spiffeID: spiffeID, publicKey: publicKey, serial: serial, keys: keys, actor: nil,
                                           until: current.notAfter, request)
    }

    /// A step's command ended: its identity (presented) closes it in the
    /// audit chain with the exit status.
    private func closeStep(_ request: HTTPRequest) async throws -> HTTPResponse {
        // Not limited by the line's budget (a lost close would lose its exit
        // status from the audit chain): a step closes once, the ledger keeps
        // a marker until the step's evidence expires, and a second close is
        // refused here, before anything is written, where this node has it.
        let (current, _) = try await verifiedWorkload(request, limited: false)
        guard current.attributes["step"] != nil else {
            throw APIError(status: .forbidden, code: "not_a_step", message: "only a step's identity closes its step")
        }
        let body = try Self.decodeBody(CloseStepRequest.self, request, expected: "{\"exit_status\": N}")
        // The step is its line (its first serial), whichever of its renewals
        // closes it, and lives until its evidence does (no renewal of it
        // outlives that): the marker is named by both.
        let step = current.attributes["lineage"] ?? current.serialHex
        let notAfterMillis = max(1, current.attributes["evidence_expires"].flatMap(UInt64.init).map { $0 * 1000 } ?? Self.millis(current.notAfter))
        let closed = APIError(status: .conflict, code: "already_closed", message: "the step \(current.spiffeID) (serial \(step)) was closed already")
        guard try store.document(named: AuthorityDocuments.closedStep(notAfterMillis: notAfterMillis, serial: step)) == nil else { throw closed }
        let command = LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: Self.bounded(actor: "workload:\(current.spiffeID)"),
                                    requestID: try RequestID.forCommand(request),
                                    operation: .closeStep(spiffeID: current.spiffeID.description, serial: step, exitStatus: body.exitStatus,
                                                          notAfterMillis: notAfterMillis))
        if let reason = command.invalidReason { throw APIError.badRequest(reason) }
        let (outcome, _) = try await driver.write(command)
        if case .rejected(let reason) = outcome.result {
            // Two closes at once: the ledger refused (and audited) the second.
            throw reason.contains("closed already") ? closed : APIError(status: .conflict, code: "rejected", message: reason)
        }
        return APIJSON.response(CloseStepBody(spiffeId: current.spiffeID.description, serial: current.serialHex, exitStatus: body.exitStatus))
    }

    /// Why a token would (not) join, without consuming it: verification,
    /// then every rule of its issuer with each failed condition and the
    /// claim's value. A token that fails verification is still matched
    /// (its claims marked unverified), so an expired token's rules can be
    /// debugged too.
    private func explainJoin(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(JoinExplainRequest.self, request, expected: "{\"token\"}")
        let joins = try requireJoins()
        let policy = try currentPolicy(joins)
        let token: PlatformToken
        do {
            token = try PlatformToken(parsing: body.token)
        } catch {
            let failure = Self.apiError(error)
            return APIJSON.response(JoinExplainBody(verified: false, error: APIError.ErrorBody.Detail(code: failure.code, message: failure.message), rules: [],
                                                    decision: "refused before any rule: \(error.message)"))
        }
        guard let issuer = policy.issuer(for: token.issuer) else {
            return APIJSON.response(JoinExplainBody(verified: false, error: APIError.ErrorBody.Detail(code: "unknown_issuer", message: "no issuer is configured for iss \"\(token.issuer)\""),
                                                    rules: [], decision: "refused: no issuer is configured for this token's iss"))
        }
        var claims = TokenVerifier.flatten(token.claims, method: issuer.method)
        var failure: APIError?
        var used = false
        do {
            let verified = try await joins.verify(body.token, policy: policy, now: Int64(Date().timeIntervalSince1970)).1
            claims = verified.claims
            let consumed = AuthorityDocuments.platformToken(expiresAtMillis: UInt64(verified.expiresAt) * 1000, replayKey: verified.replayKey)
            used = try store.document(named: consumed) != nil
        } catch let error as AttestationError {
            failure = Self.apiError(error)
        }
        let decision = policy.evaluate(issuer: issuer, claims: claims)
        let outcome: String
        if let failure {
            outcome = "refused: the token does not verify (\(failure.code)); the rules below were matched against its unverified claims"
        } else if used {
            outcome = "refused: this token was already used (a token joins once); the rules below would " + (decision.grant == nil ? "not admit it either" : "admit a fresh one")
        } else if let grant = decision.grant {
            outcome = "allowed by rule \(grant.rule.name): \(grant.spiffeID)"
        } else {
            outcome = "refused: " + decision.denial
        }
        return APIJSON.response(JoinExplainBody(
            issuer: issuer.name, method: issuer.method.rawValue, verified: failure == nil,
            error: failure.map { APIError.ErrorBody.Detail(code: $0.code, message: $0.message) }, claims: claims,
            rules: decision.explanations.map { RuleExplanationBody(rule: $0.rule, matched: $0.matched, failures: $0.failures, spiffeId: $0.spiffeID) },
            decision: outcome))
    }

    private func lintJoin() throws -> HTTPResponse {
        let policy = try requireJoins().policy(maxAge: .zero)
        let rules = policy.rules.map { rule in
            LintedRuleBody(rule: rule.name, issuer: rule.issuer, warnings: Self.warnings(for: rule, in: policy))
        }
        return APIJSON.response(JoinLintBody(rules: rules, broken: policy.broken))
    }

    static func warnings(for rule: JoinRule, in policy: JoinPolicy) -> [String] {
        guard let issuer = policy.issuers[rule.issuer] else {
            return ["the issuer '\(rule.issuer)' is not configured (no \(IssuerConfig.documentPrefix)\(rule.issuer)): this rule admits nothing yet"]
        }
        return PolicyLint.warnings(for: rule, method: issuer.method)
    }

    /// Checks a document under `policy/` before it is written: an issuer
    /// or a rule that does not read is refused with where and why; a rule
    /// that reads is linted. Returns the warnings.
    func checkPolicyDocument(_ name: String, _ content: [UInt8]) throws -> [String]? {
        guard name.hasPrefix("policy/") else { return nil }
        let joins = try requireJoins()
        let text = String(decoding: content, as: UTF8.self)
        func leaf(_ prefix: String) throws -> String {
            let leaf = String(name.dropFirst(prefix.count))
            guard !leaf.isEmpty, !leaf.contains("/") else {
                throw APIError(status: .badRequest, code: "bad_policy", message: "\(name): name it \(prefix)<name>, one segment")
            }
            return leaf
        }
        do {
            if name.hasPrefix(IssuerConfig.documentPrefix) {
                _ = try IssuerConfig(name: try leaf(IssuerConfig.documentPrefix), document: text, defaultAudience: joins.trustDomain)
                return []
            }
            if name.hasPrefix(JoinRule.documentPrefix) {
                let policy = try joins.policy(maxAge: .zero)
                let method = try JoinRule.issuerName(in: text).flatMap { policy.issuers[$0]?.method }
                let rule = try JoinRule(name: try leaf(JoinRule.documentPrefix), document: text, method: method, trustDomain: joins.trustDomain)
                return Self.warnings(for: rule, in: policy)
            }
        } catch let error as PolicyError {
            throw APIError(status: .badRequest, code: "bad_policy", message: "\(name): \(error)")
        }
        throw APIError(status: .badRequest, code: "bad_policy", message: "documents under policy/ are \(IssuerConfig.documentPrefix)<name> and \(JoinRule.documentPrefix)<name>")
    }
}

extension JoinExplainRequest: HandDecodedJSON {
    init?(flat: [String: JSONText.Value]) {
        guard let token = flat.string("token"), let token else { return nil }
        self.init(token: token)
    }
}
