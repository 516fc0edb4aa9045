/// One member's Raft state machine. Synchronous and pure: the driver feeds
/// it ticks, messages and proposals, takes a `Ready`, carries it out and
/// calls `advance()`. It reads no clock and draws randomness only from the
/// seeded generator in its configuration.
public struct RaftNode: Sendable {
    public let configuration: Configuration
    public var id: NodeID { configuration.id }

    public private(set) var term: Term
    public private(set) var votedFor: NodeID
    public private(set) var role: Role = .follower
    /// The leader of the current term, if known.
    public private(set) var leaderID: NodeID = noNode
    /// Membership as of the commit index.
    public private(set) var membership: Membership

    private var log: RaftLog
    /// Memberships committed after the last snapshot, to label new snapshots.
    private var membershipHistory: [(index: LogIndex, membership: Membership)] = []
    private var snapshotMembership: Membership
    /// The newest snapshot, sent to followers whose next entry was compacted.
    private var latestSnapshot: Snapshot?

    private var random: SeededGenerator
    private var electionElapsedTicks = 0
    private var heartbeatElapsedTicks = 0
    private var randomizedElectionTimeoutTicks = 0
    private var ticksTotal = 0

    // Leader state.
    private var progress: [NodeID: Progress] = [:]
    /// Other members, sorted, so iteration order never depends on hashing.
    private var peers: [NodeID] = []
    private var transferTarget: NodeID = noNode
    private var transferElapsedTicks = 0
    /// A new configuration change may be proposed once this index commits.
    private var pendingConfigIndex: LogIndex = 0
    private var uncommittedBytes = 0
    /// Set when this leader's own removal committed: it keeps leading (not
    /// counting itself) until the remaining voters know, then hands over.
    private var selfRemoval: (index: LogIndex, tick: Int)?

    // Candidate state.
    private var votes: [NodeID: Bool] = [:]

    // Linearizable reads.
    private struct PendingRead {
        var origin: NodeID
        var requestID: UInt64
        var index: LogIndex
        /// 0 until the heartbeat round that confirms it is assigned.
        var round: UInt64
    }
    private var readRound: UInt64 = 0
    private var pendingReads: [PendingRead] = []
    private var readsAwaitingFirstCommit: [(origin: NodeID, requestID: UInt64)] = []
    private var readStates: [ReadState] = []
    private var abandonedReads: [UInt64] = []
    /// A follower's reads sent to its leader, abandoned if leader or term change.
    private var forwardedReads: [(requestID: UInt64, leader: NodeID, term: Term)] = []

    // Output and the Ready handshake.
    private var outbox: [Message] = []
    /// New entries or a new commit index to send to every follower at the
    /// next `ready()`: proposals and acknowledgements arriving together
    /// share one AppendEntries per follower.
    private var broadcastPending = false
    private var persistedHardState: HardState
    private var pendingReady: (lastEntry: (index: LogIndex, term: Term)?, appliedThrough: LogIndex?, hardState: HardState?)?

    /// Restores a node from what it had made durable (or a bootstrap/empty
    /// state for a new node).
    public init(configuration: Configuration, durable: DurableState) throws(RaftError) {
        try configuration.validate()
        self.configuration = configuration
        // Mixing in the id keeps nodes given the same seed from timing out in step.
        random = SeededGenerator(seed: configuration.randomSeed ^ (configuration.id &* 0x9E37_79B9_7F4A_7C15))
        term = durable.hardState.term
        votedFor = durable.hardState.votedFor
        persistedHardState = durable.hardState
        log = RaftLog(snapshot: durable.snapshot?.metadata, entries: durable.entries,
                      commitIndex: durable.hardState.commitIndex, appliedIndex: durable.appliedIndex)
        latestSnapshot = durable.snapshot
        snapshotMembership = durable.snapshot?.metadata.membership ?? Membership()
        membership = snapshotMembership
        // Membership follows committed configuration entries.
        if log.commitIndex > log.snapshotIndex {
            for entry in log.entries(from: log.firstIndex, through: log.commitIndex, bytesMax: .max) {
                if case .configChange(let change) = entry.payload {
                    membership = membership.applying(change)
                    membershipHistory.append((entry.index, membership))
                }
            }
        }
        refreshPeers()
        resetElectionTimer()
    }

    // MARK: - Read-only views

    public var commitIndex: LogIndex { log.commitIndex }
    public var appliedIndex: LogIndex { log.appliedIndex }
    public var lastIndex: LogIndex { log.lastIndex }
    public var lastTerm: Term { log.lastTerm }
    public var firstIndex: LogIndex { log.firstIndex }
    public var snapshotIndex: LogIndex { log.snapshotIndex }
    public var stableIndex: LogIndex { log.stableIndex }
    public var hardState: HardState { HardState(term: term, votedFor: votedFor, commitIndex: log.commitIndex) }
    /// True when this node is a voter of its committed membership.
    public var isPromotable: Bool { membership.voters.contains(id) }

    public func term(at index: LogIndex) -> Term? { log.term(at: index) }

    /// Commands up to this index are `.released` (see `releasePayloads`).
    public var payloadsReleasedThrough: LogIndex { log.releasedThrough }

    /// Drops from memory the command bytes of log entries up to `index`
    /// that are already applied and durable, leaving `.released` in their
    /// place: between compactions the log would otherwise hold every
    /// command since the last snapshot. Messages in later Readies may then
    /// carry released entries (to a peer that lags); the driver must fill
    /// them from stable storage before sending. Returns how many were
    /// released.
    @discardableResult
    public mutating func releasePayloads(through index: LogIndex) -> Int {
        log.releasePayloads(through: index)
    }

    /// Entries in [from, through] still in the log (not compacted); some
    /// may be `.released`.
    public func entries(from: LogIndex, through: LogIndex) -> [Entry] {
        Array(log.entries(from: max(from, log.firstIndex), through: min(through, log.lastIndex), bytesMax: .max))
    }

