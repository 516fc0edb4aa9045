import Client
import Foundation
import Testing

/// The agent's JWT-SVID cache: reuse until half the lifetime, per audience
/// set, nothing carried across an identity's replacement (including a
/// request in flight across it), and its bound.
@Suite struct JWTSVIDCacheTests {
    let start = Date(timeIntervalSince1970: 1_800_000_000)

    @Test func reusedUntilHalfItsLifetime() {
        let cache = JWTSVIDCache<String>()
        let generation = cache.current.generation
        #expect(cache.keep("t1", for: ["b", "a"], expiresAt: start + 600, now: start, generation: generation))
        // Order and repeats of the audiences do not matter; another set does.
        #expect(cache.token(for: ["a", "b"], at: start + 1) == "t1")
        #expect(cache.token(for: ["a", "b", "a"], at: start + 299) == "t1")
        #expect(cache.token(for: ["a"], at: start + 1) == nil)
        #expect(cache.token(for: ["a", "b", "c"], at: start + 1) == nil)
        // Half of 600 s: no longer handed out.
        #expect(cache.token(for: ["a", "b"], at: start + 300) == nil)
        // An audience holding the separator is another set than two audiences.
        cache.keep("t2", for: ["a,b"], expiresAt: start + 600, now: start, generation: generation)
        #expect(cache.token(for: ["a,b"], at: start + 1) == "t2")
        #expect(cache.token(for: ["a", "b"], at: start + 1) == "t1")
        // An expired token is not kept.
        #expect(!cache.keep("t3", for: ["x"], expiresAt: start, now: start + 1, generation: generation))
        #expect(cache.token(for: ["x"], at: start) == nil)
    }

    @Test func nothingCarriedAcrossAnIdentity() {
        let cache = JWTSVIDCache<String>()
        cache.replaceIdentity("first")
        let first = cache.current.generation
        #expect(cache.current.identity == "first")
        cache.keep("old", for: ["aud"], expiresAt: start + 600, now: start, generation: first)
        // A request made for the first identity, answered after the second
        // was taken: its token is not kept for the second.
        let inFlight = cache.current.generation
        cache.replaceIdentity("second")
        // The identity and its generation move together.
        #expect(cache.current.identity == "second" && cache.current.generation != inFlight)
        #expect(cache.token(for: ["aud"], at: start + 1) == nil)
        #expect(cache.count == 0)
        #expect(!cache.keep("late", for: ["aud"], expiresAt: start + 600, now: start + 1, generation: inFlight))
        #expect(cache.token(for: ["aud"], at: start + 2) == nil)
        // A request made for the second identity is kept.
        #expect(cache.keep("new", for: ["aud"], expiresAt: start + 600, now: start + 2, generation: cache.current.generation))
        #expect(cache.token(for: ["aud"], at: start + 3) == "new")
    }

    @Test func bounded() {
        let cache = JWTSVIDCache<String>(entriesMax: 3)
        let generation = cache.current.generation
        cache.keep("short", for: ["s"], expiresAt: start + 10, now: start, generation: generation)
        cache.keep("a", for: ["a"], expiresAt: start + 600, now: start, generation: generation)
        cache.keep("b", for: ["b"], expiresAt: start + 600, now: start, generation: generation)
        // Full: the one no longer reusable (past 5 s) makes room.
        cache.keep("c", for: ["c"], expiresAt: start + 600, now: start + 6, generation: generation)
        #expect(cache.count == 3)
        #expect(cache.token(for: ["a"], at: start + 7) == "a")
        #expect(cache.token(for: ["c"], at: start + 7) == "c")
        // Replacing a held set needs no room.
        cache.keep("a2", for: ["a"], expiresAt: start + 600, now: start + 7, generation: generation)
        #expect(cache.count == 3)
        #expect(cache.token(for: ["a"], at: start + 8) == "a2")
        // Full of reusable ones: all are dropped for the new one.
        cache.keep("d", for: ["d"], expiresAt: start + 600, now: start + 8, generation: generation)
        #expect(cache.count == 1)
        #expect(cache.token(for: ["d"], at: start + 9) == "d")
        #expect(cache.token(for: ["a"], at: start + 9) == nil)
    }
}

@Suite("Bundle sequences")
struct BundleSequenceTests {
    @Test("A refreshed bundle replaces the one held unless it says it is older (a node behind); one that says nothing (an older build) does")
    func newestKept() {
        #expect(BundleSequence.takes(33, over: 32) && BundleSequence.takes(32, over: 32))
        #expect(!BundleSequence.takes(31, over: 32))
        #expect(BundleSequence.takes(nil, over: 32) && BundleSequence.takes(0, over: 0))
    }
}
