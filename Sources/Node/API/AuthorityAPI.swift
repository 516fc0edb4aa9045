import Authority
import Encoding
import Foundation
import Ledger
import NIOHTTP1
import NIOPosix
import Raft
import Synchronization
import SwiftASN1
import X509

// Issuance, trust bundles, discovery and verification (docs/openapi.yaml).

struct CreateTokenRequest: Codable {
    var spiffeId: String
    var ttlSeconds: UInt32?
    var validForSeconds: UInt32?
    var maxLifetimeSeconds: UInt32?
}

struct TokenBody: Codable {
    var token: String
    var spiffeId: String
    var ttlSeconds: UInt32
    var maxLifetimeSeconds: UInt32
    var expiresAt: String
}

struct RenewRequest: Codable {
    var csr: String
    var ttlSeconds: UInt32?
    var idempotencyKey: String?
}

struct WorkloadJWTRequest: Codable {
    var audience: [String]
    var ttlSeconds: UInt32?
    var idempotencyKey: String?
}

struct RotateRequest: Codable {
    var keyAlgorithm: String?
    var force: Bool?
}

struct AuthorityBody: Codable {
    var id: String
    var state: String
    var algorithm: String
    var subject: String
    var notAfter: String
    var jwtKeyId: String
    var createdAt: String
    var activatedAt: String?
    var retiredAt: String?
    var publishedUntil: String?
}

struct AuthoritiesBody: Codable {
    var trustDomain: String
    var authorities: [AuthorityBody]
    var action: String?
    var next: String?
}

struct RevokeRequest: Codable {
    var serial: String?
    var spiffeId: String?
    var attribute: String?
    var reason: String?
}

struct RevocationBody: Codable {
    var kind: String
    var value: String
    var reason: String?
    var revokedAt: String
}

struct RevocationsBody: Codable {
    var revocations: [RevocationBody]
    /// What the rule just added does not reach, when it is worth saying.
    var note: String?
}

struct X509SVIDRequest: Codable {
    var token: String
    var csr: String
    var ttlSeconds: UInt32?
    var idempotencyKey: String?
}

struct X509SVIDBody: Codable {
    var spiffeId: String
    var certificate: String
    var bundle: String
    /// The bundle's `spiffe_sequence`: a client refreshing its bundle
    /// from a node that is behind can tell an older one.
    var bundleSequence: UInt64
    var serial: String
    var expiresAt: String
    var replayed: Bool
}

struct JWTSVIDRequest: Codable {
    var token: String
    var audience: [String]
    var ttlSeconds: UInt32?
    var idempotencyKey: String?
}

struct JWTSVIDBody: Codable {
    var spiffeId: String
    var token: String
    var expiresAt: String
    var replayed: Bool
}

struct VerifyRequest: Codable {
    var x509Chain: String?
    var jwt: String?
    var audience: String?
}

struct VerifyBody: Codable {
    var valid: Bool
    var spiffeId: String?
    var serial: String?
    var attributes: [String: String]?
    var expiresAt: String?
    var code: String?
    var reason: String?
}

extension NodeAPI {
    static let authorityRoutes: [Route] = [
        Route(method: .POST, template: "/v1/tokens", access: .admin),
        Route(method: .POST, template: "/v1/svid/x509", access: .open, auditsDenials: true),
        Route(method: .POST, template: "/v1/svid/jwt", access: .open, auditsDenials: true),
        Route(method: .GET, template: "/v1/bundle", access: .open),
        Route(method: .GET, template: "/v1/bundle.pem", access: .open),
        Route(method: .GET, template: "/.well-known/openid-configuration", access: .open),
        Route(method: .GET, template: "/v1/keys", access: .open),
        Route(method: .POST, template: "/v1/verify", access: .open),
        Route(method: .POST, template: "/v1/svid/x509/renew", access: .open, auditsDenials: true),
        Route(method: .POST, template: "/v1/svid/jwt/workload", access: .open, auditsDenials: true),
        Route(method: .GET, template: "/v1/federation/bundle", access: .open),
        Route(method: .GET, template: "/v1/crl.pem", access: .open),
        Route(method: .GET, template: "/v1/ca", access: .admin),
        Route(method: .POST, template: "/v1/ca/rotate", access: .admin),
        Route(method: .GET, template: "/v1/revocations", access: .open),
        Route(method: .POST, template: "/v1/revocations", access: .admin),
    ]

    func dispatchAuthority(_ route: Route, _ request: HTTPRequest) async throws -> HTTPResponse? {
        switch (route.method, route.template) {
        case (.POST, "/v1/tokens"): return try await createToken(request)
        case (.POST, "/v1/svid/x509"): return try await issueX509(request)
        case (.POST, "/v1/svid/jwt"): return try await issueJWT(request)
        case (.GET, "/v1/bundle"): return try bundleResponse { try $0.jwks() }
        case (.GET, "/v1/bundle.pem"): return try bundleResponse(type: "application/x-pem-file") { Array(try $0.pem().utf8) }
        case (.GET, "/.well-known/openid-configuration"): return try discovery(request)
        case (.GET, "/v1/keys"): return try bundleResponse { try $0.oidcJWKS() }
        case (.POST, "/v1/verify"): return try await verify(request)
        case (.POST, "/v1/svid/x509/renew"): return try await renewX509(request)
        case (.POST, "/v1/svid/jwt/workload"): return try await issueWorkloadJWT(request)
        case (.GET, "/v1/federation/bundle"): return try bundleResponse { try $0.jwks() }
        case (.GET, "/v1/crl.pem"): return try crl()
        case (.GET, "/v1/ca"): return try authorities(action: nil, next: nil)
        case (.POST, "/v1/ca/rotate"): return try await rotate(request)
        case (.GET, "/v1/revocations"): return try revocations(reasons: request.caller.isOperator)
        case (.POST, "/v1/revocations"): return try await revoke(request)
        default: return nil
        }
    }

    /// Refused identity requests are audited too (`identity.deny`), at most
    /// `DenialLimiter.perSecond` records a second per node; the excess is
    /// folded into the next record's count, so a flood of bad requests
    /// cannot starve issuance. Recording does not delay the refusal.
    /// Errors are judged as the answer will show them (`apiError(for:)`):
    /// a command the driver refuses (a request id too long, say) is a 400
    /// and a denial like any other.
    func auditingDenials(_ request: HTTPRequest, _ body: () async throws -> HTTPResponse) async throws -> HTTPResponse {
        do {
            // A malformed request id is refused before anything is signed.
            _ = try RequestID.client(request)
            return try await body()
        } catch {
            let error = error as? APIError ?? Self.apiError(for: error)
            recordDenial(error, of: request)
            throw error
        }
    }

    /// The HTTP server answered `request` itself with `error` (a body over
    /// the limit, the body not kept): audited if the route's refusals are.
    public func refusedByServer(_ request: HTTPRequest, _ error: APIError) {
        guard let route = Self.match(request.method, request.path).route, route.auditsDenials else { return }
        var request = request
        believeCaller(&request)
        recordDenial(error, of: request)
    }