    public var status: Status {
        var followers: [NodeID: FollowerStatus] = [:]
        for (peer, p) in progress {
            let state: FollowerStatus.State
            switch p.state {
            case .probe: state = .probe
            case .replicate: state = .replicate
            case .snapshot: state = .snapshot
            }
            followers[peer] = FollowerStatus(matchIndex: p.matchIndex, nextIndex: p.nextIndex, state: state, isLearner: p.isLearner)
        }
        return Status(id: id, role: role, term: term, votedFor: votedFor, leaderID: leaderID, commitIndex: log.commitIndex,
                      appliedIndex: log.appliedIndex, lastIndex: log.lastIndex, snapshotIndex: log.snapshotIndex,
                      membership: membership, followers: followers, configChangePending: role == .leader && pendingConfigIndex > log.commitIndex)
    }

    // MARK: - Input: time

    /// Advances logical time by one tick.
    public mutating func tick() {
        precondition(pendingReady == nil, "tick between ready() and advance()")
        ticksTotal += 1
        if role == .leader {
            tickLeader()
            maybeHandOverAfterRemoval()
        } else {
            electionElapsedTicks += 1
            if isPromotable && electionElapsedTicks >= randomizedElectionTimeoutTicks {
                startElection(timeoutElection)
            }
        }
        abandonStaleForwardedReads()
    }

    private mutating func tickLeader() {
        heartbeatElapsedTicks += 1
        electionElapsedTicks += 1
        if electionElapsedTicks >= configuration.electionTimeoutTicks {
            electionElapsedTicks = 0
            if configuration.checkQuorum {
                // Section 6.2: a leader that cannot reach a quorum within an
                // election timeout steps down, so it stops serving reads and
                // its clients look elsewhere.
                guard quorumRecentlyActive() else {
                    becomeFollower(term: term, leader: noNode)
                    return
                }
                for peer in peers { progress[peer]?.recentlyActive = false }
            }
        }
        if transferTarget != noNode {
            transferElapsedTicks += 1
            if transferElapsedTicks >= configuration.electionTimeoutTicks { transferTarget = noNode }
        }
        for peer in peers {
            if case .snapshot(_, let sentAt) = progress[peer]?.state, ticksTotal - sentAt >= configuration.snapshotTimeoutTicks {
                progress[peer]!.becomeProbe()
            }
        }
        if heartbeatElapsedTicks >= configuration.heartbeatIntervalTicks {
            heartbeatElapsedTicks = 0
            broadcastHeartbeat(skippingStreamed: configuration.heartbeatsOnlyWhenIdle)
        }
    }

    private func quorumRecentlyActive() -> Bool {
        var active = 0
        for voter in membership.voters where voter == id || progress[voter]?.recentlyActive == true {
            active += 1
        }
        return active >= membership.quorum
    }

    /// Starts an election now (for tests and operators that want a leader
    /// without waiting for a timeout). Ignored on a leader or a non-voter.
    public mutating func campaign() {
        precondition(pendingReady == nil, "campaign between ready() and advance()")
        guard role != .leader else { return }
        startElection(timeoutElection)
        abandonStaleForwardedReads()
    }

    // MARK: - Input: messages

    /// Handles one message from a peer. Messages not addressed to this node
    /// are dropped.
    public mutating func step(_ message: Message) {
        precondition(pendingReady == nil, "step between ready() and advance()")
        guard message.to == id, message.from != id, message.from != noNode else { return }
        handle(message)
        abandonStaleForwardedReads()
    }

    private mutating func handle(_ message: Message) {
        // A snapshot's stream is the drivers' business, terms included: the
        // core is handed the snapshot once it has arrived whole.
        switch message.body {
        case .snapshotChunk, .snapshotChunkAck: return
        default: break
        }
        if message.term > term {
            switch message.body {
            case .requestVote(let request):
                // With CheckQuorum, a node that heard from a live leader within
                // the election timeout ignores (pre-)votes: a rejoining node
                // cannot depose a healthy leader (section 4.2.3).
                let inLease = configuration.checkQuorum && leaderID != noNode
                    && electionElapsedTicks < configuration.electionTimeoutTicks
                if inLease && !request.leadershipTransfer { return }
                if !request.preVote { becomeFollower(term: message.term, leader: noNode) }
            case .requestVoteResponse(let response) where response.preVote && response.granted:
                break // echoes the term we would campaign in; not a newer term
            case .appendEntries, .heartbeat, .installSnapshot:
                becomeFollower(term: message.term, leader: message.from)
            default:
                becomeFollower(term: message.term, leader: noNode)
            }
        } else if message.term < term {
            switch message.body {
            case .appendEntries, .heartbeat:
                // A deposed leader: our higher term makes it step down.
                send(to: message.from, .appendEntriesResponse(AppendEntriesResponse(index: 0, rejected: true, hintIndex: 0, hintTerm: 0, commitIndex: log.commitIndex)))
            case .requestVote(let request):
                send(to: message.from, .requestVoteResponse(RequestVoteResponse(granted: false, preVote: request.preVote)))
            default:
                break
            }
            return
        }

        switch message.body {
        case .requestVote(let request):
            handleVoteRequest(from: message.from, term: message.term, request)
        case .requestVoteResponse(let response):
            handleVoteResponse(from: message.from, response)
        case .appendEntries(let append):
            guard acceptLeader(message.from) else { return }
            handleAppendEntries(from: message.from, append)
        case .heartbeat(let heartbeat):
            guard acceptLeader(message.from) else { return }
            handleHeartbeat(from: message.from, heartbeat)
        case .installSnapshot(let snapshot):
            guard acceptLeader(message.from) else { return }
            handleSnapshot(from: message.from, snapshot)
        case .appendEntriesResponse(let response):
            guard role == .leader else { return }
            handleAppendResponse(from: message.from, response)
        case .heartbeatResponse(let response):
            guard role == .leader else { return }
            handleHeartbeatResponse(from: message.from, response)
        case .timeoutNow:
            // Leadership transfer: campaign at once, skipping pre-vote.
            guard role != .leader, isPromotable else { return }
            startElection(.transfer)
        case .forwardedProposal(let payloads):
            guard role == .leader else { return }
            // Only plain commands may arrive this way; membership changes go
            // through proposeConfigChange on the leader itself.
            let commands = payloads.filter { if case .command = $0 { return true } else { return false } }
            _ = try? appendProposals(commands)
        case .readIndexRequest(let requestID):
            guard role == .leader else { return }
            do {
                try registerRead(origin: message.from, requestID: requestID)
            } catch {
                send(to: message.from, .readIndexRefused(requestID: requestID))
            }
        case .readIndexResponse(let requestID, let index):
            guard let position = forwardedReads.firstIndex(where: { $0.requestID == requestID && $0.leader == message.from }) else { return }
            forwardedReads.remove(at: position)
            readStates.append(ReadState(requestID: requestID, index: index))
        case .readIndexRefused(let requestID):
            guard let position = forwardedReads.firstIndex(where: { $0.requestID == requestID && $0.leader == message.from }) else { return }
            forwardedReads.remove(at: position)
            abandonedReads.append(requestID)
        case .snapshotChunk, .snapshotChunkAck:
            break
        }
    }

