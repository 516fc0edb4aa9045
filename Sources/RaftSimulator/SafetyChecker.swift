import Raft

/// A broken safety or liveness property, with the tick it was seen at.
public struct Violation: Sendable, CustomStringConvertible {
    public enum Property: String, Sendable {
        case electionSafety = "Election Safety"
        case logMatching = "Log Matching"
        case leaderCompleteness = "Leader Completeness"
        case stateMachineSafety = "State Machine Safety"
        case commitMonotonic = "commit index never decreases"
        case staleRead = "linearizable read"
        case lostWrite = "acknowledged write lost"
        case liveness = "liveness after healing"
        case convergence = "convergence after healing"
    }

    public var property: Property
    public var detail: String
    public var tick: Int

    public var description: String { "\(property.rawValue) violated at tick \(tick): \(detail)" }
}

/// Watches every node of a simulated cluster and records the first time any
/// of Raft's safety properties (Figure 3 of the paper) fails.
public struct SafetyChecker: Sendable {
    public private(set) var violations: [Violation] = []
    public var tick = 0

    /// Election Safety: the one leader seen for each term.
    private var leaderOfTerm: [Term: NodeID] = [:]
    /// Log Matching: every (index, term) ever persisted anywhere, with the
    /// hash of its payload and the term of the entry before it.
    private struct EntryKey: Hashable { var index: LogIndex; var term: Term }
    private var entryRegistry: [EntryKey: (payload: UInt64, previousTerm: Term)] = [:]
    /// committedTerms[i - 1] is the term of the entry committed at index i.
    public private(set) var committedTerms: [Term] = []
    /// commitTerms[i - 1] bounds the term in which index i was committed: the
    /// lowest term of a node seen holding it committed (the committing leader
    /// is normally the first). Leader Completeness binds later terms only.
    private var commitTerms: [Term] = []
    /// State Machine Safety: digests[i - 1] is the state machine's digest
    /// after applying index i, the same on every node.
    public private(set) var digests: [UInt64] = []
    private var lastCommit: [NodeID: LogIndex] = [:]

    public init() {}

    public var isClean: Bool { violations.isEmpty }
    /// How many terms had a leader.
    public var leaderTermCount: Int { leaderOfTerm.count }
    /// The highest index any node has applied: every write at or below it
    /// has been acknowledged to some client.
    public var highestAppliedIndex: LogIndex { LogIndex(digests.count) }

    public mutating func record(_ property: Violation.Property, _ detail: String) {
        violations.append(Violation(property: property, detail: detail, tick: tick))
    }

    /// Call after every input a node handled.
    mutating func observe(_ node: RaftNode, wasLeader: Bool) {
        let id = node.id
        if node.role == .leader {
            if let other = leaderOfTerm[node.term], other != id {
                record(.electionSafety, "nodes \(other) and \(id) both lead term \(node.term)")
            }
            leaderOfTerm[node.term] = id
            if !wasLeader { checkLeaderCompleteness(node) }
        }
        let previous = lastCommit[id] ?? 0
        if node.commitIndex < previous {
            record(.commitMonotonic, "node \(id) commit index went from \(previous) to \(node.commitIndex)")
        }
        if node.commitIndex > previous {
            noteCommitted(node, from: previous + 1, through: node.commitIndex)
        }
        lastCommit[id] = node.commitIndex
    }

    /// A node restarted from its durable state: its commit index may be
    /// lower than before the crash, but never below what it persisted.
    mutating func restarted(_ node: RaftNode) {
        lastCommit[node.id] = node.commitIndex
    }

    private mutating func noteCommitted(_ node: RaftNode, from: LogIndex, through: LogIndex) {
        for index in max(from, node.snapshotIndex)...through where index > 0 {
            guard let term = node.term(at: index) else { continue }
            let slot = Int(index - 1)
            // A snapshot may have committed earlier indices we never saw
            // entry by entry: fill them from this node's log where it has them.
            while committedTerms.count < slot {
                let missing = LogIndex(committedTerms.count + 1)
                committedTerms.append(node.term(at: missing) ?? 0)
                commitTerms.append(node.term)
            }
            if slot < committedTerms.count {
                if committedTerms[slot] != term {
                    record(.stateMachineSafety, "node \(node.id) committed term \(term) at index \(index), but term \(committedTerms[slot]) was committed there before")
                }
                commitTerms[slot] = min(commitTerms[slot], node.term)
            } else {
                committedTerms.append(term)
                commitTerms.append(node.term)
            }
        }
    }

