import Authority
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
}

struct TokenBody: Codable {
    var token: String
    var spiffeId: String
    var ttlSeconds: UInt32
    var expiresAt: String
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
    var attributes: [String: String]?
    var expiresAt: String?
    var code: String?
    var reason: String?
}

extension NodeAPI {
    static let authorityRoutes: [Route] = [
        Route(method: .POST, template: "/v1/tokens", access: .admin),
        Route(method: .POST, template: "/v1/svid/x509", access: .open),
        Route(method: .POST, template: "/v1/svid/jwt", access: .open),
        Route(method: .GET, template: "/v1/bundle", access: .open),
        Route(method: .GET, template: "/v1/bundle.pem", access: .open),
        Route(method: .GET, template: "/.well-known/openid-configuration", access: .open),
        Route(method: .GET, template: "/v1/keys", access: .open),
        Route(method: .POST, template: "/v1/verify", access: .open),
    ]

    func dispatchAuthority(_ route: Route, _ request: HTTPRequest) async throws -> HTTPResponse? {
        switch (route.method, route.template) {
        case (.POST, "/v1/tokens"): return try await createToken(request)
        case (.POST, "/v1/svid/x509"): return try await auditingDenials(request) { try await issueX509(request) }
        case (.POST, "/v1/svid/jwt"): return try await auditingDenials(request) { try await issueJWT(request) }
        case (.GET, "/v1/bundle"): return try bundleResponse { try $0.jwks() }
        case (.GET, "/v1/bundle.pem"): return try bundleResponse(type: "application/x-pem-file") { Array(try $0.pem().utf8) }
        case (.GET, "/.well-known/openid-configuration"): return try discovery(request)
        case (.GET, "/v1/keys"): return try bundleResponse { try $0.oidcJWKS() }
        case (.POST, "/v1/verify"): return try await verify(request)
        default: return nil
        }
    }

