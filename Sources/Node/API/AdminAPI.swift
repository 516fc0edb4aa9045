import Authority
import Foundation
import Ledger
import NIOHTTP1
import Synchronization
import Transport

/// A rule cutting admin certificates off: one certificate by serial, or
/// every certificate of one admin name issued up to the rule (a person
/// who left, a laptop lost with several certificates on it). Admin
/// certificates are made offline from the cluster CA (`warrant admin
/// issue`), so the cluster has no record of them: a rule goes by what the
/// certificate itself says.
public struct AdminRevocation: Codable, Sendable, Equatable {
    /// `serial` or `name`; a kind this build does not know (from a newer
    /// one) covers every certificate whose serial or name is its value, so
    /// that it fails closed rather than lock every admin out.
    public var kind: String
    /// Canonical hex (`Revocation.canonicalSerial`) or the admin name.
    public var value: String
    public var revokedAtMillis: UInt64
    /// After this, everything the rule covers has expired and it is dropped.
    public var keepUntilMillis: UInt64
    public var reason: String
    /// Who made the rule.
    public var actor: String

    public static let kindSerial = "serial", kindName = "name"
    /// How far a name rule reaches past its time: admin certificates are
    /// made offline, on a machine whose clock may run ahead of the
    /// leader's. A new certificate for a revoked name works once made
    /// this long after the rule.
    public static let clockMarginMillis: UInt64 = 120_000

    /// Whether the rule covers the admin certificate `name`, `serial`
    /// issued at `issuedAtMillis`. A name rule covers certificates issued
    /// up to the rule (and `clockMarginMillis`), so the admin can be given
    /// a new one after it.
    public func covers(name: String, serial: String, issuedAtMillis: UInt64) -> Bool {
        switch kind {
        case Self.kindSerial: return value == serial
        case Self.kindName: return value == name && issuedAtMillis <= revokedAtMillis + Self.clockMarginMillis
        default: return value == serial || value == name
        }
    }
}

/// The replicated list of admin revocation rules: the document
/// `cluster/admin-revocations`, written only through
/// `POST /v1/cluster/admin-revocations`, read by every node on every
/// request an admin certificate makes.
public struct AdminRevocationList: Codable, Sendable, Equatable {
    public var rules: [AdminRevocation] = []

    public static let documentName = "\(NodeAPI.reservedPrefix)admin-revocations"
    public static let rulesMax = 1_000
    public static let reasonBytesMax = 256
    /// How long a rule is kept: an admin certificate lives at most
    /// `ClusterCA.adminValidityMax`, so by then every certificate issued
    /// up to the rule has expired (plus the backdate, and a day for
    /// clocks).
    public static let keptMillis = UInt64((ClusterCA.adminValidityMax + ClusterCA.backdate + 86_400) * 1000)

    public init(rules: [AdminRevocation] = []) { self.rules = rules }

    public func revoking(name: String, serial: String, issuedAtMillis: UInt64) -> AdminRevocation? {
        rules.first { $0.covers(name: name, serial: serial, issuedAtMillis: issuedAtMillis) }
    }

    /// The list with `rule` in it, and whether that changed anything: a
    /// serial already revoked stays as it was; a name revoked again moves
    /// its rule to the later time (covering certificates issued since).
    /// Rules past their keeping time are dropped. More than `rulesMax`
    /// rules are refused.
    public func adding(_ rule: AdminRevocation, nowMillis: UInt64) throws(APIError) -> (list: AdminRevocationList, changed: Bool) {
        var kept = rules.filter { $0.keepUntilMillis > nowMillis }
        var changed = kept.count != rules.count
        if let index = kept.firstIndex(where: { $0.kind == rule.kind && $0.value == rule.value }) {
            if rule.kind == AdminRevocation.kindName, rule.revokedAtMillis > kept[index].revokedAtMillis {
                kept[index] = rule
                changed = true
            }
        } else {
            guard kept.count < Self.rulesMax else {
                throw APIError(status: .unprocessableEntity, code: "too_many_rules",
                               message: "the admin revocation list holds \(Self.rulesMax) rules, its limit; each is dropped once what it covers has expired")
            }
            kept.append(rule)
            changed = true
        }
        let list = AdminRevocationList(rules: kept)
        // Each rule may carry a reason and actor of a few hundred bytes:
        // the document's own limit can come first.
        guard APIJSON.encode(list).count <= LedgerLimits.documentContentBytesMax else {
            throw APIError(status: .unprocessableEntity, code: "too_many_rules",
                           message: "the admin revocation list would be larger than \(LedgerLimits.documentContentBytesMax) bytes; "
                               + "each rule is dropped once what it covers has expired (shorter reasons take less room)")
        }
        return (list, changed)
    }
}

struct AdminRevokeRequest: Codable {
    var serial: String?
    var name: String?
    var reason: String?
}

