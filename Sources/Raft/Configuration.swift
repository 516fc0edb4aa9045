/// How a follower treats a proposal made to it.
public enum FollowerProposalPolicy: Sendable, Hashable {
    /// Send it on to the known leader (fire and forget; the caller learns
    /// the outcome when the entry commits, or times out).
    case forwardToLeader
    /// Refuse with `RaftError.notLeader(leaderHint:)`.
    case refuseWithLeaderHint
}

/// Safety bugs that exist only so tests can prove the simulator catches them.
/// Never set outside tests.
package enum PlantedBug: Sendable, Hashable {
    /// Commit an entry of an earlier term by counting replicas (Figure 8).
    case commitPreviousTermEntriesByCounting
    /// Grant votes without checking the candidate's log is up to date.
    case grantVoteWithoutLogCheck
    /// Answer ReadIndex at once, without confirming leadership with a quorum.
    case readIndexWithoutQuorumCheck
    /// Let votes and acknowledgements go out before the state they promise
    /// is durable (the lost-write bug of acknowledging before fsync).
    case acknowledgeBeforePersist
    /// Fill an entry released from memory with the payload of the entry
    /// before it when reading it back for a peer that lags (an off-by-one
    /// in the read-back path). The simulator's driver plants it.
    case fillReleasedFromPreviousEntry
}

/// Everything that shapes one node's core. Times are in ticks; the driver
/// decides how long a tick is. Every limit is named and checked here.
public struct Configuration: Sendable {
    public var id: NodeID
    /// Ticks without hearing from a leader before a follower campaigns; the
    /// actual timeout is drawn from [electionTimeoutTicks, 2 x electionTimeoutTicks).
    public var electionTimeoutTicks: Int = 10
    public var heartbeatIntervalTicks: Int = 1
    /// A follower sent an AppendEntries since the last heartbeat (one
    /// streaming entries, with no read waiting for a round) gets no
    /// heartbeat: the append did what it would (reset its election timer,
    /// carried the commit, asks an answer that counts for check-quorum).
    /// Off: every follower gets one every interval.
    public var heartbeatsOnlyWhenIdle: Bool = true
    public var preVote: Bool = true
    public var checkQuorum: Bool = true
    public var followerProposals: FollowerProposalPolicy = .forwardToLeader
    /// Seed for the election-timeout randomness (mixed with the id). Draw a
    /// fresh one at every start, so a restarted node does not repeat itself.
    public var randomSeed: UInt64

    /// Entry bytes in one AppendEntries (at least one entry is always sent).
    public var messageBytesMax: Int = 1 << 20
    /// AppendEntries in flight to one follower in the replicate state.
    public var inflightMessagesMax: Int = 256
    /// Entry bytes in flight to one follower in the replicate state.
    public var inflightBytesMax: Int = 64 << 20
    /// Bytes of uncommitted entries a leader accepts before refusing proposals.
    public var uncommittedBytesMax: Int = 64 << 20
    /// Entry bytes handed out for applying in one Ready.
    public var committedBytesPerReadyMax: Int = 64 << 20
    /// Reads allowed to wait for a new leader's first commit.
    public var pendingReadsMax: Int = 4096
    /// A learner may be promoted once at most this many entries behind.
    public var promotionLagEntriesMax: LogIndex = 64
    /// A follower stuck this long in the snapshot state is probed again.
    public var snapshotTimeoutTicks: Int = 50

    package var plantedBug: PlantedBug? = nil

    public init(id: NodeID, randomSeed: UInt64) {
        self.id = id
        self.randomSeed = randomSeed
    }

    public func validate() throws(RaftError) {
        guard id != noNode else { throw .invalidConfiguration("node id 0 is reserved") }
        guard heartbeatIntervalTicks >= 1 else { throw .invalidConfiguration("heartbeatIntervalTicks must be at least 1") }
        guard electionTimeoutTicks > heartbeatIntervalTicks else {
            throw .invalidConfiguration("electionTimeoutTicks (\(electionTimeoutTicks)) must exceed heartbeatIntervalTicks (\(heartbeatIntervalTicks))")
        }
        guard messageBytesMax >= 64 else { throw .invalidConfiguration("messageBytesMax must be at least 64") }
        guard inflightMessagesMax >= 1 else { throw .invalidConfiguration("inflightMessagesMax must be at least 1") }
        guard inflightBytesMax >= messageBytesMax else { throw .invalidConfiguration("inflightBytesMax must be at least messageBytesMax") }
        guard uncommittedBytesMax >= messageBytesMax else { throw .invalidConfiguration("uncommittedBytesMax must be at least messageBytesMax") }
        guard committedBytesPerReadyMax >= 1 else { throw .invalidConfiguration("committedBytesPerReadyMax must be positive") }
        guard pendingReadsMax >= 1 else { throw .invalidConfiguration("pendingReadsMax must be at least 1") }
        guard snapshotTimeoutTicks > electionTimeoutTicks else { throw .invalidConfiguration("snapshotTimeoutTicks must exceed electionTimeoutTicks") }
    }
}
