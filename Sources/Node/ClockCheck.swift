import Raft
import Synchronization
import Transport

/// This node's wall clock against the cluster's, judged by the node's
/// watcher (every 10 ticks) from the clock stamps peers send with their
/// traffic (`PeerClocks`). While it disagrees with a quorum of the
/// voters, this node signs no identity (`clock_skew`, 503), and as leader
/// it hands leadership to a voter whose clock the majority shares.
public final class ClockCheck: Sendable {
    /// Clocks further apart than this disagree. An X509-SVID's notBefore
    /// is 30 s before its issue (`X509Authority.backdate`), so one issued
    /// by a leader within the bound is valid at once for every relying
    /// party on the cluster's time; a JWT-SVID's iat is at most this far
    /// ahead of theirs.
    public static let boundMillis: Int64 = 10_000
    /// Once it disagrees, the clock agrees again only within this (a clock
    /// near the bound does not flap between the two).
    public static let agreeAgainMillis: Int64 = 8_000
    /// A disagreement counts once it has lasted this long. Stamps that were
    /// held up (this node paused, a stalled link) make the peers look
    /// behind by the delay until their next stamps come, within a second;
    /// a clock that is really off stays off.
    public static let sustainedFor: Duration = .seconds(2)
    /// Readings older than this are not counted (a peer that stopped
    /// sending is not known to agree or disagree).
    public static let readingMaxAge: Duration = .seconds(5)

    private struct State {
        var verdict = ClockAgreement.agrees
        /// Since when the readings have said it disagrees.
        var disagreeingSince: ContinuousClock.Instant?
        var offsets: [NodeID: Int64] = [:]
    }
    private let state = Mutex(State())

    public init() {}

    public var verdict: ClockAgreement { state.withLock { $0.verdict } }

    /// Each peer's latest clock offset in milliseconds (positive: ahead of this node).
    public var offsets: [NodeID: Int64] { state.withLock { $0.offsets } }

    /// Judges the clock again from `offsets`; true if it went from
    /// agreeing to disagreeing or back, or other voters now disagree.
    @discardableResult
    public func update(own: NodeID, voters: Set<NodeID>, offsets: [NodeID: Int64], now: ContinuousClock.Instant = .now) -> Bool {
        state.withLock { state in
            let bound = state.verdict.disagreeing.isEmpty ? Self.boundMillis : Self.agreeAgainMillis
            let readings = ClockAgreement.judge(own: own, voters: voters, offsets: offsets, boundMillis: bound)
            state.offsets = offsets
            if readings.disagreeing.isEmpty {
                state.disagreeingSince = nil
            } else if state.disagreeingSince == nil {
                state.disagreeingSince = now
            }
            let sustained = state.disagreeingSince.map { now - $0 >= Self.sustainedFor } ?? false
            let verdict = sustained ? readings : .agrees
            defer { state.verdict = verdict }
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

    /// Throws `clock_skew` (503) while this node's clock disagrees: it
    /// does not do `what` (which stamps this clock's time on something
    /// others rely on).
    func requireAgreement(_ what: Stamped = .identity) throws {
        let verdict = self.verdict
        guard case .disagrees = verdict else { return }
        throw APIError.unavailable("clock_skew", "this node's clock is \(verdict.description); it \(what.rawValue) until its clock agrees with the cluster's")
    }

    /// What a clock that disagrees must not make.
    enum Stamped: String {
        case identity = "signs no identity (relying parties on time would take it for not yet valid, or already partly spent)"
        case revocation = "records no revocation or rotation (the rule's or the authority's time would come from this clock)"
        case crl = "signs no CRL (its thisUpdate and nextUpdate would be off for relying parties)"
        case joinToken = "makes no join token (the token's expiry would come from this clock)"
        case verdict = "gives no verdict on an identity (its expiry, and whether its authority is still trusted, are judged by this clock)"
    }
}

extension ClockCheck {
    /// Whom a leader hands leadership to: the most caught-up voter it
    /// tracks (`matchIndexes`, by follower) whose clock agrees with a
    /// quorum of the voters by this node's readings (`offsets`), the lower
    /// id on a tie. With `orAnyClock` (a leader that is stopping: any
    /// leader is sooner than an election) the most caught-up voter when no
    /// clock agrees; without it, nil then.
    public static func handOverTarget(own: NodeID, membership: Membership, matchIndexes: [NodeID: LogIndex], offsets: [NodeID: Int64],
                                      orAnyClock: Bool) -> NodeID? {
        let voters = membership.voters.filter { $0 != own && matchIndexes[$0] != nil }
        let agreeing = voters.filter {
            ClockAgreement.agreeing(with: $0, own: own, voters: membership.voters, offsets: offsets, boundMillis: boundMillis) >= membership.quorum
        }
        let candidates = agreeing.isEmpty && orAnyClock ? voters : agreeing
        return candidates.max { (matchIndexes[$0]!, $1) < (matchIndexes[$1]!, $0) }
    }
}
