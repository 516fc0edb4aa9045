import Raft

/// How one randomized run is shaped. Everything not fixed here is drawn
/// from the seed, so `seed` plus these options replay a run exactly.
public struct SimulationOptions: Sendable, Hashable {
    /// 3, 5 or 7; nil draws one of them from the seed.
    public var nodeCount: Int?
    /// Ticks of random faults and load before the network heals.
    public var faultTicks = 300
    /// After healing, a leader must be elected and a new proposal applied on
    /// every member within this many ticks.
    public var healTicksMax = 400
    package var plantedBug: PlantedBug?

    public init(nodeCount: Int? = nil) {
        self.nodeCount = nodeCount
    }

    /// The flags that make `warrant-sim` replay a run with these options.
    public func flags(seed: UInt64) -> String {
        var parts = ["--seed \(seed)"]
        if let nodeCount { parts.append("--nodes \(nodeCount)") }
        if faultTicks != SimulationOptions().faultTicks { parts.append("--fault-ticks \(faultTicks)") }
        if let plantedBug { parts.append("--planted-bug \(plantedBug.flagName)") }
        return parts.joined(separator: " ")
    }
}

extension PlantedBug {
    package var flagName: String {
        switch self {
        case .commitPreviousTermEntriesByCounting: return "commit-previous-term"
        case .grantVoteWithoutLogCheck: return "vote-without-log-check"
        case .readIndexWithoutQuorumCheck: return "read-without-quorum"
        case .acknowledgeBeforePersist: return "ack-before-persist"
        case .fillReleasedFromPreviousEntry: return "fill-released-off-by-one"
        }
    }

    package init?(flagName: String) {
        switch flagName {
        case "commit-previous-term": self = .commitPreviousTermEntriesByCounting
        case "vote-without-log-check": self = .grantVoteWithoutLogCheck
        case "read-without-quorum": self = .readIndexWithoutQuorumCheck
        case "ack-before-persist": self = .acknowledgeBeforePersist
        case "fill-released-off-by-one": self = .fillReleasedFromPreviousEntry
        default: return nil
        }
    }
}

public struct SimulationStats: Sendable {
    public var messagesDelivered = 0
    public var messagesDropped = 0
    public var commandsApplied = 0
    public var leaderTerms = 0
    public var crashes = 0
    public var partitions = 0
    public var compactions = 0
    public var snapshotsInstalled = 0
    public var membershipChanges = 0
    public var leadershipTransfers = 0
    public var readsAnswered = 0
    public var finalCommitIndex: LogIndex = 0

    public init() {}

    /// Adds another run's counts to these (the final index is the maximum).
    public mutating func add(_ other: SimulationStats) {
        messagesDelivered += other.messagesDelivered
        messagesDropped += other.messagesDropped
        commandsApplied += other.commandsApplied
        leaderTerms += other.leaderTerms
        crashes += other.crashes
        partitions += other.partitions
        compactions += other.compactions
        snapshotsInstalled += other.snapshotsInstalled
        membershipChanges += other.membershipChanges
        leadershipTransfers += other.leadershipTransfers
        readsAnswered += other.readsAnswered
        finalCommitIndex = max(finalCommitIndex, other.finalCommitIndex)
    }
}

public struct SimulationResult: Sendable {
    public var seed: UInt64
    public var nodeCount: Int
    public var options: SimulationOptions
    public var violation: Violation?
    public var stats: SimulationStats
    /// The events of the run, when tracing was on.
    public var trace: [String]

    public var replayCommand: String {
        "swift run warrant-sim replay \(options.flags(seed: seed))"
    }
}

/// One randomized, deterministic whole-cluster run: a faulty network
/// (delay, loss, duplication, reordering, symmetric and asymmetric
/// partitions, clogged nodes), crashes that lose unpersisted state,
/// restarts, compaction, membership changes and leadership transfers under
/// client load; then healing, and a bound on recovery. Every step is checked
/// by `SafetyChecker`.
public final class Simulation {
    public let seed: UInt64
    public let options: SimulationOptions
    private var random: SeededGenerator
    private let cluster: SimulatedCluster
    private let nodeCount: Int
    private var stats = SimulationStats()
    private let tracing: Bool
    private var trace: [String] = []

