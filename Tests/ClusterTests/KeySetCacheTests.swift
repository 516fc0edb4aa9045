import Attestation
import ClusterHarness
import Foundation
import Node
import Policy
import Synchronization
import Testing

@Suite("Issuer key cache")
struct KeySetCacheTests {
    /// A clock the test moves by hand.
    private final class StepClock: Sendable {
        private let start = ContinuousClock.now
        private let offset = Mutex<Duration>(.zero)
        @Sendable func now() -> ContinuousClock.Instant { start + offset.withLock { $0 } }
        func advance(_ by: Duration) { offset.withLock { $0 += by } }
    }

    @Test("Keys older than the cache's max age are not used while refreshing them fails: a key the issuer withdrew stops being trusted even if its fetches are blocked")
    func keysExpire() async throws {
        let provider = try TestIssuer(keys: [.rsa2048])
        try await provider.serve()
        defer { Task { await provider.stop() } }
        let issuer = try IssuerConfig(name: "github", document: githubIssuerYAML(provider), defaultAudience: "warrant.local")
        // Intervals stepped through on the test's clock: a loaded machine's late wake-ups cannot move them.
        let clock = StepClock()
        let cache = KeySetCache(fetcher: KeySetFetcher(allowHTTPLoopback: false), refetchInterval: .seconds(30),
                                refreshInterval: .seconds(60), maxAge: .seconds(300), now: clock.now)
        let kid = provider.keys[0].kid
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil)
        // Every fetch fails from now on (the issuer's answer is not a key set).
        provider.overrideJWKS(Array("not json".utf8))
        // Stale and refreshed in vain: the last good keys keep serving until the max age.
        clock.advance(.seconds(90))
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil)
        #expect(cache.fetchCount("github") == 2, "a refresh was started")
        clock.advance(.seconds(120))
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil, "stale, within the max age")
        clock.advance(.seconds(100))
        do {
            let keys = try await cache.keys(for: issuer, kid: kid)
            Issue.record("keys past their max age were used: \(keys.keys.keys.sorted())")
        } catch {
            #expect(error.code == "keys_unavailable", "\(error)")
        }
        // Once the issuer answers again, its keys are fetched (after the refetch interval) and used.
        provider.overrideJWKS(nil)
        clock.advance(.seconds(31))
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil)
    }
}
