import Foundation
@testable import Ledger
import Raft
import Testing

/// The ledger's side of the authority: rotation, issuance checks,
/// revocation and the expiry-ordered record of issued identities.
private struct Book {
    var tables = InMemoryLedgerTables()
    var index: LogIndex = 0

    mutating func apply(_ operation: LedgerCommand.Operation, at time: UInt64) -> LedgerOutcome.Result {
        index += 1
        let command = LedgerCommand(timeMillis: time, actor: "test", requestID: "r\(index)", operation: operation)
        return try! Ledger.apply(Entry(term: 1, index: index, payload: .command(command.encoded)), to: &tables)!.result
    }

    func keyring() -> AuthorityKeyring {
        try! JSONDecoder().decode(AuthorityKeyring.self, from: Data(tables.document(named: AuthorityDocuments.keyring)!.content))
    }
}

private func authority(_ id: String, _ state: AuthorityKeyring.Entry.State) -> AuthorityKeyring.Entry {
    AuthorityKeyring.Entry(id: id, state: state, algorithm: "ecdsa-p256", x509Certificate: "pem-\(id)", x509Key: "sealed", jwtKeyID: "kid-\(id)",
                           jwtKey: "sealed", createdAtMillis: 0)
}

private func token(_ n: Int, spiffeID: String = "spiffe://example.org/job") -> JoinToken {
    JoinToken(hash: String(repeating: String(n % 10), count: 64), spiffeID: spiffeID, ttlMaxSeconds: 600, expiresAtMillis: 1_000_000_000)
}

private func issuance(_ n: Int, authority: String, issuedAt: UInt64, notAfter: UInt64, spiffeID: String = "spiffe://example.org/job",
                      attributes: [String: String] = [:], renewing: (serial: String, issuedAt: UInt64)? = nil) -> Issuance {
    Issuance(kind: .x509, spiffeID: spiffeID, serial: String(format: "%032x", n), fingerprint: String(repeating: "f", count: 64),
             issuedAtMillis: issuedAt, notAfterMillis: notAfter, ttlSeconds: 60, tokenHash: renewing == nil ? token(n).hash : "",
             renewedFrom: renewing?.serial ?? "", renewedIssuedAtMillis: renewing?.issuedAt ?? 0, idempotencyKey: "", node: 1,
             authority: authority, attributes: attributes, artifact: [1, 2, 3])
}

@Suite("Ledger: the authority")
struct AuthorityLedgerTests {
    @Test("A serial as an operator gives it (either case, colons, leading zeros) reads as the canonical one; anything but 1 to 64 hex digits does not")
    func serialParsing() {
        #expect(Revocation.serial(parsing: "0A:1B:C2") == "a1bc2" && Revocation.serial(parsing: "00a1bc2") == "a1bc2")
        #expect(Revocation.serial(parsing: "0") == "0" && Revocation.serial(parsing: String(repeating: "f", count: 64)) != nil)
        for bad in ["", ":", "::", "xyz", "0g", "a b", String(repeating: "f", count: 65), "\u{0661}", "-1"] {
            #expect(Revocation.serial(parsing: bad) == nil, "\(bad)")
        }
    }

    private func initialized() throws -> Book {
        var book = Book()
        let keyring = AuthorityKeyring(trustDomain: "example.org", kekID: "k", authorities: [authority("old", .active)])
        #expect(book.apply(.initializeAuthority(keyring: Array(try JSONEncoder().encode(keyring))), at: 1_000) == .written(version: 1))
        return book
    }