    /// A message that only a leader of the current term sends; candidates
    /// and pre-candidates of this term give up their campaign.
    private mutating func acceptLeader(_ from: NodeID) -> Bool {
        if role == .leader {
            // Two leaders in one term would break Election Safety.
            preconditionFailure("node \(id) is leader of term \(term) and got a leader message from \(from)")
        }
        if role != .follower { becomeFollower(term: term, leader: from) }
        leaderID = from
        electionElapsedTicks = 0
        return true
    }

    // MARK: - Elections

    private enum ElectionKind { case preVote, vote, transfer }

    /// An election after a timeout: a pre-vote first when configured.
    private var timeoutElection: ElectionKind { configuration.preVote ? .preVote : .vote }

    private mutating func startElection(_ kind: ElectionKind) {
        guard isPromotable else { return }
        let preVote = kind == .preVote
        let leadershipTransfer = kind == .transfer
        let campaignTerm: Term
        if preVote {
            becomePreCandidate()
            campaignTerm = term + 1
        } else {
            becomeCandidate()
            campaignTerm = term
        }
        votes = [id: true]
        if tallyVotes() { return }
        let request = RequestVote(lastLogIndex: log.lastIndex, lastLogTerm: log.lastTerm, preVote: preVote,
                                  leadershipTransfer: leadershipTransfer)
        for voter in peers where membership.voters.contains(voter) {
            outbox.append(Message(from: id, to: voter, term: campaignTerm, body: .requestVote(request)))
        }
    }

    private mutating func handleVoteRequest(from candidate: NodeID, term requestTerm: Term, _ request: RequestVote) {
        // Figure 2, RequestVote receiver: one vote per term, and only for a
        // log at least as up to date as ours (section 5.4.1).
        let canVote = votedFor == candidate
            || (votedFor == noNode && leaderID == noNode)
            || (request.preVote && requestTerm > term)
        let logOK = log.isUpToDate(lastIndex: request.lastLogIndex, lastTerm: request.lastLogTerm)
            || configuration.plantedBug == .grantVoteWithoutLogCheck
        if canVote && logOK {
            // A granted pre-vote echoes the candidate's term so it can count it.
            outbox.append(Message(from: id, to: candidate, term: requestTerm,
                                  body: .requestVoteResponse(RequestVoteResponse(granted: true, preVote: request.preVote))))
            if !request.preVote {
                votedFor = candidate
                electionElapsedTicks = 0
            }
        } else {
            send(to: candidate, .requestVoteResponse(RequestVoteResponse(granted: false, preVote: request.preVote)))
        }
    }

    private mutating func handleVoteResponse(from voter: NodeID, _ response: RequestVoteResponse) {
        let expectingPreVotes = role == .preCandidate
        guard (role == .candidate && !response.preVote) || (expectingPreVotes && response.preVote) else { return }
        guard membership.voters.contains(voter), votes[voter] == nil else { return }
        votes[voter] = response.granted
        _ = tallyVotes()
    }

    /// Acts on the votes so far; true if the election ended.
    private mutating func tallyVotes() -> Bool {
        var granted = 0
        var rejected = 0
        for (voter, vote) in votes where membership.voters.contains(voter) {
            if vote { granted += 1 } else { rejected += 1 }
        }
        if granted >= membership.quorum {
            if role == .preCandidate {
                startElection(.vote) // the pre-vote passed: now the real election
                return true
            }
            becomeLeader()
            return true
        }
        if rejected > membership.voters.count - membership.quorum {
            becomeFollower(term: term, leader: noNode)
            return true
        }
        return false
    }

    // MARK: - Role changes

    private mutating func resetElectionTimer() {
        electionElapsedTicks = 0
        heartbeatElapsedTicks = 0
        let timeout = configuration.electionTimeoutTicks
        randomizedElectionTimeoutTicks = timeout + random.below(timeout)
    }

    private mutating func leaveLeadership() {
        guard role == .leader else { return }
        // Its own reads are abandoned; a follower's are refused, so that it
        // need not wait for its timeout (a leader stepping down through
        // CheckQuorum keeps its term, and the follower still takes it for
        // the leader).
        for read in pendingReads.map({ (origin: $0.origin, requestID: $0.requestID) }) + readsAwaitingFirstCommit {
            if read.origin == id {
                abandonedReads.append(read.requestID)
            } else {
                send(to: read.origin, .readIndexRefused(requestID: read.requestID))
            }
        }
        pendingReads.removeAll()
        readsAwaitingFirstCommit.removeAll()
        progress.removeAll()
        transferTarget = noNode
        uncommittedBytes = 0
        selfRemoval = nil
    }