    /// Refused identity requests are audited too (`identity.deny`), at most
    /// `DenialLimiter.perSecond` records a second per node; the excess is
    /// folded into the next record's count, so a flood of bad requests
    /// cannot starve issuance. Recording does not delay the refusal.
    private func auditingDenials(_ request: HTTPRequest, _ body: () async throws -> HTTPResponse) async throws -> HTTPResponse {
        do {
            return try await body()
        } catch let error as APIError where (400..<500).contains(Int(error.status.code)) && error.code != "not_leader" {
            if let count = denials.admit() {
                let driver = self.driver
                let command = LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: Self.actor(of: request),
                                            requestID: UUID().uuidString,
                                            operation: .recordDenial(reason: String("\(error.code): \(error.message)".prefix(512)), count: count))
                Task { _ = try? await driver.write(command) }
            }
            throw error
        }
    }

    private func requireKeys() throws -> AuthorityService.Keys {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        let keys: AuthorityService.Keys?
        do {
            keys = try authority.keys()
        } catch {
            throw APIError(status: .internalServerError, code: "keyring_unreadable", message: "\(error)")
        }
        guard let keys else { throw APIError.unavailable("no_authority", "the trust domain's keys are not made yet (the first leader makes them); retry") }
        return keys
    }

    private func bundleResponse(type: String = "application/json", _ body: (TrustBundle) throws -> [UInt8]) throws -> HTTPResponse {
        let keys = try requireKeys()
        return HTTPResponse(status: .ok, headers: [("content-type", type), ("cache-control", "max-age=\(keys.bundle.refreshHintSeconds)")],
                            body: try body(keys.bundle))
    }

    private func discovery(_ request: HTTPRequest) throws -> HTTPResponse {
        _ = try requireKeys()
        let host = request.headers.first(name: "host") ?? "localhost"
        let issuer = "https://\(host)"
        let document: [String: Any] = [
            "issuer": issuer, "jwks_uri": "\(issuer)/v1/keys", "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["id_token"], "subject_types_supported": ["public"], "claims_supported": ["sub", "aud", "exp", "iat"],
        ]
        return HTTPResponse(status: .ok, headers: [("content-type", "application/json")],
                            body: Array(try JSONSerialization.data(withJSONObject: document, options: [.sortedKeys, .withoutEscapingSlashes])))
    }

    static func decodeBody<T: Decodable>(_ type: T.Type, _ request: HTTPRequest, expected: String) throws -> T {
        do {
            return try APIJSON.decode(type, from: request.body)
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
        let secret = AuthorityService.newTokenSecret()
        let now = Date()
        let expires = now.addingTimeInterval(TimeInterval(validFor))
        let token = JoinToken(hash: AuthorityService.hash(secret), spiffeID: spiffeID.description, ttlMaxSeconds: ttl,
                              expiresAtMillis: UInt64(expires.timeIntervalSince1970 * 1000))
        let (outcome, _) = try await driver.write(LedgerCommand(timeMillis: UInt64(now.timeIntervalSince1970 * 1000), actor: Self.actor(of: request),
                                                                requestID: UUID().uuidString, operation: .createJoinToken(token)))
        if case .rejected(let reason) = outcome.result { throw APIError(status: .conflict, code: "rejected", message: reason) }
        // The secret is returned once and never stored or logged.
        return APIJSON.response(TokenBody(token: secret, spiffeId: spiffeID.description, ttlSeconds: ttl, expiresAt: Self.iso(expires)), status: .created)
    }

    /// Checks the token (and replays an earlier answer for the same
    /// idempotency key) before anything is signed.
    private func admit(token secret: String, idempotencyKey: String?, ttlSeconds: UInt32?) async throws -> (hash: String, token: JoinToken, ttl: UInt32, earlier: Issuance?) {
        guard let authority else { throw APIError.unavailable("no_authority", "this node runs without an authority") }
        guard !secret.isEmpty, secret.utf8.count <= 256 else { throw APIError(status: .unauthorized, code: "invalid_token", message: "the join token is missing or malformed") }
        if let key = idempotencyKey {
            guard !key.isEmpty, key.utf8.count <= 128 else { throw APIError.badRequest("idempotency_key must be 1 to 128 bytes") }
        }
        // SQLite reads block their thread: keep them off Swift's cooperative pool.
        let (hash, token, earlierIssuance) = try await NIOThreadPool.singleton.runIfActive {
            let (hash, token) = try authority.token(secret: secret)
            return (hash, token, try idempotencyKey.flatMap { try authority.earlierIssuance(idempotencyKey: $0) })
        }
        guard let token else { throw APIError(status: .unauthorized, code: "invalid_token", message: "unknown join token") }
        if let earlier = earlierIssuance {
            guard earlier.tokenHash == hash else { throw APIError(status: .conflict, code: "idempotency_conflict", message: "the idempotency key was used with another token") }
            return (hash, token, earlier.ttlSeconds, earlier)
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
    /// record is committed and applied.
    private func record(_ issuance: Issuance, _ request: HTTPRequest) async throws -> (artifact: [UInt8], replayed: Bool) {
        let command = LedgerCommand(timeMillis: UInt64(Date().timeIntervalSince1970 * 1000), actor: "token:\(issuance.tokenHash.prefix(16))",
                                    requestID: request.headers.first(name: "warrant-request-id") ?? UUID().uuidString, operation: .recordIssuance(issuance))
        if let reason = command.invalidReason { throw APIError.badRequest(reason) }
        let (outcome, _) = try await driver.write(command)
        switch outcome.result {
        case .issued(let artifact, let replayed): return (artifact, replayed)
        case .rejected(let reason):
            let code = reason.contains("already used") ? "token_used" : reason.contains("expired") ? "token_expired" : "rejected"
            throw APIError(status: .forbidden, code: code, message: reason)
        default: throw APIError(status: .internalServerError, code: "internal", message: "unexpected outcome \(outcome.result)")
        }
    }

    private func issueX509(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(X509SVIDRequest.self, request, expected: "{\"token\", \"csr\" (PEM), \"ttl_seconds\"?, \"idempotency_key\"?}")
        let status = await driver.statusSnapshot
        guard status.role == Role.leader.rawValue else { return try await forwardToLeader(request, leaderHint: status.leaderID) }
        let keys = try requireKeys()
        let admitted = try await admit(token: body.token, idempotencyKey: body.idempotencyKey, ttlSeconds: body.ttlSeconds)
        if let earlier = admitted.earlier { return try x509Response(earlier.artifact, keys: keys, replayed: true) }
        let csrDER: [UInt8]
        do {
            csrDER = try PEMDocument(pemString: body.csr).derBytes
        } catch {
            throw APIError(status: .badRequest, code: "bad_csr", message: "csr must be a PEM CERTIFICATE REQUEST")
        }
        let publicKey: Certificate.PublicKey
        do {
            publicKey = try X509Authority.publicKey(fromCSR: csrDER)
        } catch {
            throw APIError(status: .badRequest, code: error.code, message: error.message)
        }
        let spiffeID = try Self.spiffeID(admitted.token.spiffeID, trustDomain: keys.x509.trustDomain)
        let issued: IssuedX509
        do {
            issued = try keys.x509.issue(spiffeID: spiffeID, publicKey: publicKey, ttl: TimeInterval(admitted.ttl),
                                         attributes: ["evidence": "join_token", "token": String(admitted.hash.prefix(16))])
        } catch let error as AuthorityError {
            throw APIError(status: .badRequest, code: error.code, message: error.message)
        }
        let issuance = Issuance(kind: .x509, spiffeID: spiffeID.description, serial: issued.serialHex, fingerprint: issued.fingerprintSHA256,
                                notAfterMillis: UInt64(issued.certificate.notValidAfter.timeIntervalSince1970 * 1000), ttlSeconds: admitted.ttl,
                                tokenHash: admitted.hash, idempotencyKey: body.idempotencyKey.map(AuthorityService.hash) ?? "", node: id, artifact: issued.der)
        let (artifact, replayed) = try await record(issuance, request)
        return try x509Response(artifact, keys: keys, replayed: replayed)
    }

    private func x509Response(_ der: [UInt8], keys: AuthorityService.Keys, replayed: Bool) throws -> HTTPResponse {
        let certificate = try Certificate(derEncoded: der)
        let verified = try TrustBundle.checkLeaf(certificate, trustDomain: keys.x509.trustDomain)
        return APIJSON.response(X509SVIDBody(spiffeId: verified.spiffeID.description,
                                             certificate: PEMDocument(type: "CERTIFICATE", derBytes: der).pemString + "\n",
                                             bundle: try keys.bundle.pem(), serial: verified.serialHex, expiresAt: Self.iso(certificate.notValidAfter),
                                             replayed: replayed), headers: [("warrant-leader", String(id))])
    }

    private func issueJWT(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(JWTSVIDRequest.self, request, expected: "{\"token\", \"audience\": [..], \"ttl_seconds\"?, \"idempotency_key\"?}")
        let status = await driver.statusSnapshot
        guard status.role == Role.leader.rawValue else { return try await forwardToLeader(request, leaderHint: status.leaderID) }
        let keys = try requireKeys()
        let admitted = try await admit(token: body.token, idempotencyKey: body.idempotencyKey, ttlSeconds: body.ttlSeconds)
        if let earlier = admitted.earlier { return try jwtResponse(earlier.artifact, keys: keys, replayed: true) }
        let spiffeID = try Self.spiffeID(admitted.token.spiffeID, trustDomain: keys.jwt.trustDomain)
        let issued: IssuedJWT
        do {
            issued = try keys.jwt.issue(spiffeID: spiffeID, audiences: body.audience, ttl: TimeInterval(admitted.ttl),
                                        attributes: ["evidence": "join_token"], notAfter: keys.x509.certificate.notValidAfter)
        } catch let error as AuthorityError {
            throw APIError(status: .badRequest, code: error.code, message: error.message)
        }
        let fingerprint = AuthorityService.hash(issued.token)
        let issuance = Issuance(kind: .jwt, spiffeID: spiffeID.description, serial: String(fingerprint.prefix(32)), fingerprint: fingerprint,
                                notAfterMillis: UInt64(issued.expiry.timeIntervalSince1970 * 1000), ttlSeconds: admitted.ttl,
                                tokenHash: admitted.hash, idempotencyKey: body.idempotencyKey.map(AuthorityService.hash) ?? "", node: id,
                                artifact: Array(issued.token.utf8))
        let (artifact, replayed) = try await record(issuance, request)
        return try jwtResponse(artifact, keys: keys, replayed: replayed)
    }

    private func jwtResponse(_ artifact: [UInt8], keys: AuthorityService.Keys, replayed: Bool) throws -> HTTPResponse {
        let token = String(decoding: artifact, as: UTF8.self)
        let claims = token.split(separator: ".").dropFirst().first.flatMap { Base64URL.decode($0) }
            .flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] } ?? [:]
        let expiry = (claims["exp"] as? NSNumber).map { Date(timeIntervalSince1970: $0.doubleValue) } ?? Date()
        return APIJSON.response(JWTSVIDBody(spiffeId: claims["sub"] as? String ?? "", token: token, expiresAt: Self.iso(expiry), replayed: replayed),
                                headers: [("warrant-leader", String(id))])
    }

    private func verify(_ request: HTTPRequest) async throws -> HTTPResponse {
        let body = try Self.decodeBody(VerifyRequest.self, request, expected: "{\"x509_chain\": PEM} or {\"jwt\", \"audience\"}")
        let keys = try requireKeys()
        do {
            if let chainPEM = body.x509Chain, body.jwt == nil {
                let documents = try PEMDocument.parseMultiple(pemString: chainPEM)
                guard !documents.isEmpty, documents.count <= 8 else { throw AuthorityError("bad_chain", "give 1 to 8 PEM certificates") }
                let chain = try documents.map { try Certificate(derEncoded: $0.derBytes) }
                let verified = try await keys.bundle.verifyX509(chain: chain)
                return APIJSON.response(VerifyBody(valid: true, spiffeId: verified.spiffeID.description, attributes: verified.attributes,
                                                   expiresAt: Self.iso(verified.notAfter)))
            }
            if let jwt = body.jwt, let audience = body.audience, body.x509Chain == nil {
                let verified = try JWTVerifier(trustDomain: keys.jwt.trustDomain, keys: keys.bundle.jwtKeys).verify(jwt, audience: audience)
                return APIJSON.response(VerifyBody(valid: true, spiffeId: verified.spiffeID.description, attributes: verified.attributes,
                                                   expiresAt: Self.iso(verified.expiry)))
            }
            throw APIError.badRequest("give either x509_chain, or jwt with audience")
        } catch let error as AuthorityError {
            return APIJSON.response(VerifyBody(valid: false, code: error.code, reason: error.message))
        } catch let error as APIError {
            throw error
        } catch {
            return APIJSON.response(VerifyBody(valid: false, code: "malformed", reason: "\(error)"))
        }
    }

    static func spiffeID(_ text: String, trustDomain: String) throws -> SpiffeID {
        let id: SpiffeID
        do {
            id = try SpiffeID(parsing: text)
        } catch {
            throw APIError(status: .badRequest, code: "bad_spiffe_id", message: error.description)
        }
        guard id.trustDomain == trustDomain else {
            throw APIError(status: .badRequest, code: "wrong_trust_domain", message: "\(id) is not in this cluster's trust domain \(trustDomain)")
        }
        return id
    }

    static func iso(_ date: Date) -> String { date.formatted(.iso8601) }
}

/// A per-second budget for denial records; what is over it is counted and
/// carried into the next record.
final class DenialLimiter: Sendable {
    static let perSecond = 20
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
}
