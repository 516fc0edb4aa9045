import NIOCore
import Raft
import Synchronization

/// How far each peer's wall clock is from this node's, as its clock
/// frames say: the peer's time in the frame minus this node's time when
/// the frame arrived (so a peer ahead reads positive; the frame's time on
/// the wire, well under a millisecond on a LAN, counts against the peer).
public final class PeerClocks: Sendable {
    private let readings = Mutex<[NodeID: (offsetMillis: Int64, at: ContinuousClock.Instant)]>([:])

    public init() {}

    public func record(_ peer: NodeID, offsetMillis: Int64, at instant: ContinuousClock.Instant = .now) {
        readings.withLock { $0[peer] = (offsetMillis, instant) }
    }

    /// `peer`'s latest reading and when it arrived.
    public func latest(_ peer: NodeID) -> (offsetMillis: Int64, at: ContinuousClock.Instant)? {
        readings.withLock { $0[peer] }
    }

    /// Each peer's latest offset, if it arrived within `maxAge`.
    public func offsets(maxAge: Duration, now: ContinuousClock.Instant = .now) -> [NodeID: Int64] {
        readings.withLock { readings in readings.filter { now - $0.value.at <= maxAge }.mapValues(\.offsetMillis) }
    }
}

/// Whether this node's wall clock agrees with the cluster's: with a
/// quorum of the voters (itself included) within `boundMillis` of it.
///
/// An identity carries the issuer's time (notBefore, iat, exp): a leader
/// whose clock runs ahead issues identities that relying parties on time
/// take for not yet valid, one behind issues them already half spent.
/// Nobody can tell which clock is right, so the cluster goes by its
/// majority. A node is judged skewed only on evidence: some voter's clock
/// disagrees and too few agree; with no readings (a node just started, a
/// single-node cluster) it is taken to agree.
public enum ClockAgreement: Sendable, Equatable {
    case agrees
    /// Voters whose clocks disagree by more than the bound, and the middle
    /// of their offsets (positive: they are ahead of this node).
    case disagrees(voters: [NodeID], medianOffsetMillis: Int64)

    public static func judge(own: NodeID, voters: Set<NodeID>, offsets: [NodeID: Int64], boundMillis: Int64) -> ClockAgreement {
        let disagreeing = voters.subtracting([own]).sorted().filter { offsets[$0].map { abs($0) > boundMillis } ?? false }
        guard !disagreeing.isEmpty,
              agreeing(with: own, own: own, voters: voters, offsets: offsets, boundMillis: boundMillis) < voters.count / 2 + 1 else { return .agrees }
        let sorted = disagreeing.map { offsets[$0]! }.sorted()
        return .disagrees(voters: disagreeing, medianOffsetMillis: sorted[sorted.count / 2])
    }

    /// How many voters' clocks are within `boundMillis` of `node`'s, by
    /// `own`'s readings (`offsets` are from `own`'s clock, which reads 0);
    /// a voter without a reading does not count.
    public static func agreeing(with node: NodeID, own: NodeID, voters: Set<NodeID>, offsets: [NodeID: Int64], boundMillis: Int64) -> Int {
        func offset(_ id: NodeID) -> Int64? { id == own ? 0 : offsets[id] }
        guard let base = offset(node) else { return 0 }
        return voters.filter { offset($0).map { abs($0 - base) <= boundMillis } ?? false }.count
    }

    /// The voters whose clocks disagree (none when it agrees).
    public var disagreeing: [NodeID] {
        if case .disagrees(let voters, _) = self { return voters }
        return []
    }

    /// How far off this node's clock is, for logs and errors.
    public var description: String {
        switch self {
        case .agrees: return "agrees with the cluster"
        case .disagrees(let voters, let offset):
            let tenths = (abs(offset) + 50) / 100
            return "\(tenths / 10).\(tenths % 10) s \(offset > 0 ? "behind" : "ahead of") node\(voters.count == 1 ? "" : "s") \(voters.map(String.init).joined(separator: ", "))"
        }
    }
}

/// Waits `duration` on `loop`'s timer, which runs on the monotonic clock.
/// Swift's `Task.sleep` was seen never to return in a process whose wall
/// clock was set back by libfaketime (two minutes behind; a real backward
/// step of the system clock did not do it), so the node's
/// periodic work (clock stamps, reconnect backoff, the watcher) waits here:
/// a node with a wrong clock must still notice it.
public func sleep(for duration: Duration, on loop: any EventLoop) async throws {
    let scheduled = loop.scheduleTask(in: TimeAmount(duration)) {}
    try await withTaskCancellationHandler {
        try await scheduled.futureResult.get()
    } onCancel: {
        scheduled.cancel()
    }
}