    private mutating func becomeFollower(term newTerm: Term, leader: NodeID) {
        precondition(newTerm >= term, "terms never go back")
        leaveLeadership()
        if newTerm > term {
            term = newTerm
            votedFor = noNode
        }
        role = .follower
        leaderID = leader
        votes.removeAll()
        resetElectionTimer()
    }

    private mutating func becomePreCandidate() {
        precondition(role != .leader)
        // The term and vote stay as they are: a pre-vote changes nothing durable.
        role = .preCandidate
        leaderID = noNode
        resetElectionTimer()
    }

    private mutating func becomeCandidate() {
        precondition(role != .leader)
        term += 1
        votedFor = id
        role = .candidate
        leaderID = noNode
        resetElectionTimer()
    }

    private mutating func becomeLeader() {
        precondition(role == .candidate, "only a candidate becomes leader")
        role = .leader
        leaderID = id
        votes.removeAll()
        resetElectionTimer()
        progress.removeAll()
        for peer in peers {
            var p = Progress(nextIndex: log.lastIndex + 1, isLearner: !membership.voters.contains(peer),
                             inflightMessagesMax: configuration.inflightMessagesMax, inflightBytesMax: configuration.inflightBytesMax)
            p.recentlyActive = true
            progress[peer] = p
        }
        readRound = 0
        uncommittedBytes = 0
        // Section 8: a new leader appends a no-op of its own term; it
        // commits earlier entries and gates ReadIndex and membership changes.
        log.append(CollectionOfOne(Entry(term: term, index: log.lastIndex + 1, payload: .noop)))
        pendingConfigIndex = log.lastIndex
        broadcastAppend()
    }

    private mutating func refreshPeers() {
        peers = membership.members.filter { $0 != id }.sorted()
    }

    // MARK: - Replication: follower side

    private mutating func handleAppendEntries(from leader: NodeID, _ append: AppendEntries) {
        if append.prevLogIndex < log.commitIndex {
            // Everything up to our commit index already matches the leader's log.
            send(to: leader, .appendEntriesResponse(AppendEntriesResponse(index: log.commitIndex, rejected: false, hintIndex: 0, hintTerm: 0, commitIndex: log.commitIndex)))
            return
        }
        // Figure 2, AppendEntries receiver steps 2-5.
        if log.matches(index: append.prevLogIndex, term: append.prevLogTerm) {
            let lastNew = log.appendMatching(afterIndex: append.prevLogIndex, append.entries)
            commit(to: min(append.leaderCommit, lastNew))
            send(to: leader, .appendEntriesResponse(AppendEntriesResponse(index: lastNew, rejected: false, hintIndex: 0, hintTerm: 0, commitIndex: log.commitIndex)))
        } else {
            let hintIndex = log.lastIndexAtOrBelow(min(append.prevLogIndex, log.lastIndex), withTermAtMost: append.prevLogTerm)
            let hintTerm = log.term(at: hintIndex) ?? 0
            send(to: leader, .appendEntriesResponse(AppendEntriesResponse(index: append.prevLogIndex, rejected: true,
                                                                          hintIndex: hintIndex, hintTerm: hintTerm, commitIndex: log.commitIndex)))
        }
    }

    private mutating func handleHeartbeat(from leader: NodeID, _ heartbeat: Heartbeat) {
        commit(to: min(heartbeat.commit, log.lastIndex))
        send(to: leader, .heartbeatResponse(HeartbeatResponse(readRound: heartbeat.readRound, commitIndex: log.commitIndex)))
    }

    private mutating func handleSnapshot(from leader: NodeID, _ snapshot: Snapshot) {
        let metadata = snapshot.metadata
        if metadata.index <= log.commitIndex {
            send(to: leader, .appendEntriesResponse(AppendEntriesResponse(index: log.commitIndex, rejected: false, hintIndex: 0, hintTerm: 0, commitIndex: log.commitIndex)))
            return
        }
        if log.matches(index: metadata.index, term: metadata.term) {
            // We already hold the entries it covers: just commit them.
            commit(to: metadata.index)
        } else {
            log.restore(snapshot)
            latestSnapshot = snapshot
            snapshotMembership = metadata.membership
            membership = metadata.membership
            membershipHistory.removeAll()
            refreshPeers()
        }
        send(to: leader, .appendEntriesResponse(AppendEntriesResponse(index: metadata.index, rejected: false, hintIndex: 0, hintTerm: 0, commitIndex: log.commitIndex)))
    }

    // MARK: - Replication: leader side

    private mutating func handleAppendResponse(from peer: NodeID, _ response: AppendEntriesResponse) {
        guard progress[peer] != nil else { return }
        progress[peer]!.recentlyActive = true
        progress[peer]!.commitKnown = max(progress[peer]!.commitKnown, response.commitIndex)
        defer { maybeHandOverAfterRemoval() }
        if response.rejected {
            let hintNext = log.lastIndexAtOrBelow(response.hintIndex, withTermAtMost: response.hintTerm) + 1
            if progress[peer]!.rejected(at: response.index, hintNext: hintNext) {
                sendAppends(to: peer)
            }
            return
        }
        guard progress[peer]!.acknowledge(through: response.index) else {
            // A repeated answer to a probe still proves where the logs agree.
            if progress[peer]!.state == .probe && response.index == progress[peer]!.matchIndex {
                progress[peer]!.becomeReplicate()
                sendAppends(to: peer)
            }
            return
        }
        switch progress[peer]!.state {
        case .probe:
            progress[peer]!.becomeReplicate()
        case .snapshot(let index, _):
            if progress[peer]!.matchIndex >= index { progress[peer]!.becomeReplicate() }
        case .replicate:
            progress[peer]!.inflight.free(through: response.index)
        }
        if maybeCommit() {
            broadcastPending = true // once per Ready, however many answers advanced it
        } else {
            sendAppends(to: peer)
        }
        maybeSendTimeoutNow(to: peer)
    }

