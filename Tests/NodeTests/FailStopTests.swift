import Foundation
import Ledger
import Node
import Raft
@testable import Storage
import Testing

private struct NoNetwork: MessageSender {
    func send(_ messages: [Message]) {}
}

@Suite("Driver fail-stop")
struct FailStopTests {
    @Test("A storage failure stops the node cleanly: the caller gets the error, later input is refused, nothing crashes")
    func storageFailureStopsTheNode() async throws {
        try await Self.withLeaderThatWrote { store, driver, command in
            // The disk fails.
            store.breakForTesting()

            await #expect(throws: (any Error).self) { _ = try await driver.propose(command) }
            // The tick reports the failure (the ticker logs it and stops), and no precondition trips.
            await #expect(throws: (any Error).self) { try await driver.tick() }
            #expect(driver.failureDescription != nil)
            await #expect(throws: DriverError.stopped) { _ = try await driver.propose(command) }
            await #expect(throws: DriverError.stopped) { _ = try await driver.linearizableReadIndex() }
        }
    }

    /// A single-voter driver on a fresh store that leads and wrote `command`.
    private static func withLeaderThatWrote(_ body: (RaftStore, RaftDriver, LedgerCommand) async throws -> Void) async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-failstop-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let store = try RaftStore(directory: directory.path)
        try store.initialize(with: .bootstrap(voters: [1]))
        let driver = try RaftDriver(configuration: Configuration(id: 1, randomSeed: 1), store: store, sender: NoNetwork())
        try await driver.campaign()
        let command = LedgerCommand(timeMillis: 1, actor: "t", requestID: "a", operation: .putDocument(name: "a", format: .json, content: [], expectedVersion: nil))
        #expect(try await driver.propose(command).result == .written(version: 1))
        try await body(store, driver, command)
    }

    @Test("An audit batch the writer fails to write, found by a tick on an idle node, stops the node as any storage failure")
    func auditWriteFailureStopsTheNode() async throws {
        try await Self.withLeaderThatWrote { store, driver, command in
            // The disk fails; then a write whose audit record waits in memory for its batch.
            try #require(store.ledger).audit.failWrites()
            var second = command
            second.requestID = "b"
            #expect(try await driver.propose(second).result == .written(version: 2))
            var stoppedByTick = false
            for _ in 0..<100 where !stoppedByTick {
                try await Task.sleep(for: .milliseconds(20))
                do { try await driver.tick() } catch { stoppedByTick = true }
            }
            #expect(stoppedByTick, "a tick found the failed batch")
            // (Required: a node that did not stop would leave the read below waiting for ticks that no longer come.)
            try #require(driver.failureDescription != nil, "the node counts as stopped (its API answers 503 node_stopped)")
            await #expect(throws: DriverError.stopped) { _ = try await driver.linearizableReadIndex() }
            await #expect(throws: DriverError.stopped) { _ = try await driver.propose(command) }
        }
    }

    @Test("A node whose build does not know the ledger rules an entry adopts stops there, and again after a restart, until its build knows them")
    func unknownRulesStopTheNode() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-rules-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        func open(knowing known: UInt32, initialize: Bool = false) async throws -> (RaftStore, RaftDriver) {
            let store = try RaftStore(directory: directory.path)
            store.ledger?.setRulesKnownForTesting(known)
            if initialize { try store.initialize(with: .bootstrap(voters: [1])) }
            // A checkpoint after every few entries.
            let driver = try RaftDriver(configuration: Configuration(id: 1, randomSeed: 1), store: store, sender: NoNetwork(), compactEveryEntries: 2)
            try await driver.campaign()
            return (store, driver)
        }
        let put = LedgerCommand(timeMillis: 1, actor: "t", requestID: "a", operation: .putDocument(name: "a", format: .json, content: [], expectedVersion: nil))
        let adopt = LedgerCommand(timeMillis: 1, actor: "t", requestID: "b", operation: .adoptRules(version: 2))
        var (store, driver) = try await open(knowing: 1, initialize: true)
        #expect(try await driver.propose(put).result == .written(version: 1))
        await #expect(throws: LedgerRulesError.self) { _ = try await driver.propose(adopt) }
        #expect(driver.failureDescription?.contains("rules version 2") == true)
        await #expect(throws: DriverError.stopped) { _ = try await driver.propose(put) }
        #expect(try store.ledger?.rules.inForce == 1, "the entry changed nothing")

        // The entry is committed: a restart with the old build reaches it again and refuses to go on.
        await #expect(throws: LedgerRulesError.self) { _ = try await open(knowing: 1) }

        (store, driver) = try await open(knowing: 2)
        #expect(try await driver.propose(put).result == .written(version: 2))
        let rules = try #require(try store.ledger?.rules)
        #expect(rules.known == 2 && rules.inForce == 2)
        // Once a checkpoint holds the adopted rules, the old build refuses it too (no entry left to stop at).
        func checkpointed() -> LogIndex {
            let files = FileManager.default.enumerator(atPath: directory.path)?.compactMap { ($0 as? String).map { ($0 as NSString).lastPathComponent } } ?? []
            return files.compactMap(Checkpoint.index(ofFile:)).max() ?? 0
        }
        // (Written on a low-priority thread: up to 30 s on a busy machine.)
        for n in 0..<600 where checkpointed() <= 5 {
            _ = try await driver.propose(LedgerCommand(timeMillis: 1, actor: "t", requestID: "c\(n)",
                                                       operation: .putDocument(name: "c", format: .json, content: [], expectedVersion: nil)))
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(checkpointed() > 5, "a checkpoint after the adopting entry was written")
        await driver.stop()
        await #expect(throws: LedgerRulesError.self) { _ = try await open(knowing: 1) }
    }
}
