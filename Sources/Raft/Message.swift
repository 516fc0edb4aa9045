/// One message between two members. `term` is the sender's term, except for
/// a granted pre-vote, which echoes the term the pre-candidate would use.
public struct Message: Sendable, Hashable {
    public var from: NodeID
    public var to: NodeID
    public var term: Term
    public var body: MessageBody

    public init(from: NodeID, to: NodeID, term: Term, body: MessageBody) {
        self.from = from
        self.to = to
        self.term = term
        self.body = body
    }

    /// Approximate encoded size, for flow control and tests.
    public var byteCount: Int {
        switch body {
        case .appendEntries(let append): return 48 + append.entries.reduce(0) { $0 + $1.byteCount }
        case .installSnapshot(let snapshot): return 64 + snapshot.data.count
        case .snapshotChunk(let chunk): return 96 + chunk.bytes.count
        case .forwardedProposal(let payloads): return 32 + payloads.reduce(0) { $0 + $1.byteCount }
        default: return 48
        }
    }

    /// Whether this message carries entries whose payloads the core
    /// released from memory (`RaftNode.releasePayloads`).
    public var carriesReleasedEntries: Bool {
        guard case .appendEntries(let append) = body else { return false }
        return append.entries.contains { $0.payload.isReleased }
    }

    /// This message with its released entries filled by `read` (which
    /// reads them back from stable storage, see `Entry.fillReleased`).
    public func fillingReleased(_ read: (inout [Entry]) throws -> Void) rethrows -> Message {
        guard case .appendEntries(var append) = body, carriesReleasedEntries else { return self }
        try read(&append.entries)
        var filled = self
        filled.body = .appendEntries(append)
        return filled
    }
}

public enum MessageBody: Sendable, Hashable {
    case appendEntries(AppendEntries)
    case appendEntriesResponse(AppendEntriesResponse)
    case requestVote(RequestVote)
    case requestVoteResponse(RequestVoteResponse)
    case heartbeat(Heartbeat)
    case heartbeatResponse(HeartbeatResponse)
    case installSnapshot(Snapshot)
    /// Tells the transfer target to start an election at once.
    case timeoutNow
    /// A follower's proposals, sent on to the leader.
    case forwardedProposal([EntryPayload])
    /// A follower asks the leader to confirm a read index for it.
    case readIndexRequest(requestID: UInt64)
    case readIndexResponse(requestID: UInt64, index: LogIndex)
    /// The leader will not serve this forwarded read (too many pending).
    case readIndexRefused(requestID: UInt64)
    /// A piece of a snapshot sent as a stream (a node's ledger snapshot,
    /// which has no size bound). Drivers exchange these; the core ignores
    /// them and is handed the whole snapshot once it has arrived.
    case snapshotChunk(SnapshotChunk)
    /// The follower holds the first `received` bytes of the stream of the
    /// snapshot at `index` (taken in `snapshotTerm`).
    case snapshotChunkAck(index: LogIndex, snapshotTerm: Term, received: UInt64)

    /// Messages a leader sends in its own (already durable) term; a driver
    /// may send these before persisting the Ready that carries them.
    var isLeaderOutbound: Bool {
        switch self {
        case .appendEntries, .heartbeat, .installSnapshot, .timeoutNow, .readIndexResponse, .readIndexRefused: return true
        default: return false
        }
    }
}

/// `bytes` of a snapshot's stream from `offset`. Every piece names the
/// snapshot, the stream's length and its CRC-32C, so a follower can start
/// over at any piece at offset 0 and check the whole when it ends.
public struct SnapshotChunk: Sendable, Hashable {
    public var metadata: SnapshotMetadata
    public var totalBytes: UInt64
    public var checksum: UInt32
    public var offset: UInt64
    public var bytes: [UInt8]

    public init(metadata: SnapshotMetadata, totalBytes: UInt64, checksum: UInt32, offset: UInt64, bytes: [UInt8]) {
        self.metadata = metadata
        self.totalBytes = totalBytes
        self.checksum = checksum
        self.offset = offset
        self.bytes = bytes
    }
}

public struct AppendEntries: Sendable, Hashable {
    public var prevLogIndex: LogIndex
    public var prevLogTerm: Term
    public var entries: [Entry]
    public var leaderCommit: LogIndex

    public init(prevLogIndex: LogIndex, prevLogTerm: Term, entries: [Entry], leaderCommit: LogIndex) {
        self.prevLogIndex = prevLogIndex
        self.prevLogTerm = prevLogTerm
        self.entries = entries
        self.leaderCommit = leaderCommit
    }
}

public struct AppendEntriesResponse: Sendable, Hashable {
    /// On success, the highest index known to match the leader's log.
    /// On rejection, the `prevLogIndex` that did not match.
    public var index: LogIndex
    public var rejected: Bool
    /// On rejection, a guess at where the logs agree: the follower's last
    /// index at or below `index` whose term is at most the leader's
    /// `prevLogTerm`, and that term. The leader skips back to it at once.
    public var hintIndex: LogIndex
    public var hintTerm: Term
    /// The follower's commit index after handling the append: the leader
    /// learns who knows what has committed (needed before a removed leader
    /// leaves, and before a new voter is asked to take over).
    public var commitIndex: LogIndex

    public init(index: LogIndex, rejected: Bool, hintIndex: LogIndex, hintTerm: Term, commitIndex: LogIndex = 0) {
        self.index = index
        self.rejected = rejected
        self.hintIndex = hintIndex
        self.hintTerm = hintTerm
        self.commitIndex = commitIndex
    }
}

public struct RequestVote: Sendable, Hashable {
    public var lastLogIndex: LogIndex
    public var lastLogTerm: Term
    public var preVote: Bool
    /// Set when a leader handed over leadership: voters skip the lease check.
    public var leadershipTransfer: Bool

    public init(lastLogIndex: LogIndex, lastLogTerm: Term, preVote: Bool, leadershipTransfer: Bool) {
        self.lastLogIndex = lastLogIndex
        self.lastLogTerm = lastLogTerm
        self.preVote = preVote
        self.leadershipTransfer = leadershipTransfer
    }
}

public struct RequestVoteResponse: Sendable, Hashable {
    public var granted: Bool
    public var preVote: Bool

    public init(granted: Bool, preVote: Bool) {
        self.granted = granted
        self.preVote = preVote
    }
}

public struct Heartbeat: Sendable, Hashable {
    /// min(leader's commit, follower's known match): never past what the
    /// follower's log is known to share with the leader's.
    public var commit: LogIndex
    /// The leader's read round this heartbeat confirms leadership for.
    public var readRound: UInt64

    public init(commit: LogIndex, readRound: UInt64) {
        self.commit = commit
        self.readRound = readRound
    }
}

public struct HeartbeatResponse: Sendable, Hashable {
    public var readRound: UInt64
    /// The follower's commit index after handling the heartbeat.
    public var commitIndex: LogIndex

    public init(readRound: UInt64, commitIndex: LogIndex = 0) {
        self.readRound = readRound
        self.commitIndex = commitIndex
    }
}
