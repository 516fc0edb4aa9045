import Attestation
import Authority
import ClusterHarness
import Encoding
import Foundation
import Testing
import TestSupport

/// A small seeded generator (xorshift64*), so a failing case can be replayed.
struct Xorshift: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}

@Suite("Platform token fuzzing", .onOwnThreads)
struct FuzzTests {
    static let iterations = 100_000

    /// Mutations of a valid token: byte flips, insertions, deletions,
    /// segment swaps and truncations, re-encoded header or claims with
    /// one JSON byte changed; plus random strings. Every one must be
    /// refused (none may crash), and the unmutated token must still pass.
    @Test("100,000 random and mutated tokens through the parser and verifier: no crash, no acceptance (seed 20261123)")
    func fuzz() async throws {
        let fixture = try Fixture([.ecdsaP256, .rsa2048])
        let valid = try fixture.provider.mint(fixture.github())
        let validRSA = try fixture.provider.mint(fixture.github(), kid: "key-2")
        #expect(fixture.refusal(valid) == nil && fixture.refusal(validRSA) == nil)
        var random = Xorshift(seed: 20_261_123)
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\":,[]\\".utf8)
        var accepted: [String] = []
        var reachedSignature = 0
        for iteration in 0..<Self.iterations {
            // Long and CPU-bound: let other tests' tasks (timers, network) run on this thread too.
            if iteration % 100 == 0 { await Task.yield() }
            let base = Array((iteration % 2 == 0 ? valid : validRSA).utf8)
            var bytes = base
            switch iteration % 7 {
            case 0: // flip bytes
                for _ in 0..<Int.random(in: 1...4, using: &random) {
                    let i = Int.random(in: 0..<bytes.count, using: &random)
                    bytes[i] ^= UInt8.random(in: 1...255, using: &random)
                }
            case 1: // insert
                for _ in 0..<Int.random(in: 1...8, using: &random) {
                    bytes.insert(alphabet.randomElement(using: &random)!, at: Int.random(in: 0...bytes.count, using: &random))
                }
            case 2: // delete a run
                let start = Int.random(in: 0..<bytes.count, using: &random)
                bytes.removeSubrange(start..<min(bytes.count, start + Int.random(in: 1...16, using: &random)))
            case 3: // swap or duplicate segments
                var parts = String(decoding: bytes, as: UTF8.self).split(separator: ".", omittingEmptySubsequences: false).map(String.init)
                let i = Int.random(in: 0..<parts.count, using: &random), j = Int.random(in: 0..<parts.count, using: &random)
                if i == j { parts.insert(parts[i], at: i) } else { parts.swapAt(i, j) }
                bytes = Array(parts.joined(separator: ".").utf8)
            case 4: // change one byte of the decoded header or claims, re-encode (signature kept)
                var parts = String(decoding: bytes, as: UTF8.self).split(separator: ".").map(String.init)
                let which = Int.random(in: 0...1, using: &random)
                var decoded = Base64URL.decode(parts[which])!
                decoded[Int.random(in: 0..<decoded.count, using: &random)] = alphabet.randomElement(using: &random)!
                parts[which] = Base64URL.encode(decoded)
                bytes = Array(parts.joined(separator: ".").utf8)
            case 5: // truncate
                bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &random)))
            default: // random text
                bytes = (0..<Int.random(in: 0...400, using: &random)).map { _ in alphabet.randomElement(using: &random)! }
            }
            guard bytes != base else { continue }
            let text = String(decoding: bytes, as: UTF8.self)
            do {
                let token = try PlatformToken(parsing: text)
                reachedSignature += 1
                _ = try TokenVerifier.verify(token, method: .github, requirements: fixture.requirements, keys: fixture.keys, now: fixture.now)
                accepted.append(text)
            } catch {
                #expect(!error.code.isEmpty && !error.message.isEmpty)
            }
        }
        #expect(accepted.isEmpty, "accepted mutated tokens: \(accepted.prefix(3))")
        // The mutations must reach past the parser often enough to test the verifier too.
        #expect(reachedSignature > Self.iterations / 10, "only \(reachedSignature) parsed")
    }
}