public struct AdminRevocationBody: Codable, Sendable {
    public var kind: String
    public var value: String
    public var reason: String
    public var actor: String
    public var revokedAt: String
    public var keptUntil: String
}

public struct AdminRevocationsBody: Codable, Sendable {
    public var revocations: [AdminRevocationBody]
    /// Said when the rule just made covers the certificate that asked.
    public var warning: String?
}

/// The decoded list, by the log index that wrote its document.
final class AdminRevocationCache: Sendable {
    private let cached = Mutex<(logIndex: UInt64, list: AdminRevocationList)?>(nil)

    func list(_ document: Document?) throws -> AdminRevocationList {
        guard let document else { return AdminRevocationList() }
        if let cached = cached.withLock({ $0 }), cached.logIndex == document.logIndex { return cached.list }
        let list: AdminRevocationList
        do {
            list = try APIJSON.decode(AdminRevocationList.self, from: document.content)
        } catch {
            // Fails closed: no admin certificate acts while the rules cannot be read.
            throw APIError(status: .internalServerError, code: "admin_revocations_unreadable",
                           message: "the admin revocation list in the ledger does not decode (\(error)); no admin certificate is accepted")
        }
        cached.withLock { $0 = (document.logIndex, list) }
        return list
    }
}

extension NodeAPI {
    static let adminRoutes: [Route] = [
        Route(method: .GET, template: "/v1/cluster/admin-revocations", access: .admin),
        Route(method: .POST, template: "/v1/cluster/admin-revocations", access: .admin),
    ]

    func dispatchAdmin(_ route: Route, _ request: HTTPRequest) async throws -> HTTPResponse? {
        switch (route.method, route.template) {
        case (.GET, "/v1/cluster/admin-revocations"):
            try await waitForConsistency(request)
            return APIJSON.response(Self.body(try adminRevocations()))
        case (.POST, "/v1/cluster/admin-revocations"): return try await revokeAdmin(request)
        default: return nil
        }
    }

    /// The rules as this node has applied them.
    func adminRevocations() throws -> AdminRevocationList {
        try adminRevocationCache.list(try store.document(named: AdminRevocationList.documentName))
    }

    /// The admin certificate behind a request: the caller's own, or, for a
    /// write a member node forwarded over HTTP, the one that node verified
    /// and named (`warrant-admin-certificate`: serial, time of issue,
    /// name), which the leader judges by its own rules too, and tells a
    /// revoking admin when their rule covers themselves by. Believed only
    /// from a node (`handle` has made a removed one anonymous).
    static func adminCertificate(of request: HTTPRequest) -> (name: String, serial: String, issuedAtMillis: UInt64)? {
        switch request.caller {
        case .admin(let name, let serial, let issued):
            return (name, serial, issued)
        case .node:
            guard let header = request.headers.first(name: "warrant-admin-certificate") else { return nil }
            let parts = header.split(separator: " ", omittingEmptySubsequences: false)
            guard parts.count == 3, let issued = UInt64(parts[1]), ClusterCA.invalidAdminName(String(parts[2])) == nil else { return nil }
            return (String(parts[2]), String(parts[0]), issued)
        case .anonymous, .workload:
            return nil
        }
    }

    /// The `warrant-admin-certificate` header a forwarded request carries
    /// for an admin caller.
    static func adminCertificateHeader(_ caller: APICaller) -> (String, String)? {
        guard case .admin(let name, let serial, let issued) = caller else { return nil }
        return ("warrant-admin-certificate", "\(serial) \(issued) \(name)")
    }

    /// The refusal for a request made with a revoked admin certificate, or
    /// nil. Checked on every request an admin certificate makes, on every
    /// node; a revoked certificate is an anonymous caller on open routes.
    ///
    /// For a write on an admin route the node first catches up with the
    /// leader's commit (a ReadIndex, waited for at most `catchUpTicks`): a
    /// follower passes most writes on as Raft commands, which carry only
    /// the actor's name, and a new leader may not have applied what its
    /// predecessor committed, so a rule made a moment ago must be applied
    /// here before the certificate is judged. If it cannot catch up (no
    /// leader, or cut off) it refuses the write (503 `rules_unconfirmed`).
    func adminRefusal(_ request: inout HTTPRequest, route: Route) async throws -> APIError? {
        guard let certificate = Self.adminCertificate(of: request) else { return nil }
        func rule() throws -> AdminRevocation? {
            try adminRevocations().revoking(name: certificate.name, serial: certificate.serial, issuedAtMillis: certificate.issuedAtMillis)
        }
        // (A rule this node has already applied settles it: rules are only added, until what they cover has expired.)
        var found = try rule()
        // Writes only: a read is judged by the rules this node has applied
        // (behind the leader by the replication lag at most), sparing every
        // admin read a round trip to the leader.
        if found == nil, case .admin = request.caller, route.access == .admin, request.method != .GET {
            guard (try? await driver.linearizableReadIndex(timeoutTicks: Self.catchUpTicks(driver))) != nil else {
                return APIError(status: .serviceUnavailable, code: "rules_unconfirmed",
                                message: "node \(id) could not catch up with the leader to confirm that no rule revokes this admin certificate "
                                    + "(no leader known, or this node is cut off); retry, or ask another node",
                                headers: [("retry-after", "1")])
            }
            found = try rule()
        }
        guard let rule = found else { return nil }
        request.caller = .anonymous
        guard route.access == .admin else { return nil }
        let covered = rule.kind == AdminRevocation.kindName ? "admin certificates named '\(certificate.name)' issued until then" : "its \(rule.kind) \(rule.value)"
        return APIError(status: .unauthorized, code: "certificate_revoked",
                        message: "this admin certificate was revoked at \(Self.iso(millis: rule.revokedAtMillis)) (a rule for \(covered)); "
                            + "get a new one from whoever holds the cluster CA ('warrant admin issue')")
    }

