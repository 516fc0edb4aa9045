import Crypto
import Foundation
import Ledger
import Raft
import Storage

// warrant-bench apply: the ledger's cost of one audited issuance, without
// the network: a single-voter core proposes issuance commands (each
// consuming a join token made beforehand), and every Ready is persisted
// (write-ahead log, fdatasync) and applied (in memory, the audit records
// written to the audit log in batches), as on a node. B issuances per Ready.
// X509-SVIDs and JWT-SVIDs apart: their issued records' names differ in
// order (see below).

func runApply(count: Int, batches: [Int], kinds: [Issuance.Kind], directory: URL) throws {
    print("apply: single-voter core + write-ahead log (fdatasync) + ledger, issuance commands with 700-byte certificates or tokens, \(count) per kind and batch size")
    print("kind  batch  issuances/s  µs each (wall)  apply CPU µs each  transactions/s  bytes written each")
    /// Bytes this process passed to write(2) and pwrite(2) so far.
    func writtenBytes() -> Double {
        let text = (try? String(contentsOfFile: "/proc/self/io", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").first { $0.hasPrefix("wchar:") }.flatMap { Double($0.dropFirst(6).trimmingCharacters(in: .whitespaces)) } ?? 0
    }
    for kind in kinds { for batch in batches {
        let path = directory.appendingPathComponent("apply-\(batch)-\(UUID().uuidString)").path
        defer { removeStore(path) }
        var (store, node) = try singleVoter(path: path)
        var outcomes: [LedgerOutcome] = []
        // CPU of applying alone (the ledger's work every node does per
        // issuance), apart from the synced writes.
        var applyMilliseconds = 0.0
        func drain() throws {
            while node.hasReady {
                let ready = node.ready()
                try store.persist(ready)
                let before = threadCPUMilliseconds()
                outcomes += try store.apply(ready.committedEntries)
                applyMilliseconds += threadCPUMilliseconds() - before
                node.advance()
            }
        }
        try drain()
        let now = UInt64(Date().timeIntervalSince1970 * 1000)
        func command(_ operation: LedgerCommand.Operation) -> [UInt8] {
            LedgerCommand(timeMillis: now, actor: "bench", requestID: UUID().uuidString, operation: operation).encoded
        }
        let entry = AuthorityKeyring.Entry(id: "a1", state: .active, algorithm: "ES256", x509Certificate: "c", x509Key: "k", jwtKeyID: "j",
                                           jwtKey: "k", createdAtMillis: now)
        let keyring = AuthorityKeyring(trustDomain: "bench.local", kekID: "kek", authorities: [entry])
        try node.propose(batch: [command(.initializeAuthority(keyring: Array(try JSONEncoder().encode(keyring))))])
        try drain()
        // The tokens, not timed.
        let hashes = (0..<count).map { n in SHA256.hash(data: Array("token \(n) \(batch)".utf8)).map { String(format: "%02x", $0) }.joined() }
        for start in stride(from: 0, to: count, by: 500) {
            try node.propose(batch: hashes[start..<min(count, start + 500)].map { hash in
                command(.createJoinToken(JoinToken(hash: hash, spiffeID: "spiffe://bench.local/job", ttlMaxSeconds: 600,
                                                   expiresAtMillis: now + 3_600_000)))
            })
            try drain()
        }
        outcomes = []
        applyMilliseconds = 0
        let certificate = (0..<700).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        // As a node sees them: random serials, and times that advance a
        // millisecond every nine issuances (about 9,000 a second), so the
        // issued records' names (by expiry, then serial) arrive nearly,
        // not exactly, in order; a JWT-SVID's expiry is in whole seconds,
        // so a second's names share it and arrive in random order.
        let commands = hashes.enumerated().map { n, hash in
            let serial = String(hash.suffix(32))
            let issuedAt = now + UInt64(n / 9)
            let notAfter = kind == .x509 ? issuedAt + 600_000 : (issuedAt / 1000 + 600) * 1000
            let issuance = Issuance(kind: kind, spiffeID: "spiffe://bench.local/job", serial: serial, fingerprint: hash, issuedAtMillis: issuedAt,
                                    notAfterMillis: notAfter, ttlSeconds: 600, tokenHash: hash, idempotencyKey: "", node: 1, authority: "a1",
                                    attributes: ["evidence": "join_token", "token": String(hash.prefix(16)), "evidence_expires": "1800000000",
                                                 "lineage": serial, "ttl_max": "600"],
                                    artifact: certificate)
            return LedgerCommand(timeMillis: now, actor: "token:\(hash.prefix(16))", requestID: UUID().uuidString,
                                 operation: .recordIssuance(issuance)).encoded
        }
        let clock = ContinuousClock()
        let started = clock.now
        let writtenBefore = writtenBytes()
        var transactions = 0
        for start in stride(from: 0, to: count, by: batch) {
            try node.propose(batch: Array(commands[start..<min(count, start + batch)]))
            try drain()
            transactions += 1
        }
        let elapsed = seconds(clock.now - started)
        let written = (writtenBytes() - writtenBefore) / Double(count)
        let issued = outcomes.filter { if case .issued = $0.result { return true } else { return false } }.count
        guard issued == count else { throw BenchFailure(description: "only \(issued) of \(count) issuances applied: \(outcomes.first { if case .issued = $0.result { return false } else { return true } }.map { "\($0.result)" } ?? "")") }
        print(String(format: "%4@  %5d  %11.0f  %14.1f  %17.1f  %14.0f  %17.0f", kind == .x509 ? "x509" : "jwt", batch, Double(count) / elapsed, elapsed / Double(count) * 1e6,
                     applyMilliseconds * 1000 / Double(count), Double(transactions) / elapsed, written))
        if batch == batches.last && kind == kinds.last {
            // Each checkpoint is taken at a new index (a store refuses one
            // at or before the newest it wrote): one more command first.
            var round = 0
            try measureCheckpoint(path: path, store: store) {
                if round > 0 {
                    try node.propose(batch: [command(.putDocument(name: "bench/checkpoint", format: .json, content: Array("{\"round\":\(round)}".utf8),
                                                                  expectedVersion: nil))])
                    try drain()
                }
                round += 1
                return node.snapshotMetadata(at: node.appliedIndex)
            }
        }
    } }
}

/// CPU time of this thread so far, in milliseconds (system time included:
/// the cost of a write(2) is what is measured).
private func threadCPUMilliseconds() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time)
    return Double(time.tv_sec) * 1000 + Double(time.tv_nsec) / 1e6
}