    /// Records a refusal (4xx, not a redirect to the leader) in the
    /// background, within the denial limiter's rate. A write that surely
    /// did not happen (no leader known, leadership lost before it
    /// committed, too many waiting) is tried again, up to
    /// `DenialLimiter.writeTries` times in all, half a second apart and
    /// doubling; one whose outcome is unknown (timed out) is not, since the
    /// refusals would then count twice. A record never written carries its
    /// count into the next one.
    /// Control characters, line separators and bidirectional controls as
    /// '?' (`UTF8Text.altersDisplay`): a reason quotes the caller's
    /// claims, and `warrant audit tail` prints each record on one line.
    static func oneLine(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.map { UTF8Text.altersDisplay($0) ? "?" : $0 }))
    }

    private func recordDenial(_ error: APIError, of request: HTTPRequest) {
        guard (400..<500).contains(Int(error.status.code)), error.code != "not_leader", !error.audited, let count = denials.admit() else { return }
        let driver = self.driver, denials = self.denials
        let command = LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: Self.actor(of: request),
                                    requestID: RequestID.make(),
                                    operation: .recordDenial(reason: Self.oneLine(UTF8Text.prefix("\(error.code): \(error.message)", bytes: 1_000)), count: count))
        Task {
            for attempt in 0..<DenialLimiter.writeTries {
                do {
                    _ = try await driver.write(command)
                    return
                } catch let error as DriverError where error.surelyNotApplied {
                    if attempt + 1 < DenialLimiter.writeTries { try? await Task.sleep(for: .milliseconds(500 << attempt)) }
                } catch {
                    return
                }
            }
            denials.carry(count)
        }
    }

    func requireKeys(fresh: Bool = false) throws -> AuthorityService.Keys {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        if fresh { authority.invalidate() }
        let keys: AuthorityService.Keys?
        do {
            keys = try authority.keys()
        } catch {
            throw APIError(status: .internalServerError, code: "keyring_unreadable", message: "\(error)")
        }
        guard let keys else { throw APIError.unavailable("no_authority", "the trust domain's keys are not made yet (the first leader makes them); retry") }
        return keys
    }

    /// Refuses to sign while the ledger keeps `identityRecordsMax` identity
    /// records and the first of them has not expired; once it has, an
    /// issuance goes ahead (applying it forgets that record and one more,
    /// so the records shrink back under the limit).
    func requireRoomForIdentity() throws {
        let count = try store.issuedRecordCount()
        guard count >= identityRecordsMax else { return }
        let now = UInt64(Date().timeIntervalSince1970 * 1000)
        guard let earliest = try store.earliestIssuedExpiryMillis(), earliest >= now else { return }
        let wait = min(3_600, (earliest - now) / 1000 + 1)
        throw APIError(status: .serviceUnavailable, code: "ledger_full",
                       message: "the ledger keeps \(count) identity records, its limit (storage.identity_records_max); "
                           + "nothing new is signed until they expire, the first at \(Self.iso(millis: earliest))",
                       headers: [("retry-after", String(wait))])
    }

    public static let bundleSequenceHeader = "warrant-bundle-sequence"

    private func bundleResponse(type: String = "application/json", _ body: (TrustBundle) throws -> [UInt8]) throws -> HTTPResponse {
        let keys = try requireKeys()
        // The sequence in a header too (the PEM and the OIDC key set have no
        // place for it): a client can tell a node behind the one it asked before.
        return HTTPResponse(status: .ok, headers: [("content-type", type), ("cache-control", "max-age=\(keys.bundle.refreshHintSeconds)"),
                                                   (Self.bundleSequenceHeader, String(keys.bundle.sequence))],
                            body: try body(keys.bundle))
    }

    private func discovery(_ request: HTTPRequest) throws -> HTTPResponse {
        let keys = try requireKeys()
        // Without a configured issuer, the address the client used (its
        // tokens then carry no iss for a relying party to compare).
        let issuer = jwtIssuer ?? "https://\(request.headers.first(name: "host") ?? "localhost")"
        let document: [String: Any] = [
            "issuer": issuer, "jwks_uri": "\(issuer)/v1/keys", "id_token_signing_alg_values_supported": keys.bundle.jwtAlgorithms,
            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
            "claims_supported": ["sub", "aud", "exp", "iat", "jti"] + (jwtIssuer == nil ? [] : ["iss"]),
        ]
        return HTTPResponse(status: .ok, headers: [("content-type", "application/json")],
                            body: Array(try JSONSerialization.data(withJSONObject: document, options: [.sortedKeys, .withoutEscapingSlashes])))
    }

    static func decodeBody<T: Decodable>(_ type: T.Type, _ request: HTTPRequest, expected: String) throws -> T {
        do {
            return try APIJSON.decodeRequest(type, from: request.body)
        } catch {
            throw APIError.badRequest("expected \(expected): \(error)")
        }
    }

    private func createToken(_ request: HTTPRequest) async throws -> HTTPResponse {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        let body = try Self.decodeBody(CreateTokenRequest.self, request, expected: "{\"spiffe_id\", \"ttl_seconds\"?, \"valid_for_seconds\"?}")
        let spiffeID = try Self.spiffeID(body.spiffeId, trustDomain: authority.trustDomain)
        let ttl = body.ttlSeconds ?? 3_600
        guard (1...AuthorityService.ttlMaxSeconds).contains(ttl) else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "ttl_seconds must be 1...\(AuthorityService.ttlMaxSeconds)")
        }
        let validFor = body.validForSeconds ?? 600
        guard (1...AuthorityService.tokenLifetimeMaxSeconds).contains(validFor) else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "valid_for_seconds must be 1...\(AuthorityService.tokenLifetimeMaxSeconds)")
        }
        let maxLifetime = body.maxLifetimeSeconds ?? max(ttl, 86_400)
        guard (ttl...AuthorityService.evidenceLifetimeMaxSeconds).contains(maxLifetime) else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "max_lifetime_seconds must be \(ttl)...\(AuthorityService.evidenceLifetimeMaxSeconds) (at least ttl_seconds)")
        }
        try clock.requireAgreement(.joinToken)
        let secret = AuthorityService.newTokenSecret()
        let now = Date()
        let expires = now.addingTimeInterval(TimeInterval(validFor))
        let token = JoinToken(hash: AuthorityService.hash(secret), spiffeID: spiffeID.description, ttlMaxSeconds: ttl,
                              expiresAtMillis: UInt64(expires.timeIntervalSince1970 * 1000), maxLifetimeSeconds: maxLifetime)
        let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: UInt64(now.timeIntervalSince1970 * 1000), actor: Self.actor(of: request),
                                                                requestID: RequestID.make(), operation: .createJoinToken(token)))
        if case .rejected(let reason) = outcome.result { throw APIError(status: .conflict, code: "rejected", message: reason) }
        // The secret is returned once and never stored or logged.
        return APIJSON.response(TokenBody(token: secret, spiffeId: spiffeID.description, ttlSeconds: ttl, maxLifetimeSeconds: maxLifetime,
                                          expiresAt: Self.iso(expires)), status: .created)
    }

    /// Checks the token (and replays an earlier answer for the same
    /// idempotency key) before anything is signed.
    private func admit(token secret: String, idempotencyKey: String?, ttlSeconds: UInt32?,
                       kind: Issuance.Kind) async throws -> (hash: String, token: JoinToken, ttl: UInt32, earlier: IdempotentAnswer?) {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        guard !secret.isEmpty, secret.utf8.count <= 256 else { throw APIError(status: .unauthorized, code: "invalid_token", message: "the join token is missing or malformed") }
        // The ledger is in memory: these reads do not block.
        let (hash, token) = try authority.token(secret: secret)
        guard let token else { throw APIError(status: .unauthorized, code: "invalid_token", message: "unknown join token") }
        if let earlier = try earlierAnswer(idempotencyKey, evidence: hash, kind: kind) {
            return (hash, token, token.ttlMaxSeconds, earlier)
        }
        guard !token.used else { throw APIError(status: .forbidden, code: "token_used", message: "the join token was already used") }
        guard Double(token.expiresAtMillis) / 1000 > Date().timeIntervalSince1970 else {
            throw APIError(status: .forbidden, code: "token_expired", message: "the join token expired")
        }
        let ttl = ttlSeconds ?? token.ttlMaxSeconds
        guard ttl >= 1, ttl <= token.ttlMaxSeconds, ttl <= AuthorityService.ttlMaxSeconds else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "ttl_seconds must be 1...\(min(token.ttlMaxSeconds, AuthorityService.ttlMaxSeconds)) for this token")
        }
        return (hash, token, ttl, nil)
    }

    /// Proposes the issuance; the identity is returned only once its audit
    /// record is committed and applied. The artifact itself goes into the
    /// log only when an idempotency key asks for the answer to be kept.
    private func record(_ issuance: consuming Issuance, actor: String? = nil, _ request: HTTPRequest) async throws -> (artifact: [UInt8], replayed: Bool) {
        if issuance.idempotencyKey.isEmpty { issuance.artifact = [] }
        let actor = actor ?? (issuance.tokenHash.isEmpty ? Self.actor(of: request) : "token:" + UTF8Text.prefix(issuance.tokenHash, bytes: 16))
        let command = LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: actor,
                                    requestID: try RequestID.forCommand(request), operation: .recordIssuance(consume issuance))
        // The driver's write checks the command (a request id too long, say).
        let (outcome, _) = try await driver.write(command)
        switch outcome.result {
        case .issued(let artifact, let replayed): return (artifact, replayed)
        case .rejected(let reason):
            if reason.hasPrefix("authority rotated") { throw AuthorityRotated() }
            let code = reason.contains("already used") ? "token_used" : reason.contains("expired") ? "token_expired"
                : reason.hasPrefix("revoked") ? "revoked" : reason.contains("idempotency") ? "idempotency_conflict" : "rejected"
            throw APIError(status: code == "idempotency_conflict" ? .conflict : .forbidden, code: code, message: reason, audited: true)
        default: throw APIError(status: .internalServerError, code: "internal", message: "unexpected outcome \(outcome.result)")
        }
    }

    private func issueX509(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(X509SVIDRequest.self, request, expected: "{\"token\", \"csr\" (PEM), \"ttl_seconds\"?, \"idempotency_key\"?}")
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        let keys = try requireKeys()
        let key = try Self.idempotencyKey(body.idempotencyKey)
        let admitted = try await admit(token: body.token, idempotencyKey: key, ttlSeconds: body.ttlSeconds, kind: .x509)
        if let earlier = admitted.earlier { return try x509Response(replaying: Array(earlier.artifact), keys: keys, spiffeID: admitted.token.spiffeID) }
        let publicKey = try Self.csrKey(body.csr)
        let spiffeID = try Self.spiffeID(admitted.token.spiffeID, trustDomain: keys.x509.trustDomain)
        let evidenceExpires = Int(Date().timeIntervalSince1970) + Int(admitted.token.maxLifetimeSeconds)
        // The first serial names the line its renewals continue (a serial
        // rule covers them too); renewals keep the token's TTL cap.
        let serial = X509Authority.randomSerial()
        let attributes = ["evidence": "join_token", "token": UTF8Text.prefix(admitted.hash, bytes: 16), "evidence_expires": String(evidenceExpires),
                          "lineage": Hex.encode(serial.bytes), "ttl_max": String(admitted.token.ttlMaxSeconds)]
        let template = Issuance(kind: .x509, spiffeID: spiffeID.description, serial: "", fingerprint: "", issuedAtMillis: 0, notAfterMillis: 0,
                                ttlSeconds: admitted.ttl, tokenHash: admitted.hash, idempotencyKey: key.map(AuthorityService.hash) ?? "",
                                node: id, authority: "", attributes: attributes, artifact: [])
        return try await signAndRecordX509(template, spiffeID: spiffeID, publicKey: publicKey, serial: serial, keys: keys, actor: nil, request)
    }

    /// Signs an X509-SVID with the active authority and records it with
    /// `template`'s evidence, SPIFFE ID, TTL, attributes and idempotency
    /// key. If a rotation commits first, the ledger refuses it and it is
    /// signed again by the new authority.
    ///
    /// `until` bounds it when it derives from an identity or evidence that
    /// ends (a renewal, a step): checked when it is signed, after any wait
    /// for a leader or a signing again, not only when the request came.
    func signAndRecordX509(_ template: Issuance, spiffeID: SpiffeID, publicKey: RequestedKey, serial: Certificate.SerialNumber?,
                           keys: AuthorityService.Keys, actor: String?, until: Date? = nil, _ request: HTTPRequest) async throws -> HTTPResponse {
        try clock.requireAgreement()
        try requireRoomForIdentity()
        var keys = keys
        for attempt in 0..<2 {
            let ttl = try Self.lifetime(template.ttlSeconds, until: until)
            let issued = try Self.signX509(keys, spiffeID: spiffeID, publicKey: publicKey, ttl: TimeInterval(ttl),
                                           attributes: template.attributes, serial: serial)
            var issuance = template
            issuance.ttlSeconds = ttl
            issuance.serial = issued.serialHex
            issuance.fingerprint = issued.fingerprintSHA256
            issuance.issuedAtMillis = Self.millis(issued.notValidBefore) + UInt64(X509Authority.backdate * 1000)
            issuance.notAfterMillis = Self.millis(issued.notValidAfter)
            issuance.authority = keys.active.id
            issuance.artifact = issued.der
            do {
                let (artifact, replayed) = try await record(issuance, actor: actor, request)
                if replayed { return try x509Response(replaying: artifact, keys: keys, spiffeID: spiffeID.description) }
                return x509Response(issued, spiffeID: spiffeID, keys: keys)
            } catch is AuthorityRotated where attempt == 0 {
                keys = try requireKeys(fresh: true)
            }
        }
        throw APIError.unavailable("authority_rotated", "the authority rotated twice while issuing; retry")
    }

    /// The caller's idempotency key, checked: 1 to 128 bytes.
    static func idempotencyKey(_ key: String?) throws -> String? {
        guard let key else { return nil }
        guard !key.isEmpty, key.utf8.count <= 128 else { throw APIError.badRequest("idempotency_key must be 1 to 128 bytes") }
        return key
    }

    /// The answer kept under `idempotencyKey` (the caller's key, unhashed)
    /// for the same evidence and kind of identity, to be replayed; nil
    /// without a key or an answer; a 409 if the key was used otherwise.
    func earlierAnswer(_ idempotencyKey: String?, evidence: String, kind: Issuance.Kind) throws -> IdempotentAnswer? {
        guard let idempotencyKey, let authority, let earlier = try authority.earlierAnswer(idempotencyKey: idempotencyKey) else { return nil }
        guard earlier.evidence == evidence, earlier.kind == kind else {
            throw Self.idempotencyConflict("was used with other evidence or for the other kind of identity")
        }
        return earlier
    }

    /// `ttl`, cut to end by `until` (whole seconds from `now`); refused
    /// (403 `expired`) when less than a second is left.
    static func lifetime(_ ttl: UInt32, until: Date?, now: Date = Date()) throws -> UInt32 {
        guard let until else { return ttl }
        let left = until.timeIntervalSince(now).rounded(.down)
        guard left >= 1 else {
            throw APIError(status: .forbidden, code: "expired", message: "what this identity derives from ended at \(iso(until)), before it could be signed")
        }
        return UInt32(min(Double(ttl), left))
    }

    /// The public key of a PEM CSR whose signature verifies (proof of possession).
    static func csrKey(_ pem: String) throws -> RequestedKey {
        guard pem.utf8.count <= 64 << 10, let csrDER = PEMText.decode(pem, label: "CERTIFICATE REQUEST") else {
            throw APIError(status: .badRequest, code: "bad_csr", message: "csr must be one PEM CERTIFICATE REQUEST")
        }
        do {
            return try X509Authority.requestedKey(fromCSR: csrDER)
        } catch {
            throw APIError(status: .badRequest, code: error.code, message: error.message)
        }
    }

    static func signX509(_ keys: AuthorityService.Keys, spiffeID: SpiffeID, publicKey: RequestedKey, ttl: TimeInterval,
                         attributes: Attributes, serial: Certificate.SerialNumber? = nil) throws -> IssuedX509 {
        do {
            return try keys.x509.issue(spiffeID: spiffeID, key: publicKey, ttl: ttl, attributes: attributes, serial: serial)
        } catch let error as AuthorityError {
            throw APIError(status: .badRequest, code: error.code, message: error.message)
        }
    }

    static func millis(_ date: Date) -> UInt64 { UInt64(max(0, date.timeIntervalSince1970 * 1000)) }

    /// An issuance made from a presented X509-SVID (a renewal, a workload
    /// JWT-SVID, a step): `current` is its evidence; the rest is filled in
    /// at signing.
    func issuance(from current: VerifiedX509, kind: Issuance.Kind, spiffeID: String, ttlSeconds: UInt32, idempotencyKey: String?,
                  attributes: [String: String]) -> Issuance {
        var issuance = Issuance(kind: kind, spiffeID: spiffeID, serial: "", fingerprint: "", issuedAtMillis: 0, notAfterMillis: 0,
                                ttlSeconds: ttlSeconds, tokenHash: "", renewedFrom: current.serialHex,
                                renewedIssuedAtMillis: Self.millis(current.notBefore) + UInt64(X509Authority.backdate * 1000),
                                idempotencyKey: idempotencyKey.map(AuthorityService.hash) ?? "", node: id, authority: "",
                                attributes: attributes, artifact: [])
        issuance.renewedNotAfterMillis = Self.millis(current.notAfter)
        return issuance
    }

    private func x509Response(_ issued: IssuedX509, spiffeID: SpiffeID, keys: AuthorityService.Keys) -> HTTPResponse {
        APIJSON.response(X509SVIDBody(spiffeId: spiffeID.description, certificate: issued.pem, bundle: keys.bundlePEM, bundleSequence: keys.bundle.sequence,
                                      serial: issued.serialHex,
                                      expiresAt: Self.iso(issued.notValidAfter), replayed: false),
                         headers: [("warrant-leader", String(id))])
    }

    /// The answer kept for an idempotency key, replayed: refused (409) if it
    /// is not what this request asks for, `spiffeID`'s (the key used for a
    /// renewal, then for a step, by the same workload: the evidence is the
    /// same presented SVID).
    func x509Response(replaying der: [UInt8], keys: AuthorityService.Keys, spiffeID: String) throws -> HTTPResponse {
        let certificate = try Certificate(derEncoded: der)
        let verified = try TrustBundle.checkLeaf(certificate, trustDomain: keys.x509.trustDomain)
        guard verified.spiffeID.description == spiffeID else {
            throw Self.idempotencyConflict("was used for an identity for \(verified.spiffeID), not \(spiffeID)")
        }
        return APIJSON.response(X509SVIDBody(spiffeId: verified.spiffeID.description,
                                             certificate: PEMText.encode(der, label: "CERTIFICATE"),
                                             bundle: keys.bundlePEM, bundleSequence: keys.bundle.sequence, serial: verified.serialHex, expiresAt: Self.iso(certificate.notValidAfter),
                                             replayed: true), headers: [("warrant-leader", String(id))])
    }

    /// A workload renews its X509-SVID over mutual TLS: the certificate it
    /// presents must verify against the bundle and not be revoked; the new
    /// one has the same SPIFFE ID and attested context and never outlives
    /// the evidence the first one was issued on (`evidence_expires`).
    /// The workload behind a request: its X509-SVID (the TLS client
    /// certificate, or from the node that forwarded it), verified against
    /// the published authorities and the revocation rules, and (`limited`)
    /// taken from its line's issuance budget (`workloadIssuance`).
    func verifiedWorkload(_ request: HTTPRequest, limited: Bool = true) async throws -> (VerifiedX509, AuthorityService.Keys) {
        let presented: [UInt8]
        switch request.caller {
        case .workload(_, let der): presented = der
        case .node:
            guard let header = request.headers.first(name: "warrant-workload-certificate"), let der = Data(base64Encoded: header) else {
                throw APIError(status: .unauthorized, code: "unauthenticated", message: "renewal needs the workload's X509-SVID as the TLS client certificate")
            }
            presented = Array(der)
        default:
            throw APIError(status: .unauthorized, code: "unauthenticated", message: "renewal needs the workload's X509-SVID as the TLS client certificate")
        }
        var keys = try requireKeys()
        let current: VerifiedX509
        let presentedCertificate = try Certificate(derEncoded: presented)
        func check(_ keys: AuthorityService.Keys) async -> Result<VerifiedX509, AuthorityError> {
            do {
                return .success(try await keys.bundle.verifyX509(chain: [presentedCertificate]))
            } catch {
                return .failure(error)
            }
        }
        var checked = await check(keys)
        // Signed by an authority activated a moment ago? Look again (at most every 100 ms).
        if case .failure(let error) = checked, error.code == "untrusted", let authority,
           let fresh = try authority.keys(maxAge: .milliseconds(100)), fresh.bundle.sequence != keys.bundle.sequence {
            keys = fresh
            checked = await check(keys)
        }
        switch checked {
        case .success(let verified): current = verified
        case .failure(let error):
            throw APIError(status: .unauthorized, code: error.code, message: "the presented X509-SVID does not verify: \(error.message)")
        }
        if let rule = await revocation(keys, serial: current.serialHex, spiffeID: current.spiffeID.description, attributes: current.attributes,
                                       issuedAt: current.notBefore.addingTimeInterval(X509Authority.backdate), notAfter: current.notAfter) {
            // The rule's reason is for operators (`revocations(reasons:)`), not for the holder.
            throw APIError(status: .forbidden, code: "revoked", message: "the presented X509-SVID was revoked (\(rule.kind.rawValue) \(rule.value))")
        }
        // Closing a step (`limited` false) issues nothing: its exit status is kept whatever the rules say now.
        if limited { try requireAdmittingRule(current) }
        let line = current.attributes["job_lineage"] ?? current.attributes["lineage"] ?? current.serialHex
        // By the monotonic clock: a wall clock stepped back would hold every budget until it caught up.
        if limited, let wait = workloadIssuance.admit(line, now: ProcessInfo.processInfo.systemUptime) {
            throw APIError(status: .tooManyRequests, code: "rate_limited",
                           message: "this identity's line (\(UTF8Text.prefix(line, bytes: 16))) may be issued \(Int(workloadIssuance.burst)) at once and "
                               + "\(Int(workloadIssuance.perSecond)) a second after; retry in \(String(format: "%.2f", wait)) s",
                           headers: [("retry-after", String(Int(wait.rounded(.up))))])
        }
        return (current, keys)
    }

    /// Refuses (403 `policy_changed`) an identity admitted by a join rule
    /// that has since been removed, no longer reads, lost its issuer (or the
    /// issuer takes no tokens), or that with its issuer admits something
    /// else (`rule_digest`, `JoinPolicy.admissionDigest`; an identity from
    /// before digests were kept needs only the rule and its issuer):
    /// nothing more derives from it, and the holder joins again with fresh
    /// evidence, judged by the rules as they are now. Join tokens are not
    /// rules: their identities are not affected.
    func requireAdmittingRule(_ current: VerifiedX509) throws {
        guard current.attributes["evidence"] == "platform_token", let name = current.attributes["rule"], let joins else { return }
        let policy = try currentPolicy(joins)
        let problem: String?
        if let rule = policy.rules.first(where: { $0.name.utf8.elementsEqual(name.utf8) }) {
            if let digest = policy.admissionDigest(rule) {
                problem = current.attributes["rule_digest"].map { $0 == digest } ?? true ? nil : "it or its issuer admits something else since"
            } else {
                problem = "its issuer \(rule.issuer) is no longer configured, or takes no tokens"
            }
        } else {
            problem = "it was removed since (or no longer reads)"
        }
        guard let problem else { return }
        throw APIError(status: .forbidden, code: "policy_changed",
                       message: "the join rule \(UTF8Text.prefix(Self.oneLine(name), bytes: 128)) that admitted this identity no longer admits it as it did: "
                           + "\(problem); join again with fresh evidence")
    }

    /// A workload presenting its X509-SVID gets a JWT-SVID for the given
    /// audiences: the same SPIFFE ID and context, living no longer than the
    /// X509-SVID (nor its TTL cap), audited with the serial it came from.
    private func issueWorkloadJWT(_ request: HTTPRequest) async throws -> HTTPResponse {
        let (current, keys) = try await verifiedWorkload(request)
        let body = try Self.decodeBody(WorkloadJWTRequest.self, request, expected: "{\"audience\": [..], \"ttl_seconds\"?, \"idempotency_key\"?}")
        let key = try Self.idempotencyKey(body.idempotencyKey)
        let remaining = current.notAfter.timeIntervalSinceNow.rounded(.down)
        guard remaining >= 1 else { throw APIError(status: .forbidden, code: "expired", message: "the presented X509-SVID has expired") }
        let ttlCap = UInt32(min(remaining, Double(current.attributes["ttl_max"].flatMap(UInt32.init) ?? AuthorityService.ttlMaxSeconds)))
        let ttl = body.ttlSeconds ?? min(ttlCap, 3_600)
        guard ttl >= 1, ttl <= ttlCap else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "ttl_seconds must be 1...\(ttlCap) for this identity (it may not outlive the X509-SVID)")
        }
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        if let earlier = try earlierAnswer(key, evidence: "renew:\(current.serialHex)", kind: .jwt) {
            return try jwtResponse(replaying: Array(earlier.artifact), audiences: body.audience)
        }
        let template = issuance(from: current, kind: .jwt, spiffeID: current.spiffeID.description, ttlSeconds: ttl,
                                idempotencyKey: key, attributes: current.attributes)
        return try await signAndRecordJWT(template, spiffeID: current.spiffeID, audiences: body.audience, keys: keys, actor: nil, until: current.notAfter,
                                          request)
    }

    private func renewX509(_ request: HTTPRequest) async throws -> HTTPResponse {
        let (current, keys) = try await verifiedWorkload(request)
        let body = try Self.decodeBody(RenewRequest.self, request, expected: "{\"csr\" (PEM), \"ttl_seconds\"?, \"idempotency_key\"?}")
        let key = try Self.idempotencyKey(body.idempotencyKey)
        guard let evidenceExpires = current.attributes["evidence_expires"].flatMap(TimeInterval.init) else {
            throw APIError(status: .forbidden, code: "not_renewable", message: "the presented X509-SVID carries no evidence lifetime")
        }
        let now = Date()
        let remaining = evidenceExpires - now.timeIntervalSince1970
        guard remaining >= 1 else {
            throw APIError(status: .forbidden, code: "evidence_expired", message: "the evidence this identity was first issued on expired at \(Self.iso(Date(timeIntervalSince1970: evidenceExpires))); obtain a new identity")
        }
        let previousTTL = UInt32(max(1, min(Double(AuthorityService.ttlMaxSeconds),
                                            current.notAfter.timeIntervalSince(current.notBefore) - X509Authority.backdate)))
        // The token's TTL cap travels in the identity; older ones fall back to the global cap.
        let ttlCap = current.attributes["ttl_max"].flatMap(UInt32.init).map { min($0, AuthorityService.ttlMaxSeconds) } ?? AuthorityService.ttlMaxSeconds
        let ttl = body.ttlSeconds ?? min(previousTTL, ttlCap)
        guard ttl >= 1, ttl <= ttlCap else {
            throw APIError(status: .badRequest, code: "bad_ttl", message: "ttl_seconds must be 1...\(ttlCap) for this identity")
        }
        let publicKey = try Self.csrKey(body.csr)
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        if let earlier = try earlierAnswer(key, evidence: "renew:\(current.serialHex)", kind: .x509) {
            return try x509Response(replaying: Array(earlier.artifact), keys: keys, spiffeID: current.spiffeID.description)
        }
        let lifetime = UInt32(min(TimeInterval(ttl), remaining.rounded(.down)))
        let template = issuance(from: current, kind: .x509, spiffeID: current.spiffeID.description, ttlSeconds: lifetime,
                                idempotencyKey: key, attributes: current.attributes)
        return try await signAndRecordX509(template, spiffeID: current.spiffeID, publicKey: publicKey, serial: nil, keys: keys, actor: nil,
                                           until: Date(timeIntervalSince1970: evidenceExpires), request)
    }

    private func issueJWT(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(JWTSVIDRequest.self, request, expected: "{\"token\", \"audience\": [..], \"ttl_seconds\"?, \"idempotency_key\"?}")
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        let keys = try requireKeys()
        let key = try Self.idempotencyKey(body.idempotencyKey)
        let admitted = try await admit(token: body.token, idempotencyKey: key, ttlSeconds: body.ttlSeconds, kind: .jwt)
        if let earlier = admitted.earlier { return try jwtResponse(replaying: Array(earlier.artifact), audiences: body.audience) }
        let spiffeID = try Self.spiffeID(admitted.token.spiffeID, trustDomain: keys.jwt.trustDomain)
        let attributes = ["evidence": "join_token", "token": UTF8Text.prefix(admitted.hash, bytes: 16)]
        let template = Issuance(kind: .jwt, spiffeID: spiffeID.description, serial: "", fingerprint: "", issuedAtMillis: 0, notAfterMillis: 0,
                                ttlSeconds: admitted.ttl, tokenHash: admitted.hash, idempotencyKey: key.map(AuthorityService.hash) ?? "",
                                node: id, authority: "", attributes: attributes, artifact: [])
        return try await signAndRecordJWT(template, spiffeID: spiffeID, audiences: body.audience, keys: keys, actor: nil, request)
    }

    /// Signs a JWT-SVID with the active authority and records it with
    /// `template`'s evidence, TTL, attributes and idempotency key (signed
    /// again by the new authority if a rotation commits first); never
    /// past `until` (see `signAndRecordX509`).
    func signAndRecordJWT(_ template: Issuance, spiffeID: SpiffeID, audiences: [String], keys: AuthorityService.Keys, actor: String?,
                          until: Date? = nil, _ request: HTTPRequest) async throws -> HTTPResponse {
        try clock.requireAgreement()
        try requireRoomForIdentity()
        var keys = keys
        for attempt in 0..<2 {
            let now = Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down))
            let ttl = try Self.lifetime(template.ttlSeconds, until: until, now: now)
            let issued: IssuedJWT
            do {
                issued = try keys.jwt.issue(spiffeID: spiffeID, audiences: audiences, ttl: TimeInterval(ttl),
                                            attributes: template.attributes, now: now, notAfter: keys.x509.notValidAfter, issuer: jwtIssuer)
            } catch let error as AuthorityError {
                throw APIError(status: .badRequest, code: error.code, message: error.message)
            }
            let fingerprint = AuthorityService.hash(issued.bytes)
            var issuance = template
            issuance.ttlSeconds = ttl
            issuance.serial = issued.serial
            issuance.fingerprint = fingerprint
            issuance.issuedAtMillis = Self.millis(now)
            issuance.notAfterMillis = Self.millis(issued.expiry)
            issuance.authority = keys.active.id
            // Kept (sealed) only for an idempotency key: see `record`.
            issuance.artifact = template.idempotencyKey.isEmpty ? [] : try sealKept(issued.bytes)
            do {
                let (artifact, replayed) = try await record(issuance, actor: actor, request)
                if replayed { return try jwtResponse(replaying: artifact, audiences: audiences) }
                return APIJSON.response(JWTSVIDBody(spiffeId: spiffeID.description, token: issued.token, expiresAt: Self.iso(issued.expiry), replayed: false),
                                        headers: [("warrant-leader", String(id))])
            } catch is AuthorityRotated where attempt == 0 {
                keys = try requireKeys(fresh: true)
            }
        }
        throw APIError.unavailable("authority_rotated", "the authority rotated twice while issuing; retry")
    }

    /// The JWT-SVID kept for an idempotency key, replayed: refused (409) if
    /// it is not for the audiences this request asks for.
    func jwtResponse(replaying artifact: [UInt8], audiences: [String]) throws -> HTTPResponse {
        let token = String(decoding: try openKept(artifact), as: UTF8.self)
        let claims = token.split(separator: ".").dropFirst().first.flatMap { Base64URL.decode($0) }
            .flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] } ?? [:]
        let kept = (claims["aud"] as? String).map { [$0] } ?? claims["aud"] as? [String] ?? []
        // Byte for byte, as verification compares an audience.
        guard Set(kept.map { Array($0.utf8) }) == Set(audiences.map { Array($0.utf8) }) else {
            throw Self.idempotencyConflict("was used for a JWT-SVID for other audiences (\(kept.joined(separator: ", ")))")
        }
        let expiry = (claims["exp"] as? NSNumber).map { Date(timeIntervalSince1970: $0.doubleValue) } ?? Date()
        return APIJSON.response(JWTSVIDBody(spiffeId: claims["sub"] as? String ?? "", token: token, expiresAt: Self.iso(expiry), replayed: true),
                                headers: [("warrant-leader", String(id))])
    }

    private func sealKept(_ token: [UInt8]) throws -> [UInt8] {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        return try authority.sealKept(token)
    }

    private func openKept(_ artifact: [UInt8]) throws -> [UInt8] {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        do {
            return try authority.openKept(artifact)
        } catch let error as AuthorityError {
            throw APIError(status: .internalServerError, code: error.code, message: error.message)
        }
    }

    static func idempotencyConflict(_ what: String) -> APIError {
        APIError(status: .conflict, code: "idempotency_conflict", message: "the idempotency key \(what)")
    }

    private func verify(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(VerifyRequest.self, request, expected: "{\"x509_chain\": PEM} or {\"jwt\", \"audience\"}")
        try clock.requireAgreement(.verdict)
        let keys = try requireKeys()
        let reasons = request.caller.isOperator
        let answer = try await verify(body, keys, reasons: reasons)
        // An authority activated a moment ago may not be in the cached
        // bundle yet: look again (at most every 100 ms) before saying no.
        guard let code = answer.code, code == "untrusted" || code == "unknown_key", let authority,
              let fresh = try authority.keys(maxAge: .milliseconds(100)), fresh.bundle.sequence != keys.bundle.sequence else {
            return APIJSON.response(answer)
        }
        return APIJSON.response(try await verify(body, fresh, reasons: reasons))
    }

    /// `reasons`: whether a `revoked` verdict gives the rule's reason (to operators only).
    private func verify(_ body: VerifyRequest, _ keys: AuthorityService.Keys, reasons: Bool) async throws -> VerifyBody {
        do {
            if let chainPEM = body.x509Chain, body.jwt == nil {
                let verified = try await keys.bundle.verifyX509(chainPEM: chainPEM, memo: keys.x509Chains, issued: authority?.issuedLookup)
                metrics.count(verified.signature)
                try await checkNotRevoked(keys, serial: verified.serialHex, spiffeID: verified.spiffeID, attributes: verified.attributes,
                                          issuedAt: verified.notBefore.addingTimeInterval(X509Authority.backdate), notAfter: verified.notAfter, reason: reasons)
                return VerifyBody(valid: true, spiffeId: verified.spiffeID.description, serial: verified.serialHex,
                                  attributes: verified.attributes, expiresAt: Self.iso(verified.notAfter))
            }
            if let jwt = body.jwt, let audience = body.audience, body.x509Chain == nil {
                let verified = try JWTVerifier(trustDomain: keys.jwt.trustDomain, keys: keys.bundle.jwtKeys, memo: keys.jwtSignatures,
                                               issued: authority?.issuedLookup).verify(jwt, audience: audience)
                metrics.count(verified.signature)
                try await checkNotRevoked(keys, serial: verified.serial, spiffeID: verified.spiffeID, attributes: verified.attributes,
                                          issuedAt: verified.issuedAt ?? Date(timeIntervalSince1970: 0), notAfter: verified.expiry, reason: reasons)
                return VerifyBody(valid: true, spiffeId: verified.spiffeID.description, serial: verified.serial,
                                  attributes: verified.attributes, expiresAt: Self.iso(verified.expiry))
            }
            throw APIError.badRequest("give either x509_chain, or jwt with audience")
        } catch let error as AuthorityError {
            return VerifyBody(valid: false, code: error.code, reason: error.message)
        } catch let error as APIError {
            throw error
        } catch {
            return VerifyBody(valid: false, code: "malformed", reason: "\(error)")
        }
    }

    /// The rule revoking an identity, if any (see `Revocation`). A rule
    /// that asked for the identity's issuance record (an ID or attribute
    /// rule kept with its log index, a serial rule's line) and covers it
    /// only by the times, this node holding no record, is looked at again
    /// once this node has caught up (ReadIndex): the identity may have been
    /// recorded after the rule and not have reached this node yet. (A
    /// node holding the rule holds every record written before it, unless
    /// forgotten: expired.) Without a leader to confirm, or not caught up
    /// within a fifth of the request timeout (1 s by default: a partition
    /// would otherwise hold the caller for all of it), the times decide.
    func revocation(_ keys: AuthorityService.Keys, serial: String, spiffeID: String, attributes: Attributes, issuedAt: Date,
                    notAfter: Date) async -> Revocation? {
        let record = { self.authority?.issuedRecordIndex(serial: serial, notAfter: notAfter) }
        var missing = false
        guard let rule = keys.revocation(serial: serial, spiffeID: spiffeID, attributes: attributes, issuedAt: issuedAt, recordIndex: {
            let index = record()
            missing = index == nil
            return index
        }) else {
            return nil
        }
        guard missing, (try? await driver.linearizableReadIndex(timeoutTicks: Self.catchUpTicks(driver))) != nil else { return rule }
        return keys.revocation(serial: serial, spiffeID: spiffeID, attributes: attributes, issuedAt: issuedAt, recordIndex: record)
    }

    static func catchUpTicks(_ driver: RaftDriver) -> Int { max(1, driver.requestTimeoutTicks / 5) }

    /// Throws `revoked` if a rule covers the identity; with its reason when `reason`.
    func checkNotRevoked(_ keys: AuthorityService.Keys, serial: String, spiffeID: SpiffeID, attributes: Attributes, issuedAt: Date,
                         notAfter: Date, reason: Bool) async throws(AuthorityError) {
        if let rule = await revocation(keys, serial: serial, spiffeID: spiffeID.description, attributes: attributes, issuedAt: issuedAt,
                                       notAfter: notAfter) {
            throw AuthorityError("revoked", "revoked at \(Self.iso(millis: rule.revokedAtMillis)) by \(rule.kind.rawValue) \(rule.value)"
                                 + (rule.reason.isEmpty || !reason ? "" : ": \(rule.reason)"))
        }
    }

    // MARK: - Authorities, rotation, revocation, CRL

    private func crl() throws -> HTTPResponse {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        try clock.requireAgreement(.crl)
        do {
            return HTTPResponse(status: .ok, headers: [("content-type", "application/x-pem-file"), ("cache-control", "max-age=300")],
                                body: Array(try authority.crlPEM().utf8))
        } catch let error as AuthorityError {
            throw APIError.unavailable(error.code, error.message)
        }
    }

    private func authorities(action: String?, next: String?) throws -> HTTPResponse {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        guard let keyring = try authority.keyring() else {
            throw APIError.unavailable("no_authority", "the trust domain's keys are not made yet (the first leader makes them); retry")
        }
        func date(_ millis: UInt64?) -> String? { millis.map { Self.iso(millis: $0) } }
        let now = Self.millis(Date())
        let bodies = try keyring.authorities.filter { $0.isPublished(at: now) }.map { entry -> AuthorityBody in
            let certificate = try Certificate(pemEncoded: entry.x509Certificate)
            return AuthorityBody(id: entry.id, state: entry.state.rawValue, algorithm: entry.algorithm, subject: certificate.subject.description,
                                 notAfter: Self.iso(certificate.notValidAfter), jwtKeyId: entry.jwtKeyID, createdAt: date(entry.createdAtMillis)!,
                                 activatedAt: date(entry.activatedAtMillis), retiredAt: date(entry.retiredAtMillis),
                                 publishedUntil: entry.state == .retired ? date(entry.keepUntilMillis) : nil)
        }
        return APIJSON.response(AuthoritiesBody(trustDomain: keyring.trustDomain, authorities: bodies, action: action, next: next))
    }

    /// One step of a rotation: with no prepared authority, prepares one
    /// (published in bundles, not signing); with one, activates it once it
    /// has been published for a bundle refresh interval (or at once with
    /// `force`), and the active one retires.
    private func rotate(_ request: HTTPRequest) async throws -> HTTPResponse {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        let body = request.body.isEmpty ? RotateRequest() : try Self.decodeBody(RotateRequest.self, request, expected: "{\"key_algorithm\"?, \"force\"?}")
        var algorithm: KeyAlgorithm?
        if let name = body.keyAlgorithm {
            guard let known = KeyAlgorithm(rawValue: name) else { throw APIError(status: .badRequest, code: "bad_key_algorithm", message: "key_algorithm must be one of \(KeyAlgorithm.names)") }
            algorithm = known
        }
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else { return try await forwardToLeader(request, leaderHint: leadership.leaderID) }
        try clock.requireAgreement(.revocation)
        let keys = try requireKeys(fresh: true)
        guard let keyring = try authority.keyring() else { throw APIError.unavailable("no_authority", "the trust domain's keys are not made yet") }
        let now = Date()
        let operation: LedgerCommand.Operation
        let action: String, next: String
        if let prepared = keyring.prepared {
            guard algorithm == nil else {
                throw APIError(status: .conflict, code: "rotation_in_progress", message: "authority \(prepared.id) is prepared; activate it before preparing one with another key type")
            }
            let published = now.timeIntervalSince1970 - TimeInterval(prepared.createdAtMillis) / 1000
            let wait = TimeInterval(keys.bundle.refreshHintSeconds * TrustBundle.refreshesBeforeActivation)
            guard published >= wait || body.force == true else {
                throw APIError(status: .conflict, code: "too_early",
                               message: "authority \(prepared.id) has been published for \(Int(published)) s; relying parties refresh bundles every \(keys.bundle.refreshHintSeconds) s and it is published for \(TrustBundle.refreshesBeforeActivation) refreshes (\(Int(wait)) s) before it signs. Run again after that, or with force")
            }
            operation = .activateAuthority(id: prepared.id)
            action = "activated \(prepared.id); \(keyring.active?.id ?? "the previous authority") retired (published until its identities expire)"
            next = "run rotate again to prepare the next authority"
        } else {
            let chosen = algorithm
            let entry = try await NIOThreadPool.singleton.runIfActive { try authority.makeAuthority(chosen, state: .prepared, now: now) }
            operation = .prepareAuthority(entry)
            action = "prepared \(entry.id) (\(entry.algorithm)): published in bundles, not signing yet"
            next = "run rotate again after \(keys.bundle.refreshHintSeconds * TrustBundle.refreshesBeforeActivation) s (\(TrustBundle.refreshesBeforeActivation) bundle refreshes) to activate it"
        }
        let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: Self.millis(now), actor: Self.actor(of: request),
                                                                requestID: RequestID.make(), operation: operation))
        if case .rejected(let reason) = outcome.result { throw APIError(status: .conflict, code: "rejected", message: reason) }
        authority.invalidate()
        return try authorities(action: action, next: next)
    }

    /// The rules in force; their reasons (free text, which may tell of an
    /// incident) only when `reasons` (operators).
    private func revocations(reasons: Bool, note: String? = nil) throws -> HTTPResponse {
        let keys = try requireKeys()
        return APIJSON.response(RevocationsBody(revocations: keys.revocations.rules.map {
            RevocationBody(kind: $0.kind.rawValue, value: $0.value, reason: reasons ? $0.reason : nil,
                           revokedAt: Self.iso(millis: $0.revokedAtMillis))
        }, note: note))
    }

    private func revoke(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(RevokeRequest.self, request, expected: "{\"serial\" | \"spiffe_id\" | \"attribute\": \"name=value\", \"reason\"?}")
        let given = [(Revocation.Kind.serial, body.serial), (.spiffeID, body.spiffeId), (.attribute, body.attribute)].compactMap { kind, value in value.map { (kind, $0) } }
        guard given.count == 1, let (kind, rawValue) = given.first else { throw APIError.badRequest("give exactly one of serial, spiffe_id or attribute") }
        var value = rawValue
        if kind == .serial {
            guard let serial = Revocation.serial(parsing: value) else {
                throw APIError(status: .badRequest, code: "bad_revocation", message: Revocation.serialParsingMessage)
            }
            value = serial
        }
        if kind == .spiffeID {
            guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
            // The bare trust domain ID too: identities issued with it before it was refused.
            value = try Self.spiffeID(value, trustDomain: authority.trustDomain, trustDomainItself: true).description
        }
        var rule = Revocation(kind: kind, value: value, reason: body.reason ?? "")
        if let reason = rule.invalidReason { throw APIError(status: .badRequest, code: "bad_revocation", message: reason) }
        // Passed to the leader, whose clock stamps the rule (as it stamps
        // what it issues): a revocation is urgent, and is not refused
        // because the node it reached has a clock that disagrees.
        let leadership = await driver.awaitLeadership()
        guard leadership.isLeader else {
            let answer = try await forwardToLeader(request, leaderHint: leadership.leaderID)
            // Read your writes here too: the leader answered once it
            // applied the rule; this node's verification reflects it
            // before the caller hears back.
            if answer.status == .ok {
                _ = try? await driver.linearizableReadIndex()
                authority?.invalidate()
            }
            return answer
        }
        try clock.requireAgreement(.revocation)
        // A renewal named by serial: what its line issued from it until the
        // rule is covered too (see `Revocation.lineage`).
        // (An X.509 renewal only: a JWT-SVID's record carries the line of
        // the SVID it was minted from, which its revocation must not reach.)
        var note: String?
        if kind == .serial {
            let found = try authority?.issuedRecord(serial: value)
            if let (record, logIndex) = found, record.kind == .x509,
               let lineage = record.attributes["lineage"].map(Revocation.canonicalSerial), lineage != value {
                rule.lineage = lineage
                rule.lineageFromIndex = logIndex
                rule.lineageFromMillis = record.issuedAtMillis
            } else if found == nil {
                note = "serial \(value) has no issuance record here (expired and forgotten, or not issued by this cluster): the rule covers it "
                    + "and what names it as its line or parent, not renewals made from it; to reach those, revoke its line's first serial or its SPIFFE ID"
            }
        }
        let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: Self.millis(Date()), actor: Self.actor(of: request),
                                                                requestID: RequestID.make(), operation: .revoke(rule)))
        if case .rejected(let reason) = outcome.result { throw APIError(status: .conflict, code: "rejected", message: reason) }
        authority?.invalidate()
        return try revocations(reasons: true, note: note)
    }

    /// `text` as a SPIFFE ID in `trustDomain`; unless `trustDomainItself`
    /// is allowed, one that names a workload (with a path).
    static func spiffeID(_ text: String, trustDomain: String, trustDomainItself: Bool = false) throws -> SpiffeID {
        let id: SpiffeID
        do {
            id = try SpiffeID(parsing: text)
        } catch {
            throw APIError(status: .badRequest, code: "bad_spiffe_id", message: error.description)
        }
        guard id.trustDomain == trustDomain else {
            throw APIError(status: .badRequest, code: "wrong_trust_domain", message: "\(id) is not in this cluster's trust domain \(trustDomain)")
        }
        guard trustDomainItself || id.namesWorkload else {
            throw APIError(status: .badRequest, code: "bad_spiffe_id", message: "\(id): \(SpiffeID.workloadPathMessage)")
        }
        return id
    }

    /// `iso(_:)` of a time in milliseconds since 1970.
    static func iso(millis: UInt64) -> String { iso(Date(timeIntervalSince1970: TimeInterval(millis) / 1000)) }

    /// RFC 3339 in UTC, whole seconds ("2026-11-23T07:31:53Z"), as
    /// `date.formatted(.iso8601)` writes it, without its formatter (it
    /// was a visible cost of every issuance answer).
    static func iso(_ date: Date) -> String {
        var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
        var parts = tm()
        guard gmtime_r(&seconds, &parts) != nil else { return date.formatted(.iso8601) }
        let year = Int(parts.tm_year) + 1900
        guard (0...9999).contains(year) else { return date.formatted(.iso8601) }
        // "YYYY-MM-DDTHH:MM:SSZ", digit by digit (string pieces were an eighth of answering a verification).
        return String(unsafeUninitializedCapacity: 20) { out in
            func digits(_ value: Int, _ count: Int, at position: Int) {
                var value = value
                for index in stride(from: position + count - 1, through: position, by: -1) {
                    out[index] = UInt8(ascii: "0") + UInt8(value % 10)
                    value /= 10
                }
            }
            digits(year, 4, at: 0)
            digits(Int(parts.tm_mon) + 1, 2, at: 5)
            digits(Int(parts.tm_mday), 2, at: 8)
            digits(Int(parts.tm_hour), 2, at: 11)
            digits(Int(parts.tm_min), 2, at: 14)
            digits(Int(parts.tm_sec), 2, at: 17)
            (out[4], out[7], out[10]) = (UInt8(ascii: "-"), UInt8(ascii: "-"), UInt8(ascii: "T"))
            (out[13], out[16], out[19]) = (UInt8(ascii: ":"), UInt8(ascii: ":"), UInt8(ascii: "Z"))
            return 20
        }
    }
}

