/// Expected failures of the core's public calls, each with a human reason.
/// Broken invariants are preconditions instead, which stay on in release.
public enum RaftError: Error, Sendable, Hashable, CustomStringConvertible {
    /// This node does not lead; `leaderHint` is the leader it knows of, or 0.
    case notLeader(leaderHint: NodeID)
    /// No leader is known, so nothing can be forwarded.
    case noLeader
    /// The leader's uncommitted log already holds `limitBytes`.
    case uncommittedLimitReached(limitBytes: Int)
    /// A leadership transfer is under way; proposals wait until it ends.
    case leadershipTransferInProgress(to: NodeID)
    /// Another membership change has not committed yet, or this leader has
    /// not yet committed an entry of its own term.
    case configChangePending(pendingIndex: LogIndex)
    case invalidConfigChange(String)
    /// A learner's log is too far behind the leader's to promote it.
    case learnerNotCaughtUp(id: NodeID, matchIndex: LogIndex, leaderLastIndex: LogIndex)
    case invalidTransferTarget(String)
    /// Too many read requests wait for the leader's first commit.
    case tooManyPendingReads(limit: Int)
    /// A proposal larger than the maximum message size can never be sent.
    case proposalTooLarge(bytes: Int, limitBytes: Int)
    case invalidCompaction(String)
    /// This node was removed from the group; it hands over and stops leading.
    case removedFromCluster
    case invalidConfiguration(String)

    public var description: String {
        switch self {
        case .notLeader(let hint):
            return hint == noNode ? "this node is not the leader and knows of none" : "this node is not the leader; node \(hint) is"
        case .noLeader: return "no leader is known at the moment; retry after an election"
        case .uncommittedLimitReached(let limit): return "the leader already holds \(limit) uncommitted bytes; retry when replication catches up"
        case .leadershipTransferInProgress(let to): return "leadership is being transferred to node \(to); retry shortly"
        case .configChangePending(let index): return "a membership change (or the leader's first entry) at index \(index) has not committed yet"
        case .invalidConfigChange(let reason): return "invalid membership change: \(reason)"
        case .learnerNotCaughtUp(let id, let match, let last): return "learner \(id) has replicated up to \(match) of \(last); promote it once it has caught up"
        case .invalidTransferTarget(let reason): return "cannot transfer leadership: \(reason)"
        case .tooManyPendingReads(let limit): return "more than \(limit) reads wait for the new leader's first commit"
        case .proposalTooLarge(let bytes, let limit): return "proposal of \(bytes) bytes exceeds the \(limit)-byte message limit"
        case .invalidCompaction(let reason): return "cannot compact the log: \(reason)"
        case .removedFromCluster: return "this node was removed from the cluster; send requests to another member"
        case .invalidConfiguration(let reason): return "invalid Raft configuration: \(reason)"
        }
    }
}
