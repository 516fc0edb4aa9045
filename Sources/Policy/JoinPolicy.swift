import Attestation
import Authority

/// The claims each platform puts in its tokens, by name: rules may only
/// name these (a typo would otherwise be a condition that never holds).
/// `oidc` issuers accept any claim name.
public enum Claims {
    static let common: Set<String> = ["iss", "sub", "aud", "jti", "exp", "iat", "nbf"]
    public static let known: [JoinMethod: Set<String>] = [
        .github: common.union([
            "repository", "repository_id", "repository_owner", "repository_owner_id", "ref", "ref_type", "ref_protected", "sha", "workflow",
            "workflow_ref", "workflow_sha", "job_workflow_ref", "job_workflow_sha", "environment", "environment_node_id", "actor", "actor_id",
            "triggering_actor", "event_name", "base_ref", "head_ref", "run_id", "run_number", "run_attempt", "runner_environment",
            "repository_visibility", "enterprise", "enterprise_id",
        ]),
        .gitlab: common.union([
            "namespace_id", "namespace_path", "project_id", "project_path", "user_id", "user_login", "user_email", "user_access_level",
            "pipeline_id", "pipeline_source", "job_id", "ref", "ref_type", "ref_path", "ref_protected", "environment",
            "environment_protected", "deployment_tier", "environment_action", "runner_id", "runner_environment", "sha", "ci_config_ref_uri",
            "ci_config_sha", "project_visibility", "job_project_id", "job_project_path", "job_namespace_id",
            "job_namespace_path",
        ]),
        .kubernetes: common.union(["namespace", "service_account", "service_account_uid", "pod", "pod_uid", "node", "node_uid"]),
    ]
    static let platformName: [JoinMethod: String] = [.github: "GitHub Actions", .gitlab: "GitLab CI", .kubernetes: "Kubernetes service-account"]

    /// What an identity carries of the job, per method: (claim, attribute).
    static let context: [JoinMethod: [(String, String)]] = [
        .github: [("repository", "repository"), ("repository_id", "repository_id"), ("sha", "commit"), ("ref", "ref"), ("workflow", "workflow"),
                  ("workflow_ref", "workflow_ref"), ("job_workflow_ref", "job_workflow_ref"), ("run_id", "run_id"),
                  ("run_attempt", "run_attempt"), ("event_name", "event"), ("actor", "actor"), ("environment", "environment")],
        .gitlab: [("project_path", "repository"), ("project_id", "repository_id"), ("sha", "commit"), ("ref", "ref"),
                  ("ci_config_ref_uri", "workflow"), ("pipeline_id", "run_id"), ("job_id", "job_id"), ("pipeline_source", "event"),
                  ("user_login", "actor"), ("environment", "environment")],
        .kubernetes: [("namespace", "namespace"), ("service_account", "service_account"), ("pod", "pod"), ("pod_uid", "pod_uid")],
        .oidc: [("sub", "subject")],
    ]
}

/// Why one rule did or did not admit a token.
public struct RuleExplanation: Sendable, Hashable {
    public var rule: String
    public var matched: Bool
    /// Each condition that failed: what it asked and what the token had.
    public var failures: [String]
    public var spiffeID: String?

    public var text: String {
        matched ? "rule \(rule): matched, identity \(spiffeID ?? "?")" : "rule \(rule): " + failures.joined(separator: "; ")
    }
}

/// The outcome of matching a verified token against the join rules.
public struct JoinDecision: Sendable {
    public struct Grant: Sendable {
        public var rule: JoinRule
        public var spiffeID: SpiffeID
        /// The identity's context (job attributes) for its extension and claims.
        public var context: [String: String]
    }

    public var grant: Grant?
    public var explanations: [RuleExplanation]

    /// One line saying why no rule admitted the token (claim values, never
    /// the token), for the API error and the denial's audit record.
    public var denial: String {
        if explanations.isEmpty { return "no join rule names this issuer" }
        return "no join rule admits this token: " + explanations.map(\.text).joined(separator: " | ")
    }
}

/// The cluster's issuers and join rules, as read from the ledger.
public struct JoinPolicy: Sendable {
    public var issuers: [String: IssuerConfig]
    /// Sorted by name: the first rule (by name) that admits a token wins.
    public var rules: [JoinRule]
    /// Documents that did not read, by name, with why (they admit nothing).
    public var broken: [String: String]

    public init(issuers: [String: IssuerConfig], rules: [JoinRule], broken: [String: String] = [:]) {
        self.issuers = issuers
        self.rules = rules.sorted { $0.name < $1.name }
        self.broken = broken
    }

    /// What an identity `rule` admits carries as `rule_digest`: the
    /// rule's fingerprint and its issuer's; nil if the issuer is not
    /// configured, or does not take its `iss`'s tokens (another issuer
    /// sorting first has the same `iss`).
    public func admissionDigest(_ rule: JoinRule) -> String? {
        guard let issuer = issuers[rule.issuer], self.issuer(for: issuer.requirements.issuer)?.name == issuer.name else { return nil }
        return rule.fingerprint + issuer.fingerprint
    }

