import Raft

/// Tunables shared by every node of a simulated cluster.
public struct NodeOptions: Sendable {
    public var electionTimeoutTicks = 10
    public var heartbeatIntervalTicks = 1
    public var preVote = true
    public var checkQuorum = true
    public var followerProposals: FollowerProposalPolicy = .forwardToLeader
    public var messageBytesMax = 1 << 20
    public var inflightMessagesMax = 256
    public var uncommittedBytesMax = 64 << 20
    public var promotionLagEntriesMax: LogIndex = 64
    /// Release the payloads of commands applied more than this many
    /// entries ago (`RaftNode.releasePayloads`), reading them back from
    /// the disk when a message needs them, as a node's driver does; nil
    /// keeps every payload in memory.
    public var keepPayloadsEntries: LogIndex?
    package var plantedBug: PlantedBug?

    public init() {}

    func configuration(id: NodeID, seed: UInt64) -> Configuration {
        var c = Configuration(id: id, randomSeed: seed)
        c.electionTimeoutTicks = electionTimeoutTicks
        c.heartbeatIntervalTicks = heartbeatIntervalTicks
        c.preVote = preVote
        c.checkQuorum = checkQuorum
        c.followerProposals = followerProposals
        c.messageBytesMax = messageBytesMax
        c.inflightMessagesMax = inflightMessagesMax
        c.inflightBytesMax = max(c.inflightBytesMax, messageBytesMax)
        c.uncommittedBytesMax = max(uncommittedBytesMax, messageBytesMax)
        c.promotionLagEntriesMax = promotionLagEntriesMax
        c.plantedBug = plantedBug
        return c
    }
}

/// A simulated node's disk: exactly what its Readies asked to persist,
/// nothing more. A crash keeps it and loses everything else. The default
/// is `MemoryDisk`; a test may plug in the real SQLite store.
public protocol SimulatedDisk: AnyObject {
    func persist(_ ready: Ready) throws
    func compact(through metadata: SnapshotMetadata, data: [UInt8]) throws
    func load() throws -> DurableState
    /// Fills entries the core released from memory (contiguous) from what
    /// was persisted, checking each one's index, term and size.
    func fillReleased(_ entries: inout [Entry]) throws
}

/// Makes the disk of a node, holding `initial` (bootstrap or empty).
public typealias DiskFactory = (_ id: NodeID, _ initial: DurableState) throws -> any SimulatedDisk

/// The in-memory disk.
public final class MemoryDisk: SimulatedDisk {
    public private(set) var storage: SimulatedStorage

    public init(_ initial: DurableState) {
        storage = SimulatedStorage(hardState: initial.hardState, snapshot: initial.snapshot, entries: initial.entries)
    }

    public func persist(_ ready: Ready) { storage.persist(ready) }
    public func compact(through metadata: SnapshotMetadata, data: [UInt8]) { storage.compact(through: metadata, data: data) }
    public func load() -> DurableState { storage.durableState }

    public func fillReleased(_ entries: inout [Entry]) throws {
        // The stored entries at the same indices (none if they are not here:
        // every released one then fails to match).
        let offset = Int(entries.first?.index ?? 0) - Int(storage.entries.first?.index ?? 0)
        let stored = offset >= 0 ? Array(storage.entries.dropFirst(offset).prefix(entries.count)) : []
        _ = try Entry.fillReleased(&entries, from: stored)
    }
}

/// The in-memory disk's contents.
public struct SimulatedStorage: Sendable {
    public var hardState = HardState()
    public var snapshot: Snapshot?
    public var entries: [Entry] = []

    var durableState: DurableState {
        DurableState(hardState: hardState, snapshot: snapshot, entries: entries)
    }

    mutating func persist(_ ready: Ready) {
        if let snapshot = ready.snapshot {
            self.snapshot = snapshot
            entries.removeAll()
        }
        if let first = ready.entries.first {
            // Replace any stored suffix from the first new index on.
            if let position = entries.firstIndex(where: { $0.index >= first.index }) {
                entries.removeSubrange(position...)
            }
            precondition(first.index == (entries.last?.index ?? snapshot?.metadata.index ?? 0) + 1, "storage gap")
            entries.append(contentsOf: ready.entries)
        }
        if let hardState = ready.hardState { self.hardState = hardState }
    }

    mutating func compact(through metadata: SnapshotMetadata, data: [UInt8]) {
        snapshot = Snapshot(metadata: metadata, data: data)
        entries.removeAll { $0.index <= metadata.index }
    }
}

/// One simulated member: its core (nil while crashed), its disk and its
/// state machine, which is a running digest of everything applied. A class,
/// so looking a node up never copies its whole core.
public final class SimulatedNode {
    public let id: NodeID
    public internal(set) var raft: RaftNode?
    public internal(set) var disk: any SimulatedDisk
    public internal(set) var appliedIndex: LogIndex = 0
    public internal(set) var digest: UInt64 = 0
    public internal(set) var incarnation = 0
    /// Command ids this node applied, in order (for tests).
    public internal(set) var appliedCommands: [[UInt8]] = []
    public internal(set) var readStates: [ReadState] = []
    public internal(set) var abandonedReads: [UInt64] = []
    /// Crash in the middle of the next Ready: after sending what may be sent
    /// before persisting, before persisting anything.
    var crashDuringNextReady = false

