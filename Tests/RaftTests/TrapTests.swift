@testable import Raft
import RaftSimulator
import Testing

/// The known ways Raft implementations have gone wrong, each as a scenario.
@Suite("Known traps")
struct TrapTests {
    /// Builds Figure 8 of the paper on five nodes: an entry of term 2 ends
    /// up on a majority while a leader of term 4 leads, and node 5, holding
    /// a conflicting entry of term 3, can still win. Returns the network and
    /// the index of the contested entry.
    /// Long enough that it and a no-op never share one 64-byte message.
    static let contestedCommand = "X, the contested entry of term 2"

    private func figure8(_ bug: PlantedBug?) throws -> (ScenarioNetwork, LogIndex) {
        let options = scenarioOptions(preVote: false, checkQuorum: false) {
            $0.messageBytesMax = 64 // one entry per AppendEntries
            $0.plantedBug = bug
        }
        let net = ScenarioNetwork(voters: [1, 2, 3, 4, 5], options: options)
        // (a) Node 1 leads term 2 and gets entry X only onto node 2.
        net.elect(1)
        #expect(net.cluster.raft(1).term == 2)
        net.partition([1, 2], [3, 4, 5])
        try net.propose(Array(Self.contestedCommand.utf8), on: 1)
        let contested = net.cluster.raft(1).lastIndex
        #expect(net.cluster.raft(2).lastIndex == contested)
        net.cluster.crash(1)
        // (b) Node 5 wins term 3 with votes from 3 and 4, appends its no-op
        // at X's index, and crashes before it reaches anyone.
        net.heal()
        net.cluster.with(5) { $0.campaign() }
        net.deliverAll { $0.appendRequest != nil }
        #expect(net.cluster.raft(5).role == .leader)
        #expect(net.cluster.raft(5).term == 3)
        #expect(net.cluster.raft(5).term(at: contested) == 3)
        net.cluster.crash(5)
        // (c) Node 1 restarts and wins term 4; X (term 2) reaches nodes 3
        // and 4, but nothing of term 4 does.
        net.cluster.restart(1)
        // Term-4 entries are lost on the way to any node that already holds X;
        // nodes without X still answer, so the leader backs up and sends X.
        let carriesTerm4 = { (message: Message) in
            (message.appendRequest?.entries.contains { $0.term == 4 } ?? false)
                && net.cluster.nodes[message.to]?.raft?.term(at: contested) == 2
        }
        for _ in 0..<3 where net.cluster.raft(1).role != .leader {
            net.cluster.with(1) { $0.campaign() }
            net.deliverAll(drop: carriesTerm4)
        }
        #expect(net.cluster.raft(1).role == .leader)
        #expect(net.cluster.raft(1).term == 4)
        for id: NodeID in [2, 3, 4] { #expect(net.cluster.raft(id).term(at: contested) == 2, "node \(id)") }
        net.cluster.crash(1)
        // (d) Node 5 returns; its last term (3) beats theirs (2), so it wins.
        net.cluster.restart(5)
        for _ in 0..<3 where net.cluster.raft(5).role != .leader {
            net.elect(5)
        }
        #expect(net.cluster.raft(5).role == .leader)
        net.tick(3)
        return (net, contested)
    }

    @Test("Figure 8: an entry of an earlier term is never committed by counting replicas")
    func figure8PreviousTermEntryIsNotCommittedByCounting() throws {
        let (net, contested) = try figure8(nil)
        #expect(net.cluster.checker.isClean, "\(net.cluster.checker.violations)")
        // X was on a majority under the term-4 leader but was never
        // committed, so node 5 may and does replace it everywhere.
        for id: NodeID in [2, 3, 4, 5] { #expect(net.cluster.raft(id).term(at: contested) == 3, "node \(id)") }
        #expect(net.cluster.nodes.values.allSatisfy { !commands($0).contains(Self.contestedCommand) })
    }

    @Test("Figure 8 with the counting bug planted: the checker sees a committed entry lost")
    func figure8BugIsCaught() throws {
        let (net, _) = try figure8(.commitPreviousTermEntriesByCounting)
        let violation = try #require(net.cluster.checker.violations.first)
        #expect([.leaderCompleteness, .stateMachineSafety].contains(violation.property), "\(violation)")
    }

    @Test("A leader proposes a membership change only after committing an entry of its own term, one at a time, and its status says one is pending")
    func singleServerChangeWaitsForOwnTermCommit() throws {
        var node = try makeLeader(1, voters: [1, 2, 3])
        #expect(node.role == .leader)
        #expect(throws: RaftError.configChangePending(pendingIndex: 2)) { try node.proposeConfigChange(.addLearner(4)) }
        node.step(message(from: 2, to: 1, term: 2, .appendEntriesResponse(AppendEntriesResponse(index: 2, rejected: false, hintIndex: 0, hintTerm: 0))))
        _ = node.drain()
        #expect(node.commitIndex == 2)
        #expect(!node.status.configChangePending)
        try node.proposeConfigChange(.addLearner(4))
        #expect(throws: RaftError.configChangePending(pendingIndex: 3)) { try node.proposeConfigChange(.addLearner(5)) }
        // The status says so (the membership shows the change only once it commits).
        #expect(node.status.configChangePending && !node.status.membership.members.contains(4))
        _ = node.drain()
        node.step(message(from: 2, to: 1, term: 2, .appendEntriesResponse(AppendEntriesResponse(index: 3, rejected: false, hintIndex: 0, hintTerm: 0))))
        _ = node.drain()
        #expect(node.commitIndex == 3 && !node.status.configChangePending && node.status.membership.members.contains(4))
    }

    @Test("Membership changes: a learner catches up before promotion; ids are never reused")
    func learnersCatchUpBeforePromotion() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions { $0.promotionLagEntriesMax = 2 })
        net.elect(1)
        for i in 0..<10 { try net.propose(Array("before-\(i)".utf8), on: 1) }
        net.cluster.addEmptyNode(4)
        net.isolate(4)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.addLearner(4)) }
        net.deliverAll()
        #expect(net.cluster.raft(1).membership.learners == [4])
        #expect(throws: RaftError.self) {
            _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.promoteLearner(4)) }
        }
        net.heal()
        net.tick(3)
        #expect(net.cluster.raft(4).appliedIndex == net.cluster.raft(1).commitIndex)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.promoteLearner(4)) }
        net.deliverAll()
        #expect(net.cluster.raft(1).membership.voters == [1, 2, 3, 4])
        #expect(commands(net.cluster.nodes[4]!).count == 10)
        // Remove node 4; it may never come back under the same id.
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.removeNode(4)) }
        net.deliverAll()
        #expect(net.cluster.raft(1).membership.voters == [1, 2, 3])
        #expect(throws: RaftError.invalidConfigChange("node 4 was removed before; ids are never reused")) {
            _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.addLearner(4)) }
        }
        #expect(net.cluster.checker.isClean)
    }

    @Test("Removing the leader: it steps down once the change commits and the rest elect a leader")
    func removingTheLeader() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3, 4], options: scenarioOptions())
        net.elect(1)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.removeNode(1)) }
        net.deliverAll()
        #expect(net.cluster.raft(1).role == .follower)
        #expect(!net.cluster.raft(1).isPromotable)
        for id: NodeID in [2, 3, 4] { #expect(net.cluster.raft(id).membership.voters == [2, 3, 4]) }
        net.cluster.decommission(1)
        net.tick(40)
        let leader = try #require(net.cluster.leader)
        #expect([2, 3, 4].contains(leader))
        try net.propose(Array("after".utf8), on: leader)
        for id: NodeID in [2, 3, 4] { #expect(commands(net.cluster.nodes[id]!) == ["after"]) }
        #expect(net.cluster.checker.isClean)
    }

    @Test("Stale reads: a partitioned, deposed leader never answers a ReadIndex")
    func deposedLeaderNeverAnswersReads() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        try net.propose(Array("v1".utf8), on: 1)
        net.isolate(1)
        try net.cluster.with(1) { raft throws(RaftError) in try raft.readIndex(requestID: 7) }
        net.deliverAll()
        // The majority elects a new leader and commits a newer write.
        net.tick(40)
        let newLeader = try #require(net.cluster.leader.flatMap { $0 == 1 ? nil : $0 })
        try net.propose(Array("v2".utf8), on: newLeader)
        #expect(net.cluster.nodes[1]!.readStates.isEmpty, "the old leader answered a read it could not confirm")
        #expect(net.cluster.raft(1).role != .leader, "CheckQuorum made it step down")
        // The read it held was given up, not answered late.
        net.heal()
        net.tick(5)
        #expect(net.cluster.nodes[1]!.readStates.isEmpty)
        // A read on the new leader sees v2.
        try net.cluster.with(newLeader) { raft throws(RaftError) in try raft.readIndex(requestID: 8) }
        net.deliverAll()
        let state = try #require(net.cluster.nodes[newLeader]!.readStates.first)
        #expect(state.requestID == 8)
        #expect(state.index == net.cluster.raft(newLeader).commitIndex)
    }

    @Test("Stale reads with the quorum check planted away: the deposed leader answers, and the answer is stale")
    func readWithoutQuorumCheckIsStale() throws {
        // CheckQuorum off, so the isolated leader keeps believing it leads.
        let options = scenarioOptions(checkQuorum: false) { $0.plantedBug = .readIndexWithoutQuorumCheck }
        let net = ScenarioNetwork(voters: [1, 2, 3], options: options)
        net.elect(1)
        net.isolate(1)
        net.elect(2)
        try net.propose(Array("newer".utf8), on: 2)
        let acknowledged = net.cluster.raft(2).commitIndex
        try net.cluster.with(1) { raft throws(RaftError) in try raft.readIndex(requestID: 9) }
        net.deliverAll()
        let state = try #require(net.cluster.nodes[1]!.readStates.first, "the bug answers at once")
        #expect(state.index < acknowledged, "and misses a write acknowledged before the read")
    }

    @Test("ReadIndex reports abandoned reads when leadership is lost")
    func abandonedReadsAreReported() throws {
        var node = try makeLeader(1, checkQuorum: true)
        try node.readIndex(requestID: 42)
        _ = node.drain()
        node.step(message(from: 3, to: 1, term: 9, .heartbeat(Heartbeat(commit: 0, readRound: 0))))
        let ready = node.drain()
        #expect(ready.abandonedReads == [42])
        #expect(ready.readStates.isEmpty)
    }

    @Test("A leader that steps down through CheckQuorum, keeping its term, refuses the reads its followers forwarded instead of dropping them")
    func steppingDownRefusesForwardedReads() throws {
        var node = try makeLeader(1, checkQuorum: true, acknowledgedBy: [2])
        node.step(message(from: 3, to: 1, term: node.term, .readIndexRequest(requestID: 7)))
        _ = node.drain()
        let term = node.term
        var refused: [Message] = []
        for _ in 0..<(4 * node.configuration.electionTimeoutTicks) where node.role == .leader {
            node.tick()
            let ready = node.drain()
            refused += (ready.messagesToSendNow + ready.messagesAfterPersist).filter { if case .readIndexRefused = $0.body { return true } else { return false } }
        }
        #expect(node.role == .follower && node.term == term, "stepped down, same term")
        #expect(refused.map(\.to) == [3] && refused.first?.body == .readIndexRefused(requestID: 7))
    }

    @Test("A follower's read is confirmed by the leader and answered at the leader's commit index")
    func followerReadIndex() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        try net.propose(Array("w".utf8), on: 1)
        try net.cluster.with(3) { raft throws(RaftError) in try raft.readIndex(requestID: 5) }
        net.deliverAll()
        let state = try #require(net.cluster.nodes[3]!.readStates.first)
        #expect(state.index == net.cluster.raft(1).commitIndex)
    }

    @Test("PreVote: a node rejoining after a partition does not disrupt the leader")
    func preVoteStopsARejoiningNodeFromDisrupting() throws {
        for preVote in [true, false] {
            let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions(preVote: preVote, checkQuorum: false))
            net.elect(1)
            let termBefore = net.cluster.raft(1).term
            net.isolate(3)
            net.tick(100)
            net.heal()
            net.tick(5)
            if preVote {
                #expect(net.cluster.raft(3).term == termBefore, "the isolated node never raised its term")
                #expect(net.cluster.raft(1).role == .leader)
                #expect(net.cluster.raft(1).term == termBefore)
            } else {
                // Without PreVote the same schedule deposes the leader.
                #expect(net.cluster.raft(1).term > termBefore)
            }
        }
    }

    @Test("CheckQuorum: a leader that cannot reach a quorum steps down within two election timeouts")
    func checkQuorumStepsDown() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        net.isolate(1)
        var ticks = 0
        while net.cluster.raft(1).role == .leader && ticks < 100 {
            net.tick()
            ticks += 1
        }
        #expect(net.cluster.raft(1).role == .follower)
        #expect(ticks <= 2 * net.cluster.options.electionTimeoutTicks)
    }

    @Test("CheckQuorum off: an isolated leader stays leader (the check is what makes it step down)")
    func withoutCheckQuorumLeaderStays() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions(checkQuorum: false))
        net.elect(1)
        net.isolate(1)
        net.tick(50)
        #expect(net.cluster.raft(1).role == .leader)
    }

    @Test("A follower whose next entry was compacted away receives a snapshot and catches up")
    func snapshotToALaggingFollower() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        net.cluster.crash(3)
        for i in 0..<20 { try net.propose(Array("e\(i)".utf8), on: 1) }
        net.cluster.compact(1)
        #expect(net.cluster.raft(1).snapshotIndex == net.cluster.raft(1).appliedIndex)
        net.cluster.restart(3)
        net.tick(5)
        let follower = net.cluster.raft(3)
        #expect(follower.snapshotIndex > 2, "it was brought up by a snapshot, not by entries")
        #expect(follower.appliedIndex == net.cluster.raft(1).commitIndex)
        #expect(net.cluster.nodes[3]!.digest == net.cluster.nodes[1]!.digest)
        try net.propose(Array("after".utf8), on: 1)
        #expect(commands(net.cluster.nodes[3]!) == ["after"])
        #expect(net.cluster.checker.isClean)
    }

    @Test("Leadership transfer to a lagging node: it is caught up first, then takes over")
    func transferToALaggingNode() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        net.isolate(3)
        for i in 0..<5 { try net.propose(Array("t\(i)".utf8), on: 1) }
        #expect(net.cluster.raft(3).lastIndex < net.cluster.raft(1).lastIndex)
        try net.cluster.with(1) { raft throws(RaftError) in try raft.transferLeadership(to: 3) }
        #expect(throws: RaftError.leadershipTransferInProgress(to: 3)) {
            _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.propose(Array("refused".utf8)) }
        }
        net.heal()
        net.tick(3)
        #expect(net.cluster.raft(3).role == .leader)
        #expect(net.cluster.raft(1).role == .follower)
        #expect(commands(net.cluster.nodes[3]!) == (0..<5).map { "t\($0)" })
        #expect(net.cluster.checker.isClean)
    }

    @Test("A transfer that cannot finish is abandoned after an election timeout")
    func stuckTransferIsAbandoned() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        net.cluster.crash(3)
        try net.cluster.with(1) { raft throws(RaftError) in try raft.transferLeadership(to: 3) }
        net.tick(net.cluster.options.electionTimeoutTicks + 1)
        #expect(net.cluster.raft(1).role == .leader)
        try net.propose(Array("accepted".utf8), on: 1)
        #expect(commands(net.cluster.nodes[2]!) == ["accepted"])
    }

    @Test("Follower proposals are forwarded to the leader, or refused with a leader hint")
    func followerProposals() throws {
        let forwarding = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        forwarding.elect(1)
        let receipt = try forwarding.propose(Array("via-2".utf8), on: 2)
        #expect(receipt == .forwarded(to: 1))
        #expect(commands(forwarding.cluster.nodes[3]!) == ["via-2"])

        let refusing = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions { $0.followerProposals = .refuseWithLeaderHint })
        refusing.elect(1)
        #expect(throws: RaftError.notLeader(leaderHint: 1)) { try refusing.propose(Array("no".utf8), on: 2) }
    }

    @Test("A proposal with no leader known fails at once with a clear error")
    func proposalWithoutLeader() throws {
        var node = try makeNode(1)
        #expect(throws: RaftError.noLeader) { try node.propose(Array("x".utf8)) }
        #expect(RaftError.noLeader.description.contains("no leader"))
    }

    @Test("Flow control: at most inflightMessagesMax appends are outstanding to a silent follower")
    func inflightWindowIsBounded() throws {
        var leader = try makeLeader(1, voters: [1, 2], acknowledgedBy: [2]) {
            $0.inflightMessagesMax = 3
            $0.messageBytesMax = 64
        }
        var appends = 0
        for i in 0..<10 {
            try leader.propose(Array("p\(i)".utf8))
            appends += leader.sentMessages().filter { $0.appendRequest != nil }.count
        }
        #expect(appends == 3)
        #expect(leader.status.followers[2]?.state == .replicate)
    }

    /// A leader of [1, 2] whose window to node 2 (two messages) is full:
    /// ten proposals, two appends sent and not answered.
    private func leaderWithFullWindow() throws -> (leader: RaftNode, sentThrough: LogIndex, matched: LogIndex) {
        var leader = try makeLeader(1, voters: [1, 2], acknowledgedBy: [2]) {
            $0.inflightMessagesMax = 2
            $0.messageBytesMax = 64
        }
        let matched = leader.lastIndex
        var sentThrough: LogIndex = 0
        for i in 0..<10 {
            try leader.propose(Array("p\(i)".utf8))
            for append in leader.sentMessages().compactMap(\.appendRequest) where !append.entries.isEmpty {
                sentThrough = append.entries.last!.index
            }
        }
        #expect(leader.status.followers[2]?.state == .replicate)
        #expect(sentThrough > matched && sentThrough < leader.lastIndex, "the window filled before the log was sent")
        return (leader, sentThrough, matched)
    }

    private func heartbeatAnswer(_ leader: RaftNode) -> Message {
        message(from: 2, to: 1, term: leader.term, .heartbeatResponse(HeartbeatResponse(readRound: 0, commitIndex: 0)))
    }

    @Test("Flow control: with the window full, heartbeat answers bring entry-less appends, never entries sent again; their acknowledgement reopens the window")
    func fullWindowAsksWithoutResending() throws {
        var (leader, sentThrough, _) = try leaderWithFullWindow()
        // A slow follower: it answers heartbeats while the entries are on their way.
        for _ in 0..<20 {
            leader.step(heartbeatAnswer(leader))
            let appends = leader.sentMessages().compactMap(\.appendRequest)
            #expect(appends.count == 1)
            #expect(appends.allSatisfy { $0.entries.isEmpty && $0.prevLogIndex == sentThrough },
                    "an append after the last one sent, without entries: \(appends)")
        }
        // The follower got everything and acknowledges the check: the rest goes out.
        leader.step(message(from: 2, to: 1, term: leader.term,
                            .appendEntriesResponse(AppendEntriesResponse(index: sentThrough, rejected: false, hintIndex: 0, hintTerm: 0))))
        let resumed = leader.sentMessages().compactMap(\.appendRequest).filter { !$0.entries.isEmpty }
        #expect(resumed.count == 2, "a window's worth")
        #expect(resumed.first?.prevLogIndex == sentThrough)
        #expect(resumed.count == 2 && resumed[1].prevLogIndex == resumed[0].entries.last?.index)
        #expect(leader.status.followers[2]?.matchIndex == sentThrough)
    }

    @Test("Flow control: appends lost with the window full: the check is rejected, and the follower is probed from its last acknowledged index, one entry per probe, until it answers")
    func lostAppendsAreFoundByTheCheck() throws {
        var (leader, sentThrough, matched) = try leaderWithFullWindow()
        leader.step(heartbeatAnswer(leader))
        let check = try #require(leader.sentMessages().compactMap(\.appendRequest).first)
        // The follower never got the entries: it holds the log up to `matched`.
        leader.step(message(from: 2, to: 1, term: leader.term, .appendEntriesResponse(AppendEntriesResponse(
            index: check.prevLogIndex, rejected: true, hintIndex: matched, hintTerm: leader.term))))
        #expect(leader.status.followers[2]?.state == .probe)
        var probes = leader.sentMessages().compactMap(\.appendRequest)
        // Unanswered, the probe goes again at each heartbeat answer: small each time.
        for _ in 0..<10 {
            leader.step(heartbeatAnswer(leader))
            probes += leader.sentMessages().compactMap(\.appendRequest)
        }
        #expect(probes.count == 11)
        #expect(probes.allSatisfy { $0.prevLogIndex == matched && $0.entries.count == 1 }, "\(probes.map { ($0.prevLogIndex, $0.entries.count) })")
        // It answers: streaming resumes within the window.
        leader.step(message(from: 2, to: 1, term: leader.term,
                            .appendEntriesResponse(AppendEntriesResponse(index: matched + 1, rejected: false, hintIndex: 0, hintTerm: 0))))
        #expect(leader.status.followers[2]?.state == .replicate)
        let streamed = leader.sentMessages().compactMap(\.appendRequest)
        #expect(streamed.count == 2 && streamed.allSatisfy { $0.entries.count > 1 }, "two full messages: \(streamed.map(\.entries.count))")
        #expect(sentThrough > matched + 1)
    }

    @Test("Flow control: proposals past uncommittedBytesMax are refused until replication catches up")
    func uncommittedBytesAreBounded() throws {
        var leader = try makeLeader(1, voters: [1, 2, 3]) {
            $0.messageBytesMax = 1024
            $0.uncommittedBytesMax = 1024
        }
        let big = [UInt8](repeating: 1, count: 600)
        try leader.propose(big)
        #expect(throws: RaftError.uncommittedLimitReached(limitBytes: 1024)) { try leader.propose(big) }
        #expect(throws: RaftError.proposalTooLarge(bytes: 2048 + Entry.overheadBytes, limitBytes: 1024)) {
            try leader.propose([UInt8](repeating: 0, count: 2048))
        }
    }

    @Test("A crashed node restarts from exactly what it persisted and rejoins")
    func crashAndRestart() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        try net.propose(Array("one".utf8), on: 1)
        net.cluster.crash(2)
        try net.propose(Array("two".utf8), on: 1)
        net.cluster.restart(2)
        #expect(net.cluster.raft(2).term == net.cluster.raft(1).term, "term and vote came back from storage")
        net.tick(3)
        #expect(commands(net.cluster.nodes[2]!) == ["one", "two"])
        #expect(net.cluster.checker.isClean)
    }

    @Test("Configuration limits are checked with a specific error")
    func configurationIsValidated() {
        var configuration = Configuration(id: 1, randomSeed: 1)
        configuration.electionTimeoutTicks = 1
        #expect(throws: RaftError.invalidConfiguration("electionTimeoutTicks (1) must exceed heartbeatIntervalTicks (1)")) {
            _ = try RaftNode(configuration: configuration, durable: .bootstrap(voters: [1]))
        }
        #expect(throws: RaftError.invalidConfiguration("node id 0 is reserved")) {
            _ = try RaftNode(configuration: Configuration(id: 0, randomSeed: 1), durable: .bootstrap(voters: [1]))
        }
    }

    @Test("Compaction past the applied index is refused and changes nothing")
    func compactionIsBounded() throws {
        var node = try makeNode(1, voters: [1])
        node.campaign()
        _ = node.drain()
        let applied = node.appliedIndex
        #expect(throws: RaftError.self) { try node.compactLog(through: applied + 5, snapshotData: []) }
        #expect(node.snapshotIndex == 0)
    }
}