/// The ledger refused an issuance because another authority became active
/// after it was signed.
struct AuthorityRotated: Error {}

/// A token bucket: `tokens` as of `at` (seconds, a monotonic clock).
struct TokenBucket: Sendable {
    var tokens: Double
    var at: Double

    /// Adds what `perSecond` gave since `at`, up to `burst`; a clock
    /// stepping back gives nothing, now or later.
    mutating func refill(_ now: Double, perSecond: Double, burst: Double) {
        tokens = min(burst, tokens + max(0, now - at) * perSecond)
        at = max(at, now)
    }

    /// Whether it is full again by `now` (the same as not tracked).
    func refilled(by now: Double, perSecond: Double, burst: Double) -> Bool {
        tokens + max(0, now - at) * perSecond >= burst
    }
}

/// How often one identity line (an X509-SVID and its renewals, by their
/// `lineage`, else its serial; a step's identity counts as its job's line,
/// `job_lineage`) may be issued something on the strength of its X509-SVID
/// (renewals, JWT-SVIDs, steps): a token bucket per line, `burst` at once
/// and `perSecond` after. A workload asking in a loop is held to that
/// instead of taking the leader's whole rate and filling the ledger's
/// identity records (which would stall everyone's issuance). Kept per
/// node: each node that takes such a request counts it (a forwarded one
/// on the leader too).
public final class IssuanceRateLimiter: Sendable {
    let perSecond: Double
    let burst: Double
    /// Lines tracked at most; past it, lines whose bucket has refilled
    /// (the same as untracked) are dropped, at most once a second, and
    /// meanwhile a new line goes untracked (each needs an X509-SVID of its
    /// own, so there are few).
    let linesMax: Int
    private struct State {
        var buckets: [String: TokenBucket] = [:]
        var prunedAt = -Double.infinity
    }
    private let state = Mutex(State())