    /// The transfer target may take over once it holds the whole log and
    /// knows it is a voter (a just-promoted learner learns that on commit).
    private mutating func maybeSendTimeoutNow(to peer: NodeID) {
        guard role == .leader, peer == transferTarget, let p = progress[peer], p.matchIndex == log.lastIndex else { return }
        let latestMembershipIndex = membershipHistory.last?.index ?? log.snapshotIndex
        guard p.commitKnown >= latestMembershipIndex else { return }
        send(to: peer, .timeoutNow)
    }

    /// A leader whose removal committed waits until every remaining voter
    /// has reported a commit index covering the removal (or an election
    /// timeout passed), hands leadership to the best-placed voter and
    /// steps down. Leaving at once could strand voters that never heard the
    /// change had committed, still counting the old, larger quorum.
    private mutating func maybeHandOverAfterRemoval() {
        guard role == .leader, let removal = selfRemoval else { return }
        let voters = membership.voters.sorted()
        let everyoneKnows = voters.allSatisfy { (progress[$0]?.commitKnown ?? 0) >= removal.index }
        guard everyoneKnows || ticksTotal - removal.tick >= configuration.electionTimeoutTicks else { return }
        let successor = voters.max { a, b in
            let pa = progress[a], pb = progress[b]
            let ka = (pa?.commitKnown ?? 0) >= removal.index, kb = (pb?.commitKnown ?? 0) >= removal.index
            if ka != kb { return !ka }
            return (pa?.matchIndex ?? 0, a) < (pb?.matchIndex ?? 0, b)
        }
        if let successor { send(to: successor, .timeoutNow) }
        becomeFollower(term: term, leader: noNode)
    }

    private mutating func handleHeartbeatResponse(from peer: NodeID, _ response: HeartbeatResponse) {
        guard progress[peer] != nil else { return }
        progress[peer]!.recentlyActive = true
        progress[peer]!.commitKnown = max(progress[peer]!.commitKnown, response.commitIndex)
        defer { maybeHandOverAfterRemoval() }
        maybeSendTimeoutNow(to: peer)
        if progress[peer]!.state == .probe { progress[peer]!.probeSent = false }
        if progress[peer]!.matchIndex < log.lastIndex {
            if progress[peer]!.state == .replicate && progress[peer]!.inflight.isFull {
                // Appends may have been lost: ask, without sending entries again.
                sendWindowCheck(to: peer)
            } else {
                _ = sendAppend(to: peer, allowEmpty: true)
            }
        }
        if response.readRound > progress[peer]!.readRoundAcknowledged {
            progress[peer]!.readRoundAcknowledged = response.readRound
            releaseConfirmedReads()
        }
    }

    /// Sends entries to one follower while its window allows (pipelining).
    private mutating func sendAppends(to peer: NodeID) {
        var budget = configuration.inflightMessagesMax + 1
        while budget > 0, sendAppend(to: peer, allowEmpty: false) {
            budget -= 1
            if progress[peer]?.state != .replicate { break }
        }
    }

    /// Sends one AppendEntries (or a snapshot when the entries it needs were
    /// compacted). Returns whether a message carrying entries went out.
    @discardableResult
    private mutating func sendAppend(to peer: NodeID, allowEmpty: Bool) -> Bool {
        guard let p = progress[peer], !p.isPaused else { return false }
        let prevIndex = p.nextIndex - 1
        guard let prevTerm = log.term(at: prevIndex) else {
            sendSnapshot(to: peer)
            return false
        }
        // A probe carries at most one entry: it is sent again on every
        // heartbeat answer until one comes back, so a follower far behind
        // would otherwise get the same full message every heartbeat (a
        // flood a slow follower never worked through). Once the logs agree,
        // full messages stream within the window.
        let through = p.state == .probe ? min(p.nextIndex, log.lastIndex) : log.lastIndex
        let slice = log.entries(from: p.nextIndex, through: through, bytesMax: configuration.messageBytesMax)
        if slice.isEmpty && !allowEmpty { return false }
        var bytes = 0
        for entry in slice { bytes += entry.byteCount }
        let append = AppendEntries(prevLogIndex: prevIndex, prevLogTerm: prevTerm, entries: Array(slice), leaderCommit: log.commitIndex)
        outbox.append(Message(from: id, to: peer, term: term, body: .appendEntries(append)))
        progress[peer]!.sent(lastIndex: prevIndex + LogIndex(slice.count), bytes: bytes, entryCount: slice.count)
        progress[peer]!.appendedSinceHeartbeat = true
        return !slice.isEmpty
    }

    /// The window to `peer` is full and a heartbeat answer came back: an
    /// AppendEntries without entries, after the last one sent. Appends
    /// travel on one ordered link, so it arrives behind the entries in
    /// flight: the follower acknowledges it once they are all in (which
    /// frees the window), or rejects it if one was lost (which starts
    /// probing). Nothing is sent twice while the follower is merely slow.
    /// If the entry before them was compacted meanwhile, the follower is
    /// probed again (and sent a snapshot if it needs one).
    private mutating func sendWindowCheck(to peer: NodeID) {
        guard let p = progress[peer] else { return }
        guard let prevTerm = log.term(at: p.nextIndex - 1) else {
            progress[peer]!.becomeProbe()
            _ = sendAppend(to: peer, allowEmpty: true)
            return
        }
        let append = AppendEntries(prevLogIndex: p.nextIndex - 1, prevLogTerm: prevTerm, entries: [], leaderCommit: log.commitIndex)
        outbox.append(Message(from: id, to: peer, term: term, body: .appendEntries(append)))
    }

