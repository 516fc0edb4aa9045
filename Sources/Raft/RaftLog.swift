/// The node's log: a snapshot point followed by the entries after it, all in
/// memory. `stableIndex` marks how much of it the driver has made durable;
/// `commitIndex` and `appliedIndex` follow Figure 2.
struct RaftLog {
    private(set) var snapshotIndex: LogIndex
    private(set) var snapshotTerm: Term
    /// entries[i] has index snapshotIndex + 1 + i.
    private(set) var entries: [Entry]
    /// Entries up to here are on stable storage.
    private(set) var stableIndex: LogIndex
    private(set) var commitIndex: LogIndex
    /// Committed entries up to here were handed to the driver to apply.
    private(set) var appliedIndex: LogIndex
    /// A received snapshot not yet handed to the driver to persist.
    private(set) var pendingSnapshot: Snapshot?
    /// Commands up to here (and after the snapshot) are `.released`.
    private(set) var releasedThrough: LogIndex = 0

    init(snapshot: SnapshotMetadata?, entries: [Entry], commitIndex: LogIndex, appliedIndex: LogIndex) {
        snapshotIndex = snapshot?.index ?? 0
        snapshotTerm = snapshot?.term ?? 0
        for (offset, entry) in entries.enumerated() {
            precondition(entry.index == snapshotIndex + 1 + LogIndex(offset), "durable log is not contiguous after the snapshot at \(snapshotIndex)")
        }
        self.entries = entries
        stableIndex = snapshotIndex + LogIndex(entries.count)
        precondition(commitIndex <= stableIndex, "durable commit index \(commitIndex) is past the last durable entry \(stableIndex)")
        self.commitIndex = max(commitIndex, snapshotIndex)
        self.appliedIndex = max(min(appliedIndex, self.commitIndex), snapshotIndex)
    }

    var firstIndex: LogIndex { snapshotIndex + 1 }
    var lastIndex: LogIndex { snapshotIndex + LogIndex(entries.count) }
    var lastTerm: Term { entries.last?.term ?? snapshotTerm }

    /// The term of the entry at `index`, or nil if it is compacted or absent.
    func term(at index: LogIndex) -> Term? {
        if index == snapshotIndex { return snapshotTerm }
        guard index > snapshotIndex, index <= lastIndex else { return nil }
        return entries[Int(index - snapshotIndex - 1)].term
    }

    func entry(at index: LogIndex) -> Entry {
        precondition(index > snapshotIndex && index <= lastIndex, "entry \(index) outside the log (\(snapshotIndex), \(lastIndex)]")
        return entries[Int(index - snapshotIndex - 1)]
    }

    func matches(index: LogIndex, term: Term) -> Bool {
        self.term(at: index) == term
    }

    /// Section 5.4.1: a candidate's log is at least as up to date as ours.
    func isUpToDate(lastIndex candidateIndex: LogIndex, lastTerm candidateTerm: Term) -> Bool {
        candidateTerm > lastTerm || (candidateTerm == lastTerm && candidateIndex >= lastIndex)
    }

    /// Entries in [from, through], cut at `bytesMax` (at least one entry).
    func entries(from: LogIndex, through: LogIndex, bytesMax: Int) -> ArraySlice<Entry> {
        guard from <= through else { return [] }
        precondition(from > snapshotIndex && through <= lastIndex, "entries [\(from), \(through)] outside the log")
        let start = Int(from - snapshotIndex - 1)
        let end = Int(through - snapshotIndex - 1)
        var bytes = 0
        var stop = start
        while stop <= end {
            bytes += entries[stop].byteCount
            if bytes > bytesMax && stop > start { break }
            stop += 1
        }
        return entries[start..<stop]
    }

    /// The last index at or below `index` whose term is at most `term`;
    /// where two logs disagree, it is a guess at where they agree again.
    /// Stops at the snapshot index, below which terms are unknown.
    func lastIndexAtOrBelow(_ index: LogIndex, withTermAtMost maxTerm: Term) -> LogIndex {
        var candidate = min(index, lastIndex)
        while candidate > snapshotIndex {
            if let t = term(at: candidate), t <= maxTerm { return candidate }
            candidate -= 1
        }
        return min(candidate, index)
    }

