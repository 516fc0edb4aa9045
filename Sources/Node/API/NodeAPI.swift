import Authority
import Foundation
import Ledger
import NIOHTTP1
import NIOPosix
import Raft
import Storage
import Yams

/// One route of the HTTP API. The table below is the whole API; the
/// OpenAPI document (docs/openapi.yaml) is checked against it in tests.
public struct Route: Sendable {
    public enum Access: String, Sendable { case open, admin }
    public var method: HTTPMethod
    /// Segments; `{name}` as the last one takes the rest of the path.
    public var template: String
    public var access: Access
    /// An identity request: its refusals are audited (`identity.deny`),
    /// those the HTTP server answers itself (a body over the limit) too.
    public var auditsDenials = false
}

/// The node's HTTPS API: health, status, metrics, documents, audit,
/// membership. Writes reaching a follower are forwarded to the leader.
public final class NodeAPI: Sendable {
    public static let routes: [Route] = [
        Route(method: .GET, template: "/healthz", access: .open),
        Route(method: .GET, template: "/readyz", access: .open),
        Route(method: .GET, template: "/metrics", access: .open),
        Route(method: .GET, template: "/v1/cluster/status", access: .admin),
        Route(method: .POST, template: "/v1/cluster/members", access: .admin),
        Route(method: .DELETE, template: "/v1/cluster/members/{id}", access: .admin),
        Route(method: .POST, template: "/v1/cluster/leader", access: .admin),
        Route(method: .GET, template: "/v1/documents", access: .admin),
        Route(method: .GET, template: "/v1/documents/{name}", access: .admin),
        Route(method: .PUT, template: "/v1/documents/{name}", access: .admin),
        Route(method: .DELETE, template: "/v1/documents/{name}", access: .admin),
        Route(method: .GET, template: "/v1/audit", access: .admin),
        Route(method: .GET, template: "/v1/audit/verify", access: .admin),
    ] + adminRoutes + rulesRoutes + authorityRoutes + joinRoutes

    /// Documents under this prefix hold cluster configuration (member
    /// addresses, admin revocations) and are written only through their
    /// endpoints.
    public static let reservedPrefix = "cluster/"
    public static let auditPageMax = 1_000
    public static let listPageMax = 1_000

    let id: NodeID
    let driver: RaftDriver
    let store: RaftStore
    let members: MemberDirectory
    let forwarder: Forwarder?
    let metrics: NodeMetrics
    let authority: AuthorityService?
    let joins: JoinService?
    let clock: ClockCheck
    let denials = DenialLimiter()
    let adminRevocationCache = AdminRevocationCache()
    /// Issuance on the strength of a presented X509-SVID, per identity line.
    let workloadIssuance: IssuanceRateLimiter
    /// `storage.identity_records_max`.
    let identityRecordsMax: Int
    /// `jwt_issuer`: JWT-SVIDs' `iss` and the discovery document's issuer.
    let jwtIssuer: String?

    public init(id: NodeID, driver: RaftDriver, store: RaftStore, members: MemberDirectory, forwarder: Forwarder?, metrics: NodeMetrics,
                authority: AuthorityService? = nil, joins: JoinService? = nil, clock: ClockCheck = ClockCheck(),
                identityRecordsMax: Int = NodeConfig.identityRecordsMaxDefault, jwtIssuer: String? = nil,
                workloadIssuanceBurst: Int = 100, workloadIssuancePerSecond: Int = 20) {
        self.identityRecordsMax = identityRecordsMax
        workloadIssuance = IssuanceRateLimiter(perSecond: Double(workloadIssuancePerSecond), burst: Double(workloadIssuanceBurst))
        self.jwtIssuer = jwtIssuer
        self.authority = authority
        self.clock = clock
        self.joins = joins
        self.id = id
        self.driver = driver
        self.store = store
        self.members = members
        self.forwarder = forwarder
        self.metrics = metrics
    }