    // Network.
    private static let microticksPerTick = 10
    private var now = 0
    private var queue = MessageQueue()
    private var blocked: Set<Link> = []
    private var clogged: Set<NodeID> = []
    private var lossProbability = 0.0
    private var duplicateProbability = 0.0
    private var delayMicroticksMax = 5

    // Workload.
    private var nextNodeID: NodeID
    private var nextRequestID: UInt64 = 1
    private var pendingReads: [UInt64: LogIndex] = [:]
    private var markerIndex: LogIndex?
    /// Drawn per seed: whether this run cuts new leaders short.
    private let churnLeaders: Bool

    /// `disk` makes each node's disk; the default keeps it in memory.
    public init(seed: UInt64, options: SimulationOptions = SimulationOptions(), tracing: Bool = false, disk: DiskFactory? = nil) {
        self.seed = seed
        self.options = options
        self.tracing = tracing
        var random = SeededGenerator(seed: seed)
        let drawnCount = [3, 5, 7][random.below(3)]
        nodeCount = options.nodeCount ?? drawnCount
        var nodeOptions = NodeOptions()
        nodeOptions.plantedBug = options.plantedBug
        // Small messages split replication into many pieces, so followers
        // often hold part of a leader's log: the ground Figure 8 grows on.
        nodeOptions.messageBytesMax = [64, 256, 4096][random.below(3)]
        nodeOptions.inflightMessagesMax = 1 + random.below(8)
        nodeOptions.promotionLagEntriesMax = 16
        nodeOptions.followerProposals = random.chance(0.5) ? .forwardToLeader : .refuseWithLeaderHint
        // Safety must not rest on PreVote or CheckQuorum: some runs go without.
        nodeOptions.preVote = random.chance(0.75)
        nodeOptions.checkQuorum = random.chance(0.75)
        // As a node's driver does, but keeping only 0 to 7 payloads, so
        // that lagging followers are sent entries read back from the disk.
        // Drawn from the seed, not the generator: it changes no other draw,
        // and a run behaves the same with it or without (the bytes read
        // back are the bytes released) unless reading back is wrong.
        nodeOptions.keepPayloadsEntries = seed % 8
        cluster = SimulatedCluster(voters: (1...NodeID(nodeCount)).map { $0 }, options: nodeOptions, seed: random.next(), disk: disk)
        cluster.recordAppliedCommands = false
        churnLeaders = random.chance(0.5)
        self.random = random
        nextNodeID = NodeID(nodeCount) + 1
    }

    private func note(_ text: @autoclosure () -> String) {
        if tracing { trace.append("t=\(cluster.checker.tick) \(text())") }
    }

    // MARK: - Running

    public func run() -> SimulationResult {
        cluster.onReadState = { [unowned self] node, state in self.readAnswered(node: node, state) }
        cluster.onApplied = { [unowned self] node, entry in self.entryApplied(node: node, entry) }
        defer {
            cluster.onReadState = nil
            cluster.onApplied = nil
        }
        let start = 1 + random.below(3)
        for _ in 0..<options.faultTicks {
            cluster.checker.tick += 1
            if cluster.checker.tick > start { injectFaults() }
            generateLoad()
            runOneTick()
            if !cluster.checker.isClean { return finish() }
        }
        heal()
        let healedAt = cluster.checker.tick
        var recovered = false
        while cluster.checker.tick - healedAt < options.healTicksMax {
            cluster.checker.tick += 1
            driveMarker()
            runOneTick()
            if !cluster.checker.isClean { return finish() }
            if hasRecovered() {
                recovered = true
                break
            }
        }
        if !recovered {
            let states = cluster.runningIDs.map { id -> String in
                let r = cluster.raft(id)
                return "\(id):\(r.role.rawValue)/t\(r.term)/c\(r.commitIndex)/a\(cluster.nodes[id]!.appliedIndex)"
            }.joined(separator: " ")
            cluster.checker.record(.liveness, "no leader committed a new proposal on every member within \(options.healTicksMax) ticks of healing [\(states)]")
        }
        return finish()
    }

    private func finish() -> SimulationResult {
        stats.finalCommitIndex = cluster.checker.highestAppliedIndex
        stats.leaderTerms = cluster.checker.leaderTermCount
        return SimulationResult(seed: seed, nodeCount: nodeCount, options: options, violation: cluster.checker.violations.first,
                                stats: stats, trace: trace)
    }