    mutating func append(_ newEntries: some Collection<Entry>) {
        guard let first = newEntries.first else { return }
        precondition(first.index == lastIndex + 1, "append at \(first.index) leaves a gap after \(lastIndex)")
        entries.append(contentsOf: newEntries)
    }

    /// Appends `newEntries` (which follow a matching prevLogIndex), replacing
    /// any conflicting suffix. Returns the index of the last new entry.
    /// Figure 2, AppendEntries steps 3 and 4.
    mutating func appendMatching(afterIndex prevIndex: LogIndex, _ newEntries: [Entry]) -> LogIndex {
        let lastNew = prevIndex + LogIndex(newEntries.count)
        // Find the first entry that is not already in the log with that term.
        var firstNew = newEntries.count
        for (offset, entry) in newEntries.enumerated() where entry.index > snapshotIndex {
            if term(at: entry.index) != entry.term {
                firstNew = offset
                break
            }
        }
        guard firstNew < newEntries.count else { return lastNew }
        let conflictIndex = newEntries[firstNew].index
        precondition(conflictIndex > commitIndex, "a leader tried to overwrite committed entry \(conflictIndex) (commit \(commitIndex))")
        if conflictIndex <= lastIndex {
            entries.removeSubrange(Int(conflictIndex - snapshotIndex - 1)...)
            stableIndex = min(stableIndex, conflictIndex - 1)
        }
        append(newEntries[firstNew...])
        return lastNew
    }

    mutating func commit(to index: LogIndex) {
        guard index > commitIndex else { return }
        precondition(index <= lastIndex, "commit \(index) past last index \(lastIndex)")
        commitIndex = index
    }

    /// Committed entries not yet handed out, cut at `bytesMax`. Some may be
    /// in the same Ready's `entries`: the driver persists before applying.
    func entriesToApply(bytesMax: Int) -> ArraySlice<Entry> {
        guard commitIndex > appliedIndex else { return [] }
        return entries(from: appliedIndex + 1, through: commitIndex, bytesMax: bytesMax)
    }

    mutating func markApplied(through index: LogIndex) {
        precondition(index >= appliedIndex && index <= commitIndex, "applied \(index) outside [\(appliedIndex), \(commitIndex)]")
        appliedIndex = index
    }

    var unstableEntries: ArraySlice<Entry> {
        guard stableIndex < lastIndex else { return [] }
        return entries[Int(stableIndex - snapshotIndex)...]
    }

    mutating func markStable(through index: LogIndex, term: Term) {
        // Entries may have been replaced since the Ready was taken only if a
        // step ran in between, which the core forbids; check anyway.
        precondition(matches(index: index, term: term) || index == 0, "stable entry \(index) changed before advance")
        stableIndex = max(stableIndex, index)
    }

    /// Drops everything and starts again from `snapshot` (a follower that
    /// was too far behind).
    mutating func restore(_ snapshot: Snapshot) {
        snapshotIndex = snapshot.metadata.index
        snapshotTerm = snapshot.metadata.term
        entries = []
        stableIndex = snapshotIndex
        commitIndex = snapshotIndex
        appliedIndex = snapshotIndex
        pendingSnapshot = snapshot
    }

    /// Drops from memory the command bytes of entries up to `index`,
    /// clamped to what is both applied and stable (the driver can read
    /// those back from storage). Returns how many were released.
    mutating func releasePayloads(through index: LogIndex) -> Int {
        let limit = min(index, appliedIndex, stableIndex, lastIndex)
        var released = 0
        var next = max(releasedThrough, snapshotIndex) + 1
        while next <= limit {
            let position = Int(next - snapshotIndex - 1)
            if case .command(let bytes) = entries[position].payload {
                entries[position].payload = .released(byteCount: bytes.count)
                released += 1
            }
            next += 1
        }
        releasedThrough = max(releasedThrough, limit)
        return released
    }

    mutating func takePendingSnapshot() -> Snapshot? {
        defer { pendingSnapshot = nil }
        return pendingSnapshot
    }

    /// Forgets entries up to `index` (covered by a snapshot the driver took).
    mutating func compact(through index: LogIndex) {
        precondition(index > snapshotIndex && index <= appliedIndex && index <= stableIndex)
        let newTerm = term(at: index)!
        entries.removeFirst(Int(index - snapshotIndex))
        snapshotIndex = index
        snapshotTerm = newTerm
    }
}
