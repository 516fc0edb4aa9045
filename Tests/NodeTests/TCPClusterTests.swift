import Foundation
import Ledger
import NIOCore
import NIOPosix
import Node
import Raft
import Storage
import Synchronization
import Testing
import Transport

final class BoundAddresses: Sendable {
    private let addresses = Mutex<[NodeID: SocketAddress]>([:])
    func set(_ id: NodeID, _ address: SocketAddress) { addresses.withLock { $0[id] = address } }
    var all: [NodeID: SocketAddress] { addresses.withLock { $0 } }
}

@Suite("Three nodes over mutual TLS", .serialized)
struct TCPClusterTests {
    @Test("Drivers replicate over loopback TCP with mutual TLS: a leader is elected, writes commit, every store ends with the same audit chain")
    func replicateOverTCP() async throws {
        let ids: [NodeID] = [1, 2, 3]
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // The drivers on threads of their own, as in a node.
        let driverGroup = MultiThreadedEventLoopGroup(numberOfThreads: ids.count)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-tcp-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let ca = try ClusterCA.create(clusterID: "test-\(UUID().uuidString.prefix(8))")
        var transports: [NodeID: TCPTransport] = [:]
        var drivers: [NodeID: RaftDriver] = [:]
        var stores: [NodeID: RaftStore] = [:]
        for id in ids {
            let transport = try TCPTransport(id: id, peers: Dictionary(uniqueKeysWithValues: ids.filter { $0 != id }.map { ($0, nil) }), group: group,
                                             identity: try ca.issueNodeIdentity(id))
            let store = try RaftStore(directory: directory.appendingPathComponent("node-\(id)").path, synchronous: .none)
            try store.initialize(with: .bootstrap(voters: ids))
            var configuration = Configuration(id: id, randomSeed: UInt64.random(in: 1...UInt64.max))
            configuration.electionTimeoutTicks = 100 // 0.5-1 s: a busy CI machine stalls threads for longer than 50 ms
            configuration.snapshotTimeoutTicks = max(configuration.snapshotTimeoutTicks, 2 * configuration.electionTimeoutTicks)
            transports[id] = transport
            stores[id] = store
            drivers[id] = try RaftDriver(configuration: configuration, store: store, sender: transport, requestTimeoutTicks: 2_000,
                                         loop: driverGroup.next())
        }
        let bound = BoundAddresses()
        let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        var tasks: [Task<Void, Never>] = []
        var tickers: [RepeatedTask] = [] // on the drivers' threads, as in a node
        for id in ids {
            let transport = transports[id]!, driver = drivers[id]!
            tasks.append(Task { try? await transport.run(listeningOn: loopback, ready: { bound.set(id, $0) }) { driver.enqueue($0) } })
            tickers.append(driver.startTicking(every: .milliseconds(5)) { error in Issue.record("storage failed: \(error)") })
        }
        defer { try? FileManager.default.removeItem(at: directory) }
        func eventually(_ condition: () async throws -> Bool) async rethrows -> Bool {
            for _ in 0..<3_000 { // at most about 30 s
                if try await condition() { return true }
                try? await Task.sleep(for: .milliseconds(10))
            }
            return try await condition()
        }
        #expect(await eventually { bound.all.count == 3 })
        for (id, address) in bound.all { for other in ids where other != id { transports[other]!.setAddress(address, of: id) } }

        var leader: NodeID?
        #expect(await eventually {
            for id in ids where await drivers[id]!.status.role == .leader { leader = id; return true }
            return false
        })
        if let leader {
            for i in 0..<30 {
                let outcome = try await drivers[leader]!.propose(LedgerCommand(
                    timeMillis: UInt64(i), actor: "tcp-test", requestID: "w\(i)",
                    operation: .putDocument(name: "docs/\(i % 3)", format: .json, content: Array("{\"i\":\(i)}".utf8), expectedVersion: nil)))
                #expect(outcome.result == .written(version: UInt64(i / 3 + 1)))
            }
            let converged = try await eventually {
                let chains = try ids.map { try stores[$0]!.verifyAudit() }
                return Set(chains).count == 1 && chains.first.map { if case .intact(31, _) = $0 { true } else { false } } == true
            }
            #expect(converged, "all three stores hold the bootstrap record and thirty writes, identically chained")
        }
        for ticker in tickers {
            let cancelled = driverGroup.next().makePromise(of: Void.self)
            ticker.cancel(promise: cancelled)
            try? await cancelled.futureResult.get()
        }
        for task in tasks { task.cancel() }
        for transport in transports.values { transport.finish() }
        for task in tasks { await task.value }
        for driver in drivers.values { await driver.stop() }
        try await group.shutdownGracefully()
        try await driverGroup.shutdownGracefully()
    }
}