    public init(perSecond: Double = 20, burst: Double = 100, linesMax: Int = 100_000) {
        precondition(perSecond > 0 && burst >= 1 && linesMax > 0)
        (self.perSecond, self.burst, self.linesMax) = (perSecond, burst, linesMax)
    }

    /// Takes one issuance from `line`'s budget at `now` (seconds): nil if
    /// allowed, else the seconds until one more will be.
    public func admit(_ line: String, now: Double) -> Double? {
        state.withLock { state in
            var bucket = state.buckets[line] ?? TokenBucket(tokens: burst, at: now)
            bucket.refill(now, perSecond: perSecond, burst: burst)
            guard bucket.tokens >= 1 else {
                state.buckets[line] = bucket
                return (1 - bucket.tokens) / perSecond
            }
            bucket.tokens -= 1
            if state.buckets[line] == nil && state.buckets.count >= linesMax {
                guard now - state.prunedAt >= 1 || now < state.prunedAt else { return nil }
                state.prunedAt = now
                let (burst, perSecond) = (burst, perSecond)
                state.buckets = state.buckets.filter { !$0.value.refilled(by: now, perSecond: perSecond, burst: burst) }
                guard state.buckets.count < linesMax else { return nil }
            }
            state.buckets[line] = bucket
            return nil
        }
    }