    /// Delivers every message due within this tick, then ticks every node.
    private func runOneTick() {
        enqueueOutgoing()
        let tickEnd = cluster.checker.tick * Self.microticksPerTick
        var delivered = 0
        while let due = queue.peekTime, due < tickEnd, delivered < 200_000 {
            let (time, message) = queue.pop()!
            now = max(now, time)
            delivered += 1
            if cluster.nodes[message.to]?.isRunning == true {
                stats.messagesDelivered += 1
                cluster.deliver(message)
            }
            enqueueOutgoing()
            if !cluster.checker.isClean { return }
        }
        now = tickEnd
        for id in cluster.runningIDs {
            let wasLeader = cluster.role(of: id) == .leader
            cluster.tick(id)
            if wasLeader, let role = cluster.role(of: id), role != .leader {
                note("node \(id) stepped down in term \(cluster.term(of: id)!)")
            }
        }
        enqueueOutgoing()
        decommissionRemovedNodes()
        if tracing, cluster.checker.leaderTermCount != leaderTermsTraced, let leader = cluster.leader {
            leaderTermsTraced = cluster.checker.leaderTermCount
            note("node \(leader) leads term \(cluster.term(of: leader)!)")
        }
    }

    private var leaderTermsTraced = 0

    private func enqueueOutgoing() {
        guard !cluster.outgoing.isEmpty else { return }
        let batch = cluster.outgoing
        cluster.outgoing.removeAll()
        for message in batch {
            if blocked.contains(Link(from: message.from, to: message.to)) || random.chance(lossProbability) {
                stats.messagesDropped += 1
                continue
            }
            var delay = 1 + random.below(delayMicroticksMax)
            if clogged.contains(message.from) || clogged.contains(message.to) {
                delay += 3 * Self.microticksPerTick + random.below(10 * Self.microticksPerTick)
            }
            queue.push(time: now + delay, message)
            if random.chance(duplicateProbability) {
                queue.push(time: now + delay + random.below(3 * Self.microticksPerTick), message)
            }
        }
    }

    // MARK: - Faults

    private var lastLeader: NodeID?
    private var leaderFault: (id: NodeID, tick: Int)?

    /// Cuts some new leaders short a few ticks into their term, before they
    /// have replicated much: many short terms leave logs that disagree in
    /// just the ways Figure 8 needs.
    private func shortenNewLeaders() {
        let leader = cluster.leader
        if let leader, leader != lastLeader, random.chance(0.3) {
            leaderFault = (leader, cluster.checker.tick + random.below(4))
        }
        lastLeader = leader
        guard let fault = leaderFault, fault.tick <= cluster.checker.tick else { return }
        leaderFault = nil
        guard cluster.nodes[fault.id]?.isRunning == true else { return }
        if random.chance(0.5) {
            cluster.crash(fault.id)
            stats.crashes += 1
            note("crash new leader \(fault.id)")
            let down = cluster.ids.filter { !cluster.nodes[$0]!.isRunning && $0 != fault.id }
            if let back = down.first { cluster.restart(back); note("restart \(back)") }
        } else {
            for other in cluster.ids where other != fault.id {
                blocked.insert(Link(from: fault.id, to: other))
                blocked.insert(Link(from: other, to: fault.id))
            }
            stats.partitions += 1
            note("isolate new leader \(fault.id)")
        }
    }

