import Crypto
import Synchronization

/// JWTs whose signature has verified under one set of keys, by the
/// SHA-256 of the token's bytes.
///
/// A service that relies on JWT-SVIDs sees the same token on every call
/// its peer makes until the token expires, and the signature check (an
/// ECDSA or RSA verification) is most of what verifying costs. A memo hit
/// skips only that check: the header, key id, algorithm, claims, audience,
/// expiry and (in the node) revocation are read again every time. A memo
/// belongs to one key set (the node makes a new one whenever its keys or
/// revocations change), so a key id always means the same key within it.
/// Bounded: when full it starts over.
public final class SignatureMemo: Sendable {
    public let capacity: Int
    private let digests: Mutex<Set<Digest>>

    /// The 32 bytes of a SHA-256, as four words (hashes faster than bytes).
    struct Digest: Hashable {
        let a, b, c, d: UInt64

        init(_ digest: SHA256Digest) {
            (a, b, c, d) = digest.withUnsafeBytes { raw in
                (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                 raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
            }
        }
    }

    /// Tokens held at most (about 40 bytes each, with the set's overhead).
    public static let defaultCapacity = 16_384

    public init(capacity: Int = SignatureMemo.defaultCapacity) {
        precondition(capacity > 0)
        self.capacity = capacity
        digests = Mutex([])
    }

    public var count: Int { digests.withLock { $0.count } }

    func contains(_ digest: Digest) -> Bool { digests.withLock { $0.contains(digest) } }

    func insert(_ digest: Digest) {
        digests.withLock { set in
            if set.count >= capacity { set.removeAll(keepingCapacity: true) }
            set.insert(digest)
        }
    }
}
