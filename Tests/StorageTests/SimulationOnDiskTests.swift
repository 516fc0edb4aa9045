import Foundation
import Raft
import RaftSimulator
import Storage
import Testing
import TestSupport

/// A simulated node's disk backed by a real store directory (the
/// write-ahead log): a crash drops the core, a restart reopens the files.
final class StoreDisk: SimulatedDisk {
    let path: String
    private var store: RaftStore
    private(set) var loads = 0
    private(set) var persists = 0

    init(path: String, initial: DurableState) throws {
        self.path = path
        // No fdatasync: the simulator's crashes are process crashes, which
        // written files survive; syncing would only slow the test.
        store = try RaftStore(directory: path, synchronous: .none, snapshotsHoldLedger: false)
        try store.initialize(with: initial)
    }

    func persist(_ ready: Ready) throws {
        persists += 1
        try store.persist(ready)
    }
    func compact(through metadata: SnapshotMetadata, data: [UInt8]) throws { try store.compact(through: metadata, data: data) }
    private(set) var entriesReadBack = 0
    func fillReleased(_ entries: inout [Entry]) throws { entriesReadBack += try store.fillReleased(&entries) }

    func load() throws -> DurableState {
        loads += 1
        store = try RaftStore(directory: path, synchronous: .none, snapshotsHoldLedger: false) // what a restarted process would do
        return try store.loadDurableState()
    }
}

/// The disks a run made, to look at afterwards.
final class DiskRegistry {
    var disks: [StoreDisk] = []
}

@Suite("The simulator on the write-ahead log", .onOwnThreads)
struct SimulationOnDiskTests {
    @Test("Seeded runs on real log files are clean and identical to the in-memory runs", arguments: [UInt64(2), 13, 16])
    func sameRunOnDisk(seed: UInt64) throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-sim-disk-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        var options = SimulationOptions()
        options.faultTicks = 150
        let inMemory = Simulation(seed: seed, options: options, tracing: true).run()
        let registry = DiskRegistry()
        let onDisk = Simulation(seed: seed, options: options, tracing: true) { id, initial in
            let disk = try StoreDisk(path: directory.appendingPathComponent("node-\(id)").path, initial: initial)
            registry.disks.append(disk)
            return disk
        }.run()
        let persists = registry.disks.reduce(0) { $0 + $1.persists }
        let loads = registry.disks.reduce(0) { $0 + $1.loads }
        #expect(persists > 100, "every Ready went to the store")
        #expect(loads > registry.disks.count, "restarts reopened their files")
        let readBack = registry.disks.reduce(0) { $0 + $1.entriesReadBack }
        #expect(readBack > 0, "lagging followers were sent entries read back from the log files")
        #expect(onDisk.violation == nil, "\(onDisk.violation.map(String.init(describing:)) ?? "")")
        #expect(onDisk.trace == inMemory.trace, "the store returned exactly what was persisted, so the run is the same")
        #expect(onDisk.stats.finalCommitIndex == inMemory.stats.finalCommitIndex)
        #expect(onDisk.stats.crashes > 0 && onDisk.stats.compactions > 0 && onDisk.stats.membershipChanges > 0, "seed \(seed) must exercise restarts, compaction and membership changes")
    }
}