    var linesTracked: Int { state.withLock { $0.buckets.count } }
}

/// A budget shared by callers, none of whom may take more than its own
/// part of it: a call is admitted only if both its caller's bucket and the
/// shared one hold a token (then one is taken from each; none otherwise).
/// One busy caller thus leaves the rest of the shared budget to others.
public final class FairShareLimiter: Sendable {
    let perSecond: Double, burst: Double
    let callerPerSecond: Double, callerBurst: Double
    /// Callers tracked at most; past it, callers whose bucket has refilled
    /// are dropped, and if none has, a new caller shares one bucket with
    /// the others past the bound.
    let callersMax: Int
    private let state = Mutex<(shared: TokenBucket, callers: [String: TokenBucket])>((TokenBucket(tokens: 0, at: -Double.infinity), [:]))

    public init(perSecond: Double, burst: Double, callerPerSecond: Double, callerBurst: Double, callersMax: Int = 4_096) {
        precondition(perSecond > 0 && burst >= 1 && callerPerSecond > 0 && callerBurst >= 1 && callersMax > 0)
        (self.perSecond, self.burst, self.callerPerSecond, self.callerBurst, self.callersMax) = (perSecond, burst, callerPerSecond, callerBurst, callersMax)
        state.withLock { $0.shared = TokenBucket(tokens: burst, at: -Double.infinity) }
    }

