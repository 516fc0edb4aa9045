import Foundation
import Ledger
import Node
import Raft
import Storage
import Testing

private struct NoNetwork: MessageSender {
    func send(_ messages: [Message]) {}
}

@Suite("Driver fail-stop")
struct FailStopTests {
    @Test("A storage failure stops the node cleanly: the caller gets the error, later input is refused, nothing crashes")
    func storageFailureStopsTheNode() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-failstop-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try RaftStore(directory: directory.path)
        try store.initialize(with: .bootstrap(voters: [1]))
        let driver = try RaftDriver(configuration: Configuration(id: 1, randomSeed: 1), store: store, sender: NoNetwork())
        try await driver.campaign()
        let command = LedgerCommand(timeMillis: 1, actor: "t", requestID: "a", operation: .putDocument(name: "a", format: .json, content: [], expectedVersion: nil))
        #expect(try await driver.propose(command).result == .written(version: 1))

        // The disk fails.
        store.breakForTesting()

        await #expect(throws: (any Error).self) { _ = try await driver.propose(command) }
        try await driver.tick() // ignored, and no precondition trips
        await #expect(throws: DriverError.stopped) { _ = try await driver.propose(command) }
        await #expect(throws: DriverError.stopped) { _ = try await driver.linearizableReadIndex() }
    }
}
