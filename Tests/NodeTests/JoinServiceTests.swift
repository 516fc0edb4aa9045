import Foundation
import Ledger
@testable import Node
import Raft
import Storage
import Testing

@Suite("Join policy cache")
struct JoinServiceTests {
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
}
