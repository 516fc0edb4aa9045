import Raft
import RaftSimulator
import Testing

/// One test per rule of Figure 2 of the Raft paper ("In Search of an
/// Understandable Consensus Algorithm", extended version), named after it.
@Suite("Figure 2: the rules of Raft")
struct Figure2Tests {
    // MARK: Rules for all servers

    @Test("If commitIndex > lastApplied: apply log[lastApplied+1], in order")
    func committedEntriesAreAppliedInOrder() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        for text in ["a", "b", "c"] { try net.propose(Array(text.utf8), on: 1) }
        net.tick(2)
        for id: NodeID in [1, 2, 3] {
            #expect(commands(net.cluster.nodes[id]!) == ["a", "b", "c"], "node \(id)")
        }
        #expect(net.cluster.checker.isClean)
    }

    @Test("If an RPC carries term T > currentTerm: set currentTerm = T, convert to follower")
    func higherTermMakesAnyRoleAFollower() throws {
        var node = try makeNode(1)
        node.campaign()
        _ = node.drain()
        #expect(node.role == .candidate)
        #expect(node.term == 2)
        node.step(message(from: 3, to: 1, term: 7, .heartbeat(Heartbeat(commit: 0, readRound: 0))))
        #expect(node.role == .follower)
        #expect(node.term == 7)
        #expect(node.leaderID == 3)
        #expect(node.votedFor == noNode)
        let ready = node.drain()
        #expect(ready.hardState?.term == 7, "the new term is handed out to be persisted")
    }

    // MARK: Followers

    @Test("A follower that hears nothing for an election timeout becomes a candidate")
    func silentFollowerCampaigns() throws {
        var node = try makeNode(1) { $0.electionTimeoutTicks = 10 }
        for _ in 0..<9 { node.tick() }
        #expect(node.role == .follower, "the timeout is at least electionTimeoutTicks")
        for _ in 0..<11 { node.tick() }
        #expect(node.role == .candidate, "and less than twice that")
        #expect(node.term == 2)
    }

    @Test("A follower that keeps hearing from its leader never campaigns")
    func heartbeatsHoldOffElections() throws {
        var node = try makeNode(1) { $0.electionTimeoutTicks = 10 }
        for round in 0..<100 {
            node.tick()
            if round % 5 == 0 {
                node.step(message(from: 2, to: 1, term: 2, .heartbeat(Heartbeat(commit: 1, readRound: 0))))
            }
            _ = node.drain()
        }
        #expect(node.role == .follower)
        #expect(node.term == 2)
        #expect(node.leaderID == 2)
    }

    // MARK: Candidates

    @Test("On becoming a candidate: increment currentTerm, vote for self, send RequestVote to all others")
    func candidateStartsAnElection() throws {
        var node = try makeNode(1)
        node.campaign()
        let ready = node.drain()
        #expect(node.term == 2)
        #expect(node.votedFor == 1)
        #expect(ready.hardState == HardState(term: 2, votedFor: 1, commitIndex: 1))
        let requests = ready.messagesAfterPersist.filter { $0.voteRequest != nil }
        #expect(requests.map(\.to).sorted() == [2, 3])
        #expect(requests.allSatisfy { $0.term == 2 && $0.voteRequest?.preVote == false })
        #expect(ready.messagesToSendNow.isEmpty, "vote requests wait for the term and vote to be durable")
    }

    @Test("If votes are received from a majority: become leader, and append a no-op of the new term")
    func majorityMakesALeader() throws {
        var node = try makeNode(1)
        node.campaign()
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 2, .requestVoteResponse(RequestVoteResponse(granted: true, preVote: false))))
        #expect(node.role == .leader)
        let ready = node.drain()
        #expect(ready.entries.map(\.payload) == [.noop])
        #expect(ready.entries.first?.term == 2)
        #expect(ready.messagesToSendNow.filter { $0.appendRequest != nil }.map(\.to).sorted() == [2, 3])
    }

    @Test("Rejections from a majority end the election as a follower")
    func majorityRejectionEndsTheElection() throws {
        var node = try makeNode(1)
        node.campaign()
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 2, .requestVoteResponse(RequestVoteResponse(granted: false, preVote: false))))
        #expect(node.role == .candidate)
        node.step(message(from: 3, to: 1, term: 2, .requestVoteResponse(RequestVoteResponse(granted: false, preVote: false))))
        #expect(node.role == .follower)
        #expect(node.term == 2)
    }

    @Test("If AppendEntries is received from a new leader: the candidate converts to follower")
    func candidateYieldsToLeaderOfItsTerm() throws {
        var node = try makeNode(1)
        node.campaign()
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 2, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2)], commit: 1)))
        #expect(node.role == .follower)
        #expect(node.leaderID == 2)
        #expect(node.lastIndex == 2)
    }

    @Test("If the election timeout elapses: start a new election in a higher term")
    func splitVoteStartsANewElection() throws {
        var node = try makeNode(1) { $0.electionTimeoutTicks = 10 }
        node.campaign()
        _ = node.drain()
        #expect(node.term == 2)
        for _ in 0..<20 { node.tick() }
        #expect(node.role == .candidate)
        #expect(node.term == 3)
    }

    // MARK: Leaders

    @Test("A leader sends heartbeats each heartbeat interval to prevent election timeouts")
    func leaderSendsHeartbeats() throws {
        var node = try makeNode(1, voters: [1, 2, 3]) { $0.heartbeatIntervalTicks = 2 }
        node.campaign()
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 2, .requestVoteResponse(RequestVoteResponse(granted: true, preVote: false))))
        _ = node.drain()
        node.tick()
        #expect(node.sentMessages().isEmpty)
        node.tick()
        let beats = node.sentMessages().filter { if case .heartbeat = $0.body { return true } else { return false } }
        #expect(beats.map(\.to).sorted() == [2, 3])
    }

    @Test("A follower streaming entries gets no heartbeat for an interval it was sent an append in; an idle one, or any while a read waits, gets one", arguments: [true, false])
    func heartbeatsOnlyToIdleFollowers(onlyWhenIdle: Bool) throws {
        var leader = try makeLeader(acknowledgedBy: [2, 3]) { $0.heartbeatsOnlyWhenIdle = onlyWhenIdle }
        func heartbeatsOfNextTick() -> [NodeID] {
            leader.tick()
            return leader.sentMessages().compactMap { if case .heartbeat = $0.body { return $0.to } else { return nil } }.sorted()
        }
        _ = heartbeatsOfNextTick() // the interval in which the no-op went out
        // An interval with an append to both followers, then one with nothing.
        _ = try leader.propose(Array("a".utf8))
        let appended = leader.sentMessages().compactMap { if case .appendEntries = $0.body { return $0.to } else { return nil } }
        #expect(appended.sorted() == [2, 3])
        #expect(heartbeatsOfNextTick() == (onlyWhenIdle ? [] : [2, 3]), "both were sent the append this interval")
        #expect(heartbeatsOfNextTick() == [2, 3], "nothing was sent to either since")
        // A read waiting for its round (unanswered): heartbeats go to every
        // follower, appends or not.
        try leader.readIndex(requestID: 1)
        _ = leader.sentMessages()
        _ = try leader.propose(Array("b".utf8))
        #expect(leader.sentMessages().filter { if case .appendEntries = $0.body { return true } else { return false } }.count == 2)
        #expect(heartbeatsOfNextTick() == [2, 3])
    }

    @Test("On a command the leader appends to its log and replicates; a follower's rejection moves nextIndex back")
    func leaderBacktracksToWhereLogsAgree() throws {
        // Node 2 holds a long suffix from term 2 that the leader never had.
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions(preVote: false, checkQuorum: false))
        net.elect(2)
        net.isolate(2)
        for i in 0..<6 { _ = try net.cluster.with(2) { raft throws(RaftError) in try raft.propose(Array("stale\(i)".utf8)) } }
        net.deliverAll()
        net.heal()
        net.isolate(2)
        net.elect(1)
        try net.propose(Array("fresh".utf8), on: 1)
        net.heal()
        net.tick(3)
        let leader = net.cluster.raft(1)
        let follower = net.cluster.raft(2)
        #expect(leader.role == .leader)
        #expect(follower.lastIndex == leader.lastIndex)
        #expect(follower.entries(from: 1, through: follower.lastIndex) == leader.entries(from: 1, through: leader.lastIndex))
        #expect(commands(net.cluster.nodes[2]!) == ["fresh"])
        #expect(net.cluster.checker.isClean)
    }

    @Test("If there is an N > commitIndex stored on a majority with log[N].term == currentTerm: commitIndex = N")
    func leaderCommitsWhatAMajorityStores() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3, 4, 5], options: scenarioOptions())
        net.elect(1)
        let before = net.cluster.raft(1).commitIndex
        net.cut(from: 1, to: 4)
        net.cut(from: 1, to: 5)
        try net.propose(Array("majority".utf8), on: 1)
        #expect(net.cluster.raft(1).commitIndex == before + 1, "nodes 1, 2 and 3 are a majority of five")
        net.cut(from: 1, to: 3)
        try net.propose(Array("minority".utf8), on: 1)
        #expect(net.cluster.raft(1).commitIndex == before + 1, "two of five is not a majority")
    }

    // MARK: AppendEntries receiver

    @Test("AppendEntries: reply false if term < currentTerm")
    func appendFromOlderTermIsRefused() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 5, .heartbeat(Heartbeat(commit: 1, readRound: 0))))
        _ = node.drain()
        node.step(message(from: 3, to: 1, term: 4, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 4)], commit: 1)))
        let replies = node.sentMessages()
        #expect(replies.count == 1)
        #expect(replies.first?.term == 5, "the stale leader learns the newer term and steps down")
        #expect(node.lastIndex == 1, "nothing from the stale leader is appended")
        #expect(node.leaderID == 2)
    }

    @Test("AppendEntries: reply false if the log has no entry at prevLogIndex whose term matches prevLogTerm")
    func appendWithMismatchedPrevIsRejected() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 3, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2), entry(3, 2)], commit: 1)))
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 3, append(prevIndex: 3, prevTerm: 3, entries: [entry(4, 3)], commit: 1)))
        let reply = try #require(node.sentMessages().first?.appendResponse)
        #expect(reply.rejected)
        #expect(reply.index == 3)
        #expect(reply.hintIndex == 3, "the follower's last entry with a term at most 3")
        #expect(reply.hintTerm == 2)
        #expect(node.lastIndex == 3)
    }

    @Test("AppendEntries: a conflicting entry is deleted with all that follow; new entries are appended")
    func conflictingSuffixIsReplaced() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 2, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2, "a"), entry(3, 2, "b"), entry(4, 2, "c")], commit: 1)))
        _ = node.drain()
        node.step(message(from: 3, to: 1, term: 3, append(prevIndex: 2, prevTerm: 2, entries: [entry(3, 3, "B")], commit: 1)))
        let ready = node.drain()
        #expect(node.lastIndex == 3)
        #expect(node.entries(from: 2, through: 3) == [entry(2, 2, "a"), entry(3, 3, "B")])
        #expect(ready.entries == [entry(3, 3, "B")], "storage is told to replace from index 3 on")
        let reply = try #require((ready.messagesAfterPersist).first?.appendResponse)
        #expect(!reply.rejected && reply.index == 3)
    }

    @Test("AppendEntries: entries already present are not truncated by a stale, shorter append")
    func staleAppendDoesNotTruncate() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 2, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2, "a"), entry(3, 2, "b")], commit: 1)))
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 2, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2, "a")], commit: 1)))
        _ = node.drain()
        #expect(node.lastIndex == 3)
    }

    @Test("AppendEntries: if leaderCommit > commitIndex, commitIndex = min(leaderCommit, index of last new entry)")
    func commitFollowsTheLeaderUpToTheLastNewEntry() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 2, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2), entry(3, 2)], commit: 9)))
        #expect(node.commitIndex == 3)
        let ready = node.drain()
        #expect(ready.committedEntries.map(\.index) == [1, 2, 3], "committed entries, persisted in the same Ready, may be applied")
    }

    // MARK: RequestVote receiver

    @Test("RequestVote: reply false if term < currentTerm")
    func voteForOlderTermIsRefused() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 5, .heartbeat(Heartbeat(commit: 1, readRound: 0))))
        _ = node.drain()
        node.step(message(from: 3, to: 1, term: 4, .requestVote(RequestVote(lastLogIndex: 9, lastLogTerm: 4, preVote: false, leadershipTransfer: false))))
        let reply = try #require(node.sentMessages().first)
        #expect(reply.voteResponse?.granted == false)
        #expect(reply.term == 5)
    }

    @Test("RequestVote: grant at most one vote per term")
    func oneVotePerTerm() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 2, .requestVote(RequestVote(lastLogIndex: 1, lastLogTerm: 1, preVote: false, leadershipTransfer: false))))
        #expect(node.sentMessages().first?.voteResponse?.granted == true)
        #expect(node.votedFor == 2)
        node.step(message(from: 3, to: 1, term: 2, .requestVote(RequestVote(lastLogIndex: 1, lastLogTerm: 1, preVote: false, leadershipTransfer: false))))
        #expect(node.sentMessages().first?.voteResponse?.granted == false)
        node.step(message(from: 2, to: 1, term: 2, .requestVote(RequestVote(lastLogIndex: 1, lastLogTerm: 1, preVote: false, leadershipTransfer: false))))
        #expect(node.sentMessages().first?.voteResponse?.granted == true, "a repeated request from the same candidate is granted again")
    }

    @Test("RequestVote: grant only if the candidate's log is at least as up to date (section 5.4.1)")
    func votesOnlyForUpToDateLogs() throws {
        var node = try makeNode(1)
        node.step(message(from: 2, to: 1, term: 3, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 3), entry(3, 3)], commit: 1)))
        _ = node.drain()
        // Older last term, even if longer: refused.
        node.step(message(from: 3, to: 1, term: 4, .requestVote(RequestVote(lastLogIndex: 9, lastLogTerm: 2, preVote: false, leadershipTransfer: false))))
        #expect(node.sentMessages().first?.voteResponse?.granted == false)
        // Same last term but shorter: refused.
        node.step(message(from: 3, to: 1, term: 5, .requestVote(RequestVote(lastLogIndex: 2, lastLogTerm: 3, preVote: false, leadershipTransfer: false))))
        #expect(node.sentMessages().first?.voteResponse?.granted == false)
        // Same last term and as long: granted.
        node.step(message(from: 3, to: 1, term: 6, .requestVote(RequestVote(lastLogIndex: 3, lastLogTerm: 3, preVote: false, leadershipTransfer: false))))
        #expect(node.sentMessages().first?.voteResponse?.granted == true)
    }

    // MARK: Persistence contract

    @Test("Acknowledgements are sent only after persisting; a leader's appends may go before its own write")
    func persistenceContractSplitsMessages() throws {
        var follower = try makeNode(2)
        follower.step(message(from: 1, to: 2, term: 2, append(prevIndex: 1, prevTerm: 1, entries: [entry(2, 2)], commit: 1)))
        let followerReady = follower.drain()
        #expect(followerReady.messagesToSendNow.isEmpty)
        #expect(followerReady.messagesAfterPersist.first?.appendResponse != nil)
        #expect(followerReady.entries == [entry(2, 2)])

        // Node 2 acknowledged the no-op: the leader streams to it from now on.
        var leader = try makeLeader(1, acknowledgedBy: [2])
        try leader.propose(Array("x".utf8))
        let leaderReady = leader.drain()
        #expect(leaderReady.entries.count == 1, "the leader still persists its own entry")
        #expect(leaderReady.messagesToSendNow.contains { $0.appendRequest?.entries.count == 1 }, "but may replicate it in parallel")
    }

    @Test("A leader counts its own entry only once it is durable")
    func leaderCountsItselfAfterPersisting() throws {
        var leader = try makeNode(1, voters: [1])
        leader.campaign()
        #expect(leader.role == .leader)
        #expect(leader.commitIndex == 1, "the no-op is not durable yet")
        let ready = leader.ready()
        #expect(ready.committedEntries.map(\.index) == [1])
        leader.advance()
        #expect(leader.commitIndex == 2, "durable now: a quorum of one")
    }
}
