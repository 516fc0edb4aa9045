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

    /// How long the leader waits for each member's answer about its build.
    static let rulesAskTimeout: TimeAmount = .seconds(3)

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
        for member in status.membership.members.sorted() where member != id {
            let answer: ClusterStatusBody
            do {
                guard let forwarder, let address = members.all[member]?.api else { throw APIError.notFound("no API address is known for it") }
                let response = try await forwarder.get("/v1/cluster/status", at: address, timeout: Self.rulesAskTimeout)
                guard response.status == .ok else { throw APIError(status: response.status, code: "status", message: response.text) }
                answer = try APIJSON.decode(ClusterStatusBody.self, from: response.body)
                // (Any node's certificate passes TLS: the answer must be the member's own.)
                guard answer.id == member else { throw APIError.notFound("node \(answer.id) answered at its address") }
            } catch {
                throw APIError.unavailable("member_unreachable", "node \(member) did not say which rules its build knows (\(error)); every member must, "
                    + "so that none is left applying by older ones")
            }
            let known = answer.rulesKnown ?? LedgerRules.initial
            know[String(member)] = known
            guard known >= body.version else {
                throw APIError(status: .conflict, code: "member_behind",
                               message: "node \(member)'s build applies ledger rules up to version \(known): upgrade it before adopting \(body.version)")
            }
        }
        let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: Self.millis(Date()), actor: Self.actor(of: request),
                                                                requestID: try RequestID.forCommand(request), operation: .adoptRules(version: body.version)))
        if case .rejected(let reason) = outcome.result { throw APIError(status: .conflict, code: "rejected", message: reason) }
        return APIJSON.response(RulesBody(rulesInForce: body.version, logIndex: outcome.logIndex, membersKnow: know))
    }
}
