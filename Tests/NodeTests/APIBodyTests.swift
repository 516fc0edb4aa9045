import Encoding
import Foundation
@testable import Node
import Testing

@Suite("Hand-written response bodies")
struct APIBodyTests {
    private func parsed(_ bytes: [UInt8]) throws -> NSDictionary {
        try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? NSDictionary)
    }

    @Test("A denial's reason is kept on one line, unreordered: controls, line separators and bidirectional controls become '?'")
    func denialReasonsOnOneLine() {
        #expect(NodeAPI.oneLine("sub a\u{202E}cod.exe\u{2029}b\nc\u{9B}d é") == "sub a?cod.exe?b?c?d é")
    }

    @Test("`warrant audit tail` prints a record on one line whatever its quoted text holds: a claim with a bidirectional override, a line separator or a CSI is shown escaped")
    func auditTailLine() {
        let record = AuditRecordBody(sequence: 7, logIndex: 42, timeMillis: 0, actor: "token:abcd", action: "issue",
                                     target: "spiffe://warrant.local/ci", result: "ok: jwt context=workflow=a\u{202E}b\u{2028}c\u{9B}2J é",
                                     previousHash: "00", hash: String(repeating: "f", count: 64))
        #expect(record.line == "#7 idx=42 - token:abcd issue spiffe://warrant.local/ci -> ok: jwt context=workflow=a\\u{202E}b\\u{2028}c\\u{009B}2J é hash=ffffffffffffffff")
    }

    @Test("Issuance and verification bodies written by hand say exactly what JSONEncoder would")
    func sameAsEncoder() throws {
        let bodies: [any Encodable & HandEncodedJSON] = [
            X509SVIDBody(spiffeId: "spiffe://a/b", certificate: "-----BEGIN CERTIFICATE-----\nMII\n", bundle: "x\"y\\z", bundleSequence: 4_294_967_312, serial: "0a",
                         expiresAt: "2026-11-23T00:00:00Z", replayed: true),
            JWTSVIDBody(spiffeId: "spiffe://a/b", token: "h.c.s", expiresAt: "2026-11-23T00:00:00Z", replayed: false),
            VerifyBody(valid: true, spiffeId: "spiffe://a/b", serial: "ff", attributes: ["repo": "acme/api", "ctl": "\u{1}\t"], expiresAt: "t",
                       code: nil, reason: nil),
            VerifyBody(valid: false, spiffeId: nil, serial: nil, attributes: nil, expiresAt: nil, code: "revoked", reason: "by serial ff: \"leak\""),
        ]
        for body in bodies {
            #expect(try parsed(body.json) == parsed(APIJSON.encode(body)), "\(String(decoding: body.json, as: UTF8.self))")
        }
    }

    @Test("Request bodies read by hand give what JSONDecoder gives; anything of another type is left to JSONDecoder")
    func requestsSameAsDecoder() throws {
        func slow<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
            let decoder = JSONDecoder()
            decoder.keyDecodingStrategy = .convertFromSnakeCase
            return try decoder.decode(type, from: Data(text.utf8))
        }
        func flat(_ text: String) -> [String: JSONText.Value] { JSONText.parseFlatObject(Array(text.utf8)) ?? [:] }
        let x509 = #"{"token":"wjt.x","csr":"-----BEGIN\n","ttl_seconds":60,"idempotency_key":"k","extra":true}"#
        let fastX509 = try #require(X509SVIDRequest(flat: flat(x509)))
        let slowX509 = try slow(X509SVIDRequest.self, x509)
        #expect(fastX509.token == slowX509.token && fastX509.csr == slowX509.csr && fastX509.ttlSeconds == slowX509.ttlSeconds
                && fastX509.idempotencyKey == slowX509.idempotencyKey)
        let jwt = #"{"token":"t","audience":["a","b"]}"#
        let fastJWT = try #require(JWTSVIDRequest(flat: flat(jwt)))
        #expect(fastJWT.audience == (try slow(JWTSVIDRequest.self, jwt)).audience && fastJWT.ttlSeconds == nil)
        let verify = #"{"jwt":"h.c.s","audience":"x","x509_chain":null}"#
        let fastVerify = try #require(VerifyRequest(flat: flat(verify)))
        #expect(fastVerify.jwt == "h.c.s" && fastVerify.audience == "x" && fastVerify.x509Chain == nil)
        // Wrong types or missing members: not read by hand, and JSONDecoder refuses them.
        for bad in [#"{"token":"t","csr":"c","ttl_seconds":"60"}"#, #"{"token":"t","csr":"c","ttl_seconds":-1}"#, #"{"csr":"c"}"#,
                    #"{"token":1,"csr":"c"}"#] {
            #expect(X509SVIDRequest(flat: flat(bad)) == nil, "\(bad)")
            #expect(throws: (any Error).self) { try APIJSON.decode(X509SVIDRequest.self, from: Array(bad.utf8)) }
        }
        #expect(JWTSVIDRequest(flat: flat(#"{"token":"t","audience":"a"}"#)) == nil)
    }

    @Test("A request body left to JSONDecoder is read as the hand decoder reads it: camelCase names no member, a duplicate member is refused")
    func requestsBothWaysAlike() throws {
        // A fractional member sends the body to JSONDecoder; its idempotencyKey is no member there either.
        for text in [#"{"token":"t","csr":"c","idempotencyKey":"k"}"#, #"{"token":"t","csr":"c","idempotencyKey":"k","x":1.5}"#] {
            let read = try APIJSON.decodeRequest(X509SVIDRequest.self, from: Array(text.utf8))
            #expect(read.token == "t" && read.idempotencyKey == nil, "\(text)")
        }
        let slow = try APIJSON.decodeRequest(X509SVIDRequest.self, from: Array(#"{"token":"t","csr":"c","ttl_seconds":60,"idempotency_key":"k","x":1.5}"#.utf8))
        #expect(slow.ttlSeconds == 60 && slow.idempotencyKey == "k")
        // Unicode upper-cases the long s to S and the dotless i to I: such names are no members either way.
        let unicode = try APIJSON.decodeRequest(X509SVIDRequest.self, from: Array(#"{"token":"t","csr":"c","ttl_\#u{17F}econds":10,"x":1.5}"#.utf8))
        #expect(unicode.ttlSeconds == nil)
        #expect(try APIJSON.decodeRequest(VerifyRequest.self, from: Array(#"{"x509_chain":"pem","x":[1.5]}"#.utf8)).x509Chain == "pem")
        #expect(throws: (any Error).self) { try APIJSON.decodeRequest(X509SVIDRequest.self, from: Array(#"{"token":"t","csr":"c","ttlSeconds":60,"x":1.5,"token":"u"}"#.utf8)) }
        #expect(throws: (any Error).self) { try APIJSON.decodeRequest(X509SVIDRequest.self, from: Array(#"{"token":"t","token":"u","csr":"c"}"#.utf8)) }
    }
}

@Suite("Times in answers")
struct TimeTextTests {
    @Test("ISO 8601 times written by hand are what Foundation's formatter writes")
    func sameAsFormatter() {
        var random = SystemRandomNumberGenerator()
        let dates = [Date(timeIntervalSince1970: 0), Date(timeIntervalSince1970: 951_782_400.75), Date(timeIntervalSince1970: 4_102_444_799.999)]
            + (0..<200).map { _ in Date(timeIntervalSince1970: Double(random.next() % 4_000_000_000) + Double(random.next() % 1000) / 1000) }
        for date in dates {
            #expect(NodeAPI.iso(date) == date.formatted(.iso8601), "\(date.timeIntervalSince1970)")
        }
    }

    /// Ids made on many threads at once are all different, share this
    /// process's prefix and read back as UUIDs.
    @Test("Request ids a node makes are unique across threads and UUID-shaped")
    func requestIDs() async {
        let ids = await withTaskGroup(of: [String].self) { group in
            for _ in 0..<8 { group.addTask { (0..<5_000).map { _ in RequestID.make() } } }
            var all: [String] = []
            for await part in group { all += part }
            return all
        }
        #expect(Set(ids).count == ids.count)
        #expect(ids.allSatisfy { UUID(uuidString: $0) != nil })
        #expect(Set(ids.map { $0.prefix(18) }).count == 1, "one prefix per process")
        // Written by hand as UUID.uuidString writes the same sixteen bytes.
        var random = SystemRandomNumberGenerator()
        for (prefix, count) in [(UInt64(0), UInt64(0)), (.max, .max), (0x0123_4567_89AB_CDEF, 1)] + (0..<100).map({ _ in (random.next(), random.next()) }) {
            let b = withUnsafeBytes(of: (prefix.bigEndian, count.bigEndian)) { Array($0) }
            let uuid = UUID(uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]))
            #expect(RequestID.format(prefix: prefix, count: count) == uuid.uuidString)
        }
    }
}

@Suite("Issuance on a presented X509-SVID, per identity line")
struct IssuanceRateLimiterTests {
    @Test("A line gets its burst at once, then one per 1/perSecond; lines are counted apart; the wait said is the time to the next")
    func tokenBucket() {
        let limiter = IssuanceRateLimiter(perSecond: 2, burst: 3)
        #expect((0..<3).map { _ in limiter.admit("a", now: 100) } == [nil, nil, nil])
        #expect(limiter.admit("a", now: 100) == 0.5)
        #expect(limiter.admit("b", now: 100) == nil, "another line has its own budget")
        #expect(limiter.admit("a", now: 100.25) == 0.25, "a refusal takes nothing")
        #expect(limiter.admit("a", now: 100.5) == nil)
        #expect(limiter.admit("a", now: 100.5) == 0.5)
        #expect(limiter.admit("a", now: 90) == 0.5, "a clock that steps back gives nothing")
        #expect(limiter.admit("a", now: 100.75) == 0.25, "nor counts the time twice once it is back")
        // Idle long enough, a line is back to its burst and no more.
        #expect((0..<4).map { _ in limiter.admit("a", now: 200) } == [nil, nil, nil, 0.5])
    }

    @Test("Past linesMax lines, refilled ones are dropped; if none has refilled, a new line goes untracked (allowed)")
    func boundedLines() {
        let limiter = IssuanceRateLimiter(perSecond: 1, burst: 2, linesMax: 2)
        _ = limiter.admit("a", now: 0)
        _ = limiter.admit("b", now: 0)
        #expect(limiter.admit("c", now: 0.5) == nil && limiter.linesTracked == 2, "a and b have not refilled: c is not tracked")
        #expect(limiter.admit("c", now: 0.5) == nil, "so it is not limited either")
        #expect(limiter.admit("d", now: 5) == nil && limiter.linesTracked == 1, "a and b refilled and went; d is tracked")
        _ = limiter.admit("d", now: 5)
        #expect(limiter.admit("d", now: 5) == 1, "d's budget is spent")
        #expect(limiter.admit("e", now: 5) == nil && limiter.linesTracked == 2)
        #expect(limiter.admit("f", now: 5.5) == nil && limiter.linesTracked == 2, "no second pruning within a second: f goes untracked")
        #expect(limiter.admit("g", now: 6.5) == nil && limiter.linesTracked == 2, "a second later e (refilled) goes and g is tracked")
        #expect(limiter.admit("g", now: 6.5) == nil && limiter.admit("g", now: 6.5) == 1)
    }
}

@Suite("A budget shared fairly by callers")
struct FairShareLimiterTests {
    @Test("No caller takes more than its part: one busy caller leaves the rest of the shared budget to others; a refusal takes nothing from either; the wait said is the nearer bucket's")
    func fairShare() {
        let limiter = FairShareLimiter(perSecond: 10, burst: 6, callerPerSecond: 5, callerBurst: 4)
        #expect((0..<4).map { _ in limiter.admit("a", now: 0) } == [nil, nil, nil, nil])
        #expect(limiter.admit("a", now: 0) == 0.2, "a's part is spent though the shared budget has two left")
        #expect(limiter.admit("b", now: 0) == nil && limiter.admit("b", now: 0) == nil, "b gets the two left")
        #expect(limiter.admit("b", now: 0) == 0.1, "then the shared budget refuses it")
        #expect(limiter.admit("c", now: 0.1) == nil, "the refusals took nothing: the one token refilled is c's")
        #expect(limiter.admit("c", now: 0.1) != nil)
        #expect(limiter.admit("a", now: 0.2) == nil, "a's part refills at its own rate")
        // Callers that cannot be told apart take from the shared budget alone.
        let shared = FairShareLimiter(perSecond: 1, burst: 3, callerPerSecond: 1, callerBurst: 1)
        #expect((0..<4).map { _ in shared.admit(nil, now: 0) } == [nil, nil, nil, 1])
        #expect(shared.admit("d", now: 0) == 1, "nothing left for a known caller either")
    }

    @Test("Past callersMax callers, refilled ones are dropped; if none has, new callers share one part")
    func boundedCallers() {
        let limiter = FairShareLimiter(perSecond: 100, burst: 100, callerPerSecond: 1, callerBurst: 1, callersMax: 2)
        #expect(limiter.admit("x", now: 0) == nil && limiter.admit("y", now: 0) == nil)
        #expect(limiter.admit("z", now: 0) == nil && limiter.callersTracked == 3, "z takes the shared part of callers past the bound")
        #expect(limiter.admit("w", now: 0) == 1, "w shares it with z")
        #expect(limiter.admit("w", now: 5) == nil && limiter.callersTracked == 1, "once the others refilled they went; w is tracked")
    }
}

@Suite("CRL numbers")
struct CRLNumberTests {
    /// The number as an unsigned integer's bytes compare: same length, so lexicographically.
    func greater(_ a: [UInt8], _ b: [UInt8]) -> Bool { a.count == b.count && b.lexicographicallyPrecedes(a) }

    @Test("A CRL made from newer content outnumbers one made before it on any node, even by a clock seconds ahead; same content orders by time")
    func ordering() {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let before = AuthorityService.crlNumber(contentVersion: 41, now: now)
        // A rule was added (content version 42), signed by a node whose clock is 9 s behind.
        let after = AuthorityService.crlNumber(contentVersion: 42, now: now.addingTimeInterval(-9))
        #expect(greater(after, before))
        #expect(greater(AuthorityService.crlNumber(contentVersion: 41, now: now.addingTimeInterval(1)), before))
        #expect(before.count == 16 && before.first == 0)
        #expect(Array(before[8...]) == withUnsafeBytes(of: UInt64(1_800_000_000).bigEndian) { Array($0) })
    }
}

@Suite("Lifetimes bounded at signing")
struct LifetimeTests {
    @Test("An identity deriving from one that ends is cut to end with it when signed, and refused when under a second is left")
    func cut() throws {
        let now = Date(timeIntervalSince1970: 1_800_000_000.25)
        #expect(try NodeAPI.lifetime(600, until: nil, now: now) == 600)
        #expect(try NodeAPI.lifetime(600, until: now.addingTimeInterval(30.9), now: now) == 30)
        #expect(try NodeAPI.lifetime(20, until: now.addingTimeInterval(30.9), now: now) == 20)
        #expect(try NodeAPI.lifetime(600, until: now.addingTimeInterval(1), now: now) == 1)
        for late in [0.5, 0, -10] {
            do {
                _ = try NodeAPI.lifetime(600, until: now.addingTimeInterval(late), now: now)
                Issue.record("signed past its end (\(late) s left)")
            } catch let error as APIError {
                #expect(error.status == .forbidden && error.code == "expired", "\(error)")
            }
        }
    }
}
