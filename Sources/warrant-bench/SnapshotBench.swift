import Foundation
import Ledger
import Raft
import Storage

// warrant-bench snapshot: a ledger snapshot far past what one message could
// carry (the codec's 256 MiB), sent as a node sends it. A single-voter
// store applies N document writes (one audit record each) and takes a
// checkpoint; its stream is made as for a follower, staged a megabyte at a
// time into a second store, and installed through a core there. Prints
// the stream's size, each step's time and the process's peak memory, and
// checks the two audit chains agree.

func runSnapshotBench(records: Int, directory: URL) throws {
    let leaderPath = directory.appendingPathComponent("snapshot-leader-\(UUID().uuidString)").path
    let followerPath = directory.appendingPathComponent("snapshot-follower-\(UUID().uuidString)").path
    defer {
        removeStore(leaderPath)
        removeStore(followerPath)
    }
    print("snapshot: \(records) audit records (one per document write, 64 documents), streamed in 1 MiB pieces to a second store")
    var (leader, node) = try singleVoter(path: leaderPath)
    func drain() throws {
        while node.hasReady {
            let ready = node.ready()
            _ = try leader.persistAndApply(ready)
            node.advance()
        }
    }
    try drain()
    let clock = ContinuousClock()
    var started = clock.now
    let now = UInt64(Date().timeIntervalSince1970 * 1000)
    for start in stride(from: 0, to: records, by: 1_000) {
        try node.propose(batch: (start..<min(records, start + 1_000)).map { n in
            // Actor and target about as long as an issuance's (a SPIFFE ID, a job's path).
            LedgerCommand(timeMillis: now, actor: "spiffe://bench.example.org/ci/github/acme-corp/payments-service/deploy", requestID: "write-\(n)",
                          operation: .putDocument(name: "jobs/acme-corp/payments-service/workflows/deploy/runs/\(n % 64)", format: .json,
                                                  content: Array("{\"n\":\(n)}".utf8), expectedVersion: nil)).encoded
        })
        try drain()
    }
    print(String(format: "  applied in %.1f s", seconds(clock.now - started)))
    let metadata = try node.snapshotMetadata(at: node.appliedIndex).unwrap("no snapshot metadata at the applied index")
    _ = try leader.beginCheckpoint(metadata).write()
    _ = try node.compactLog(through: metadata.index, snapshotData: [])
    try leader.compact(through: metadata, data: [])
    let residentBefore = resetPeakResident()

    started = clock.now
    let outgoing = try leader.outgoingSnapshot(for: metadata)
    let made = seconds(clock.now - started)
    let mebibytes = Double(outgoing.byteCount) / 1_048_576

    let follower = try RaftStore(directory: followerPath, synchronous: .full)
    try follower.initialize(with: .empty)
    started = clock.now
    var offset: UInt64 = 0
    var receipt: SnapshotReceipt?
    while offset < outgoing.byteCount {
        let chunk = try outgoing.chunk(at: offset, count: 1 << 20)
        receipt = try follower.receiveSnapshotChunk(chunk, from: 1)
        offset += UInt64(chunk.bytes.count)
    }
    let staged = seconds(clock.now - started)
    guard receipt?.complete == true else { throw BenchFailure(description: "the stream was not received whole: \(String(describing: receipt))") }

    started = clock.now
    var followerNode = try RaftNode(configuration: Configuration(id: 2, randomSeed: 2), durable: try follower.loadDurableState())
    followerNode.step(Message(from: 1, to: 2, term: metadata.term, body: .installSnapshot(Snapshot(metadata: metadata, data: []))))
    while followerNode.hasReady {
        let ready = followerNode.ready()
        _ = try follower.persistAndApply(ready)
        followerNode.advance()
    }
    let installed = seconds(clock.now - started)
    let peak = residentPeakMegabytes()
    let (leaderHead, followerHead) = (try leader.verifyAudit(), try follower.verifyAudit())
    guard case .intact(let count, let head) = followerHead, leaderHead == followerHead, try follower.ledgerAppliedIndex() == metadata.index else {
        throw BenchFailure(description: "the installed ledger differs: audit \(followerHead) against \(leaderHead)")
    }
    print(String(format: "  stream %.1f MiB (%.2f x the old single-message limit of 256 MiB)", mebibytes, mebibytes / 256))
    print(String(format: "  made    %6.2f s  %7.1f MiB/s", made, mebibytes / made))
    print(String(format: "  staged  %6.2f s  %7.1f MiB/s", staged, mebibytes / staged))
    print(String(format: "  installed %4.2f s  %7.1f MiB/s (every audit link checked, then written and synced)", installed, mebibytes / installed))
    print(String(format: "  peak resident memory while made, staged and installed: %.0f MiB (%.0f MiB before)", peak, residentBefore))
    print("  the follower's audit chain verifies: \(count) records, head \(head.prefix(8).map { String(format: "%02x", $0) }.joined())..., the leader's")
}

extension Optional {
    func unwrap(_ failure: String) throws -> Wrapped {
        guard let self else { throw BenchFailure(description: failure) }
        return self
    }
}

/// A field of /proc/self/status, in MiB.
private func statusMegabytes(_ field: String) -> Double {
    let text = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    let line = text.split(separator: "\n").first { $0.hasPrefix(field + ":") } ?? ""
    return (Double(line.split(separator: " ").dropFirst().first ?? "") ?? 0) / 1024
}

/// Resets the peak (VmHWM) to what is resident now, and returns that.
/// Freed heap memory goes back to the system first, so that what is
/// allocated afterwards shows in the peak instead of reusing it.
func resetPeakResident() -> Double {
    // glibc's malloc_trim, which the Glibc module does not export.
    if let symbol = dlsym(dlopen(nil, RTLD_NOW), "malloc_trim") {
        _ = unsafeBitCast(symbol, to: (@convention(c) (Int) -> Int32).self)(0)
    }
    try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)
    return statusMegabytes("VmRSS")
}
func residentPeakMegabytes() -> Double { statusMegabytes("VmHWM") }
