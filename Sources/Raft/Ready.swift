/// Everything the core asks its driver to do, taken with `RaftNode.ready()`
/// and acknowledged with `RaftNode.advance()`. No other call may reach the
/// node between the two.
///
/// The persistence contract, in the order a driver must follow:
/// 1. `messagesToSendNow` may be sent at once, even before anything below
///    is durable. They are a leader's replication traffic in a term that is
///    already durable; sending them while the leader writes its own log is
///    the parallel write of section 10.2.1 of the Raft dissertation.
/// 2. Make `snapshot` (if any), then `entries`, then `hardState` durable, in
///    one atomic write (one transaction, one fsync). Before writing
///    `entries`, delete every stored entry whose index is at or above the
///    first new entry's index: a follower may be replacing a conflicting
///    suffix. A snapshot replaces the whole log and state machine.
/// 3. Only then send `messagesAfterPersist`: votes, vote grants and
///    acknowledgements promise that the state above is durable.
/// 4. Apply `committedEntries` in order (they may include entries from
///    step 2), then answer `readStates` once the applied index reaches them;
///    fail the callers of `abandonedReads`. Committed entries that are all
///    durable here already (at or below `stableIndex` when the Ready was
///    taken, as a leader's always are: it counts itself only for what it
///    has written) may be applied before step 2 instead.
/// 5. Call `advance()`.
public struct Ready: Sendable {
    public var role: Role
    public var term: Term
    public var leaderID: NodeID
    /// Non-nil when term, vote or commit changed since the last Ready.
    public var hardState: HardState?
    /// A snapshot received from the leader, to persist and install.
    public var snapshot: Snapshot?
    /// Log entries to append durably (replacing any stored suffix).
    public var entries: [Entry]
    public var messagesToSendNow: [Message]
    public var messagesAfterPersist: [Message]
    public var committedEntries: [Entry]
    public var readStates: [ReadState]
    /// Local reads dropped because this node lost leadership or its leader.
    public var abandonedReads: [UInt64]

    public var isEmpty: Bool {
        hardState == nil && snapshot == nil && entries.isEmpty && messagesToSendNow.isEmpty
            && messagesAfterPersist.isEmpty && committedEntries.isEmpty && readStates.isEmpty && abandonedReads.isEmpty
    }
}

/// A read-only view of a node for operators, tests and the simulator.
public struct Status: Sendable {
    public var id: NodeID
    public var role: Role
    public var term: Term
    public var votedFor: NodeID
    public var leaderID: NodeID
    public var commitIndex: LogIndex
    public var appliedIndex: LogIndex
    public var lastIndex: LogIndex
    public var snapshotIndex: LogIndex
    public var membership: Membership
    /// The leader's view of each follower: match index and replication state.
    public var followers: [NodeID: FollowerStatus]
    /// A leader's membership change is appended but not yet committed
    /// (`membership` does not show it yet).
    public var configChangePending = false
}

public struct FollowerStatus: Sendable, Hashable {
    public enum State: String, Sendable { case probe, replicate, snapshot }
    public var matchIndex: LogIndex
    public var nextIndex: LogIndex
    public var state: State
    public var isLearner: Bool
}
