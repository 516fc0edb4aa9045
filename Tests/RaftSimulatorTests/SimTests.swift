@testable import Raft
@testable import RaftSimulator
import Foundation
import Testing
import TestSupport

/// The simulator's bounded CI run and the proof that its checks bite.
@Suite("Deterministic simulator")
struct SimulatorTests {
    /// 400 seeds in 8 slices (Swift Testing runs slices in parallel).
    static let slices = (0..<8).map { $0 * 50 }

    @Test("Seeds run clean: safety after every step, recovery after healing", arguments: slices)
    func seedsRunClean(firstSeed: Int) async {
        for seed in UInt64(firstSeed)..<UInt64(firstSeed + 50) {
            let result = await offThePool { Simulation(seed: seed).run() }
            #expect(result.violation == nil, "seed \(seed): \(result.violation.map(String.init(describing:)) ?? "") — replay: \(result.replayCommand) --trace")
            if result.violation != nil { return }
            #expect(result.stats.commandsApplied > 0, "seed \(seed) applied nothing: the workload is not running")
        }
    }

    /// Seeds that once failed, kept so they stay fixed.
    /// 36542: a clogged candidate won term 4 after term 5 had committed an
    /// entry; the checker wrongly demanded that entry of the term-4 leader.
    /// 103 (and 89, 238): a leader asked a follower whose window was full
    /// with an entry-less append, but the entry before it had been
    /// compacted, so it sent nothing, ever; now it probes (and sends a
    /// snapshot).
    @Test("Regression seeds stay clean", arguments: [UInt64(36542), 103])
    func regressionSeed(seed: UInt64) {
        let result = Simulation(seed: seed).run()
        #expect(result.violation == nil, "\(result.violation.map(String.init(describing:)) ?? "")")
    }

    @Test("The schedules vary: crashes, partitions, membership changes, snapshots and transfers all happen")
    func schedulesCoverEveryFault() async {
        var totals = SimulationStats()
        var nodeCounts: Set<Int> = []
        for seed in UInt64(0)..<40 {
            let result = await offThePool { Simulation(seed: seed).run() }
            nodeCounts.insert(result.nodeCount)
            totals.add(result.stats)
        }
        #expect(nodeCounts == [3, 5, 7])
        #expect(totals.crashes > 10)
        #expect(totals.partitions > 10)
        #expect(totals.membershipChanges > 10)
        #expect(totals.compactions > 10)
        #expect(totals.leadershipTransfers > 5)
        #expect(totals.readsAnswered > 100)
        #expect(totals.messagesDropped > 100)
    }

    @Test("A seed replays exactly")
    func seedReplaysExactly() {
        let first = Simulation(seed: 77, tracing: true).run()
        let second = Simulation(seed: 77, tracing: true).run()
        #expect(first.trace == second.trace)
        #expect(!first.trace.isEmpty)
        #expect(first.stats.messagesDelivered == second.stats.messagesDelivered)
        #expect(first.stats.finalCommitIndex == second.stats.finalCommitIndex)
        let other = Simulation(seed: 78, tracing: true).run()
        #expect(other.trace != first.trace)
    }

    /// Each planted bug must be found within this many seeds.
    static let plantedBugs: [(PlantedBug, seedsMax: UInt64)] = [
        (.grantVoteWithoutLogCheck, 200),     // first found at seed 4
        (.readIndexWithoutQuorumCheck, 600),  // first found at seed 15
        (.acknowledgeBeforePersist, 1500),    // first found at seed 357
        (.fillReleasedFromPreviousEntry, 400), // first found at seed 1
    ]

    @Test("A planted safety bug is found within a bounded number of seeds", arguments: plantedBugs.indices)
    func plantedBugIsFound(which: Int) async {
        let (bug, seedsMax) = Self.plantedBugs[which]
        var options = SimulationOptions()
        options.plantedBug = bug
        var found: SimulationResult?
        for seed in 0..<seedsMax {
            let result = await offThePool { [options] in Simulation(seed: seed, options: options).run() }
            if result.violation != nil {
                found = result
                break
            }
        }
        #expect(found != nil, "\(bug) survived \(seedsMax) seeds")
        if let found {
            #expect(found.replayCommand.contains("--planted-bug \(bug.flagName)"))
            // The failure replays from its seed.
            let again = await offThePool { [options] in Simulation(seed: found.seed, options: options).run() }
            #expect(again.violation?.description == found.violation?.description)
        }
    }
}

@Suite("Safety checker")
struct SafetyCheckerTests {
    @Test("Two leaders in one term break Election Safety")
    func twoLeadersInOneTerm() throws {
        var checker = SafetyChecker()
        var a = try RaftNode(configuration: Configuration(id: 1, randomSeed: 1), durable: .bootstrap(voters: [1]))
        var b = try RaftNode(configuration: Configuration(id: 2, randomSeed: 2), durable: .bootstrap(voters: [2]))
        a.campaign()
        b.campaign()
        #expect(a.term == b.term)
        checker.observe(a, wasLeader: false)
        #expect(checker.isClean)
        checker.observe(b, wasLeader: false)
        #expect(checker.violations.first?.property == .electionSafety)
    }

    @Test("Different entries at the same index and term break Log Matching")
    func conflictingEntries() {
        var checker = SafetyChecker()
        checker.persisted([Entry(term: 2, index: 5, payload: .command([1]))], previousTerm: 1, by: 1)
        checker.persisted([Entry(term: 2, index: 5, payload: .command([1]))], previousTerm: 1, by: 2)
        #expect(checker.isClean)
        checker.persisted([Entry(term: 2, index: 5, payload: .command([2]))], previousTerm: 1, by: 3)
        #expect(checker.violations.first?.property == .logMatching)
    }

    @Test("Applying different entries at one index breaks State Machine Safety")
    func divergentApply() {
        var checker = SafetyChecker()
        let one = checker.applied(Entry(term: 1, index: 1, payload: .noop), after: 0, by: 1)
        _ = checker.applied(Entry(term: 1, index: 1, payload: .noop), after: 0, by: 2)
        #expect(checker.isClean)
        _ = checker.applied(Entry(term: 2, index: 2, payload: .command([9])), after: one, by: 1)
        _ = checker.applied(Entry(term: 2, index: 2, payload: .command([8])), after: one, by: 2)
        #expect(checker.violations.first?.property == .stateMachineSafety)
    }
}
