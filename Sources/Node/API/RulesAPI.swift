import Encoding
import Foundation
import Ledger
import NIOCore
import NIOHTTP1
import Raft

struct AdoptRulesRequest: Codable {
    var version: UInt32
}

public struct RulesBody: Codable, Sendable {
    public var rulesInForce: UInt32
    public var logIndex: UInt64
    /// Each member's build: the newest rules it applies by.
    public var membersKnow: [String: UInt32]
}

/// Adopting newer ledger rules (`LedgerRules`) once every member's build
/// knows them: the step that finishes an upgrade.
extension NodeAPI {
    static let rulesRoutes: [Route] = [
        Route(method: .POST, template: "/v1/cluster/rules", access: .admin),
    ]

    func dispatchRules(_ route: Route, _ request: HTTPRequest) async throws -> HTTPResponse? {
        switch (route.method, route.template) {
        case (.POST, "/v1/cluster/rules"): return try await adoptRules(request)
        default: return nil
        }
    }

    /// How long the leader waits for the members' answers about their builds.
    static let rulesAskTimeout: TimeAmount = .seconds(3)

    /// Asks each node, all at once, which ledger rules its build knows:
    /// its `/readyz` answer, which anyone may read (a node not yet a member
    /// counts this one's certificate as no one's). A node that does not
    /// answer within `rulesAskTimeout`, or answers as another node (any
    /// node's certificate passes TLS), fails with 503 `member_unreachable`.
    /// A build from before `/readyz` named the node knows only the first
    /// rules, and is taken at that.
    func buildsRules(of nodes: [NodeID: HostPort?]) async -> [NodeID: Result<UInt32, APIError>] {
        await withTaskGroup(of: (NodeID, Result<UInt32, APIError>).self) { group in
            for (node, address) in nodes {
                group.addTask { [forwarder] in
                    do {
                        guard let forwarder, let address else { throw APIError.notFound("no API address is known for it") }
                        let response = try await forwarder.get("/readyz", of: node, at: address, timeout: Self.rulesAskTimeout)
                        guard let answer = try? APIJSON.decode(ReadinessBody.self, from: response.body) else {
                            throw APIError(status: response.status, code: "readyz", message: "\(response.status.code) \(UTF8Text.prefix(response.text, bytes: 300))")
                        }
                        if let answering = answer.node, answering != node { throw APIError.notFound("node \(answering) answered at its address \(address)") }
                        return (node, .success(answer.node == nil ? LedgerRules.initial : answer.rulesKnown ?? LedgerRules.initial))
                    } catch {
                        return (node, .failure(APIError.unavailable("member_unreachable", "node \(node) did not say which ledger rules its build knows (\(error)); "
                            + "every member must, so that none is left applying by older ones")))
                    }
                }
            }
            var answers: [NodeID: Result<UInt32, APIError>] = [:]
            for await (node, answer) in group { answers[node] = answer }
            return answers
        }
    }

    private func adoptRules(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(AdoptRulesRequest.self, request, expected: "{\"version\": N}")
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        guard let ledger = store.ledger else { throw APIError(status: .conflict, code: "no_ledger", message: "this node keeps no ledger") }
        _ = try await driver.linearizableReadIndex()
        let rules = try ledger.rules
        guard body.version <= rules.known else {
            throw APIError(status: .conflict, code: "rules_unknown",
                           message: "this node's build (the leader's) applies ledger rules up to version \(rules.known), not \(body.version)")
        }
        guard body.version > rules.inForce else {
            throw APIError(status: .conflict, code: "rules_in_force", message: "the ledger applies rules version \(rules.inForce) already; versions only move forward")
        }
        // Every member, learners too: each applies every entry. (One being
        // added is not in the membership until its change commits.)
        let status = await driver.status
        guard !status.configChangePending else {
            throw APIError(status: .conflict, code: "membership_changing", message: "a membership change is under way; retry once it has committed")
        }
        var know: [String: UInt32] = [String(id): rules.known]
        let addresses = members.all
        let others = status.membership.members.filter { $0 != id }.map { ($0, addresses[$0]?.api) }
        for (member, answer) in await buildsRules(of: Dictionary(uniqueKeysWithValues: others)).sorted(by: { $0.key < $1.key }) {
            let known = try answer.get()
            know[String(member)] = known
            guard known >= body.version else {
                throw APIError(status: .conflict, code: "member_behind",
                               message: "node \(member)'s build applies ledger rules up to version \(known): upgrade it before adopting \(body.version)")
            }
        }
        // A member added while they were asked was not asked.
        let now = await driver.status
        guard !now.configChangePending, now.membership.members == status.membership.members else {
            throw APIError(status: .conflict, code: "membership_changing", message: "the membership changed while the members were asked; retry")
        }
        let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: Self.millis(Date()), actor: Self.actor(of: request),
                                                                requestID: try RequestID.forCommand(request), operation: .adoptRules(version: body.version)))
        if case .rejected(let reason) = outcome.result { throw APIError(status: .conflict, code: "rejected", message: reason) }
        return APIJSON.response(RulesBody(rulesInForce: body.version, logIndex: outcome.logIndex, membersKnow: know))
    }
}
