/// The leader's view of one follower's log (section 5.3's nextIndex and
/// matchIndex), with the flow-control state around it.
struct Progress {
    enum State: Equatable {
        /// Unsure where the logs agree: one AppendEntries per heartbeat
        /// until an answer comes back.
        case probe
        /// Logs agree up to `match`: stream entries optimistically, bounded
        /// by the in-flight window.
        case replicate
        /// The follower needs a snapshot at this index; nothing else is sent
        /// until it answers or the snapshot times out.
        case snapshot(index: LogIndex, sentAtTick: Int)
    }

    var matchIndex: LogIndex = 0
    var nextIndex: LogIndex
    var state: State = .probe
    /// In the probe state, a message was sent since the last heartbeat.
    var probeSent = false
    /// An AppendEntries was sent since the last heartbeat interval.
    var appendedSinceHeartbeat = false
    /// Heard from since the last check-quorum round.
    var recentlyActive = false
    var isLearner: Bool
    var inflight: Inflight
    /// Highest read round this follower has acknowledged in this term.
    var readRoundAcknowledged: UInt64 = 0
    /// Highest commit index this follower reported having.
    var commitKnown: LogIndex = 0

    init(nextIndex: LogIndex, isLearner: Bool, inflightMessagesMax: Int, inflightBytesMax: Int) {
        self.nextIndex = nextIndex
        self.isLearner = isLearner
        self.inflight = Inflight(messagesMax: inflightMessagesMax, bytesMax: inflightBytesMax)
    }

    var isPaused: Bool {
        switch state {
        case .probe: return probeSent
        case .replicate: return inflight.isFull
        case .snapshot: return true
        }
    }

    mutating func becomeProbe() {
        if case .snapshot(let index, _) = state {
            nextIndex = max(matchIndex + 1, index + 1)
        } else {
            nextIndex = matchIndex + 1
        }
        state = .probe
        probeSent = false
        inflight.reset()
    }

    mutating func becomeReplicate() {
        state = .replicate
        nextIndex = matchIndex + 1
        probeSent = false
        inflight.reset()
    }

    mutating func becomeSnapshot(index: LogIndex, tick: Int) {
        state = .snapshot(index: index, sentAtTick: tick)
        probeSent = false
        inflight.reset()
    }

    /// Records an acknowledgement up to `index`; false if it was stale.
    mutating func acknowledge(through index: LogIndex) -> Bool {
        var updated = false
        if index > matchIndex {
            matchIndex = index
            probeSent = false
            updated = true
        }
        nextIndex = max(nextIndex, index + 1)
        return updated
    }

    /// Handles a rejection of the AppendEntries at `rejectedIndex`, moving
    /// `nextIndex` back to `hintNext`. False if the rejection was stale.
    mutating func rejected(at rejectedIndex: LogIndex, hintNext: LogIndex) -> Bool {
        switch state {
        case .replicate:
            // A rejection of something at or below match is a stale reply.
            guard rejectedIndex > matchIndex else { return false }
            becomeProbe()
            nextIndex = max(min(hintNext, nextIndex), matchIndex + 1)
            return true
        case .probe:
            // Only the reply to the probe we are waiting for counts.
            guard rejectedIndex == nextIndex - 1 else { return false }
            nextIndex = max(min(hintNext, rejectedIndex), matchIndex + 1)
            probeSent = false
            return true
        case .snapshot:
            return false
        }
    }

    /// Bookkeeping after sending entries up to `lastIndex` with `bytes` bytes.
    mutating func sent(lastIndex: LogIndex, bytes: Int, entryCount: Int) {
        switch state {
        case .replicate:
            if entryCount > 0 {
                nextIndex = lastIndex + 1
                inflight.add(lastIndex: lastIndex, bytes: bytes)
            }
        case .probe:
            probeSent = true
        case .snapshot:
            preconditionFailure("no entries are sent while a snapshot is pending")
        }
    }
}

/// A bounded window of AppendEntries in flight to one follower, freed as
/// acknowledgements arrive. A ring buffer: no allocation after the first use.
struct Inflight {
    let messagesMax: Int
    let bytesMax: Int
    private var lastIndices: [LogIndex] = []
    private var sizes: [Int] = []
    private var start = 0
    private(set) var count = 0
    private(set) var bytes = 0

    init(messagesMax: Int, bytesMax: Int) {
        precondition(messagesMax >= 1 && bytesMax >= 1)
        self.messagesMax = messagesMax
        self.bytesMax = bytesMax
    }

    var isFull: Bool { count >= messagesMax || bytes >= bytesMax }

    mutating func add(lastIndex: LogIndex, bytes size: Int) {
        precondition(count < messagesMax, "in-flight window overflow")
        if lastIndices.isEmpty {
            lastIndices = Array(repeating: 0, count: messagesMax)
            sizes = Array(repeating: 0, count: messagesMax)
        }
        let slot = (start + count) % messagesMax
        if count > 0 {
            let previous = lastIndices[(start + count - 1) % messagesMax]
            precondition(lastIndex > previous, "in-flight indices must increase")
        }
        lastIndices[slot] = lastIndex
        sizes[slot] = size
        count += 1
        bytes += size
    }

    /// Frees every message whose entries are all at or below `index`.
    mutating func free(through index: LogIndex) {
        while count > 0 && lastIndices[start] <= index {
            bytes -= sizes[start]
            start = (start + 1) % messagesMax
            count -= 1
        }
        if count == 0 { start = 0 }
    }

    mutating func reset() {
        start = 0
        count = 0
        bytes = 0
    }
}