    private func revokeAdmin(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(AdminRevokeRequest.self, request, expected: "{\"serial\" | \"name\", \"reason\"?}")
        let kind: String
        let value: String
        switch (body.serial, body.name) {
        case (let serial?, nil):
            guard let serial = Revocation.serial(parsing: serial) else {
                throw APIError(status: .badRequest, code: "bad_revocation", message: Revocation.serialParsingMessage)
            }
            (kind, value) = (AdminRevocation.kindSerial, serial)
        case (nil, let name?):
            if let reason = ClusterCA.invalidAdminName(name) { throw APIError(status: .badRequest, code: "bad_revocation", message: reason) }
            (kind, value) = (AdminRevocation.kindName, name)
        default:
            throw APIError.badRequest("give exactly one of serial or name")
        }
        let reason = body.reason ?? ""
        guard reason.utf8.count <= AdminRevocationList.reasonBytesMax, !reason.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw APIError(status: .badRequest, code: "bad_revocation",
                           message: "reason must be at most \(AdminRevocationList.reasonBytesMax) bytes without control characters")
        }
        // The leader's clock stamps the rule, as it stamps the identity
        // revocations (a name rule covers what was issued until then).
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else {
            let answer = try await forwardToLeader(request, leaderHint: leadership.leaderID)
            // Read your writes here (elsewhere a covered certificate's next write catches up with the rule).
            if answer.status == .ok { _ = try? await driver.linearizableReadIndex() }
            return answer
        }
        try clock.requireAgreement(.revocation)
        let actor = Self.actor(of: request)
        // Compare-and-set on the list, again if another revocation won the
        // race (its entry applied here before ours was refused). A new
        // leader first applies what its predecessor committed.
        _ = try await driver.linearizableReadIndex()
        for _ in 0..<5 {
            let document = try store.document(named: AdminRevocationList.documentName)
            let now = Self.millis(Date())
            let rule = AdminRevocation(kind: kind, value: value, revokedAtMillis: now, keepUntilMillis: now + AdminRevocationList.keptMillis,
                                       reason: reason, actor: actor)
            let (list, changed) = try adminRevocationCache.list(document).adding(rule, nowMillis: now)
            var answer = Self.body(list)
            if let own = Self.adminCertificate(of: request),
               rule.covers(name: own.name, serial: own.serial, issuedAtMillis: own.issuedAtMillis) {
                answer.warning = "the rule covers the admin certificate that made this request: it is refused from now on"
            }
            guard changed else { return APIJSON.response(answer) }
            let command = LedgerCommand(timeMillis: now, actor: actor, requestID: try RequestID.forCommand(request),
                                        operation: .putDocument(name: AdminRevocationList.documentName, format: .json, content: APIJSON.encode(list),
                                                                expectedVersion: document?.version ?? 0))
            let (outcome, _) = try await driver.write(command)
            switch outcome.result {
            case .written: return APIJSON.response(answer)
            case .rejected(let reason) where reason.hasPrefix("version conflict"): continue
            case .rejected(let reason): throw APIError(status: .conflict, code: "rejected", message: reason)
            case .deleted, .issued: throw APIError(status: .internalServerError, code: "internal", message: "a document write was answered with \(outcome.result)")
            }
        }
        throw APIError(status: .conflict, code: "version_conflict", message: "the admin revocation list kept changing under this request; retry")
    }

    static func body(_ list: AdminRevocationList) -> AdminRevocationsBody {
        AdminRevocationsBody(revocations: list.rules.map {
            AdminRevocationBody(kind: $0.kind, value: $0.value, reason: $0.reason, actor: $0.actor,
                                revokedAt: iso(millis: $0.revokedAtMillis), keptUntil: iso(millis: $0.keepUntilMillis))
        })
    }
}