    /// Takes one call from `caller`'s part and the shared budget at `now`
    /// (seconds, a monotonic clock): nil if allowed, else the seconds until
    /// one more may be. A caller that cannot be told apart (nil) takes from
    /// the shared budget alone.
    public func admit(_ caller: String?, now: Double) -> Double? {
        state.withLock { state in
            if state.shared.at == -Double.infinity { state.shared.at = now }
            state.shared.refill(now, perSecond: perSecond, burst: burst)
            guard let caller else {
                guard state.shared.tokens >= 1 else { return (1 - state.shared.tokens) / perSecond }
                state.shared.tokens -= 1
                return nil
            }
            var key = caller
            if state.callers[key] == nil && state.callers.count >= callersMax {
                let (callerBurst, callerPerSecond) = (callerBurst, callerPerSecond)
                state.callers = state.callers.filter { !$0.value.refilled(by: now, perSecond: callerPerSecond, burst: callerBurst) }
                if state.callers.count >= callersMax { key = "" }
            }
            var mine = state.callers[key] ?? TokenBucket(tokens: callerBurst, at: now)
            mine.refill(now, perSecond: callerPerSecond, burst: callerBurst)
            defer { state.callers[key] = mine }
            guard mine.tokens >= 1 else { return (1 - mine.tokens) / callerPerSecond }
            guard state.shared.tokens >= 1 else { return (1 - state.shared.tokens) / perSecond }
            mine.tokens -= 1
            state.shared.tokens -= 1
            return nil
        }
    }

