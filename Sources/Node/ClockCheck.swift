import Raft
import Synchronization
import Transport

/// This node's wall clock against the cluster's, judged by the node's
/// watcher (every 10 ticks) from the clock stamps peers send with their
/// traffic (`PeerClocks`). While it disagrees with a quorum of the
/// voters, this node signs no identity (`clock_skew`, 503), and as leader
/// it hands leadership to a voter whose clock the majority shares.
public final class ClockCheck: Sendable {
    /// Clocks further apart than this disagree. Identities are backdated
    /// by 30 s (`X509Authority.backdate`), so one issued by a leader within
    /// the bound is valid at once for every relying party on the
    /// cluster's time.
    public static let boundMillis: Int64 = 10_000
    /// Readings older than this are not counted (a peer that stopped
    /// sending is not known to agree or disagree).
    public static let readingMaxAge: Duration = .seconds(5)

    private let state = Mutex<(verdict: ClockAgreement, offsets: [NodeID: Int64])>((.agrees, [:]))

    public init() {}

    public var verdict: ClockAgreement { state.withLock { $0.verdict } }

    /// Each peer's latest clock offset in milliseconds (positive: ahead of this node).
    public var offsets: [NodeID: Int64] { state.withLock { $0.offsets } }

    /// Judges the clock again from `offsets`; true if it went from
    /// agreeing to disagreeing or back, or other voters now disagree.
    @discardableResult
    public func update(own: NodeID, voters: Set<NodeID>, offsets: [NodeID: Int64]) -> Bool {
        let verdict = ClockAgreement.judge(own: own, voters: voters, offsets: offsets, boundMillis: Self.boundMillis)
        return state.withLock { state in
            defer { state = (verdict, offsets) }
            return state.verdict.disagreeing != verdict.disagreeing
        }
    }

    /// The Prometheus lines for /metrics.
    var metricsText: String {
        let (verdict, offsets) = state.withLock { ($0.verdict, $0.offsets) }
        var text = "# HELP warrant_clock_peer_offset_seconds How far each peer's wall clock is ahead of this node's (its latest clock stamp).\n"
            + "# TYPE warrant_clock_peer_offset_seconds gauge\n"
        for (peer, offset) in offsets.sorted(by: { $0.key < $1.key }) {
            text += "warrant_clock_peer_offset_seconds{peer=\"\(peer)\"} \(Double(offset) / 1000)\n"
        }
        text += "# HELP warrant_clock_disagrees Whether this node's clock disagrees with a quorum of the voters (then it signs no identity).\n"
            + "# TYPE warrant_clock_disagrees gauge\nwarrant_clock_disagrees \(verdict.disagreeing.isEmpty ? 0 : 1)\n"
        return text
    }

    /// Throws `clock_skew` (503) while this node's clock disagrees.
    func requireAgreement() throws {
        let verdict = self.verdict
        guard case .disagrees = verdict else { return }
        throw APIError.unavailable("clock_skew", "this node's clock is \(verdict.description); it signs no identity until its clock agrees with "
            + "the cluster's (relying parties on time would take it for not yet valid, or already partly spent)")
    }
}