/// The CPU a checkpoint of the ledger costs, as a node writes it (around
/// the page cache where the file system allows), against the same bytes
/// written through the page cache, alternating three times.
private func measureCheckpoint(path: String, store: RaftStore, nextMetadata: () throws -> SnapshotMetadata?) throws {
    func checkpointFile() throws -> String? {
        let files = FileManager.default.enumerator(atPath: path)?.compactMap { $0 as? String } ?? []
        return files.first { ($0 as NSString).lastPathComponent.hasPrefix("checkpoint-") && $0.hasSuffix(".ledger") }.map { path + "/" + $0 }
    }
    var direct: [Double] = [], cached: [Double] = [], megabytes = 0.0, documents = 0
    for _ in 0..<3 {
        guard let metadata = try nextMetadata() else { return }
        let checkpoint = try store.beginCheckpoint(metadata)
        let before = threadCPUMilliseconds()
        documents = try checkpoint.write()
        direct.append(threadCPUMilliseconds() - before)
        guard let file = try checkpointFile() else { throw BenchFailure(description: "no checkpoint file under \(path)") }
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        megabytes = Double(bytes.count) / 1e6
        // The same bytes, a megabyte per write(2), fsynced, as before.
        let copy = path + "/cached-copy"
        let startCopy = threadCPUMilliseconds()
        let descriptor = open(copy, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw BenchFailure(description: "cannot create \(copy)") }
        try bytes.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = write(descriptor, buffer.baseAddress! + offset, min(1 << 20, buffer.count - offset))
                guard written > 0 else { throw BenchFailure(description: "write to \(copy) failed") }
                offset += written
            }
        }
        fsync(descriptor)
        close(descriptor)
        cached.append(threadCPUMilliseconds() - startCopy)
        unlink(copy)
    }
    func list(_ values: [Double]) -> String { values.map { String(format: "%.0f", $0) }.joined(separator: " / ") }
    print(String(format: "checkpoint of %d rows, %.1f MB: CPU ms written as a node does (encode + direct write): %@; the same bytes through the page cache (write only): %@",
                 documents, megabytes, list(direct), list(cached)))
}
