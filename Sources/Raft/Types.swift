/// A member of a Raft group. Zero means "nobody" (no vote, no known leader);
/// real ids are never zero and are never reused once removed.
public typealias NodeID = UInt64
public typealias Term = UInt64
public typealias LogIndex = UInt64

/// The id that stands for "no node".
public let noNode: NodeID = 0

/// What a log entry carries. The core interprets only `.configChange`;
/// `.command` bytes belong to the replicated state machine.
public enum EntryPayload: Sendable, Hashable {
    /// Appended by every new leader so it can commit an entry of its own term.
    case noop
    case command([UInt8])
    case configChange(ConfigChange)
    /// A command the log no longer keeps in memory (`RaftNode.releasePayloads`):
    /// the entry is durable and applied, and its bytes are on stable
    /// storage. It never leaves the node like this: the driver reads the
    /// bytes back before sending the entry to a peer that lags.
    case released(byteCount: Int)

    public var isReleased: Bool {
        if case .released = self { return true }
        return false
    }

    /// Bytes counted against flow-control limits.
    @inlinable
    public var byteCount: Int {
        switch self {
        case .noop: return 0
        case .command(let bytes): return bytes.count
        case .configChange: return 16
        case .released(let byteCount): return byteCount
        }
    }
}

public struct Entry: Sendable, Hashable {
    public var term: Term
    public var index: LogIndex
    public var payload: EntryPayload

    public init(term: Term, index: LogIndex, payload: EntryPayload) {
        self.term = term
        self.index = index
        self.payload = payload
    }

    /// Payload bytes plus a fixed per-entry overhead, for size limits.
    @inlinable
    public var byteCount: Int { payload.byteCount + Entry.overheadBytes }

    public static let overheadBytes = 24

    /// Gives each released entry of `entries` the payload of the entry at
    /// the same place in `stored`: the same entries read back from stable
    /// storage, which must match each one's index, term and size. Returns
    /// how many were filled.
    public static func fillReleased(_ entries: inout [Entry], from stored: [Entry]) throws(ReleasedEntryMismatch) -> Int {
        var filled = 0
        for slot in entries.indices where entries[slot].payload.isReleased {
            let entry = entries[slot]
            let found = slot < stored.count ? stored[slot] : nil
            guard let found, found.index == entry.index, found.term == entry.term, found.byteCount == entry.byteCount else {
                throw ReleasedEntryMismatch(released: entry, found: found)
            }
            entries[slot].payload = found.payload
            filled += 1
        }
        return filled
    }
}

/// A released entry that stable storage does not hold as the log says.
public struct ReleasedEntryMismatch: Error, Sendable, CustomStringConvertible {
    public let released: Entry
    public let found: Entry?

    public var description: String {
        let wanted = "entry \(released.index) (term \(released.term), \(released.byteCount) bytes)"
        guard let found else { return "\(wanted) is not in stable storage" }
        return "\(wanted) reads back as \(found.index) (term \(found.term), \(found.byteCount) bytes)"
    }
}

/// A single-server membership change. Only one may be in flight at a time,
/// and a leader proposes one only after committing an entry of its own term.
public enum ConfigChange: Sendable, Hashable {
    /// The first entry of a new cluster (index 1, term 1): its founding voters.
    case bootstrap(voters: [NodeID])
    /// A non-voting member that receives the log; promote it once caught up.
    case addLearner(NodeID)
    /// Turn a caught-up learner into a voter.
    case promoteLearner(NodeID)
    /// Remove a voter or learner for good; its id can never return.
    case removeNode(NodeID)
}

/// The durable variables of Figure 2 plus the commit index.
public struct HardState: Sendable, Hashable {
    public var term: Term
    public var votedFor: NodeID
    public var commitIndex: LogIndex

    public init(term: Term = 0, votedFor: NodeID = noNode, commitIndex: LogIndex = 0) {
        self.term = term
        self.votedFor = votedFor
        self.commitIndex = commitIndex
    }
}

public struct SnapshotMetadata: Sendable, Hashable {
    /// The last log index the snapshot covers, and that entry's term.
    public var index: LogIndex
    public var term: Term
    /// Membership as of `index`.
    public var membership: Membership

    public init(index: LogIndex, term: Term, membership: Membership) {
        self.index = index
        self.term = term
        self.membership = membership
    }
}

/// A state-machine image at a log index. `data` is opaque to the core; a
/// driver may put a handle here and stream the real bytes itself.
public struct Snapshot: Sendable, Hashable {
    public var metadata: SnapshotMetadata
    public var data: [UInt8]

    public init(metadata: SnapshotMetadata, data: [UInt8]) {
        self.metadata = metadata
        self.data = data
    }
}

/// What a node must have kept on stable storage to restart: the hard state,
/// the latest snapshot (if any) and every log entry after it.
public struct DurableState: Sendable {
    public var hardState: HardState
    public var snapshot: Snapshot?
    public var entries: [Entry]
    /// The highest index the driver's state machine has already applied
    /// (durably); committed entries after it are handed out again.
    public var appliedIndex: LogIndex

    public init(hardState: HardState, snapshot: Snapshot?, entries: [Entry], appliedIndex: LogIndex? = nil) {
        self.hardState = hardState
        self.snapshot = snapshot
        self.entries = entries
        self.appliedIndex = appliedIndex ?? snapshot?.metadata.index ?? 0
    }

    /// The state of a founding member of a new cluster: one committed
    /// bootstrap entry naming the voters, identical on every founder.
    public static func bootstrap(voters: [NodeID]) -> DurableState {
        let first = Entry(term: 1, index: 1, payload: .configChange(.bootstrap(voters: voters.sorted())))
        return DurableState(hardState: HardState(term: 1, votedFor: noNode, commitIndex: 1), snapshot: nil, entries: [first], appliedIndex: 0)
    }

    /// The state of a node joining an existing cluster: nothing yet; the
    /// leader sends it the log or a snapshot after it is added as a learner.
    public static let empty = DurableState(hardState: HardState(), snapshot: nil, entries: [], appliedIndex: 0)
}

public enum Role: String, Sendable, Hashable {
    case follower
    case preCandidate
    case candidate
    case leader
}

/// A linearizable read's answer: once the local state machine has applied
/// `index`, reading it reflects every write acknowledged before the read.
public struct ReadState: Sendable, Hashable {
    public var requestID: UInt64
    public var index: LogIndex
}

/// Where a proposal went.
public enum ProposalReceipt: Sendable, Hashable {
    /// Appended to the leader's log at these indices in this term.
    case appended(term: Term, firstIndex: LogIndex, lastIndex: LogIndex)
    /// Sent on to the leader; its index is known only when it commits.
    case forwarded(to: NodeID)
}
