import Authority
import Foundation
import Ledger
@testable import Node
import Testing
import TestSupport
import Transport
import X509

@Suite("Admin certificates and the rules revoking them", .onOwnThreads)
struct AdminRevocationTests {
    static let ca = try! ClusterCA.create(clusterID: "admintest")

    @Test("An admin certificate tells the API its admin, serial and time of issue; another cluster's is anonymous; bad names and lifetimes are refused")
    func callerFromCertificate() throws {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let (certificate, _) = try Self.ca.issueAdminIdentity(name: "alice", now: now, validity: 3_600)
        let der = try certificate.serializeAsPEM().derBytes
        let serial = Revocation.canonicalSerial(Hex.encode(certificate.serialNumber.bytes))
        #expect(APICaller.from(certificateDER: der, clusterID: "admintest", clusterCA: Self.ca.certificate.subject)
            == .admin(name: "alice", serial: serial, issuedAtMillis: 1_800_000_000_000))
        let other = try ClusterCA.create(clusterID: "admintest")
        #expect(APICaller.from(certificateDER: der, clusterID: "admintest", clusterCA: other.certificate.subject) == .anonymous)
        #expect(APICaller.from(certificateDER: der, clusterID: "othercluster", clusterCA: Self.ca.certificate.subject) == .anonymous)
        for name in ["", "a b", "a/b", String(repeating: "x", count: 65), "caf\u{e9}", "tab\t"] {
            #expect(ClusterCA.invalidAdminName(name) != nil, "\(name)")
            #expect(throws: PeerIdentityError.self, "\(name)") { try Self.ca.issueAdminIdentity(name: name) }
        }
        #expect(ClusterCA.invalidAdminName(String(repeating: "x", count: 64)) == nil)
        for validity in [0, -1, ClusterCA.adminValidityMax + 1] {
            #expect(throws: PeerIdentityError.self, "\(validity)") { try Self.ca.issueAdminIdentity(name: "alice", validity: validity) }
        }
    }

    static func rule(_ kind: String, _ value: String, at millis: UInt64, reason: String = "") -> AdminRevocation {
        AdminRevocation(kind: kind, value: value, revokedAtMillis: millis, keepUntilMillis: millis + AdminRevocationList.keptMillis,
                        reason: reason, actor: "admin:root")
    }

    @Test("A serial rule covers that certificate; a name rule covers the name's certificates issued until the rule, and moves later when made again")
    func coverage() throws {
        var list = AdminRevocationList()
        (list, _) = try list.adding(Self.rule(AdminRevocation.kindSerial, "ab12", at: 1_000), nowMillis: 1_000)
        #expect(list.revoking(name: "alice", serial: "ab12", issuedAtMillis: 5_000) != nil, "a serial rule, whenever issued")
        #expect(list.revoking(name: "alice", serial: "ab13", issuedAtMillis: 500) == nil)
        let (again, changed) = try list.adding(Self.rule(AdminRevocation.kindSerial, "ab12", at: 2_000), nowMillis: 2_000)
        #expect(!changed && again == list, "the same serial again changes nothing")

        (list, _) = try list.adding(Self.rule(AdminRevocation.kindName, "bob", at: 3_000), nowMillis: 3_000)
        let margin = AdminRevocation.clockMarginMillis
        #expect(list.revoking(name: "bob", serial: "1", issuedAtMillis: 3_000 + margin) != nil, "issued up to the clock margin after the rule")
        #expect(list.revoking(name: "bob", serial: "1", issuedAtMillis: 3_001 + margin) == nil, "issued after that")
        #expect(list.revoking(name: "bobby", serial: "1", issuedAtMillis: 100) == nil, "another name")
        let moved: Bool
        (list, moved) = try list.adding(Self.rule(AdminRevocation.kindName, "bob", at: 9_000), nowMillis: 9_000)
        #expect(moved && list.rules.count == 2)
        #expect(list.revoking(name: "bob", serial: "1", issuedAtMillis: 8_000 + margin) != nil, "the name's rule now reaches its later time")
        // A kind from a newer build fails closed: it covers the serial or name it gives.
        let unknown = AdminRevocationList(rules: [Self.rule("fingerprint", "carol", at: 1)])
        let decoded = try APIJSON.decode(AdminRevocationList.self, from: APIJSON.encode(unknown))
        #expect(decoded == unknown && decoded.revoking(name: "carol", serial: "9", issuedAtMillis: .max) != nil)
        #expect(decoded.revoking(name: "dave", serial: "carol", issuedAtMillis: 0) != nil && decoded.revoking(name: "dave", serial: "9", issuedAtMillis: 0) == nil)
        let (earlier, stayed) = try list.adding(Self.rule(AdminRevocation.kindName, "bob", at: 4_000), nowMillis: 9_500)
        #expect(!stayed && earlier == list, "an earlier time does not pull a name's rule back")
    }

    @Test("Rules are dropped once what they cover has expired; the list is bounded, and a full one refuses a new rule but not a repeat")
    func bounds() async throws {
        var list = AdminRevocationList()
        for serial in 0..<AdminRevocationList.rulesMax {
            // Each rule added re-checks the list (seconds in all in a debug
            // build): other tests' tasks run on this thread meanwhile.
            if serial % 20 == 0 { await Task.yield() }
            (list, _) = try list.adding(Self.rule(AdminRevocation.kindSerial, String(serial, radix: 16), at: UInt64(serial)), nowMillis: UInt64(serial))
        }
        #expect(list.rules.count == AdminRevocationList.rulesMax)
        #expect(throws: APIError.self) { try list.adding(Self.rule(AdminRevocation.kindName, "one-more", at: 5_000), nowMillis: 5_000) }
        #expect(try !list.adding(Self.rule(AdminRevocation.kindSerial, "0", at: 5_000), nowMillis: 5_000).changed)
        // Every admin certificate lives at most a year: a rule outlives what it covers, and then goes.
        #expect(AdminRevocationList.keptMillis > UInt64((ClusterCA.adminValidityMax + ClusterCA.backdate) * 1000))
        let later = AdminRevocationList.keptMillis + 10
        let (pruned, changed) = try list.adding(Self.rule(AdminRevocation.kindName, "one-more", at: later), nowMillis: later)
        #expect(changed && pruned.rules.count == AdminRevocationList.rulesMax - 10, "rules 0...10 are past their keeping time")
        #expect(pruned.rules.last?.value == "one-more")
        // Long reasons reach the document's size limit before the count does.
        var long = AdminRevocationList()
        let reason = String(repeating: "\"", count: AdminRevocationList.reasonBytesMax)
        var refused: APIError?
        for serial in 0..<AdminRevocationList.rulesMax {
            if serial % 20 == 0 { await Task.yield() }
            do {
                (long, _) = try long.adding(Self.rule(AdminRevocation.kindSerial, String(serial, radix: 16), at: 1, reason: reason), nowMillis: 1)
            } catch {
                refused = error
                break
            }
        }
        #expect(refused?.code == "too_many_rules" && long.rules.count < AdminRevocationList.rulesMax, "\(String(describing: refused))")
        #expect(APIJSON.encode(long).count <= LedgerLimits.documentContentBytesMax)
    }

    @Test("An admin certificate's time of issue is never after it was made: whole seconds, rounded down")
    func issuedRoundsDown() throws {
        for fraction in [0.0, 0.4, 0.6, 0.999] {
            let made = Date(timeIntervalSince1970: 1_800_000_000 + fraction)
            let (certificate, _) = try Self.ca.issueAdminIdentity(name: "alice", now: made, validity: 600)
            let caller = APICaller.from(certificateDER: try certificate.serializeAsPEM().derBytes, clusterID: "admintest",
                                        clusterCA: Self.ca.certificate.subject)
            guard case .admin(_, _, let issued) = caller else { Issue.record("not an admin: \(caller)"); continue }
            #expect(issued == 1_800_000_000_000, "made at +\(fraction) s")
        }
    }
}