/// Liveness holes found in review, each pinned by a scenario.
@Suite("Membership and reads at the edges")
struct MembershipEdgeTests {
    @Test("A removed leader hands over only once the survivors know the removal committed")
    func removedLeaderWaitsUntilSurvivorsKnow() throws {
        let net = ScenarioNetwork(voters: [1, 2], options: scenarioOptions())
        net.elect(1)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.removeNode(1)) }
        // Node 2 stores and acknowledges the change, but everything that
        // would tell it the change committed is lost for now.
        var lostCommitNotice = false
        net.deliverAll { message in
            guard message.from == 1, net.cluster.raft(1).membership.voters == [2] else { return false }
            lostCommitNotice = true
            return true
        }
        #expect(lostCommitNotice)
        #expect(net.cluster.raft(1).role == .leader, "it must not leave while node 2 still counts it as a voter")
        #expect(throws: RaftError.removedFromCluster) { try net.propose(Array("no".utf8), on: 1) }
        net.tick(3)
        #expect(net.cluster.raft(2).membership.voters == [2])
        #expect(net.cluster.raft(2).role == .leader, "node 1 handed over to node 2")
        #expect(net.cluster.raft(1).role == .follower)
        net.cluster.decommission(1)
        try net.propose(Array("alone".utf8), on: 2)
        #expect(commands(net.cluster.nodes[2]!) == ["alone"])
        #expect(net.cluster.checker.isClean)
    }

    @Test("A read waiting for confirmation is answered when a removal shrinks the quorum to the leader alone")
    func readSurvivesQuorumShrink() throws {
        let net = ScenarioNetwork(voters: [1, 2], options: scenarioOptions())
        net.elect(1)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.removeNode(2)) }
        try net.cluster.with(1) { raft throws(RaftError) in try raft.readIndex(requestID: 11) }
        // Node 2 acknowledges the removal before its heartbeat answer, which
        // then arrives from a node that is no longer a member.
        net.deliverAll()
        #expect(net.cluster.raft(1).membership.voters == [1])
        #expect(net.cluster.nodes[1]!.readStates.map(\.requestID) == [11])
    }

    @Test("A follower's forwarded read is abandoned when its leader changes, and refused when the leader is full")
    func forwardedReadsAreNeverLeftHanging() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        try net.cluster.with(3) { raft throws(RaftError) in try raft.readIndex(requestID: 21) }
        net.dropQueued() // the request is lost
        try net.cluster.with(1) { raft throws(RaftError) in try raft.transferLeadership(to: 2) }
        net.deliverAll()
        #expect(net.cluster.raft(3).leaderID == 2)
        #expect(net.cluster.nodes[3]!.abandonedReads == [21])
        #expect(net.cluster.nodes[3]!.readStates.isEmpty)

        let full = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        full.elect(1)
        // No heartbeat answer gets through, so node 1 confirms nothing and
        // its pending reads fill up; node 3's read is then refused, not dropped.
        for request in 0..<UInt64(4096) {
            try full.cluster.with(1) { raft throws(RaftError) in try raft.readIndex(requestID: request) }
        }
        #expect(throws: RaftError.tooManyPendingReads(limit: 4096)) {
            try full.cluster.with(1) { raft throws(RaftError) in try raft.readIndex(requestID: 5000) }
        }
        try full.cluster.with(3) { raft throws(RaftError) in try raft.readIndex(requestID: 99_999) }
        full.deliverAll { if case .heartbeatResponse = $0.body { return true } else { return false } }
        #expect(full.cluster.nodes[3]!.abandonedReads == [99_999])
    }

    @Test("Heartbeats never carry a commit index past what the follower is known to hold")
    func heartbeatCommitIsBoundedByMatch() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        net.isolate(3)
        for i in 0..<3 { try net.propose(Array("h\(i)".utf8), on: 1) }
        let leaderCommit = net.cluster.raft(1).commitIndex
        let match = try #require(net.cluster.raft(1).status.followers[3]?.matchIndex)
        #expect(match < leaderCommit)
        net.heal()
        // Two intervals: in the first, the appends sent (and lost) stand in for a heartbeat.
        net.cluster.tick(1)
        net.cluster.tick(1)
        let beats = net.cluster.outgoing.compactMap { message -> Heartbeat? in
            if message.to == 3, case .heartbeat(let heartbeat) = message.body { return heartbeat }
            return nil
        }
        #expect(!beats.isEmpty)
        #expect(beats.allSatisfy { $0.commit <= match }, "a lagging follower could commit entries it does not share with the leader")
    }

    @Test("Leadership goes to a just-promoted voter only once it knows it is a voter")
    func transferToAJustPromotedVoter() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions())
        net.elect(1)
        net.cluster.addEmptyNode(4)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.addLearner(4)) }
        net.deliverAll()
        net.tick(2)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.promoteLearner(4)) }
        // Node 4 stores the promotion but does not hear that it committed.
        net.deliverAll { $0.from == 1 && $0.to == 4 && net.cluster.raft(1).membership.voters.contains(4) }
        #expect(net.cluster.raft(1).membership.voters == [1, 2, 3, 4])
        #expect(!net.cluster.raft(4).isPromotable)
        try net.cluster.with(1) { raft throws(RaftError) in try raft.transferLeadership(to: 4) }
        var wasted = 0
        for _ in 0..<3 {
            net.deliverAll { message in
                if case .timeoutNow = message.body, !net.cluster.raft(4).isPromotable { wasted += 1 }
                return false
            }
            net.cluster.tickAll()
        }
        net.deliverAll()
        #expect(wasted == 0, "no TimeoutNow is spent on a node that cannot campaign yet")
        #expect(net.cluster.raft(4).role == .leader, "the TimeoutNow waited until node 4 knew it could campaign")
        #expect(net.cluster.checker.isClean)
    }

    @Test("A learner that never answered is not promoted, however short the log")
    func silentLearnerIsNotPromoted() throws {
        let net = ScenarioNetwork(voters: [1], options: scenarioOptions())
        net.elect(1)
        net.cluster.addEmptyNode(2)
        net.isolate(2)
        _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.addLearner(2)) }
        net.deliverAll()
        #expect(net.cluster.raft(1).membership.learners == [2])
        #expect(throws: RaftError.learnerNotCaughtUp(id: 2, matchIndex: 0, leaderLastIndex: net.cluster.raft(1).lastIndex)) {
            _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.proposeConfigChange(.promoteLearner(2)) }
        }
        #expect(net.cluster.raft(1).membership.voters == [1], "a promotion would have made a dead node half the quorum")
    }
}
