import Client
import Testing

@Suite("Job-side idempotency keys")
struct IdempotencyKeyTests {
    @Test("One attempt presenting the same evidence asks with the same key (a retry gets the answer already given); another token, certificate or attempt gets another; every key is within the cluster's 128 bytes")
    func derived() {
        let token = "eyJ.a.b", other = "eyJ.c.d"
        #expect(IdempotencyKey.derive(nonce: "n1", evidence: token) == IdempotencyKey.derive(nonce: "n1", evidence: token))
        #expect(IdempotencyKey.derive(nonce: "n1", evidence: token) != IdempotencyKey.derive(nonce: "n1", evidence: other))
        #expect(IdempotencyKey.derive(nonce: "n1", evidence: token) != IdempotencyKey.derive(nonce: "n2", evidence: token))
        // The two parts never run together.
        #expect(IdempotencyKey.derive(nonce: "a", evidence: "b\nc") != IdempotencyKey.derive(nonce: "a\nb", evidence: "c"))
        let key = IdempotencyKey.derive(nonce: String(repeating: "n", count: 500), evidence: String(repeating: "t", count: 5_000))
        #expect(key.utf8.count == 64 && !key.contains(token))
    }
}