    /// The identity records the ledger keeps, against their limit.
    private var identityRecordsMetricsText: String {
        guard let count = try? store.issuedRecordCount() else { return "" }
        return "# HELP warrant_ledger_identity_records Identity records the ledger keeps (each until its identity expires).\n"
            + "# TYPE warrant_ledger_identity_records gauge\nwarrant_ledger_identity_records \(count)\n"
            + "# HELP warrant_ledger_identity_records_max The leader signs nothing new while this many are kept and none has expired.\n"
            + "# TYPE warrant_ledger_identity_records_max gauge\nwarrant_ledger_identity_records_max \(identityRecordsMax)\n"
    }

    // MARK: - Routing

    /// The route a method and path select, with the captured parameter.
    /// Routes without a parameter, by path (most requests hit one of these).
    private static let literalRoutes: [String: [Route]] = Dictionary(grouping: routes.filter { !$0.template.contains("{") }, by: \.template)

    static func match(_ method: HTTPMethod, _ path: String) -> (route: Route?, parameter: String?, pathKnown: Bool) {
        // HEAD is GET without the body (which the server leaves out).
        let method = method == .HEAD ? .GET : method
        if let candidates = literalRoutes[path] {
            return (candidates.first { $0.method == method }, nil, true)
        }
        var pathKnown = false
        for route in routes {
            guard let parameter = capture(route.template, path) else { continue }
            pathKnown = true
            if route.method == method { return (route, parameter.isEmpty ? nil : parameter, true) }
        }
        return (nil, nil, pathKnown)
    }

    /// "" for a literal match, the captured text for a template, nil if no match.
    static func capture(_ template: String, _ path: String) -> String? {
        guard let brace = template.firstIndex(of: "{") else { return template == path ? "" : nil }
        let prefix = template[..<brace]
        guard path.hasPrefix(prefix), path.count > prefix.count else { return nil }
        let rest = String(path.dropFirst(prefix.count))
        if template.hasSuffix("{name}") { return rest }
        return rest.contains("/") ? nil : rest
    }

    /// A node's certificate speaks for it only while it is a member: one
    /// removed from the cluster (its certificate still chains to the
    /// cluster CA) is an anonymous caller, and its forwarded actor and
    /// workload headers are not believed.
    func believeCaller(_ request: inout HTTPRequest) {
        if case .node(let id) = request.caller, !driver.isMember(id) { request.caller = .anonymous }
    }

    public func handle(_ request: HTTPRequest) async -> HTTPResponse {
        var request = request
        // A node stopped by a failure serves nothing from its frozen state
        // (its metrics still answer, for whoever looks into why).
        if let failure = driver.failureDescription, request.path != "/metrics" {
            return APIError(status: .serviceUnavailable, code: "node_stopped", message: "node \(id) stopped: \(failure)").response
        }
        believeCaller(&request)
        let (route, parameter, pathKnown) = Self.match(request.method, request.path)
        guard let route else {
            return pathKnown
                ? APIError(status: .methodNotAllowed, code: "method_not_allowed", message: "\(request.method) is not allowed on \(request.path)").response
                : APIError.notFound("no endpoint \(request.path)").response
        }
        do {
            if let refusal = try await adminRefusal(&request, route: route) { return refusal.response }
        } catch let error as APIError {
            return error.response
        } catch {
            return Self.apiError(for: error).response
        }
        if route.access == .admin && !request.caller.isOperator {
            return APIError(status: .unauthorized, code: "unauthenticated",
                            message: "\(route.template) needs a client certificate from this cluster's CA (an admin certificate)").response
        }
        do {
            guard route.auditsDenials else { return try await dispatch(route, parameter, request) }
            return try await auditingDenials(request) { try await dispatch(route, parameter, request) }
        } catch let error as APIError {
            return error.response
        } catch {
            return Self.apiError(for: error).response
        }
    }