    init(id: NodeID, disk: any SimulatedDisk) {
        self.id = id
        self.disk = disk
    }

    public var isRunning: Bool { raft != nil }
}

/// A whole cluster of pure Raft cores in one process. Messages are not
/// delivered here: they collect in `outgoing`, and a network (the scenario
/// tests' direct one, or the simulator's faulty one) decides their fate.
public final class SimulatedCluster {
    public let options: NodeOptions
    public private(set) var nodes: [NodeID: SimulatedNode] = [:]
    /// `nodes.keys`, sorted; kept up to date where nodes come and go.
    private var sortedIDs: [NodeID] = []
    public var checker = SafetyChecker()
    /// Messages sent and not yet handed to a network.
    public var outgoing: [Message] = []
    /// Whether to keep every applied command per node (tests), or only digests.
    public var recordAppliedCommands = true
    private var seeds: SeededGenerator
    /// Called with every (node, read state) a node produced.
    public var onReadState: ((NodeID, ReadState) -> Void)?
    /// Called with every (node, entry) a node applied.
    public var onApplied: ((NodeID, Entry) -> Void)?

    private let makeDisk: DiskFactory

    public init(voters: [NodeID], options: NodeOptions = NodeOptions(), seed: UInt64, disk: DiskFactory? = nil) {
        self.options = options
        makeDisk = disk ?? { _, initial in MemoryDisk(initial) }
        seeds = SeededGenerator(seed: seed)
        let durable = DurableState.bootstrap(voters: voters)
        for id in voters {
            nodes[id] = SimulatedNode(id: id, disk: Self.mustMake(makeDisk, id, durable))
            start(id)
        }
        sortedIDs = nodes.keys.sorted()
    }

    public var ids: [NodeID] { sortedIDs }
    public var runningIDs: [NodeID] { sortedIDs.filter { nodes[$0]!.isRunning } }

    /// A copy of a running node's core (for inspection; changes go through `with`).
    public func raft(_ id: NodeID) -> RaftNode {
        guard let raft = nodes[id]?.raft else { preconditionFailure("node \(id) is not running") }
        return raft
    }

    /// A running node's role, read without copying its core.
    public func role(of id: NodeID) -> Role? { nodes[id]?.raft?.role }
    public func term(of id: NodeID) -> Term? { nodes[id]?.raft?.term }

    /// The leader with the highest term among running nodes, if any.
    public var leader: NodeID? {
        var best: (NodeID, Term)?
        for id in sortedIDs {
            guard let node = nodes[id], node.raft?.role == .leader, let term = node.raft?.term else { continue }
            if best == nil || term > best!.1 { best = (id, term) }
        }
        return best?.0
    }

    // MARK: - Life cycle

    private func start(_ id: NodeID) {
        let configuration = options.configuration(id: id, seed: seeds.next())
        let durable: DurableState
        do {
            durable = try nodes[id]!.disk.load()
        } catch {
            preconditionFailure("node \(id) could not load its disk: \(error)")
        }
        do {
            let raft = try RaftNode(configuration: configuration, durable: durable)
            nodes[id]!.raft = raft
            nodes[id]!.incarnation += 1
            // The state machine restarts from the snapshot, if any.
            if let snapshot = durable.snapshot {
                nodes[id]!.appliedIndex = snapshot.metadata.index
                nodes[id]!.digest = Self.digest(from: snapshot.data)
            } else {
                nodes[id]!.appliedIndex = 0
                nodes[id]!.digest = 0
            }
            nodes[id]!.appliedCommands = []
            checker.restarted(raft)
        } catch {
            preconditionFailure("node \(id) could not restart: \(error)")
        }
    }

    /// Adds a brand-new, empty node (it joins once the leader adds it).
    public func addEmptyNode(_ id: NodeID) {
        precondition(nodes[id] == nil, "node ids are never reused")
        nodes[id] = SimulatedNode(id: id, disk: Self.mustMake(makeDisk, id, .empty))
        sortedIDs = nodes.keys.sorted()
        start(id)
    }

    /// Stops a node; it keeps only what it had persisted.
    public func crash(_ id: NodeID) {
        nodes[id]?.raft = nil
        nodes[id]?.crashDuringNextReady = false
    }

    /// Arms a crash in the middle of this node's next Ready.
    public func crashDuringNextReady(_ id: NodeID) {
        guard nodes[id]?.isRunning == true else { return }
        nodes[id]!.crashDuringNextReady = true
    }

    /// Cancels every armed crash.
    public func disarmCrashes() {
        for id in ids { nodes[id]!.crashDuringNextReady = false }
    }

    public func restart(_ id: NodeID) {
        guard let node = nodes[id], !node.isRunning else { return }
        start(id)
    }

    /// Forgets a removed node entirely (an operator shut it down).
    public func decommission(_ id: NodeID) {
        nodes[id] = nil
        sortedIDs = nodes.keys.sorted()
    }

    // MARK: - Input