    var callersTracked: Int { state.withLock { $0.callers.count } }
}

/// A per-second budget for denial records; what is over it is counted and
/// carried into the next record.
final class DenialLimiter: Sendable {
    static let perSecond = 20
    /// Tries to write one record (see `NodeAPI.recordDenial`): 7.5 s of waits between them, and up to 2 s each waiting for a leader.
    static let writeTries = 5
    private let state = Mutex<(second: Int, used: Int, suppressed: UInt32)>((0, 0, 0))

    /// The count the next record stands for, or nil if over budget.
    func admit() -> UInt32? {
        let second = Int(Date().timeIntervalSince1970)
        return state.withLock { state in
            if state.second != second { state.second = second; state.used = 0 }
            guard state.used < Self.perSecond else {
                state.suppressed &+= 1
                return nil
            }
            state.used += 1
            defer { state.suppressed = 0 }
            return state.suppressed + 1
        }
    }

    /// A record of `count` refusals could not be written: the next one counts them.
    func carry(_ count: UInt32) {
        state.withLock { $0.suppressed &+= count }
    }
}

extension X509SVIDBody: HandEncodedJSON {
    var json: [UInt8] {
        var w = JSONObjectWriter()
        w.add("bundle", bundle)
        w.add("bundle_sequence", bundleSequence)
        w.add("certificate", certificate)
        w.add("expires_at", expiresAt)
        w.add("replayed", replayed)
        w.add("serial", serial)
        w.add("spiffe_id", spiffeId)
        return w.bytes
    }
}