    private func dispatch(_ route: Route, _ parameter: String?, _ request: HTTPRequest) async throws -> HTTPResponse {
        switch (route.method, route.template) {
        case (.GET, "/healthz"): return HTTPResponse(status: .ok, headers: [("content-type", "text/plain")], body: Array("ok\n".utf8))
        case (.GET, "/readyz"): return await readiness()
        case (.GET, "/metrics"):
            return HTTPResponse(status: .ok, headers: [("content-type", "text/plain; version=0.0.4")],
                                body: Array((metrics.render(status: await driver.statusSnapshot) + clock.metricsText + identityRecordsMetricsText).utf8))
        case (.GET, "/v1/cluster/status"): return APIJSON.response(await clusterStatus())
        case (.POST, "/v1/cluster/members"): return try await addMember(request)
        case (.DELETE, "/v1/cluster/members/{id}"): return try await removeMember(parameter ?? "", request)
        case (.POST, "/v1/cluster/leader"): return try await transferLeadership(request)
        case (.GET, "/v1/documents"): return try await listDocuments(request)
        case (.GET, "/v1/documents/{name}"): return try await readDocument(parameter ?? "", request)
        case (.PUT, "/v1/documents/{name}"): return try await putDocument(parameter ?? "", request)
        case (.DELETE, "/v1/documents/{name}"): return try await deleteDocument(parameter ?? "", request)
        case (.GET, "/v1/audit"): return try await auditTail(request)
        case (.GET, "/v1/audit/verify"): return try await auditVerify()
        default:
            if let response = try await dispatchAdmin(route, request) { return response }
            if let response = try await dispatchRules(route, request) { return response }
            if let response = try await dispatchAuthority(route, request) { return response }
            if let response = try await dispatchJoin(route, request) { return response }
            return APIError.notFound("no endpoint \(request.path)").response
        }
    }

    // MARK: - Health and status

    private func readiness() async -> HTTPResponse {
        let status = await driver.statusSnapshot
        var reason: String?
        if status.leaderID == noNode {
            reason = "no known leader"
        } else if status.appliedIndex < status.commitIndex {
            reason = "applied index \(status.appliedIndex) is behind commit index \(status.commitIndex)"
        } else if let authority, (try? authority.keys()) == nil {
            reason = "the trust domain's keys are not made yet (or cannot be opened with this node's key-encryption key)"
        }
        return APIJSON.response(ReadinessBody(ready: reason == nil, leader: status.leaderID, reason: reason, node: id,
                                              rulesKnown: (try? store.ledger?.rules)?.known),
                                status: reason == nil ? .ok : .serviceUnavailable)
    }

    func clusterStatus() async -> ClusterStatusBody {
        let status = await driver.status
        let addresses = members.all
        var rows: [MemberBody] = []
        for member in status.membership.members.sorted() {
            let follower = status.followers[member]
            let match: LogIndex? = member == id ? status.lastIndex : follower?.matchIndex
            rows.append(MemberBody(
                id: member, role: status.membership.voters.contains(member) ? "voter" : "learner",
                peerAddress: addresses[member]?.peer.description, apiAddress: addresses[member]?.api.description,
                matchIndex: status.role == .leader ? match : nil,
                lag: status.role == .leader ? match.map { status.lastIndex - min($0, status.lastIndex) } : nil,
                replication: member == id ? (status.role == .leader ? "leader" : nil) : follower?.state.rawValue))
        }
        let rules = try? store.ledger?.rules
        return ClusterStatusBody(id: id, role: status.role.rawValue, term: status.term, leader: status.leaderID,
                                 commitIndex: status.commitIndex, appliedIndex: status.appliedIndex, lastIndex: status.lastIndex,
                                 snapshotIndex: status.snapshotIndex, members: rows, rulesInForce: rules?.inForce, rulesKnown: rules?.known)
    }

    // MARK: - Documents

    /// Linearizable (the default) waits for a ReadIndex confirmation and
    /// this node's apply; serializable reads what this node has applied.
    func waitForConsistency(_ request: HTTPRequest) async throws {
        switch request.query["consistency"] ?? "linearizable" {
        case "linearizable": _ = try await driver.linearizableReadIndex()
        case "serializable": break
        case let other: throw APIError.badRequest("consistency must be 'linearizable' or 'serializable', not '\(other)'")
        }
    }