    /// Leader Completeness: a new leader holds every entry committed in an
    /// earlier term. (A slow candidate may still win an older term after a
    /// newer term committed entries; it need not hold those.)
    private mutating func checkLeaderCompleteness(_ node: RaftNode) {
        var index = max(node.snapshotIndex + 1, 1)
        while index <= LogIndex(committedTerms.count) {
            let expected = committedTerms[Int(index - 1)]
            if expected != 0 && commitTerms[Int(index - 1)] < node.term {
                let actual = node.term(at: index)
                if actual != expected {
                    record(.leaderCompleteness, "node \(node.id) leads term \(node.term) but holds term \(actual.map(String.init) ?? "nothing") at committed index \(index) (committed term \(expected))")
                    return
                }
            }
            index += 1
        }
    }

    /// Log Matching: the same (index, term) always carries the same payload
    /// and follows the same term, on every node, forever.
    mutating func persisted(_ entries: [Entry], previousTerm: Term?, by node: NodeID) {
        var previous = previousTerm
        for entry in entries {
            let key = EntryKey(index: entry.index, term: entry.term)
            let payload = Self.hash(entry.payload)
            if let known = entryRegistry[key] {
                if known.payload != payload {
                    record(.logMatching, "node \(node) stored a different entry at index \(entry.index) term \(entry.term)")
                } else if let previous, known.previousTerm != previous {
                    record(.logMatching, "node \(node) holds index \(entry.index) term \(entry.term) after term \(previous), others after term \(known.previousTerm)")
                }
            } else if let previous {
                entryRegistry[key] = (payload, previous)
            }
            previous = entry.term
        }
    }

    /// State Machine Safety: applying index `index` leads every node to the
    /// same digest. Returns the node's new digest.
    mutating func applied(_ entry: Entry, after digest: UInt64, by node: NodeID) -> UInt64 {
        let next = Self.mix(digest ^ Self.mix(entry.index &* 0x9E37_79B9 ^ entry.term) ^ Self.hash(entry.payload))
        let slot = Int(entry.index - 1)
        if slot < digests.count {
            if digests[slot] != next {
                record(.stateMachineSafety, "node \(node) applied a different entry (or history) at index \(entry.index)")
            }
        } else if slot == digests.count {
            digests.append(next)
        } else {
            record(.stateMachineSafety, "node \(node) applied index \(entry.index) before anyone applied \(digests.count + 1)")
        }
        return next
    }

    /// A node installed a snapshot at `index` with this digest.
    mutating func installedSnapshot(index: LogIndex, digest: UInt64, by node: NodeID) {
        guard index > 0 else { return }
        let slot = Int(index - 1)
        if slot < digests.count, digests[slot] != digest {
            record(.stateMachineSafety, "node \(node) installed a snapshot at \(index) that differs from what others applied")
        }
    }

    static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    static func hash(_ payload: EntryPayload) -> UInt64 {
        switch payload {
        case .noop: return 1
        case .configChange(let change):
            // Not hashValue: that is seeded per process, and runs must replay.
            switch change {
            case .bootstrap(let voters): return voters.reduce(mix(2)) { mix($0 ^ $1) }
            case .addLearner(let id): return mix(3 ^ (id << 8))
            case .promoteLearner(let id): return mix(4 ^ (id << 8))
            case .removeNode(let id): return mix(5 ^ (id << 8))
            }
        case .command(let bytes):
            var h: UInt64 = 0xCBF2_9CE4_8422_2325
            for byte in bytes { h = (h ^ UInt64(byte)) &* 0x100_0000_01B3 }
            return h
        case .released:
            preconditionFailure("the simulator's nodes keep every payload in memory")
        }
    }
}