    /// Runs `action` on a running node and then carries out its Readies.
    /// Returns what the action returned, or nil if the node is down.
    @discardableResult
    public func with<T, E: Error>(_ id: NodeID, _ action: (inout RaftNode) throws(E) -> T) throws(E) -> T? {
        guard let node = nodes[id], node.raft != nil else { return nil }
        let wasLeader = node.raft!.role == .leader
        let result = try action(&node.raft!)
        if node.raft != nil { checker.observe(node.raft!, wasLeader: wasLeader) }
        processReadies(node)
        return result
    }

    public func deliver(_ message: Message) {
        with(message.to) { $0.step(message) }
    }

    public func tick(_ id: NodeID) {
        with(id) { $0.tick() }
    }

    public func tickAll() {
        for id in runningIDs { tick(id) }
    }

    /// Compacts a node's log up to its applied index.
    public func compact(_ id: NodeID) {
        guard let node = nodes[id], let raft = node.raft, node.appliedIndex > raft.snapshotIndex else { return }
        let data = Self.snapshotData(index: node.appliedIndex, digest: node.digest)
        let index = node.appliedIndex
        let metadata = with(id) { try? $0.compactLog(through: index, snapshotData: data) }
        if let metadata, let metadata {
            do {
                try nodes[id]!.disk.compact(through: metadata, data: data)
            } catch {
                preconditionFailure("node \(id) could not compact its disk: \(error)")
            }
        }
    }

    // MARK: - The driver loop

    private func processReadies(_ node: SimulatedNode) {
        let id = node.id
        var rounds = 0
        while node.raft?.hasReady == true {
            rounds += 1
            precondition(rounds < 10_000, "node \(id) never runs out of Ready")
            let wasLeader = node.raft!.role == .leader
            let ready = node.raft!.ready()
            // 1. Leader traffic may go before persisting.
            outgoing.append(contentsOf: filledReleased(ready.messagesToSendNow, node))
            if node.crashDuringNextReady {
                crash(id)
                return
            }
            // 2. Persist atomically.
            let previousTerm = ready.entries.first.flatMap { node.raft!.term(at: $0.index - 1) }
            checker.persisted(ready.entries, previousTerm: previousTerm, by: id)
            do {
                try node.disk.persist(ready)
            } catch {
                preconditionFailure("node \(id) could not persist a Ready: \(error)")
            }
            if let snapshot = ready.snapshot {
                let digest = Self.digest(from: snapshot.data)
                checker.installedSnapshot(index: snapshot.metadata.index, digest: digest, by: id)
                node.appliedIndex = snapshot.metadata.index
                node.digest = digest
            }
            // 3. Then what depends on it.
            outgoing.append(contentsOf: filledReleased(ready.messagesAfterPersist, node))
            // 4. Apply.
            for entry in ready.committedEntries {
                precondition(entry.index == node.appliedIndex + 1, "node \(id) applies \(entry.index) after \(node.appliedIndex)")
                node.digest = checker.applied(entry, after: node.digest, by: id)
                node.appliedIndex = entry.index
                if case .command(let bytes) = entry.payload, recordAppliedCommands {
                    node.appliedCommands.append(bytes)
                }
                onApplied?(id, entry)
            }
            if recordAppliedCommands { node.abandonedReads.append(contentsOf: ready.abandonedReads) }
            for state in ready.readStates {
                if recordAppliedCommands { node.readStates.append(state) }
                onReadState?(id, state)
            }
            node.raft!.advance()
            if let keep = options.keepPayloadsEntries, node.appliedIndex > keep {
                node.raft!.releasePayloads(through: node.appliedIndex - keep)
            }
            checker.observe(node.raft!, wasLeader: wasLeader)
        }
    }

    /// Messages with the entries their core released filled from the disk.
    private func filledReleased(_ messages: [Message], _ node: SimulatedNode) -> [Message] {
        guard options.keepPayloadsEntries != nil else { return messages }
        return messages.map { message in
            do {
                return try message.fillingReleased { entries in
                    let released = entries.indices.filter { entries[$0].payload.isReleased }
                    try node.disk.fillReleased(&entries)
                    if options.plantedBug == .fillReleasedFromPreviousEntry {
                        for slot in released where slot > 0 { entries[slot].payload = entries[slot - 1].payload }
                    }
                }
            } catch {
                preconditionFailure("node \(node.id) could not read back released entries: \(error)")
            }
        }
    }

    private static func mustMake(_ factory: DiskFactory, _ id: NodeID, _ initial: DurableState) -> any SimulatedDisk {
        do {
            return try factory(id, initial)
        } catch {
            preconditionFailure("could not make the disk of node \(id): \(error)")
        }
    }

    // MARK: - Snapshot bytes: the applied index and digest

    static func snapshotData(index: LogIndex, digest: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        for value in [index, digest] {
            for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
        }
        return bytes
    }

    static func digest(from data: [UInt8]) -> UInt64 {
        guard data.count == 16 else { return 0 }
        var value: UInt64 = 0
        for (offset, byte) in data[8..<16].enumerated() { value |= UInt64(byte) << UInt64(offset * 8) }
        return value
    }
}
