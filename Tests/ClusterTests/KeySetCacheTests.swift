import Attestation
import ClusterHarness
import Foundation
import Node
import Policy
import Testing

@Suite("Issuer key cache")
struct KeySetCacheTests {
    @Test("Keys older than the cache's max age are not used while refreshing them fails: a key the issuer withdrew stops being trusted even if its fetches are blocked")
    func keysExpire() async throws {
        let provider = try TestIssuer(keys: [.rsa2048])
        try await provider.serve()
        defer { Task { await provider.stop() } }
        let issuer = try IssuerConfig(name: "github", document: githubIssuerYAML(provider), defaultAudience: "warrant.local")
        let cache = KeySetCache(fetcher: KeySetFetcher(allowHTTPLoopback: false), refetchInterval: .milliseconds(100),
                                refreshInterval: .milliseconds(200), maxAge: .milliseconds(1_500))
        let kid = provider.keys[0].kid
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil)
        // Every fetch fails from now on (the issuer's answer is not a key set).
        provider.overrideJWKS(Array("not json".utf8))
        // Stale and refreshed in vain: the last good keys keep serving until the max age.
        try await Task.sleep(for: .milliseconds(300))
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil)
        try await Task.sleep(for: .milliseconds(1_400))
        do {
            let keys = try await cache.keys(for: issuer, kid: kid)
            Issue.record("keys past their max age were used: \(keys.keys.keys.sorted())")
        } catch {
            #expect(error.code == "keys_unavailable", "\(error)")
        }
        // Once the issuer answers again, its keys are fetched and used.
        provider.overrideJWKS(nil)
        try await Task.sleep(for: .milliseconds(150))
        #expect(try await cache.keys(for: issuer, kid: kid).keys[kid] != nil)
    }
}
