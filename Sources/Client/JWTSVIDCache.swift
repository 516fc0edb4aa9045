import Foundation
import Synchronization

/// JWT-SVIDs an agent holds for the identity it serves, by audience set,
/// handed out again until half their lifetime has passed (as SPIRE's
/// agent does): a workload that asks on every call then makes no issuance
/// each time (the cluster allows one identity line 100 at once and 20 a
/// second).
///
/// It also holds the identity itself: each one the agent takes starts a
/// new generation and empties the cache, in one step, and a caller reads
/// the identity and its generation together. A token asked for under one
/// generation and answered after the next has begun is not kept: a
/// request in flight across a join again must not leave the old line's
/// token to be handed out for the new one.
public final class JWTSVIDCache<Identity: Sendable>: Sendable {
    private struct State {
        var generation: UInt64 = 0
        var identity: Identity?
        var entries: [String: (token: String, reuseUntil: Date)] = [:]
    }
    private let state = Mutex(State())
    /// The most audience sets held; past it, those no longer reusable are
    /// dropped, and if that is not enough, all of them.
    public let entriesMax: Int

    public init(entriesMax: Int = 1_000) {
        precondition(entriesMax >= 1, "a cache holds at least one entry")
        self.entriesMax = entriesMax
    }

    /// The identity held and its generation, read together (pass the
    /// generation to `keep` for a token asked for with this identity).
    public var current: (identity: Identity?, generation: UInt64) { state.withLock { ($0.identity, $0.generation) } }

    /// Audience sets held (for tests and metrics).
    public var count: Int { state.withLock { $0.entries.count } }

    /// Takes `identity` in a new generation: nothing held before is
    /// handed out again.
    public func replaceIdentity(_ identity: Identity) {
        state.withLock { state in
            state.generation &+= 1
            state.identity = identity
            state.entries.removeAll()
        }
    }

    /// A token held for `audiences` (order and repeats do not matter) that
    /// may still be handed out at `now`.
    public func token(for audiences: [String], at now: Date) -> String? {
        let key = Self.key(audiences)
        return state.withLock { state in
            guard let held = state.entries[key], held.reuseUntil > now else { return nil }
            return held.token
        }
    }

    /// Holds `token`, issued for `audiences` and expiring at `expiresAt`,
    /// until half its remaining lifetime from `now` has passed, unless the
    /// identity was replaced since `generation` was read or it has
    /// expired. Returns whether it was kept.
    @discardableResult
    public func keep(_ token: String, for audiences: [String], expiresAt: Date, now: Date, generation: UInt64) -> Bool {
        guard expiresAt > now else { return false }
        let key = Self.key(audiences)
        return state.withLock { state in
            guard state.generation == generation else { return false }
            if state.entries[key] == nil && state.entries.count >= entriesMax {
                state.entries = state.entries.filter { $0.value.reuseUntil > now }
                if state.entries.count >= entriesMax { state.entries.removeAll() }
            }
            state.entries[key] = (token, now.addingTimeInterval(expiresAt.timeIntervalSince(now) / 2))
            return true
        }
    }

    /// The audience set as one string: sorted, without repeats, each
    /// length-prefixed so no two sets share a key.
    static func key(_ audiences: [String]) -> String {
        Set(audiences).sorted().map { "\($0.utf8.count):\($0)" }.joined(separator: ",")
    }
}

/// Trust bundles come with their `spiffe_sequence` (the
/// `warrant-bundle-sequence` header, a renewal's `bundle_sequence`); a
/// client refreshing its bundle from whichever node answers keeps the
/// newest, so a node that is behind (a CA prepared a moment ago not yet
/// applied there) cannot hand it an older one.
public enum BundleSequence {
    /// Whether a bundle said to be at `fetched` replaces one held at
    /// `held`: not if it says it is older; one that says nothing (an older
    /// build) does.
    public static func takes(_ fetched: UInt64?, over held: UInt64) -> Bool {
        guard let fetched else { return true }
        return fetched >= held
    }
}
