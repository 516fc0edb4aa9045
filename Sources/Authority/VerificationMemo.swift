import Crypto
import Synchronization

/// Verifications already done under one set of keys, by the SHA-256 of
/// what was presented.
///
/// A service that relies on SPIFFE identities sees the same JWT-SVID on
/// every call its peer makes until it expires, and the same X509-SVID on
/// every connection; the signature checks (ECDSA or RSA) are most of what
/// verifying costs. A memo belongs to one key set (the node makes new ones
/// whenever its keys or revocations change), so a key id or a trusted
/// authority always means the same key within it. What a hit may skip is
/// up to the verifier: see `JWTVerifier` and `TrustBundle.verifyX509(chainPEM:memo:now:)`.
/// Bounded: when full it starts over.
public final class VerificationMemo<Value: Sendable>: Sendable {
    public let capacity: Int
    private let entries: Mutex<[MemoDigest: Value]>

    /// Entries held at most.
    public static var defaultCapacity: Int { 16_384 }

    public init(capacity: Int = VerificationMemo.defaultCapacity) {
        precondition(capacity > 0)
        self.capacity = capacity
        entries = Mutex([:])
    }

    public var count: Int { entries.withLock { $0.count } }

    func value(for digest: MemoDigest) -> Value? { entries.withLock { $0[digest] } }

    func remember(_ value: Value, for digest: MemoDigest) {
        entries.withLock { entries in
            if entries.count >= capacity, entries[digest] == nil { entries.removeAll(keepingCapacity: true) }
            entries[digest] = value
        }
    }
}

/// JWTs whose signature verified (the value is empty).
public typealias SignatureMemo = VerificationMemo<Bool>

/// The 32 bytes of a SHA-256, as four words (hashes faster than bytes).
struct MemoDigest: Hashable {
    let a, b, c, d: UInt64

    init(_ digest: SHA256Digest) {
        (a, b, c, d) = digest.withUnsafeBytes { raw in
            (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
             raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        }
    }
}