    /// The issuer whose configured `iss` is exactly `iss` (compared as bytes).
    public func issuer(for iss: String) -> IssuerConfig? {
        issuers.values.sorted { $0.name < $1.name }.first { $0.requirements.issuer.utf8.elementsEqual(iss.utf8) }
    }

    public func evaluate(issuer: IssuerConfig, claims: [String: String]) -> JoinDecision {
        var explanations: [RuleExplanation] = []
        var grant: JoinDecision.Grant?
        for rule in rules where rule.issuer == issuer.name {
            var failures: [String] = []
            for condition in rule.conditions where !condition.holds(for: claims[condition.claim]) {
                let had = claims[condition.claim].map { "\"\($0.prefix(128))\"" } ?? "no such claim"
                failures.append("\(condition.summary) failed: the token has \(had)")
            }
            var spiffeID: SpiffeID?
            if failures.isEmpty {
                do {
                    spiffeID = try Template.fill(rule.spiffeIDTemplate, claims: claims)
                } catch {
                    failures.append(error.message)
                }
            }
            explanations.append(RuleExplanation(rule: rule.name, matched: failures.isEmpty, failures: failures, spiffeID: spiffeID?.description))
            if grant == nil, let spiffeID {
                var context: [String: String] = [:]
                for (claim, attribute) in Claims.context[issuer.method] ?? [] {
                    if let value = claims[claim], value.utf8.count <= 1_024 { context[attribute] = value }
                }
                grant = JoinDecision.Grant(rule: rule, spiffeID: spiffeID, context: context)
            }
        }
        return JoinDecision(grant: grant, explanations: explanations)
    }
}

/// Warnings about rules that trust too much. They do not stop a rule from
/// being saved; they are returned when it is, and by `warrant join lint`.
public enum PolicyLint {
    public static func warnings(for rule: JoinRule, method: JoinMethod?) -> [String] {
        var warnings: [String] = []
        func pinned(_ claims: String...) -> Bool {
            rule.conditions.contains { claims.contains($0.claim) && ($0.op == .equals || $0.op == .oneOf) }
        }
        /// A glob on an owner/name claim whose owner or name part is a wildcard.
        func wildcard(_ claims: String...) -> Condition? {
            rule.conditions.first { condition in
                claims.contains(condition.claim) && condition.op == .glob
                    && condition.values.contains { $0.split(separator: "/", omittingEmptySubsequences: false).contains { $0.contains("*") } }
            }
        }
        func allows(_ claim: String, _ value: String) -> Bool {
            rule.conditions.filter { $0.claim == claim }.allSatisfy { $0.holds(for: value) }
        }
        switch method {
        case .github?:
            if !pinned("repository_owner", "repository_owner_id", "repository", "repository_id") {
                warnings.append("no repository owner or repository is pinned (equals/one_of on repository_owner_id, repository_owner, repository_id or repository): any GitHub repository whose workflow matches the rest could join")
            } else if !pinned("repository_owner_id", "repository_id") {
                warnings.append("the owner is pinned by name only: pin repository_owner_id or repository_id too, since names can be renamed and re-registered")
            }
            if let condition = wildcard("repository", "repository_owner") {
                warnings.append("\(condition.summary) is a wildcard over repositories: every repository it matches (today's and future ones) could join; list them with one_of")
            }
            if allows("event_name", "pull_request_target") {
                warnings.append("pull_request_target events are allowed: they run with the base repository's permissions on code from forks; add event_name: {not_one_of: [pull_request_target]} or pin event_name")
            }
            for condition in rule.conditions where condition.claim == "job_workflow_ref" || condition.claim == "workflow_ref" {
                let unpinned = condition.values.contains { value in
                    guard let at = value.firstIndex(of: "@") else { return true }
                    let ref = value[value.index(after: at)...]
                    return ref.contains("*") || ref.isEmpty
                }
                if unpinned && !pinned("job_workflow_sha", "workflow_sha") {
                    warnings.append("\(condition.summary) does not pin the workflow to a ref or sha ('path@refs/heads/main' or a job_workflow_sha condition): any branch's version of it could join")
                }
            }
        case .gitlab?:
            if !pinned("namespace_id", "namespace_path", "project_id", "project_path") {
                warnings.append("no namespace or project is pinned (equals/one_of on namespace_id, namespace_path, project_id or project_path): any project on the instance could join")
            }
            if let condition = wildcard("namespace_path", "project_path") {
                warnings.append("\(condition.summary) is a wildcard over a group's projects: every project it matches (today's and future ones) could join; list them with one_of")
            }
        case .kubernetes?:
            if !pinned("namespace") {
                warnings.append("no namespace is pinned: any service account in the cluster could join")
            }
            if !pinned("service_account", "sub") {
                warnings.append("no service account is pinned: every pod in the namespace could join")
            }
        case .oidc?:
            if !pinned("sub") {
                warnings.append("'sub' is not pinned: check that the conditions name exactly the workloads meant to join")
            }
        case .token?, nil:
            break
        }
        if rule.conditions.allSatisfy({ $0.op.negated }) {
            warnings.append("every condition is a negation: the rule admits everything it does not name")
        }
        return warnings
    }
}
