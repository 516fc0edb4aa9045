import Node
import Raft
import Testing
import Transport

@Suite("Clock check")
struct ClockCheckTests {
    @Test("A disagreement counts once it has lasted 2 s, and ends only within 8 s: stamps held up by a pause do not trip it, a clock near the bound does not flap")
    func sustainedWithHysteresis() {
        let check = ClockCheck()
        let start = ContinuousClock.now
        func at(_ seconds: Double) -> ContinuousClock.Instant { start + .milliseconds(Int64(seconds * 1000)) }
        let ahead: [UInt64: Int64] = [2: -30_000, 3: -30_000] // peers read 30 s behind: this node is ahead
        // Stamps that waited out a pause: peers look behind for a moment, then fresh ones arrive.
        check.update(own: 1, voters: [1, 2, 3], offsets: ahead, now: at(0))
        check.update(own: 1, voters: [1, 2, 3], offsets: ahead, now: at(1.5))
        #expect(check.verdict == .agrees, "not yet sustained")
        check.update(own: 1, voters: [1, 2, 3], offsets: [2: 20, 3: -5], now: at(1.9))
        check.update(own: 1, voters: [1, 2, 3], offsets: ahead, now: at(3.0))
        #expect(check.verdict == .agrees, "the earlier disagreement ended at 1.9 s; this one is new")
        // Really off: after 2 s it counts.
        #expect(check.update(own: 1, voters: [1, 2, 3], offsets: ahead, now: at(5.0)), "the verdict changed")
        #expect(check.verdict.disagreeing == [2, 3])
        // Back to 9 s off: still off (agrees again only within 8 s).
        check.update(own: 1, voters: [1, 2, 3], offsets: [2: -9_000, 3: -9_000], now: at(6.0))
        #expect(check.verdict.disagreeing == [2, 3])
        #expect(check.update(own: 1, voters: [1, 2, 3], offsets: [2: -7_000, 3: -7_500], now: at(7.0)))
        #expect(check.verdict == .agrees)
        // Agreeing again, 9 s off is within the 10 s bound.
        check.update(own: 1, voters: [1, 2, 3], offsets: [2: -9_000, 3: -9_000], now: at(20.0))
        check.update(own: 1, voters: [1, 2, 3], offsets: [2: -9_000, 3: -9_000], now: at(30.0))
        #expect(check.verdict == .agrees)
    }

    @Test("Leadership goes to the most caught-up voter whose clock agrees; a stopping leader falls back to the most caught-up when none does, a skewed leader keeps it")
    func handOverTarget() {
        let membership = Membership(voters: [1, 2, 3, 4, 5], learners: [6])
        // Node 1 leads; node 2 is the most caught up but 60 s off; node 6 is a learner.
        let matches: [NodeID: LogIndex] = [2: 90, 3: 70, 4: 80, 5: 80, 6: 95]
        let offsets: [NodeID: Int64] = [2: 60_000, 3: 10, 4: -20, 5: 5, 6: 0]
        for stopping in [false, true] {
            let target = ClockCheck.handOverTarget(own: 1, membership: membership, matchIndexes: matches, offsets: offsets, orAnyClock: stopping)
            #expect(target == 4, "stopping \(stopping): the most caught-up agreeing voter, the lower id of 4 and 5")
        }
        // This leader is the one that is off: the other four agree with one another, so the most caught up of them.
        let skewedLeader: [NodeID: Int64] = [2: -60_000, 3: -60_010, 4: -59_990, 5: -60_005]
        #expect(ClockCheck.handOverTarget(own: 1, membership: membership, matchIndexes: matches, offsets: skewedLeader, orAnyClock: false) == 2)
        // Readings missing (no stamps yet): no clock is known to agree.
        #expect(ClockCheck.handOverTarget(own: 1, membership: membership, matchIndexes: matches, offsets: [:], orAnyClock: false) == nil)
        #expect(ClockCheck.handOverTarget(own: 1, membership: membership, matchIndexes: matches, offsets: [:], orAnyClock: true) == 2)
        // A voter this leader does not track is not a candidate.
        #expect(ClockCheck.handOverTarget(own: 1, membership: Membership(voters: [1, 7]), matchIndexes: matches, offsets: [:], orAnyClock: true) == nil)
    }
}