extension JWTSVIDBody: HandEncodedJSON {
    var json: [UInt8] {
        var w = JSONObjectWriter()
        w.add("expires_at", expiresAt)
        w.add("replayed", replayed)
        w.add("spiffe_id", spiffeId)
        w.add("token", token)
        return w.bytes
    }
}

extension VerifyBody: HandEncodedJSON {
    var json: [UInt8] {
        var w = JSONObjectWriter()
        w.add("attributes", attributes)
        w.add("code", code)
        w.add("expires_at", expiresAt)
        w.add("reason", reason)
        w.add("serial", serial)
        w.add("spiffe_id", spiffeId)
        w.add("valid", valid)
        return w.bytes
    }
}

extension X509SVIDRequest: HandDecodedJSON {
    init?(flat: [String: JSONText.Value]) {
        guard let token = flat.string("token"), let token, let csr = flat.string("csr"), let csr,
              let ttl = flat.uint32("ttl_seconds"), let key = flat.string("idempotency_key") else { return nil }
        self.init(token: token, csr: csr, ttlSeconds: ttl, idempotencyKey: key)
    }
}

extension JWTSVIDRequest: HandDecodedJSON {
    init?(flat: [String: JSONText.Value]) {
        guard let token = flat.string("token"), let token, case .stringArray(let audience)? = flat["audience"],
              let ttl = flat.uint32("ttl_seconds"), let key = flat.string("idempotency_key") else { return nil }
        self.init(token: token, audience: audience, ttlSeconds: ttl, idempotencyKey: key)
    }
}

extension WorkloadJWTRequest: HandDecodedJSON {
    init?(flat: [String: JSONText.Value]) {
        guard case .stringArray(let audience)? = flat["audience"], let ttl = flat.uint32("ttl_seconds"), let key = flat.string("idempotency_key") else { return nil }
        self.init(audience: audience, ttlSeconds: ttl, idempotencyKey: key)
    }
}

extension VerifyRequest: HandDecodedJSON {
    init?(flat: [String: JSONText.Value]) {
        guard let chain = flat.string("x509_chain"), let jwt = flat.string("jwt"), let audience = flat.string("audience") else { return nil }
        self.init(x509Chain: chain, jwt: jwt, audience: audience)
    }
}

extension NodeMetrics {
    /// Counts a verification by how its signature was known good.
    func count(_ signature: SignatureCheck) {
        switch signature {
        case .checked: signaturesChecked.add(1)
        case .remembered: signaturesRemembered.add(1)
        case .recorded: signaturesRecorded.add(1)
        }
    }
}