    private mutating func sendSnapshot(to peer: NodeID) {
        guard let snapshot = latestSnapshot else {
            preconditionFailure("entries below \(log.firstIndex) were compacted but no snapshot is held")
        }
        outbox.append(Message(from: id, to: peer, term: term, body: .installSnapshot(snapshot)))
        progress[peer]!.becomeSnapshot(index: snapshot.metadata.index, tick: ticksTotal)
    }

    private mutating func broadcastAppend() {
        for peer in peers {
            if !sendAppend(to: peer, allowEmpty: true) { continue }
            sendAppends(to: peer)
        }
    }

    /// A heartbeat to every follower; with `skippingStreamed`, not to one in
    /// the replicate state sent an AppendEntries since the last interval,
    /// unless reads wait (their rounds are confirmed by heartbeat answers).
    private mutating func broadcastHeartbeat(skippingStreamed: Bool = false) {
        for peer in peers {
            guard let p = progress[peer] else { continue }
            progress[peer]!.appendedSinceHeartbeat = false
            if skippingStreamed, p.appendedSinceHeartbeat, p.state == .replicate, pendingReads.isEmpty { continue }
            let heartbeat = Heartbeat(commit: min(p.matchIndex, log.commitIndex), readRound: readRound)
            outbox.append(Message(from: id, to: peer, term: term, body: .heartbeat(heartbeat)))
        }
    }

    /// Figure 2, leaders: the highest index stored on a quorum whose entry
    /// is of the current term becomes committed (section 5.4.2: never count
    /// replicas for an earlier term's entry). True if the commit advanced.
    private mutating func maybeCommit() -> Bool {
        let firstCommitOfTerm = log.term(at: log.commitIndex) != term
        var advanced = false
        // Loops only when a committed membership change moved the quorum.
        while role == .leader {
            var matches: [LogIndex] = []
            matches.reserveCapacity(membership.voters.count)
            for voter in membership.voters {
                matches.append(voter == id ? log.stableIndex : (progress[voter]?.matchIndex ?? 0))
            }
            guard !matches.isEmpty else { break }
            matches.sort(by: >)
            let candidate = matches[membership.quorum - 1]
            guard candidate > log.commitIndex else { break }
            guard log.term(at: candidate) == term || configuration.plantedBug == .commitPreviousTermEntriesByCounting else { break }
            commit(to: candidate)
            advanced = true
        }
        if advanced && firstCommitOfTerm && role == .leader && log.term(at: log.commitIndex) == term {
            let waiting = readsAwaitingFirstCommit
            readsAwaitingFirstCommit.removeAll()
            for read in waiting { try? registerRead(origin: read.origin, requestID: read.requestID) }
        }
        return advanced
    }

    /// Advances the commit index and applies membership changes it covers.
    private mutating func commit(to index: LogIndex) {
        guard index > log.commitIndex else { return }
        let previous = log.commitIndex
        log.commit(to: index)
        var changes: [(LogIndex, ConfigChange)] = []
        var committedBytes = 0
        for entry in log.entries(from: previous + 1, through: index, bytesMax: .max) {
            committedBytes += entry.payload.byteCount
            if case .configChange(let change) = entry.payload { changes.append((entry.index, change)) }
        }
        if role == .leader { uncommittedBytes = max(0, uncommittedBytes - committedBytes) }
        for (entryIndex, change) in changes { applyMembership(change, at: entryIndex) }
    }

    private mutating func applyMembership(_ change: ConfigChange, at index: LogIndex) {
        guard index > (membershipHistory.last?.index ?? log.snapshotIndex) else { return }
        membership = membership.applying(change)
        membershipHistory.append((index, membership))
        refreshPeers()
        guard role == .leader else { return }
        for peer in peers where progress[peer] == nil {
            progress[peer] = Progress(nextIndex: log.lastIndex + 1, isLearner: true,
                                      inflightMessagesMax: configuration.inflightMessagesMax, inflightBytesMax: configuration.inflightBytesMax)
            progress[peer]!.recentlyActive = true
        }
        for peer in Array(progress.keys) where !membership.contains(peer) { progress[peer] = nil }
        for peer in peers { progress[peer]!.isLearner = !membership.voters.contains(peer) }
        if transferTarget != noNode && !membership.voters.contains(transferTarget) { transferTarget = noNode }
        if !membership.voters.contains(id) && selfRemoval == nil {
            // This leader was removed: it stops counting itself at once and
            // hands over once the others know (maybeHandOverAfterRemoval).
            selfRemoval = (index, ticksTotal)
            broadcastAppend()
        }
        // A smaller quorum may already have confirmed waiting reads.
        releaseConfirmedReads()
    }

    // MARK: - Proposals

    /// Proposes one command. On the leader it is appended; on a follower it
    /// is forwarded or refused, as `configuration.followerProposals` says.
    @discardableResult
    public mutating func propose(_ command: [UInt8]) throws(RaftError) -> ProposalReceipt {
        try propose(batch: [command])
    }

    /// Proposes many commands at once: one append, one broadcast.
    @discardableResult
    public mutating func propose(batch commands: [[UInt8]]) throws(RaftError) -> ProposalReceipt {
        precondition(pendingReady == nil, "propose between ready() and advance()")
        return try appendProposals(commands.map { .command($0) })
    }

