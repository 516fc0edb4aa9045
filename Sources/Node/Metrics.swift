import Synchronization

/// A monotonically increasing count.
public final class Counter: Sendable {
    public let name: String
    public let help: String
    private let value = Atomic<Int>(0)

    init(_ name: String, _ help: String) {
        self.name = name
        self.help = help
    }

    public func add(_ amount: Int) { value.add(amount, ordering: .relaxed) }
    public var current: Int { value.load(ordering: .relaxed) }
}

/// Durations in fixed buckets (seconds), as Prometheus histograms count them.
public final class Histogram: Sendable {
    public let name: String
    public let help: String
    public static let bucketBounds: [Double] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
    private struct State {
        var counts = [Int](repeating: 0, count: Histogram.bucketBounds.count + 1)
        var sum = 0.0
    }
    private let state = Mutex(State())

    init(_ name: String, _ help: String) {
        self.name = name
        self.help = help
    }

    public func observe(_ duration: Duration) {
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        let bucket = Self.bucketBounds.firstIndex { seconds <= $0 } ?? Self.bucketBounds.count
        state.withLock {
            $0.counts[bucket] += 1
            $0.sum += seconds
        }
    }

    public var count: Int { state.withLock { $0.counts.reduce(0, +) } }

    func render(into text: inout String) {
        let (counts, sum) = state.withLock { ($0.counts, $0.sum) }
        text += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
        var cumulative = 0
        for (bound, count) in zip(Self.bucketBounds, counts) {
            cumulative += count
            text += "\(name)_bucket{le=\"\(bound)\"} \(cumulative)\n"
        }
        cumulative += counts.last ?? 0
        text += "\(name)_bucket{le=\"+Inf\"} \(cumulative)\n\(name)_sum \(sum)\n\(name)_count \(cumulative)\n"
    }
}

/// What a node counts and times, rendered at /metrics in the Prometheus
/// text format together with the gauges read from the Raft status.
public final class NodeMetrics: Sendable {
    public let proposals = Counter("warrant_raft_proposals_total", "Ledger commands proposed on this node as leader.")
    public let proposalBatches = Counter("warrant_raft_proposal_batches_total", "Batches of ledger commands this node appended as leader (one append each).")
    public let messagesSent = Counter("warrant_raft_messages_sent_total", "Raft messages handed to the transport.")
    public let messagesReceived = Counter("warrant_raft_messages_received_total", "Raft messages received from peers.")
    public let messagesFromRemoved = Counter("warrant_raft_messages_refused_total",
                                             "Raft messages dropped: from a node removed from the cluster, or proposals forwarded by a non-member or to another node.")
    public let snapshotsTaken = Counter("warrant_raft_snapshots_taken_total", "Ledger snapshots taken (log compactions).")
    public let checkpointsBegun = Counter("warrant_ledger_checkpoints_begun_total", "Ledger checkpoints begun (each written on a thread of its own, then taken as the snapshot).")
    public let snapshotsInstalled = Counter("warrant_raft_snapshots_installed_total", "Snapshots received from a leader and installed.")
    public let snapshotBytesSent = Counter("warrant_raft_snapshot_bytes_sent_total", "Bytes of snapshot streams sent to followers (pieces sent again included).")
    public let snapshotBytesStaged = Counter("warrant_raft_snapshot_bytes_staged_total", "Bytes of snapshot streams received from a leader and staged (each byte once).")
    public let snapshotTransfersAbandoned = Counter("warrant_raft_snapshot_transfers_abandoned_total", "Snapshot streams a leader gave up on (no progress after retries, or its file could not be made or read); the follower is probed again.")
    public let snapshotsSentWhole = Counter("warrant_raft_snapshots_sent_whole_total", "Snapshots sent as one message in the encoding of builds before streams, to a follower that took no stream.")
    public let snapshotStagingFailures = Counter("warrant_raft_snapshot_staging_failures_total", "Pieces of a snapshot stream this node could not stage (a write failed, or the whole failed its checksum).")
    public let compactionFailures = Counter("warrant_raft_compaction_failures_total", "Log compactions abandoned (the log stays longer).")
    public let releasedEntriesRead = Counter("warrant_raft_released_entries_read_total", "Log entries whose payloads were released from memory, read back from the write-ahead log for a peer that lags.")
    public let releasedEntryReadFailures = Counter("warrant_raft_released_entry_read_failures_total", "Messages to a lagging peer dropped because released entries could not be read back (the log is damaged; the node logs why).")
    public let forwardedWrites = Counter("warrant_api_forwarded_writes_total", "Writes this node forwarded to the leader.")
    public let signaturesChecked = Counter("warrant_verify_signatures_checked_total", "Identities verified here whose signature was checked (ECDSA or RSA).")
    public let signaturesRemembered = Counter("warrant_verify_signatures_remembered_total", "Identities verified here whose signature was checked before under the same keys.")
    public let signaturesRecorded = Counter("warrant_verify_recorded_total", "Identities verified here whose SHA-256 is in the replicated issuance records (the bytes the leader signed; no signature check needed).")
    public let storageWriteSeconds = Histogram("warrant_storage_write_seconds", "One synced write of a Ready (the write-ahead log: one write, one fdatasync).")
    public let applySeconds = Histogram("warrant_ledger_apply_seconds", "Applying one Ready's committed entries to the ledger in memory.")
    public let commitSeconds = Histogram("warrant_raft_commit_seconds", "From proposal to applied outcome, on the leader.")