    @Test("Rotation: prepared -> active; the old one retires, kept until the last identity issued expires; issuances signed by it are refused afterwards")
    func rotation() throws {
        var book = try initialized()
        // A keyring with two authorities, or none active, is not a valid start.
        var other = Book()
        let twoActive = AuthorityKeyring(trustDomain: "example.org", kekID: "k", authorities: [authority("a", .active), authority("b", .active)])
        #expect(other.apply(.initializeAuthority(keyring: Array(try JSONEncoder().encode(twoActive))), at: 1) != .written(version: 1))

        for n in 1...3 { _ = book.apply(.createJoinToken(token(n)), at: 2_000) }
        #expect(book.apply(.recordIssuance(issuance(1, authority: "old", issuedAt: 2_000, notAfter: 90_000)), at: 2_000) == .issued(artifact: [1, 2, 3], replayed: false))
        #expect(book.apply(.activateAuthority(id: "new"), at: 3_000) == .rejected("no prepared authority has id new"))
        #expect(book.apply(.prepareAuthority(authority("new", .prepared)), at: 3_000) == .written(version: 2))
        #expect(book.apply(.prepareAuthority(authority("newer", .prepared)), at: 3_100) == .rejected("authority new is already prepared; activate it first"))
        // Prepared: published, but the old one still signs.
        #expect(book.apply(.recordIssuance(issuance(2, authority: "new", issuedAt: 3_200, notAfter: 60_000)), at: 3_200)
                == .rejected("authority rotated: new is no longer the active authority"))
        #expect(book.apply(.activateAuthority(id: "new"), at: 4_000) == .written(version: 3))
        let keyring = book.keyring()
        let old = try #require(keyring.authorities.first { $0.id == "old" })
        #expect(old.state == .retired && old.retiredAtMillis == 4_000 && old.keepUntilMillis == 90_000, "kept until the last identity expires")
        #expect(keyring.active?.id == "new" && old.isPublished(at: 89_999) && !old.isPublished(at: 90_000))
        // Signed by the retired authority after the rotation committed: refused (the node signs again).
        #expect(book.apply(.recordIssuance(issuance(3, authority: "old", issuedAt: 4_100, notAfter: 200_000)), at: 4_100)
                == .rejected("authority rotated: old is no longer the active authority"))
        #expect(book.apply(.recordIssuance(issuance(3, authority: "new", issuedAt: 4_200, notAfter: 200_000)), at: 4_200) == .issued(artifact: [1, 2, 3], replayed: false))
        // Once its identities expired, preparing the next drops it from the keyring.
        #expect(book.apply(.prepareAuthority(authority("third", .prepared)), at: 95_000) == .written(version: 4))
        #expect(book.keyring().authorities.map(\.id) == ["new", "third"])
    }

    @Test("An issuance marks its join token used by its serial: the token's canonical document, whether the token was written canonically or by JSONEncoder (older ledgers)")
    func tokenMarkedUsed() throws {
        var book = try initialized()
        _ = book.apply(.createJoinToken(token(1)), at: 2_000)
        let older = token(2)
        let name = AuthorityDocuments.token(older.hash)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys // escapes the SPIFFE ID's slashes: not canonical, still ends in "used":false}
        let olderDocument = Array(try encoder.encode(older))
        #expect(String(decoding: olderDocument, as: UTF8.self).hasSuffix(",\"used\":false}") && olderDocument != older.canonicalJSON)
        book.tables.put(Document(name: name, format: .json, content: olderDocument, version: 1, logIndex: book.index))
        for (n, expected) in [(1, token(1)), (2, older)] {
            #expect(book.apply(.recordIssuance(issuance(n, authority: "old", issuedAt: 2_000, notAfter: 90_000)), at: 2_000) == .issued(artifact: [1, 2, 3], replayed: false))
            var used = expected
            used.used = true
            used.usedBySerial = String(format: "%032x", n)
            #expect(book.tables.document(named: AuthorityDocuments.token(expected.hash))?.content == used.canonicalJSON)
            #expect(book.apply(.recordIssuance(issuance(n, authority: "old", issuedAt: 2_001, notAfter: 90_000)), at: 2_001) == .rejected("the join token was already used"))
        }
        #expect(book.tables.document(named: name)?.version == 2)
    }

    @Test("Plain document writes cannot make, change or remove the authority's documents (an issued record stands in for a signature)")
    func authorityNamesAreReserved() throws {
        var book = try initialized()
        _ = book.apply(.createJoinToken(token(1)), at: 2_000)
        #expect(book.apply(.recordIssuance(issuance(1, authority: "old", issuedAt: 2_000, notAfter: 90_000)), at: 2_000) == .issued(artifact: [1, 2, 3], replayed: false))
        let issued = AuthorityDocuments.issued(notAfterMillis: 90_000, serial: String(format: "%032x", 1))
        let before = try #require(book.tables.document(named: issued))
        let refusal = LedgerOutcome.Result.rejected("names under 'authority/' are written only by the authority's operations")
        let forged = AuthorityDocuments.issued(notAfterMillis: 90_000, serial: String(format: "%032x", 2))
        #expect(book.apply(.putDocument(name: forged, format: .json, content: Array("{}".utf8), expectedVersion: nil), at: 3_000) == refusal)
        #expect(book.apply(.putDocument(name: issued, format: .json, content: Array("{}".utf8), expectedVersion: nil), at: 3_000) == refusal)
        #expect(book.apply(.deleteDocument(name: AuthorityDocuments.keyring, expectedVersion: nil), at: 3_000) == refusal)
        #expect(book.tables.document(named: forged) == nil && book.tables.document(named: issued) == before)
        #expect(book.tables.document(named: AuthorityDocuments.keyring) != nil)
        #expect(book.apply(.putDocument(name: "authorityx/ok", format: .json, content: Array("{}".utf8), expectedVersion: nil), at: 3_000) == .written(version: 1))
    }

    @Test("Revocation rules match by serial (whenever issued), SPIFFE ID or attribute (only identities issued at or before them), and block renewal of what they cover")
    func revocation() throws {
        let rule = Revocation(kind: .attribute, value: "repository=acme/api", reason: "", revokedAtMillis: 5_000)
        #expect(rule.matches(serial: "aa", spiffeID: "spiffe://x/y", attributes: ["repository": "acme/api"], issuedAtMillis: 5_000))
        #expect(!rule.matches(serial: "aa", spiffeID: "spiffe://x/y", attributes: ["repository": "acme/api"], issuedAtMillis: 5_001))
        #expect(!rule.matches(serial: "aa", spiffeID: "spiffe://x/y", attributes: ["repository": "acme/web"], issuedAtMillis: 1))
        #expect(Revocation(kind: .serial, value: "XYZ", reason: "").invalidReason != nil)
        // Serials compare without case or leading zeros, and cover the renewals of their line.
        let serialRule = Revocation(kind: .serial, value: "0a1b", reason: "", revokedAtMillis: 5_000)
        #expect(serialRule.matches(serial: "A1B", spiffeID: "spiffe://x/y", attributes: [:], issuedAtMillis: 1))
        #expect(serialRule.matches(serial: "ff", spiffeID: "spiffe://x/y", attributes: ["lineage": "00a1b"], issuedAtMillis: 1))
        #expect(!serialRule.matches(serial: "ff", spiffeID: "spiffe://x/y", attributes: ["lineage": "a1c"], issuedAtMillis: 1))
        // Stamped by a clock behind the signer's: the serial it names is covered all the same (an ID or attribute rule is not).
        #expect(serialRule.matches(serial: "a1b", spiffeID: "spiffe://x/y", attributes: [:], issuedAtMillis: 9_000))
        #expect(serialRule.matches(serial: "ff", spiffeID: "spiffe://x/y", attributes: ["parent": "a1b"], issuedAtMillis: 9_000))
        #expect(!Revocation(kind: .spiffeID, value: "spiffe://x/y", reason: "", revokedAtMillis: 5_000)
            .matches(serial: "a1b", spiffeID: "spiffe://x/y", attributes: [:], issuedAtMillis: 9_000))
        #expect(Revocation(kind: .attribute, value: "novalue", reason: "").invalidReason != nil)

        var book = try initialized()
        let renewing = issuance(9, authority: "old", issuedAt: 7_000, notAfter: 20_000, spiffeID: "spiffe://example.org/svc",
                                attributes: ["repository": "acme/api"], renewing: (String(format: "%032x", 8), 2_000))
        #expect(book.apply(.revoke(Revocation(kind: .attribute, value: "repository=acme/api", reason: "incident")), at: 6_000) == .written(version: 1))
        #expect(book.apply(.recordIssuance(renewing), at: 7_000) == .rejected("revoked: the identity being renewed was revoked (attribute repository=acme/api)"))
        // Re-revoking the same thing moves the rule's time instead of adding a rule.
        #expect(book.apply(.revoke(Revocation(kind: .attribute, value: "repository=acme/api", reason: "again")), at: 6_500) == .written(version: 2))
        let list = try JSONDecoder().decode(RevocationList.self, from: Data(book.tables.document(named: AuthorityDocuments.revocations)!.content))
        #expect(list.rules.count == 1 && list.rules[0].revokedAtMillis == 6_500)
        #expect(list.rules[0].revokedAtIndex == book.index, "the rule keeps the log index that added it")
        // A renewal of an identity issued after the rule goes through.
        var fresh = renewing
        fresh.renewedIssuedAtMillis = 6_600
        #expect(book.apply(.recordIssuance(fresh), at: 7_100) == .issued(artifact: [1, 2, 3], replayed: false))
        // The rules must fit in one document a snapshot can carry: a rule that would not is refused.
        let huge = String(repeating: "a", count: 2_000)
        var refusedAt = 0
        for n in 0..<200 {
            if case .rejected(let reason) = book.apply(.revoke(Revocation(kind: .attribute, value: "k\(n)=\(huge)", reason: "")), at: 6_600) {
                #expect(reason.contains("at most \(LedgerLimits.documentContentBytesMax)"))
                refusedAt = n
                break
            }
        }
        #expect(refusedAt > 100, "refused after \(refusedAt) large rules")
        #expect(book.tables.document(named: AuthorityDocuments.revocations)!.content.count <= LedgerLimits.documentContentBytesMax)
        // A rule is forgotten once nothing it covers can still be valid.
        let later = 6_600 + UInt64(AuthorityDocuments.identityLifetimeMaxSeconds) * 1000 + 60_001
        _ = book.apply(.revoke(Revocation(kind: .serial, value: "ab", reason: "")), at: later)
        let pruned = try JSONDecoder().decode(RevocationList.self, from: Data(book.tables.document(named: AuthorityDocuments.revocations)!.content))
        #expect(pruned.rules.map(\.value) == ["ab"])
    }

    @Test("ID and attribute rules cover what the log holds before them, whatever the clocks said; the times decide only where an index is unknown")
    func revocationFollowsTheLog() {
        let rule = Revocation(kind: .spiffeID, value: "spiffe://x/y", reason: "", revokedAtMillis: 5_000, revokedAtIndex: 100)
        func covers(issuedAt: UInt64, index: UInt64?, id: String = "spiffe://x/y") -> Bool {
            rule.matches(serial: "aa", spiffeID: id, attributes: [:], issuedAtMillis: issuedAt, recordIndex: { index })
        }
        // Signed before the rule by a leader whose clock ran 4 s ahead.
        #expect(covers(issuedAt: 9_000, index: 60), "an identity recorded before the rule escaped it")
        // Signed after the rule, within its second (or by a clock behind).
        #expect(!covers(issuedAt: 5_000, index: 101), "an identity recorded after the rule started out revoked")
        // No record at hand (forgotten, or not applied here yet): the times decide.
        #expect(covers(issuedAt: 5_000, index: nil) && !covers(issuedAt: 5_001, index: nil))
        // A rule from before indexes were kept: the times decide.
        let old = Revocation(kind: .attribute, value: "repository=acme/api", reason: "", revokedAtMillis: 5_000)
        #expect(!old.matches(serial: "aa", spiffeID: "spiffe://x/y", attributes: ["repository": "acme/api"], issuedAtMillis: 9_000, recordIndex: { 60 }))
        // The record is looked up only for an identity the rule names.
        var asked = 0
        #expect(!rule.matches(serial: "aa", spiffeID: "spiffe://x/z", attributes: [:], issuedAtMillis: 1, recordIndex: { asked += 1; return 1 }))
        #expect(asked == 0)
        // And once, however many rules name it (here the first is later than its record, the second not).
        let earlier = Revocation(kind: .attribute, value: "repository=acme/api", reason: "", revokedAtMillis: 5_000, revokedAtIndex: 50)
        let list = RevocationList(rules: [earlier, rule])
        #expect(list.revoking(serial: "aa", spiffeID: "spiffe://x/y", attributes: ["repository": "acme/api"], issuedAtMillis: 1,
                              recordIndex: { asked += 1; return 70 }) == rule)
        #expect(asked == 1)
    }

    @Test("A renewal is checked against ID and attribute rules by the log too: the command names the renewed identity's record (tag 12, which round-trips)")
    func renewalFollowsTheLog() throws {
        var book = try initialized()
        let id = "spiffe://example.org/svc"
        for n in 1...2 { _ = book.apply(.createJoinToken(token(n, spiffeID: id)), at: 2_000) }
        // A signed by a leader whose clock ran ahead (9 s), then the rule (6 s), then B by one whose clock is behind (5 s).
        #expect(book.apply(.recordIssuance(issuance(1, authority: "old", issuedAt: 9_000, notAfter: 90_000, spiffeID: id)), at: 9_000)
                == .issued(artifact: [1, 2, 3], replayed: false))
        #expect(book.apply(.revoke(Revocation(kind: .spiffeID, value: id, reason: "")), at: 6_000) == .written(version: 1))
        #expect(book.apply(.recordIssuance(issuance(2, authority: "old", issuedAt: 5_000, notAfter: 90_000, spiffeID: id)), at: 5_000)
                == .issued(artifact: [1, 2, 3], replayed: false))
        func renewal(of n: Int, issuedAt: UInt64, named: Bool) -> Issuance {
            var renewal = issuance(10 + n, authority: "old", issuedAt: 10_000, notAfter: 60_000, spiffeID: id,
                                   renewing: (String(format: "%032x", n), issuedAt))
            if named { renewal.renewedNotAfterMillis = 90_000 }
            return renewal
        }
        let command = LedgerCommand(timeMillis: 10_000, actor: "a", requestID: "r", operation: .recordIssuance(renewal(of: 1, issuedAt: 9_000, named: true)))
        #expect(try LedgerCommand(decoding: command.encoded) == command, "tag 12 carries the renewed identity's expiry")
        #expect(book.apply(.recordIssuance(renewal(of: 1, issuedAt: 9_000, named: true)), at: 10_000)
                == .rejected("revoked: the identity being renewed was revoked (spiffe_id \(id))"), "A was recorded before the rule")
        #expect(book.apply(.recordIssuance(renewal(of: 2, issuedAt: 5_000, named: true)), at: 10_000) == .issued(artifact: [1, 2, 3], replayed: false),
                "B was recorded after the rule")
        // Without the name (entries from before it was carried), the times decide.
        #expect(book.apply(.recordIssuance(renewal(of: 1, issuedAt: 9_000, named: false)), at: 10_000) == .issued(artifact: [1, 2, 3], replayed: false))
    }

    @Test("An ID rule for a job reaches its steps (`<job>/step/<name>` carrying step=<name>), not an ID that only looks like one nor another job's; a step made from a job SVID recorded before the rule is refused at apply")
    func idRuleReachesSteps() throws {
        let job = "spiffe://example.org/ci/build"
        let rule = Revocation(kind: .spiffeID, value: job, reason: "", revokedAtMillis: 5_000)
        func covers(_ id: String, _ attributes: [String: String], issuedAt: UInt64 = 4_000) -> Bool {
            rule.matches(serial: "aa", spiffeID: id, attributes: attributes, issuedAtMillis: issuedAt)
        }
        #expect(covers(job + "/step/test", ["step": "test"]))
        #expect(!covers(job + "/step/test", [:]), "a token's ID that only looks like a step's")
        #expect(!covers(job + "/step/test", ["step": "lint"]))
        #expect(!covers("spiffe://example.org/ci/build2/step/test", ["step": "test"]))
        #expect(!covers("spiffe://example.org/ci/buil/step/test", ["step": "test"]))
        #expect(!covers(job + "/step/test", ["step": "test"], issuedAt: 6_000), "issued after the rule")

        var book = try initialized()
        _ = book.apply(.createJoinToken(token(1, spiffeID: job)), at: 2_000)
        #expect(book.apply(.recordIssuance(issuance(1, authority: "old", issuedAt: 2_000, notAfter: 90_000, spiffeID: job)), at: 2_000)
                == .issued(artifact: [1, 2, 3], replayed: false))
        #expect(book.apply(.revoke(Revocation(kind: .spiffeID, value: job, reason: "")), at: 3_000) == .written(version: 1))
        let jobSerial = String(format: "%032x", 1)
        var step = issuance(2, authority: "old", issuedAt: 4_000, notAfter: 60_000, spiffeID: job + "/step/test",
                            attributes: ["step": "test", "parent": jobSerial], renewing: (jobSerial, 2_000))
        step.renewedNotAfterMillis = 90_000
        #expect(book.apply(.recordIssuance(step), at: 4_000) == .rejected("revoked: the identity being renewed was revoked (spiffe_id \(job))"))
    }

    @Test("A serial rule naming a renewal covers what its line issued from it until the rule (by the log where known, else the times): later renewals, their steps and JWT-SVIDs; not what came before it or after the rule, nor other lines; apply and verification agree")
    func serialRuleFollowsItsLine() throws {
        var rule = Revocation(kind: .serial, value: "b2", reason: "", revokedAtMillis: 9_000, revokedAtIndex: 40)
        rule.lineage = "a1"
        rule.lineageFromIndex = 20
        rule.lineageFromMillis = 5_000
        #expect(rule.invalidReason == nil)
        func covers(_ attributes: [String: String], issuedAt: UInt64, index: UInt64?) -> Bool {
            rule.matches(serial: "cc", spiffeID: "spiffe://x/y", attributes: attributes, issuedAtMillis: issuedAt, recordIndex: { index })
        }
        #expect(covers(["lineage": "a1"], issuedAt: 4_000, index: 25), "renewed after it (by the log, whatever the clock said)")
        #expect(!covers(["lineage": "a1"], issuedAt: 6_000, index: 15), "before it in the log")
        #expect(!covers(["lineage": "a1"], issuedAt: 6_000, index: 45), "after the rule in the log")
        #expect(covers(["lineage": "00A1"], issuedAt: 6_000, index: nil) && !covers(["lineage": "a1"], issuedAt: 4_000, index: nil)
                && !covers(["lineage": "a1"], issuedAt: 9_500, index: nil), "no record: the times")
        #expect(covers(["job_lineage": "a1", "lineage": "d4"], issuedAt: 6_000, index: 30), "a step of a later renewal")
        #expect(!covers(["lineage": "e5"], issuedAt: 6_000, index: 30), "another line")
        var without = rule
        without.lineageFromMillis = nil
        #expect(without.invalidReason != nil, "a line needs where it starts")
        var onID = Revocation(kind: .spiffeID, value: "spiffe://x/y", reason: "")
        onID.lineage = "a1"
        onID.lineageFromMillis = 1
        #expect(onID.invalidReason != nil, "only a serial rule has a line")

        // At apply: the renewal of a later renewal of the line (recorded after the one named) is refused.
        var book = try initialized()
        let id = "spiffe://example.org/svc"
        _ = book.apply(.createJoinToken(token(1, spiffeID: id)), at: 2_000)
        let first = String(format: "%032x", 1)
        #expect(book.apply(.recordIssuance(issuance(1, authority: "old", issuedAt: 2_000, notAfter: 90_000, spiffeID: id, attributes: ["lineage": first])),
                           at: 2_000) == .issued(artifact: [1, 2, 3], replayed: false))
        func renewal(_ n: Int, of parent: Int, at time: UInt64, parentIssuedAt: UInt64) -> Issuance {
            var renewal = issuance(n, authority: "old", issuedAt: time, notAfter: 90_000 + UInt64(n), spiffeID: id, attributes: ["lineage": first],
                                   renewing: (String(format: "%032x", parent), parentIssuedAt))
            renewal.renewedNotAfterMillis = 90_000 + (parent == 1 ? 0 : UInt64(parent))
            return renewal
        }
        #expect(book.apply(.recordIssuance(renewal(2, of: 1, at: 3_000, parentIssuedAt: 2_000)), at: 3_000) == .issued(artifact: [1, 2, 3], replayed: false))
        let secondIndex = book.index
        #expect(book.apply(.recordIssuance(renewal(3, of: 2, at: 4_000, parentIssuedAt: 3_000)), at: 4_000) == .issued(artifact: [1, 2, 3], replayed: false))
        var second = Revocation(kind: .serial, value: "2", reason: "key leaked")
        second.lineage = "1"
        second.lineageFromIndex = secondIndex
        second.lineageFromMillis = 3_000
        #expect(book.apply(.revoke(second), at: 5_000) == .written(version: 1))
        #expect(book.apply(.recordIssuance(renewal(4, of: 3, at: 6_000, parentIssuedAt: 4_000)), at: 6_000)
                == .rejected("revoked: the identity being renewed was revoked (serial 2)"), "renewed from the one named, then again")
        #expect(book.apply(.recordIssuance(renewal(5, of: 1, at: 6_000, parentIssuedAt: 2_000)), at: 6_000)
                == .issued(artifact: [1, 2, 3], replayed: false), "the line's first, recorded before the one named, renews")
        // Verification agrees: the renewal just issued is not covered, the one renewed from the named one is.
        let rules = try JSONDecoder().decode(RevocationList.self, from: Data(book.tables.document(named: AuthorityDocuments.revocations)!.content))
        func recordIndex(_ n: Int) -> UInt64? {
            book.tables.document(named: AuthorityDocuments.issued(notAfterMillis: 90_000 + UInt64(n), serial: String(format: "%032x", n)))?.logIndex
        }
        #expect(rules.revoking(serial: String(format: "%032x", 5), spiffeID: id, attributes: ["lineage": first], issuedAtMillis: 6_000,
                               recordIndex: { recordIndex(5) }) == nil)
        #expect(rules.revoking(serial: String(format: "%032x", 3), spiffeID: id, attributes: ["lineage": first], issuedAtMillis: 4_000,
                               recordIndex: { recordIndex(3) }) != nil)
        // Revoked again (its record gone by then, say): the rule keeps the line it had.
        #expect(book.apply(.revoke(Revocation(kind: .serial, value: "2", reason: "again")), at: 7_000) == .written(version: 2))
        let again = try JSONDecoder().decode(RevocationList.self, from: Data(book.tables.document(named: AuthorityDocuments.revocations)!.content))
        #expect(again.rules.count == 1 && again.rules[0].lineage == "1" && again.rules[0].lineageFromIndex == secondIndex)
    }

    @Test("A step closes once (tag 13, which round-trips): a second close is refused, the marker is forgotten once the step's SVID expired; tag 11 closes only audit")
    func stepClosesOnce() throws {
        var book = try initialized()
        let step = "spiffe://example.org/job/step/test"
        let close = LedgerCommand.Operation.closeStep(spiffeID: step, serial: "ab", exitStatus: 2, notAfterMillis: 50_000)
        let command = LedgerCommand(timeMillis: 1, actor: "a", requestID: "r", operation: close)
        #expect(try LedgerCommand(decoding: command.encoded) == command)
        #expect(book.apply(close, at: 10_000) == .written(version: 1))
        #expect(book.apply(.closeStep(spiffeID: step, serial: "ab", exitStatus: 0, notAfterMillis: 50_000), at: 11_000)
                == .rejected("the step was closed already"))
        #expect(book.tables.document(named: AuthorityDocuments.closedStep(notAfterMillis: 50_000, serial: "ab")) != nil)
        // Another step's close, after the first one's SVID expired, forgets its marker.
        #expect(book.apply(.closeStep(spiffeID: step, serial: "cd", exitStatus: 0, notAfterMillis: 90_000), at: 60_000) == .written(version: 1))
        #expect(book.tables.document(named: AuthorityDocuments.closedStep(notAfterMillis: 50_000, serial: "ab")) == nil)
        // Without the expiry (entries from before it was carried): audited each time, nothing kept.
        let legacy = LedgerCommand.Operation.closeStep(spiffeID: step, serial: "ef", exitStatus: 1)
        let legacyCommand = LedgerCommand(timeMillis: 1, actor: "a", requestID: "r", operation: legacy)
        #expect(try LedgerCommand(decoding: legacyCommand.encoded) == legacyCommand && legacyCommand.encoded.count == command.encoded.count - 8)
        #expect(book.apply(legacy, at: 61_000) == .written(version: 0) && book.apply(legacy, at: 62_000) == .written(version: 0))
        let audit = book.tables.audit.filter { $0.action == "step.close" }.map(\.result)
        #expect(audit == ["ok: serial=ab exit_status=2", "rejected: the step was closed already", "ok: serial=cd exit_status=0",
                          "ok: serial=ef exit_status=1", "ok: serial=ef exit_status=1"], "\(audit)")
    }

    @Test("Join tokens and idempotency answers are forgotten a day after they expire, two at a time as new ones come, and refused as expired before that")
    func tokensAndAnswersAreForgotten() throws {
        var book = try initialized()
        let day: UInt64 = 86_400_000
        func tokenExpiring(_ n: Int, at expires: UInt64) -> JoinToken {
            JoinToken(hash: String(format: "%064x", n), spiffeID: "spiffe://example.org/job", ttlMaxSeconds: 600, expiresAtMillis: expires)
        }
        for n in 1...3 { #expect(book.apply(.createJoinToken(tokenExpiring(n, at: 10_000)), at: 2_000) == .written(version: 1)) }
        var answered = issuance(50, authority: "old", issuedAt: 2_000, notAfter: 60_000)
        answered.tokenHash = tokenExpiring(1, at: 10_000).hash
        answered.idempotencyKey = String(repeating: "a", count: 64)
        #expect(book.apply(.recordIssuance(answered), at: 2_000) == .issued(artifact: [1, 2, 3], replayed: false))
        // The same key and evidence asking for the other kind of identity: refused, not answered with this one.
        var otherKind = answered
        otherKind.kind = .jwt
        #expect(book.apply(.recordIssuance(otherKind), at: 2_001) == .rejected("the idempotency key was used with other evidence or for the other kind of identity"))
        #expect(book.apply(.recordIssuance(answered), at: 2_001) == .issued(artifact: [1, 2, 3], replayed: true))
        // Expired, not yet forgotten: refused as expired.
        var late = issuance(51, authority: "old", issuedAt: 20_000, notAfter: 90_000)
        late.tokenHash = tokenExpiring(2, at: 10_000).hash
        #expect(book.apply(.recordIssuance(late), at: 20_000) == .rejected("the join token expired"))
        let tokenNames = { book.tables.documents.keys.filter { $0.hasPrefix("authority/tokens/") }.count }
        #expect(tokenNames() == 3)
        // A day later, each new token forgets two old ones (and their markers).
        #expect(book.apply(.createJoinToken(tokenExpiring(4, at: 10_000 + 2 * day)), at: 10_000 + day + 1) == .written(version: 1))
        #expect(tokenNames() == 2, "three old, one new, two forgotten")
        #expect(book.apply(.createJoinToken(tokenExpiring(5, at: 10_000 + 2 * day)), at: 10_000 + day + 2) == .written(version: 1))
        #expect(tokenNames() == 2, "the last old one forgotten; the two new stay")
        #expect(book.tables.document(named: AuthorityDocuments.token(tokenExpiring(4, at: 0).hash)) != nil)
        #expect(book.tables.documents.keys.filter { $0.hasPrefix(AuthorityDocuments.tokenForgetPrefix) }.count == 2)
        // Unknown now, not expired: it is gone.
        var gone = issuance(52, authority: "old", issuedAt: 10_000 + day + 3, notAfter: 90_000 + 2 * day)
        gone.tokenHash = tokenExpiring(3, at: 10_000).hash
        #expect(book.apply(.recordIssuance(gone), at: 10_000 + day + 3) == .rejected("unknown join token"))
        // The idempotency answer stays until a day after its identity expired, then an issuance forgets it.
        #expect(book.tables.document(named: AuthorityDocuments.idempotency(answered.idempotencyKey)) != nil)
        var next = issuance(53, authority: "old", issuedAt: 60_000 + day + 1, notAfter: 120_000 + day)
        next.tokenHash = tokenExpiring(4, at: 0).hash
        #expect(book.apply(.recordIssuance(next), at: 60_000 + day + 1) == .issued(artifact: [1, 2, 3], replayed: false))
        #expect(book.tables.document(named: AuthorityDocuments.idempotency(answered.idempotencyKey)) == nil)
        #expect(!book.tables.documents.keys.contains { $0.hasPrefix(AuthorityDocuments.idempotencyForgetPrefix) })
    }

    @Test("Time-ordered names: 13 zero-padded digits (more kept whole), then the id; they sort by time")
    func timedNames() {
        #expect(AuthorityDocuments.issued(notAfterMillis: 10_000, serial: "ab") == "authority/issued/0000000010000/ab")
        #expect(AuthorityDocuments.issued(notAfterMillis: 0, serial: "") == "authority/issued/0000000000000/")
        #expect(AuthorityDocuments.platformToken(expiresAtMillis: 1_733_300_000_123, replayKey: "k") == "authority/joins/1733300000123/k")
        #expect(AuthorityDocuments.tokenForget(atMillis: 12_345_678_901_234_567, hash: "h") == "authority/forget/tokens/12345678901234567/h")
        #expect(AuthorityDocuments.idempotencyForget(atMillis: 7, key: "é") == "authority/forget/idempotency/0000000000007/é")
        var random = SeededGenerator(seed: 11)
        let times = (0..<500).map { _ in UInt64(random.below(10_000_000_000_000)) }
        let names = times.map { AuthorityDocuments.issued(notAfterMillis: $0, serial: "s") }
        #expect(names.sorted() == times.sorted().map { AuthorityDocuments.issued(notAfterMillis: $0, serial: "s") })
    }

    @Test("Whether a time-ordered name is due (before a scan's bound) agrees with comparing it to the bound as a string")
    func timedNameBeforeBound() {
        var random = SeededGenerator(seed: 12)
        let prefix = AuthorityDocuments.tokenForgetPrefix
        for step in 0..<5_000 {
            let now = UInt64(random.below(3)) == 0 ? UInt64(random.below(100)) : UInt64(random.below(20_000_000_000_000))
            let bound = AuthorityDocuments.timed(prefix, now, "")
            let name: String
            switch random.below(5) {
            case 0: name = bound // the bound itself: not before it
            case 1: name = String(bound.dropLast(random.below(bound.utf8.count - prefix.utf8.count) + 1)) // a proper prefix of it: before
            case 2: name = AuthorityDocuments.timed(prefix, now + UInt64(random.below(3)) &- 1, random.chance(0.5) ? "" : "ab")
            default: name = AuthorityDocuments.timed(prefix, UInt64(random.below(20_000_000_000_000)), String(random.below(1_000), radix: 16))
            }
            #expect(AuthorityDocuments.timedName(name, prefix: prefix, isBefore: now) == (name < bound), "step \(step): \(name) against \(bound)")
        }
    }

    @Test("Issued identities are recorded by expiry and forgotten once expired")
    func issuedRecords() throws {
        var book = try initialized()
        for n in 1...4 { _ = book.apply(.createJoinToken(token(n, spiffeID: "spiffe://example.org/job")), at: 1_000) }
        for n in 1...3 {
            _ = book.apply(.recordIssuance(issuance(n, authority: "old", issuedAt: 1_000, notAfter: UInt64(10_000 * n))), at: 1_000)
        }
        func issued() -> [String] { book.tables.documentNames(from: AuthorityDocuments.issuedPrefix, to: AuthorityDocuments.issuedPrefix + "~", limit: 100, reverse: false) }
        #expect(issued().count == 3)
        #expect(issued().first == AuthorityDocuments.issued(notAfterMillis: 10_000, serial: String(format: "%032x", 1)))
        // An issuance at 25_000 forgets the two that expired by then.
        _ = book.apply(.recordIssuance(issuance(4, authority: "old", issuedAt: 25_000, notAfter: 90_000)), at: 25_000)
        #expect(issued() == [AuthorityDocuments.issued(notAfterMillis: 30_000, serial: String(format: "%032x", 3)),
                             AuthorityDocuments.issued(notAfterMillis: 90_000, serial: String(format: "%032x", 4))])
        let record = try JSONDecoder().decode(IssuedRecord.self, from: Data(book.tables.document(named: issued()[1])!.content))
        #expect(record.authority == "old" && record.issuedAtMillis == 25_000 && record.notAfterMillis == 90_000)
        #expect(record.fingerprint == String(repeating: "f", count: 64), "the record keeps the identity's SHA-256")
    }
}