    private mutating func appendProposals(_ payloads: [EntryPayload]) throws(RaftError) -> ProposalReceipt {
        guard role == .leader else {
            guard leaderID != noNode else { throw .noLeader }
            if configuration.followerProposals == .refuseWithLeaderHint { throw .notLeader(leaderHint: leaderID) }
            send(to: leaderID, .forwardedProposal(payloads))
            return .forwarded(to: leaderID)
        }
        guard transferTarget == noNode else { throw .leadershipTransferInProgress(to: transferTarget) }
        guard selfRemoval == nil else { throw .removedFromCluster }
        var bytes = 0
        for payload in payloads {
            let size = payload.byteCount + Entry.overheadBytes
            guard size <= configuration.messageBytesMax else {
                throw .proposalTooLarge(bytes: size, limitBytes: configuration.messageBytesMax)
            }
            bytes += payload.byteCount
        }
        guard uncommittedBytes == 0 || uncommittedBytes + bytes <= configuration.uncommittedBytesMax else {
            throw .uncommittedLimitReached(limitBytes: configuration.uncommittedBytesMax)
        }
        let first = log.lastIndex + 1
        var index = first
        var newEntries: [Entry] = []
        newEntries.reserveCapacity(payloads.count)
        for payload in payloads {
            newEntries.append(Entry(term: term, index: index, payload: payload))
            index += 1
        }
        log.append(newEntries)
        uncommittedBytes += bytes
        // Sent when the driver next takes a Ready: every proposal made
        // until then travels in the same AppendEntries.
        broadcastPending = true
        return .appended(term: term, firstIndex: first, lastIndex: log.lastIndex)
    }

    /// Proposes a single-server membership change. Only a leader that has
    /// committed an entry of its own term and has no other change pending
    /// may do so (the fix for the single-server change bug).
    @discardableResult
    public mutating func proposeConfigChange(_ change: ConfigChange) throws(RaftError) -> ProposalReceipt {
        precondition(pendingReady == nil, "proposeConfigChange between ready() and advance()")
        guard role == .leader else { throw .notLeader(leaderHint: leaderID) }
        guard log.commitIndex >= pendingConfigIndex else { throw .configChangePending(pendingIndex: pendingConfigIndex) }
        if case .bootstrap = change { throw .invalidConfigChange("bootstrap is only written when a cluster is created") }
        try membership.validate(change)
        if case .promoteLearner(let learner) = change {
            // It must have answered (a silent learner never counts as caught
            // up, however short the log) and be within the allowed lag.
            let match = progress[learner]?.matchIndex ?? 0
            let answered = match > 0 && progress[learner]?.recentlyActive == true
            guard answered && match + configuration.promotionLagEntriesMax >= log.lastIndex else {
                throw .learnerNotCaughtUp(id: learner, matchIndex: match, leaderLastIndex: log.lastIndex)
            }
        }
        guard transferTarget == noNode else { throw .leadershipTransferInProgress(to: transferTarget) }
        let receipt = try appendProposals([.configChange(change)])
        pendingConfigIndex = log.lastIndex
        return receipt
    }

    // MARK: - Linearizable reads (section 6.4, ReadIndex)

    /// Asks for a read index. The answer arrives as a `ReadState` in a later
    /// Ready once a quorum has confirmed this leadership (or the leader has,
    /// for a follower). A deposed or partitioned leader never answers.
    public mutating func readIndex(requestID: UInt64) throws(RaftError) {
        precondition(pendingReady == nil, "readIndex between ready() and advance()")
        if role == .leader {
            try registerRead(origin: id, requestID: requestID)
        } else {
            guard leaderID != noNode else { throw .noLeader }
            guard forwardedReads.count < configuration.pendingReadsMax else {
                throw .tooManyPendingReads(limit: configuration.pendingReadsMax)
            }
            send(to: leaderID, .readIndexRequest(requestID: requestID))
            forwardedReads.append((requestID, leaderID, term))
        }
    }

    /// Forwarded reads whose leader or term is no longer current will never
    /// be answered: report them abandoned so their callers fail fast.
    private mutating func abandonStaleForwardedReads() {
        guard !forwardedReads.isEmpty else { return }
        let current = (leader: role == .leader ? noNode : leaderID, term: term)
        var kept: [(requestID: UInt64, leader: NodeID, term: Term)] = []
        for read in forwardedReads {
            if read.leader == current.leader && read.term == current.term {
                kept.append(read)
            } else {
                abandonedReads.append(read.requestID)
            }
        }
        forwardedReads = kept
    }

    private mutating func registerRead(origin: NodeID, requestID: UInt64) throws(RaftError) {
        guard log.term(at: log.commitIndex) == term else {
            // The read index must cover every entry committed by earlier
            // leaders, which is known only once our no-op commits.
            guard readsAwaitingFirstCommit.count < configuration.pendingReadsMax else {
                throw .tooManyPendingReads(limit: configuration.pendingReadsMax)
            }
            readsAwaitingFirstCommit.append((origin, requestID))
            return
        }
        let read = PendingRead(origin: origin, requestID: requestID, index: log.commitIndex, round: 0)
        if configuration.plantedBug == .readIndexWithoutQuorumCheck {
            release(read)
            return
        }
        guard pendingReads.count < configuration.pendingReadsMax else {
            throw .tooManyPendingReads(limit: configuration.pendingReadsMax)
        }
        pendingReads.append(read)
        // A lone voter is its own quorum: answer now (after any older reads).
        if membership.voters == [id] { releaseConfirmedReads() }
    }

    /// Gives every read registered since the last round a new round and
    /// sends the heartbeats that confirm it: one round per Ready, however
    /// many reads arrived.
    private mutating func startReadRoundIfNeeded() {
        guard role == .leader, let last = pendingReads.last, last.round == 0 else { return }
        readRound += 1
        for index in pendingReads.indices.reversed() {
            guard pendingReads[index].round == 0 else { break }
            pendingReads[index].round = readRound
        }
        broadcastHeartbeat()
    }

    private mutating func releaseConfirmedReads() {
        guard role == .leader, !pendingReads.isEmpty, !membership.voters.isEmpty else { return }
        var rounds: [UInt64] = []
        for voter in membership.voters {
            rounds.append(voter == id ? .max : (progress[voter]?.readRoundAcknowledged ?? 0))
        }
        rounds.sort(by: >)
        // .max means this leader alone is a quorum: every read is confirmed,
        // even one whose round was not assigned yet.
        let confirmed = rounds[membership.quorum - 1]
        var released = 0
        for read in pendingReads {
            guard confirmed == .max || (read.round != 0 && read.round <= confirmed) else { break }
            release(read)
            released += 1
        }
        pendingReads.removeFirst(released)
    }