    /// When this node's certificate expires (seconds since 1970; 0: not known).
    public let certificateNotAfter = Atomic<UInt64>(0)

    public init() {}

    /// The Prometheus exposition of these metrics and the status gauges.
    public func render(status: NodeStatusSnapshot) -> String {
        var text = ""
        func gauge(_ name: String, _ help: String, _ value: UInt64) {
            text += "# HELP \(name) \(help)\n# TYPE \(name) gauge\n\(name) \(value)\n"
        }
        gauge("warrant_raft_term", "Current Raft term.", status.term)
        text += "# HELP warrant_raft_role Role of this node (1 for the current role).\n# TYPE warrant_raft_role gauge\n"
        for role in ["follower", "preCandidate", "candidate", "leader"] {
            text += "warrant_raft_role{role=\"\(role)\"} \(status.role == role ? 1 : 0)\n"
        }
        gauge("warrant_raft_leader_id", "The node this node believes leads (0 if none).", status.leaderID)
        gauge("warrant_raft_commit_index", "Highest log index known committed.", status.commitIndex)
        gauge("warrant_raft_applied_index", "Highest log index applied to the ledger.", status.appliedIndex)
        gauge("warrant_raft_last_index", "Last index in this node's log.", status.lastIndex)
        gauge("warrant_raft_snapshot_index", "Index of the latest snapshot.", status.snapshotIndex)
        gauge("warrant_node_certificate_expiry_timestamp_seconds",
              "When this node's certificate (peer TLS and the API) expires, seconds since 1970; renew it before with 'warrant cluster renew-cert'.",
              certificateNotAfter.load(ordering: .relaxed))
        for counter in [proposals, proposalBatches, messagesSent, messagesReceived, messagesFromRemoved, snapshotsTaken, checkpointsBegun, snapshotsInstalled, snapshotBytesSent, snapshotBytesStaged, snapshotTransfersAbandoned, snapshotsSentWhole, snapshotStagingFailures, compactionFailures, releasedEntriesRead, releasedEntryReadFailures, forwardedWrites,
                        signaturesChecked, signaturesRemembered, signaturesRecorded] {
            text += "# HELP \(counter.name) \(counter.help)\n# TYPE \(counter.name) counter\n\(counter.name) \(counter.current)\n"
        }
        storageWriteSeconds.render(into: &text)
        applySeconds.render(into: &text)
        commitSeconds.render(into: &text)
        return text
    }
}

/// The numbers /metrics and /v1/cluster/status report, read from the driver.
public struct NodeStatusSnapshot: Sendable {
    public var term: UInt64
    public var role: String
    public var leaderID: UInt64
    public var commitIndex: UInt64
    public var appliedIndex: UInt64
    public var lastIndex: UInt64
    public var snapshotIndex: UInt64
}