    private func readDocument(_ name: String, _ request: HTTPRequest) async throws -> HTTPResponse {
        if let reason = LedgerCommand.invalidName(name) { throw APIError.badRequest(reason) }
        // What an idempotency answer keeps for the client that asked (a
        // JWT-SVID is a bearer token) is not handed to anyone else.
        guard !name.hasPrefix(AuthorityDocuments.idempotencyPrefix) else {
            throw APIError(status: .forbidden, code: "withheld", message: "idempotency answers hold live identities (JWT-SVIDs are bearer tokens) and are not served")
        }
        try await waitForConsistency(request)
        guard let document = try store.document(named: name) else { throw APIError.notFound("document '\(name)' does not exist") }
        return APIJSON.response(Self.body(document, withContent: true))
    }

    private func listDocuments(_ request: HTTPRequest) async throws -> HTTPResponse {
        let prefix = request.query["prefix"] ?? ""
        if !prefix.isEmpty, !prefix.utf8.allSatisfy(LedgerCommand.isNameByte) {
            throw APIError.badRequest("prefix may hold only a-z, 0-9, '.', '_', '-' and '/'")
        }
        let limit = try Self.integer(request.query["limit"], "limit", default: 100, range: 1...Self.listPageMax)
        try await waitForConsistency(request)
        let documents = try store.documents(prefix: prefix, after: request.query["after"] ?? "", limit: limit)
        return APIJSON.response(DocumentListBody(documents: documents.map { Self.body($0, withContent: false) }))
    }

    private func putDocument(_ name: String, _ request: HTTPRequest) async throws -> HTTPResponse {
        try Self.checkUserName(name)
        let format = try Self.format(of: request)
        try Self.checkParses(request.body, format)
        let warnings = try checkPolicyDocument(name, request.body)
        let expected = try Self.expectedVersion(request)
        return try await write(.putDocument(name: name, format: format, content: request.body, expectedVersion: expected), name: name, request,
                               warnings: warnings)
    }

    private func deleteDocument(_ name: String, _ request: HTTPRequest) async throws -> HTTPResponse {
        try Self.checkUserName(name)
        return try await write(.deleteDocument(name: name, expectedVersion: try Self.expectedVersion(request)), name: name, request)
    }