    private func injectFaults() {
        if churnLeaders { shortenNewLeaders() }
        guard random.chance(0.08) else { return }
        let running = cluster.runningIDs
        switch random.below(14) {
        case 0, 1:
            // A random split into two sides, cut both ways.
            var shuffled = cluster.ids
            shuffled.shuffle(using: &random)
            let cutAt = 1 + random.below(max(1, shuffled.count - 1))
            let sideA = Array(shuffled[..<cutAt]), sideB = Array(shuffled[cutAt...])
            for a in sideA { for b in sideB { blocked.insert(Link(from: a, to: b)); blocked.insert(Link(from: b, to: a)) } }
            stats.partitions += 1
            note("partition \(sideA) | \(sideB)")
        case 2:
            if let leader = cluster.leader {
                for other in cluster.ids where other != leader {
                    blocked.insert(Link(from: leader, to: other))
                    blocked.insert(Link(from: other, to: leader))
                }
                stats.partitions += 1
                note("isolate leader \(leader)")
            }
        case 3:
            // Asymmetric: some directed links only.
            for _ in 0..<(1 + random.below(3)) {
                let ids = cluster.ids
                let a = ids[random.below(ids.count)], b = ids[random.below(ids.count)]
                if a != b { blocked.insert(Link(from: a, to: b)); note("cut \(a) -> \(b)") }
            }
            stats.partitions += 1
        case 4:
            let ids = cluster.ids
            let id = ids[random.below(ids.count)]
            clogged.insert(id)
            note("clog \(id)")
        case 5, 6:
            blocked.removeAll()
            clogged.removeAll()
            note("heal network")
        case 7:
            guard !running.isEmpty else { break }
            let victim = random.chance(0.4) ? (cluster.leader ?? running[random.below(running.count)]) : running[random.below(running.count)]
            if random.chance(0.5) {
                cluster.crashDuringNextReady(victim)
                note("crash \(victim) during its next Ready")
            } else {
                cluster.crash(victim)
                note("crash \(victim)")
            }
            stats.crashes += 1
        case 8:
            let down = cluster.ids.filter { !cluster.nodes[$0]!.isRunning }
            if !down.isEmpty {
                let id = down[random.below(down.count)]
                cluster.restart(id)
                note("restart \(id)")
            }
        case 9:
            lossProbability = random.chance(0.5) ? 0 : Double(random.below(30)) / 100
            duplicateProbability = random.chance(0.5) ? 0 : Double(random.below(10)) / 100
            delayMicroticksMax = random.chance(0.7) ? 5 : 5 + random.below(4 * Self.microticksPerTick)
            note("network loss \(lossProbability) duplication \(duplicateProbability) delay<=\(delayMicroticksMax)")
        case 10:
            guard !running.isEmpty else { break }
            let id = running[random.below(running.count)]
            cluster.compact(id)
            stats.compactions += 1
            note("compact \(id)")
        case 11, 12:
            changeMembership()
        default:
            guard let leader = cluster.leader else { break }
            let voters = cluster.raft(leader).membership.voters.sorted().filter { $0 != leader }
            guard !voters.isEmpty else { break }
            let target = voters[random.below(voters.count)]
            if (try? cluster.with(leader, { raft throws(RaftError) in try raft.transferLeadership(to: target) })) != nil {
                stats.leadershipTransfers += 1
                note("transfer leadership \(leader) -> \(target)")
            }
        }
    }

    private func changeMembership() {
        guard let leader = cluster.leader else { return }
        let membership = cluster.raft(leader).membership
        let learners = membership.learners.sorted()
        let change: ConfigChange
        var newNode: NodeID?
        switch random.below(3) {
        case 0 where cluster.ids.count < 9:
            newNode = nextNodeID
            nextNodeID += 1
            change = .addLearner(newNode!)
        case 1 where !learners.isEmpty && membership.voters.count < 7:
            change = .promoteLearner(learners[random.below(learners.count)])
        default:
            let members = membership.members.sorted()
            let removable = members.filter { membership.learners.contains($0) || membership.voters.count > 3 }
            guard !removable.isEmpty else { return }
            change = .removeNode(removable[random.below(removable.count)])
        }
        if let newNode { cluster.addEmptyNode(newNode) }
        let accepted = (try? cluster.with(leader, { raft throws(RaftError) in try raft.proposeConfigChange(change) })) != nil
        if accepted {
            stats.membershipChanges += 1
            note("propose \(change) on \(leader)")
        } else if let newNode {
            cluster.decommission(newNode)
        }
    }

    /// Nodes whose removal has committed are shut down, as an operator
    /// would, once they no longer lead (a removed leader hands over first).
    private func decommissionRemovedNodes() {
        var removed: Set<NodeID> = []
        for id in cluster.runningIDs {
            if let ids = cluster.nodes[id]?.raft?.membership.removed, !ids.isEmpty { removed.formUnion(ids) }
        }
        for id in removed.sorted() where cluster.nodes[id] != nil && cluster.role(of: id) != .leader {
            cluster.decommission(id)
            note("decommission \(id)")
        }
    }