    private mutating func release(_ read: PendingRead) {
        if read.origin == id {
            readStates.append(ReadState(requestID: read.requestID, index: read.index))
        } else {
            send(to: read.origin, .readIndexResponse(requestID: read.requestID, index: read.index))
        }
    }

    // MARK: - Leadership transfer (section 3.10)

    /// Hands leadership to `target`: it is brought up to date, then told to
    /// campaign at once. Proposals are refused meanwhile; the transfer is
    /// abandoned after an election timeout.
    public mutating func transferLeadership(to target: NodeID) throws(RaftError) {
        precondition(pendingReady == nil, "transferLeadership between ready() and advance()")
        guard role == .leader else { throw .notLeader(leaderHint: leaderID) }
        guard target != id else { throw .invalidTransferTarget("node \(target) already leads") }
        guard membership.voters.contains(target) else { throw .invalidTransferTarget("node \(target) is not a voter") }
        guard transferTarget != target else { return }
        transferTarget = target
        transferElapsedTicks = 0
        sendAppends(to: target)
        maybeSendTimeoutNow(to: target)
    }

    // MARK: - Snapshots and compaction

    /// Records that the driver captured its state machine at `index` (at or
    /// below the applied index) and drops the log up to it. Returns the
    /// snapshot's metadata, which the driver stores with the data.
    @discardableResult
    public mutating func compactLog(through index: LogIndex, snapshotData: [UInt8]) throws(RaftError) -> SnapshotMetadata {
        precondition(pendingReady == nil, "compactLog between ready() and advance()")
        guard index <= log.appliedIndex else {
            throw .invalidCompaction("index \(index) is past the applied index \(log.appliedIndex)")
        }
        guard index > log.snapshotIndex else {
            throw .invalidCompaction("index \(index) is already covered by the snapshot at \(log.snapshotIndex)")
        }
        let metadata = snapshotMetadata(at: index)!
        let membershipAtIndex = metadata.membership
        log.compact(through: index)
        latestSnapshot = Snapshot(metadata: metadata, data: snapshotData)
        snapshotMembership = membershipAtIndex
        membershipHistory.removeAll { $0.index <= index }
        return metadata
    }

    /// What a snapshot taken at `index` would record (its term and the
    /// membership in force there), for an applied index after the last
    /// snapshot; nil otherwise. Changes nothing.
    public func snapshotMetadata(at index: LogIndex) -> SnapshotMetadata? {
        guard index <= log.appliedIndex, index > log.snapshotIndex, let term = log.term(at: index) else { return nil }
        let membership = membershipHistory.last(where: { $0.index <= index })?.membership ?? snapshotMembership
        return SnapshotMetadata(index: index, term: term, membership: membership)
    }

    /// The driver could not deliver a snapshot to `peer`: probe again.
    public mutating func reportSnapshotFailure(to peer: NodeID) {
        guard role == .leader, case .snapshot = progress[peer]?.state else { return }
        progress[peer]!.becomeProbe()
    }

    /// The driver lost its connection to `peer`: stop streaming optimistically.
    public mutating func reportUnreachable(_ peer: NodeID) {
        guard role == .leader, progress[peer]?.state == .replicate else { return }
        progress[peer]!.becomeProbe()
    }

    // MARK: - Output

    private mutating func send(to peer: NodeID, _ body: MessageBody) {
        outbox.append(Message(from: id, to: peer, term: term, body: body))
    }

    /// True when `ready()` would return something to do.
    public var hasReady: Bool {
        if broadcastPending && role == .leader { return true }
        if !outbox.isEmpty || !readStates.isEmpty || !abandonedReads.isEmpty { return true }
        if hardState != persistedHardState || log.pendingSnapshot != nil || log.stableIndex < log.lastIndex { return true }
        if log.commitIndex > log.appliedIndex { return true }
        if role == .leader, let last = pendingReads.last, last.round == 0 { return true }
        return false
    }

    /// What to persist, send and apply now; see `Ready` for the order.
    public mutating func ready() -> Ready {
        precondition(pendingReady == nil, "ready() called twice without advance()")
        if broadcastPending && role == .leader { broadcastAppend() }
        broadcastPending = false
        startReadRoundIfNeeded()
        let current = hardState
        let changedHardState = current != persistedHardState ? current : nil
        let snapshot = log.takePendingSnapshot()
        let entries = Array(log.unstableEntries)
        let committed = Array(log.entriesToApply(bytesMax: configuration.committedBytesPerReadyMax))
        var now: [Message] = []
        var afterPersist: [Message] = []
        for message in outbox {
            if (message.body.isLeaderOutbound && message.term <= persistedHardState.term)
                || configuration.plantedBug == .acknowledgeBeforePersist {
                now.append(message)
            } else {
                afterPersist.append(message)
            }
        }
        outbox.removeAll(keepingCapacity: true)
        let ready = Ready(role: role, term: term, leaderID: leaderID, hardState: changedHardState, snapshot: snapshot,
                          entries: entries, messagesToSendNow: now, messagesAfterPersist: afterPersist,
                          committedEntries: committed, readStates: readStates, abandonedReads: abandonedReads)
        readStates.removeAll()
        abandonedReads.removeAll()
        pendingReady = (entries.last.map { ($0.index, $0.term) }, committed.last?.index, changedHardState)
        return ready
    }

    /// The driver has carried out the last Ready.
    public mutating func advance() {
        guard let done = pendingReady else { preconditionFailure("advance() without ready()") }
        pendingReady = nil
        if let hardState = done.hardState { persistedHardState = hardState }
        if let last = done.lastEntry, log.matches(index: last.index, term: last.term) {
            log.markStable(through: last.index, term: last.term)
        }
        if let applied = done.appliedThrough { log.markApplied(through: applied) }
        if role == .leader && maybeCommit() {
            broadcastPending = true
        }
    }
}
