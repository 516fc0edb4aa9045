import Node
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
}
