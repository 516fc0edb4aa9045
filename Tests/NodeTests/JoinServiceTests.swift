import Foundation
import Ledger
@testable import Node
import Policy
import Raft
import Storage
import Testing

@Suite("Join policy cache")
struct JoinServiceTests {
    @Test("Two issuers with the same iss: the one after the first by name is listed as not taking its tokens; a policy at the document limit says so")
    func shadowedIssuer() {
        func document(_ name: String, _ text: String) -> Document {
            Document(name: name, format: .yaml, content: Array(text.utf8), version: 1, logIndex: 1)
        }
        let issuers = [document("policy/issuers/github", "method: github\nissuer: https://token.actions.githubusercontent.com\n"),
                       document("policy/issuers/github-again", "method: github\nissuer: https://token.actions.githubusercontent.com\n"),
                       document("policy/issuers/gitlab", "method: gitlab\nissuer: https://gitlab.com\n")]
        let policy = JoinService.read(issuers: issuers, rules: [], trustDomain: "example.org")
        #expect(Array(policy.broken.keys) == ["policy/issuers/github-again"], "\(policy.broken)")
        #expect(policy.broken["policy/issuers/github-again"]?.contains("issuer github's") == true)
        #expect(policy.issuer(for: "https://token.actions.githubusercontent.com")?.name == "github")
        let many = (0..<JoinService.documentsMax).map { document("policy/issuers/i\($0)", "method: oidc\nissuer: https://issuer-\($0).example.com\n") }
        #expect(JoinService.read(issuers: many, rules: [], trustDomain: "example.org").broken["policy"]?.contains("not read") == true)
    }

    @Test("When the cached policy is a second old, one caller re-reads it and the others keep the older one meanwhile")
    func oneRefreshAtATime() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-joins-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try RaftStore(directory: directory.path)
        let joins = JoinService(trustDomain: "example.org", store: store, fetcher: KeySetFetcher(allowHTTPLoopback: false))
        #expect(joins.cachedPolicy() == nil, "nothing read yet")
        _ = try joins.policy()
        #expect(joins.cachedPolicy() != nil, "fresh: no I/O")
        try await Task.sleep(for: .milliseconds(1_100))
        #expect(joins.cachedPolicy() == nil, "the first caller after a second re-reads")
        for _ in 0..<10 { #expect(joins.cachedPolicy() != nil, "the others get the policy read a second ago") }
        _ = try joins.policy()
        #expect(joins.cachedPolicy() != nil)
        try await Task.sleep(for: .milliseconds(1_100))
        #expect(joins.cachedPolicy() == nil, "after the re-read, the next expiry again lets one caller through")
    }

    @Test("A rule deleted and made again (its version starts again at 1) is read afresh, not taken for the one cached")
    func remadeDocument() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-joins-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try RaftStore(directory: directory.path)
        let joins = JoinService(trustDomain: "example.org", store: store, fetcher: KeySetFetcher(allowHTTPLoopback: false))
        var index: UInt64 = 0
        func apply(_ operation: LedgerCommand.Operation) throws {
            index += 1
            let command = LedgerCommand(timeMillis: 1, actor: "test", requestID: "r\(index)", operation: operation)
            _ = try store.apply([Entry(term: 1, index: index, payload: .command(command.encoded))])
        }
        func rule(_ path: String) -> [UInt8] { Array("issuer: github\nspiffe_id: spiffe://example.org/\(path)\nconditions:\n  repository: acme/api\n".utf8) }
        let name = JoinRule.documentPrefix + "ci"
        try apply(.putDocument(name: name, format: .yaml, content: rule("loose"), expectedVersion: nil))
        #expect(try joins.policy(maxAge: .zero).rules.map(\.spiffeIDTemplate) == ["spiffe://example.org/loose"])
        try apply(.deleteDocument(name: name, expectedVersion: nil))
        try apply(.putDocument(name: name, format: .yaml, content: rule("tight"), expectedVersion: nil))
        #expect(try store.document(named: name)?.version == 1, "the version started again")
        #expect(try joins.policy(maxAge: .zero).rules.map(\.spiffeIDTemplate) == ["spiffe://example.org/tight"])
    }
}