    /// Proposes on the leader (here, or forwarded there) and answers with
    /// the outcome and which node led.
    private func write(_ operation: LedgerCommand.Operation, name: String, _ request: HTTPRequest, warnings: [String]? = nil) async throws -> HTTPResponse {
        let command = LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: Self.actor(of: request),
                                    requestID: try RequestID.forCommand(request), operation: operation)
        if let reason = command.invalidReason { throw APIError.badRequest(reason) }
        let (outcome, leader) = try await driver.write(command)
        var leaderHeader = [("warrant-leader", String(leader))]
        if leader != id { leaderHeader.append(("warrant-forwarded-by", String(id))) }
        switch outcome.result {
        case .written(let version):
            return HTTPResponse(status: .ok, headers: [("content-type", "application/json")] + leaderHeader,
                                body: WriteResultBody(name: name, version: version, deleted: false, logIndex: outcome.logIndex, leader: leader,
                                                      warnings: warnings).json)
        case .deleted:
            return HTTPResponse(status: .ok, headers: [("content-type", "application/json")] + leaderHeader,
                                body: WriteResultBody(name: name, version: nil, deleted: true, logIndex: outcome.logIndex, leader: leader).json)
        case .rejected(let reason):
            let status: HTTPResponseStatus = reason.hasPrefix("version conflict") ? .conflict : (reason.hasSuffix("does not exist") ? .notFound : .unprocessableEntity)
            let code = status == .conflict ? "version_conflict" : (status == .notFound ? "not_found" : "rejected")
            throw APIError(status: status, code: code, message: reason, headers: leaderHeader)
        case .issued:
            throw APIError(status: .internalServerError, code: "internal", message: "a document write was answered with an issuance")
        }
    }

    /// Sends a request that only the leader can answer (signing,
    /// membership) to it.
    func forwardToLeader(_ request: HTTPRequest, leaderHint: NodeID) async throws -> HTTPResponse {
        try await forward(request, leaderHint: leaderHint)
    }

    /// Sends a write this follower cannot make to the leader, once.
    private func forward(_ request: HTTPRequest, leaderHint: NodeID) async throws -> HTTPResponse {
        // Never forwarded twice: one that came from a node (even if its
        // caller is no longer believed, a revoked admin's say) stops here.
        var fromNode = request.headers.first(name: "warrant-forwarded-by") != nil
        if case .node = request.caller { fromNode = true }
        if fromNode {
            throw APIError.unavailable("not_leader", "node \(id) is not the leader (it believes node \(leaderHint) is); retry")
        }
        guard leaderHint != noNode else { throw APIError.unavailable("no_leader", "no leader is known right now (an election may be under way); retry") }
        guard let forwarder, let address = members.all[leaderHint]?.api else {
            throw APIError.unavailable("not_leader", "node \(leaderHint) leads but its API address is unknown here; send the request there")
        }
        metrics.forwardedWrites.add(1)
        return try await forwarder.forward(request, to: leaderHint, at: address, actor: Self.actor(of: request))
    }

    // MARK: - Audit

    private func auditTail(_ request: HTTPRequest) async throws -> HTTPResponse {
        let after = try Self.integer(request.query["after"], "after", default: 0, range: 0...Int.max)
        let limit = try Self.integer(request.query["limit"], "limit", default: 100, range: 1...Self.auditPageMax)
        let store = self.store
        // SQLite reads block their thread: off the event loop.
        let records = try await NIOThreadPool.singleton.runIfActive { try store.auditRecords(after: UInt64(after), limit: limit) }
        return APIJSON.response(AuditPageBody(records: records.map(Self.body)))
    }

    private func auditVerify() async throws -> HTTPResponse {
        let store = self.store
        switch try await NIOThreadPool.singleton.runIfActive({ try store.verifyAudit() }) {
        case .intact(let count, let head):
            return APIJSON.response(AuditVerifyBody(node: id, intact: true, records: count, headHash: Hex.encode(head)))
        case .broken(let sequence, let reason):
            return APIJSON.response(AuditVerifyBody(node: id, intact: false, records: sequence > 0 ? sequence - 1 : 0, brokenAt: sequence, reason: reason))
        }
    }

    // MARK: - Membership

    private func addMember(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body: AddMemberRequest
        do {
            body = try APIJSON.decodeRequest(AddMemberRequest.self, from: request.body)
        } catch {
            throw APIError.badRequest("expected {\"id\": N, \"peer_address\": \"host:port\", \"api_address\": \"host:port\"}: \(error)")
        }
        guard body.id != noNode else { throw APIError.badRequest("node id 0 is reserved") }
        let peer = try HostPort(parsing: body.peerAddress, at: "peer_address")
        let api = try HostPort(parsing: body.apiAddress, at: "api_address")
        let status = await driver.status
        guard status.role == .leader else { return try await forward(request, leaderHint: status.leaderID) }
        if let reason = Self.membershipRefusal(.addLearner(body.id), status.membership) { throw reason }
        // A node whose build does not know the ledger rules in force would
        // stop at the first entry it applied: refused here instead. (Every
        // build knows the first rules, so a new cluster's node is not asked,
        // and may be started after it is added.)
        if let ledger = store.ledger, case let inForce = try ledger.rules.inForce, inForce > LedgerRules.initial {
            let known = try await buildsRules(of: [body.id: api])[body.id]?.get() ?? LedgerRules.initial
            guard known >= inForce else {
                throw APIError(status: .conflict, code: "member_behind",
                               message: "node \(body.id)'s build applies ledger rules up to version \(known), and the cluster applies version \(inForce): upgrade it first")
            }
        }
        // The addresses first, so every node can reach the learner once it is added.
        let addresses = Array(String(decoding: APIJSON.encode(MemberAddressesBody(peerAddress: peer.description, apiAddress: api.description)), as: UTF8.self).utf8)
        _ = try await driver.propose(LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: Self.actor(of: request),
                                                   requestID: RequestID.make(),
                                                   operation: .putDocument(name: MemberDirectory.documentName(body.id), format: .json, content: addresses, expectedVersion: nil)))
        let index = try await driver.proposeConfigChange(.addLearner(body.id))
        return APIJSON.response(MemberChangeBody(id: body.id, change: "added as learner; promoted to voter once caught up", logIndex: index, leader: id),
                                status: .accepted, headers: [("warrant-leader", String(id))])
    }

    private func removeMember(_ parameter: String, _ request: HTTPRequest) async throws -> HTTPResponse {
        guard let member = NodeID(parameter), member != noNode else { throw APIError.badRequest("'\(parameter)' is not a node id") }
        let status = await driver.status
        guard status.role == .leader else { return try await forward(request, leaderHint: status.leaderID) }
        if let reason = Self.membershipRefusal(.removeNode(member), status.membership) { throw reason }
        let index = try await driver.proposeConfigChange(.removeNode(member))
        return APIJSON.response(MemberChangeBody(id: member, change: "removed", logIndex: index, leader: id), headers: [("warrant-leader", String(id))])
    }

    private func transferLeadership(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body: TransferRequest
        do {
            body = try APIJSON.decodeRequest(TransferRequest.self, from: request.body)
        } catch {
            throw APIError.badRequest("expected {\"to\": N}: \(error)")
        }
        let status = await driver.status
        guard status.role == .leader else { return try await forward(request, leaderHint: status.leaderID) }
        if body.to == id { return APIJSON.response(TransferResultBody(leader: id)) }
        try await driver.transferLeadership(to: body.to)
        for _ in 0..<300 { // at most about 3 s
            try await driver.sleep(for: .milliseconds(10))
            let now = await driver.status
            if now.leaderID == body.to { return APIJSON.response(TransferResultBody(leader: body.to)) }
        }
        throw APIError(status: .gatewayTimeout, code: "timed_out", message: "node \(body.to) did not take over within 3 s; leadership stays or moves by election")
    }

    static func membershipRefusal(_ change: ConfigChange, _ membership: Membership) -> APIError? {
        do {
            try membership.validate(change)
            return nil
        } catch {
            return APIError(status: .conflict, code: "invalid_membership_change", message: error.description)
        }
    }

    // MARK: - Helpers

    static func actor(of request: HTTPRequest) -> String {
        if case .node = request.caller, let forwarded = request.headers.first(name: "warrant-actor"), !forwarded.isEmpty {
            return bounded(actor: forwarded)
        }
        return bounded(actor: request.caller.actor)
    }

    /// An actor as a command may carry it (`LedgerLimits.actorBytesMax`):
    /// a longer one (a workload's SPIFFE ID may have 2,048 bytes) keeps its
    /// beginning and the SHA-256 of the whole, so it stays distinct.
    static func bounded(actor: String) -> String {
        guard actor.utf8.count > LedgerLimits.actorBytesMax else { return actor }
        let digest = "...sha256:" + UTF8Text.prefix(AuthorityService.hash(actor), bytes: 32)
        // 3 bytes spare: a character cut in two decodes as U+FFFD.
        return UTF8Text.prefix(actor, bytes: LedgerLimits.actorBytesMax - digest.utf8.count - 3) + digest
    }

    static func checkUserName(_ name: String) throws {
        if let reason = LedgerCommand.invalidName(name) { throw APIError.badRequest(reason) }
        if name.hasPrefix(reservedPrefix) {
            throw APIError(status: .forbidden, code: "reserved_name", message: "names under '\(reservedPrefix)' are written only by the cluster endpoints (membership, admin revocations)")
        }
        if name.hasPrefix(AuthorityDocuments.prefix) {
            throw APIError(status: .forbidden, code: "reserved_name", message: "names under '\(AuthorityDocuments.prefix)' are written only by the authority")
        }
    }

    static func format(of request: HTTPRequest) throws -> DocumentFormat {
        let header = request.headers.first(name: "content-type") ?? ""
        if header == "application/json" { return .json } // the common case, without parsing
        let type = header.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
        switch type {
        case "application/json": return .json
        case "application/yaml", "application/x-yaml", "text/yaml": return .yaml
        default:
            throw APIError(status: .unsupportedMediaType, code: "unsupported_media_type",
                           message: "content-type must be application/json or application/yaml, not '\(type)'")
        }
    }

    static func checkParses(_ body: [UInt8], _ format: DocumentFormat) throws {
        if body.count > LedgerLimits.documentContentBytesMax {
            throw APIError.payloadTooLarge("document content is \(body.count) bytes; the limit is \(LedgerLimits.documentContentBytesMax)")
        }
        switch format {
        case .json:
            do {
                _ = try JSONSerialization.jsonObject(with: Data(body), options: [.fragmentsAllowed])
            } catch {
                throw APIError.badRequest("the body is not valid JSON: \(error.localizedDescription)")
            }
        case .yaml:
            guard let text = String(validating: body, as: UTF8.self) else { throw APIError.badRequest("the body is not UTF-8") }
            do {
                _ = try Yams.compose(yaml: text)
            } catch {
                throw APIError.badRequest("the body is not valid YAML: \(error)")
            }
        }
    }

    static func expectedVersion(_ request: HTTPRequest) throws -> UInt64? {
        guard let text = request.query["expected_version"] else { return nil }
        guard let value = UInt64(text) else { throw APIError.badRequest("expected_version must be a non-negative integer (0 means: create only)") }
        return value
    }

    static func integer(_ text: String?, _ name: String, default fallback: Int, range: ClosedRange<Int>) throws -> Int {
        guard let text else { return fallback }
        guard let value = Int(text), range.contains(value) else {
            throw APIError.badRequest("\(name) must be an integer in \(range.lowerBound)...\(range.upperBound)")
        }
        return value
    }

    static func body(_ document: Document, withContent: Bool) -> DocumentBody {
        DocumentBody(name: document.name, format: document.format == .json ? "json" : "yaml", version: document.version,
                     logIndex: document.logIndex, content: withContent ? String(decoding: document.content, as: UTF8.self) : nil)
    }

    static func body(_ record: AuditRecord) -> AuditRecordBody {
        AuditRecordBody(sequence: record.sequence, logIndex: record.logIndex, timeMillis: record.timeMillis, actor: record.actor,
                        action: record.action, target: record.target, result: record.result,
                        previousHash: Hex.encode(record.previousHash), hash: Hex.encode(record.hash))
    }

    /// Driver and storage failures as API errors.
    static func apiError(for error: any Error) -> APIError {
        switch error {
        case let error as DriverError:
            switch error {
            case .notLeader(let hint): return APIError.unavailable("not_leader", error.description + (hint == noNode ? "" : "; retry there"))
            case .invalidCommand(let reason): return APIError.badRequest(reason)
            case .lostLeadership: return APIError.unavailable("leadership_changed", error.description + "; retry")
            case .timedOut: return APIError(status: .gatewayTimeout, code: "timed_out", message: error.description + "; the outcome is unknown")
            case .outcomeUnknown: return APIError(status: .gatewayTimeout, code: "outcome_unknown", message: error.description)
            case .raft(let raft):
                switch raft {
                case .invalidConfigChange, .invalidTransferTarget, .learnerNotCaughtUp:
                    return APIError(status: .conflict, code: "invalid_membership_change", message: raft.description)
                case .proposalTooLarge:
                    return APIError.payloadTooLarge(raft.description)
                case .notLeader(let hint):
                    return APIError.unavailable("not_leader", raft.description + (hint == noNode ? "" : "; retry there"))
                case .noLeader:
                    return APIError.unavailable("no_leader", raft.description)
                default:
                    return APIError.unavailable("raft_refused", raft.description)
                }
            case .stopped: return APIError.unavailable("stopping", error.description)
            case .stoppedBeforeOutcome: return APIError(status: .gatewayTimeout, code: "outcome_unknown", message: error.description)
            case .overloaded: return APIError.unavailable("overloaded", error.description)
            }
        case let error as LedgerRulesError:
            return APIError(status: .serviceUnavailable, code: "node_stopped",
                            message: "this node stopped (\(error)); a write it was applying may have committed: check elsewhere")
        case let error as NodeConfigError:
            return APIError.badRequest(error.description)
        case let error as StorageError:
            return APIError(status: .internalServerError, code: "storage_failure", message: error.description)
        default:
            return APIError(status: .internalServerError, code: "internal", message: "\(error)")
        }
    }
}