    // MARK: - Load and its checks

    private func generateLoad() {
        let running = cluster.runningIDs
        guard !running.isEmpty else { return }
        if random.chance(0.6) {
            let id = running[random.below(running.count)]
            var batch: [[UInt8]] = []
            for _ in 0..<(1 + random.below(3)) {
                batch.append(Self.command(nextRequestID))
                nextRequestID += 1
            }
            _ = try? cluster.with(id) { raft throws(RaftError) in try raft.propose(batch: batch) }
        }
        if random.chance(0.4) {
            // Half the reads go to the node that believes it leads in the
            // oldest term: during a partition that is the deposed leader of
            // the classic stale read.
            let running = cluster.runningIDs // the proposal may have crashed one
            guard !running.isEmpty else { return }
            let leaders = running.filter { cluster.role(of: $0) == .leader }
            let oldestLeader = leaders.min { cluster.term(of: $0)! < cluster.term(of: $1)! }
            let id = oldestLeader != nil && random.chance(0.5) ? oldestLeader! : running[random.below(running.count)]
            let requestID = nextRequestID
            nextRequestID += 1
            // Every write acknowledged before this read began is at or below this index.
            let required = cluster.checker.highestAppliedIndex
            if (try? cluster.with(id, { raft throws(RaftError) in try raft.readIndex(requestID: requestID) })) != nil {
                pendingReads[requestID] = required
            }
        }
    }

    private func readAnswered(node: NodeID, _ state: ReadState) {
        guard let required = pendingReads.removeValue(forKey: state.requestID) else { return }
        stats.readsAnswered += 1
        if state.index < required {
            cluster.checker.record(.staleRead, "node \(node) answered read \(state.requestID) at index \(state.index), but index \(required) was acknowledged before the read began")
        }
    }

    private func entryApplied(node: NodeID, _ entry: Entry) {
        guard case .command(let bytes) = entry.payload else { return }
        stats.commandsApplied += 1
        if bytes == Self.markerCommand, markerIndex == nil { markerIndex = entry.index }
    }

    static func command(_ id: UInt64) -> [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: id >> UInt64($0 * 8)) } + [0x77, 0x72]
    }

    static let markerCommand: [UInt8] = Array("after-heal".utf8)

    // MARK: - Healing

    private func heal() {
        blocked.removeAll()
        clogged.removeAll()
        lossProbability = 0
        duplicateProbability = 0
        delayMicroticksMax = 5
        cluster.disarmCrashes()
        for id in cluster.ids where !cluster.nodes[id]!.isRunning { cluster.restart(id) }
        note("heal everything")
    }

    private var markerProposedAt = -1_000

    private func driveMarker() {
        guard markerIndex == nil, let leader = cluster.leader else { return }
        let t = cluster.checker.tick
        guard t - markerProposedAt >= 3 * cluster.options.electionTimeoutTicks else { return }
        if (try? cluster.with(leader, { raft throws(RaftError) in try raft.propose(Self.markerCommand) })) != nil {
            markerProposedAt = t
        }
    }

    /// A leader exists and every member has applied the marker.
    private func hasRecovered() -> Bool {
        guard let markerIndex, let leader = cluster.leader else { return false }
        for id in cluster.raft(leader).membership.members.sorted() {
            guard let node = cluster.nodes[id], node.isRunning, node.appliedIndex >= markerIndex else { return false }
        }
        return true
    }
}

/// Messages ordered by delivery time, then by send order: a binary heap.
struct MessageQueue {
    private var heap: [(time: Int, sequence: Int, message: Message)] = []
    private var sequence = 0

    var peekTime: Int? { heap.first?.time }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time < heap[b].time || (heap[a].time == heap[b].time && heap[a].sequence < heap[b].sequence)
    }

    mutating func push(time: Int, _ message: Message) {
        sequence += 1
        heap.append((time, sequence, message))
        var child = heap.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard less(child, parent) else { break }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> (Int, Message)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1, right = left + 1
            var smallest = parent
            if left < heap.count && less(left, smallest) { smallest = left }
            if right < heap.count && less(right, smallest) { smallest = right }
            guard smallest != parent else { break }
            heap.swapAt(parent, smallest)
            parent = smallest
        }
        return (top.time, top.message)
    }
}