@Suite("Ledger: platform tokens")
struct PlatformTokenLedgerTests {
    private func platform(_ n: Int, key: String, expires: UInt64) -> Issuance {
        var issuance = Issuance(kind: .x509, spiffeID: "spiffe://example.org/gh/acme/api", serial: String(format: "%032x", n),
                                fingerprint: String(repeating: "f", count: 64), issuedAtMillis: 2_000, notAfterMillis: 60_000, ttlSeconds: 60,
                                tokenHash: "", idempotencyKey: "", node: 1, authority: "old", attributes: ["repository": "acme/api"], artifact: [UInt8(n)])
        issuance.platformReplayKey = key
        issuance.platformExpiresAtMillis = expires
        return issuance
    }

    @Test("A platform token is consumed once (its replay key), refused once expired, forgotten after; the encoding round-trips; evidence is exactly one kind")
    func consumedOnce() throws {
        var book = Book()
        let keyring = AuthorityKeyring(trustDomain: "example.org", kekID: "k", authorities: [authority("old", .active)])
        _ = book.apply(.initializeAuthority(keyring: Array(try JSONEncoder().encode(keyring))), at: 1_000)
        let a = String(repeating: "a", count: 64), b = String(repeating: "b", count: 64)
        let first = platform(1, key: a, expires: 300_000)
        let command = LedgerCommand(timeMillis: 2_000, actor: "x", requestID: "r", operation: .recordIssuance(first))
        #expect(try LedgerCommand(decoding: command.encoded) == command, "tag 10 carries the platform evidence")
        #expect(book.apply(.recordIssuance(first), at: 2_000) == .issued(artifact: [1], replayed: false))
        #expect(book.apply(.recordIssuance(platform(2, key: a, expires: 300_000)), at: 3_000) == .rejected("the platform token was already used"))
        #expect(book.apply(.recordIssuance(platform(3, key: b, expires: 4_000)), at: 5_000) == .rejected("the platform token expired"))
        #expect(book.apply(.recordIssuance(platform(4, key: b, expires: 400_000)), at: 5_000) == .issued(artifact: [4], replayed: false))
        func consumed() -> [String] {
            book.tables.documentNames(from: AuthorityDocuments.platformTokensPrefix, to: AuthorityDocuments.platformTokensPrefix + "~", limit: 10, reverse: false)
        }
        #expect(consumed().count == 2)
        // Once both tokens expired, issuing forgets them (two per issuance).
        #expect(book.apply(.recordIssuance(platform(5, key: String(repeating: "c", count: 64), expires: 900_000)), at: 500_000) == .issued(artifact: [5], replayed: false))
        #expect(consumed() == [AuthorityDocuments.platformToken(expiresAtMillis: 900_000, replayKey: String(repeating: "c", count: 64))])
        // A used token is remembered for a minute past its expiry: a leader whose clock is seconds behind the one
        // that last forgot tokens must still find it used.
        let e = String(repeating: "e", count: 64)
        #expect(book.apply(.recordIssuance(platform(8, key: e, expires: 600_000)), at: 500_001) == .issued(artifact: [8], replayed: false))
        #expect(book.apply(.recordIssuance(platform(9, key: String(repeating: "f", count: 64), expires: 900_000)), at: 600_001)
                == .issued(artifact: [9], replayed: false))
        #expect(book.apply(.recordIssuance(platform(10, key: e, expires: 600_000)), at: 599_000) == .rejected("the platform token was already used"))
        // Two kinds of evidence, or a malformed key, are refused before anything is read.
        var both = platform(6, key: String(repeating: "d", count: 64), expires: 900_000)
        both.tokenHash = String(repeating: "1", count: 64)
        #expect(book.apply(.recordIssuance(both), at: 500_000) == .rejected("an issuance names exactly one of a join token, the serial it renews, or a platform token"))
        #expect(book.apply(.recordIssuance(platform(7, key: "XYZ", expires: 900_000)), at: 500_000) == .rejected("a platform token key is 64 lower-case hex digits"))
    }
}
