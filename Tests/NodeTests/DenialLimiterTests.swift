@testable import Node
import Testing

@Suite("Denial records' limiter")
struct DenialLimiterTests {
    @Test("A record that could not be written carries its count into the next one, once")
    func carriedCount() {
        let limiter = DenialLimiter()
        #expect(limiter.admit() == 1)
        limiter.carry(3)
        #expect(limiter.admit() == 4, "the next record counts the three refusals never recorded, and its own")
        #expect(limiter.admit() == 1, "counted once")
    }
}
