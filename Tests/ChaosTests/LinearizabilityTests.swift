import Chaos
import Testing
import TestSupport

/// Builds histories by hand: times in milliseconds.
private struct Builder {
    var operations: [ClientOperation] = []

    mutating func add(_ client: Int, _ kind: ClientOperation.Kind, value: Int? = nil, expect: UInt64? = nil, from: UInt64, to: UInt64?,
                      _ outcome: ClientOperation.Outcome = .ok, version: UInt64? = nil, read: Int? = nil, conflict: Bool? = nil, key: String = "k") {
        operations.append(ClientOperation(id: operations.count, client: client, key: key, kind: kind, value: value, expectedVersion: expect,
                                          invoked: from * 1_000_000, completed: to.map { $0 * 1_000_000 }, outcome: outcome,
                                          observedVersion: version, observedValue: read, conflict: conflict))
    }

    var verdict: Linearizability.Verdict { Linearizability.check(operations)["k"] ?? .linearizable }
}

@Suite("Linearizability checker", .onOwnThreads)
struct LinearizabilityTests {
    @Test("Sequential and overlapping histories that a register allows are linearizable")
    func good() {
        var h = Builder()
        h.add(0, .write, value: 1, from: 0, to: 10, version: 1)
        h.add(1, .read, from: 20, to: 30, version: 1, read: 1)
        // A read overlapping a write may see either side of it.
        h.add(0, .write, value: 2, from: 40, to: 60, version: 2)
        h.add(1, .read, from: 45, to: 50, version: 1, read: 1)
        h.add(2, .read, from: 55, to: 58, version: 2, read: 2)
        h.add(0, .cas, value: 3, expect: 2, from: 70, to: 80, version: 3)
        h.add(1, .cas, value: 9, expect: 2, from: 75, to: 85, conflict: true)
        // Refused before anything was proposed: observed nothing, changed nothing.
        h.add(1, .write, value: 10, from: 86, to: 87, .fail)
        h.add(1, .cas, value: 11, expect: 0, from: 86, to: 87, .fail)
        h.add(2, .read, from: 90, to: 95, version: 3, read: 3)
        #expect(h.verdict == .linearizable)
    }

    @Test("A stale read is flagged: a read that began after a write completed returns the old value")
    func staleRead() {
        var h = Builder()
        h.add(0, .write, value: 1, from: 0, to: 10, version: 1)
        h.add(0, .write, value: 2, from: 20, to: 30, version: 2)
        h.add(1, .read, from: 40, to: 50, version: 1, read: 1)
        guard case .violation(let why) = h.verdict else { Issue.record("not flagged: \(h.verdict)"); return }
        #expect(why.contains("read"))
    }

    @Test("A lost write is flagged: an acknowledged write that no later read reflects")
    func lostWrite() {
        var h = Builder()
        h.add(0, .write, value: 1, from: 0, to: 10, version: 1)
        h.add(1, .write, value: 2, from: 20, to: 30, version: 2)
        h.add(2, .read, from: 40, to: 50, version: 1, read: 1)
        h.add(2, .read, from: 60, to: 70, version: 1, read: 1)
        #expect(h.verdict.name == "violation")
        // Two compare-and-sets on the same version cannot both succeed.
        var cas = Builder()
        cas.add(0, .cas, value: 1, expect: 0, from: 0, to: 10, version: 1)
        cas.add(1, .cas, value: 2, expect: 0, from: 5, to: 15, version: 1)
        #expect(cas.verdict.name == "violation")
        // Versions must advance one at a time.
        var skipped = Builder()
        skipped.add(0, .write, value: 1, from: 0, to: 10, version: 2)
        #expect(skipped.verdict.name == "violation")
    }

    @Test("Unknown outcomes: a write whose answer was lost may or may not have happened; a read may not see a value nobody wrote")
    func unknown() {
        var happened = Builder()
        happened.add(0, .write, value: 7, from: 0, to: nil, .unknown)
        happened.add(1, .read, from: 100, to: 110, version: 1, read: 7)
        #expect(happened.verdict == .linearizable)
        var didNot = Builder()
        didNot.add(0, .write, value: 7, from: 0, to: nil, .unknown)
        didNot.add(1, .read, from: 100, to: 110, version: 0, read: nil)
        #expect(didNot.verdict == .linearizable)
        var invented = Builder()
        invented.add(0, .write, value: 7, from: 0, to: nil, .unknown)
        invented.add(1, .read, from: 100, to: 110, version: 1, read: 8)
        #expect(invented.verdict.name == "violation")
        // A compare-and-set refused for a version conflict observed a different version.
        var refused = Builder()
        refused.add(0, .cas, value: 1, expect: 0, from: 0, to: 10, conflict: true)
        #expect(refused.verdict.name == "violation", "version 0 matched, so the refusal is wrong")
        // A refusal naming the version it found: right if that was the version then, wrong otherwise.
        var named = Builder()
        named.add(0, .write, value: 1, from: 0, to: 10, version: 1)
        named.add(1, .cas, value: 2, expect: 0, from: 20, to: 30, version: 1, conflict: true)
        #expect(named.verdict == .linearizable)
        var misnamed = Builder()
        misnamed.add(0, .write, value: 1, from: 0, to: 10, version: 1)
        misnamed.add(1, .cas, value: 2, expect: 0, from: 20, to: 30, version: 2, conflict: true)
        #expect(misnamed.verdict.name == "violation", "the register was at version 1, not 2")
    }

    @Test("Keys are judged separately, and the search gives up with 'undecided' when its step budget or its bound on explored states runs out")
    func budget() {
        var h = Builder()
        // Many concurrent unknown writes and reads of values no one wrote:
        // every order must be tried before the search can say no. (Later
        // reads observed each write's value, so none is a mere filler of
        // versions, interchangeable with the others.)
        for client in 0..<14 { h.add(client, .write, value: client, from: 0, to: nil, .unknown) }
        h.add(99, .read, from: 10, to: 20, version: 1, read: 1_000)
        for client in 0..<14 { h.add(100 + client, .read, from: 30, to: 40, version: 1, read: client) }
        let verdict = Linearizability.check(h.operations, stepsMax: 2_000)["k"]
        #expect(verdict?.name == "undecided")
        // Memory is bounded too: the same search stopped by its explored states.
        let bounded = Linearizability.check(h.operations, statesMax: 500)["k"]
        #expect(bounded?.name == "undecided" && "\(String(describing: bounded))".contains("exploring 500 states"), "\(String(describing: bounded))")
        var other = Builder()
        other.add(0, .write, value: 1, from: 0, to: 10, version: 1, key: "a")
        other.add(0, .write, value: 1, from: 0, to: 10, version: 1, key: "b")
        #expect(Linearizability.check(other.operations).values.allSatisfy { $0 == .linearizable })
    }

    @Test("Twenty unknown writes whose values no one read count only by how many happened: a history needing some of them, and one no order fits, are decided within 20,000 steps")
    func fillers() {
        func history(staleEnd: Bool) -> Builder {
            var h = Builder()
            for client in 0..<20 { h.add(client, .write, value: 100 + client, from: UInt64(client), to: nil, .unknown) }
            // Version 6: five of them happened before this write.
            h.add(30, .write, value: 1, from: 30, to: 40, version: 6)
            h.add(31, .read, from: 50, to: 60, version: 6, read: 1)
            // Two more before this one.
            h.add(30, .write, value: 2, from: 70, to: 80, version: 9)
            h.add(31, .read, from: 90, to: 100, version: 9, read: 2)
            if staleEnd { h.add(32, .read, from: 110, to: 120, version: 9, read: 1) }
            return h
        }
        #expect(Linearizability.check(history(staleEnd: false).operations, stepsMax: 20_000)["k"] == .linearizable)
        let stale = Linearizability.check(history(staleEnd: true).operations, stepsMax: 20_000)["k"]
        #expect(stale?.name == "violation", "\(String(describing: stale))")
    }

    @Test("Unknown calls pending from the start cost a long history little: 40 of them (20 read at the very end) and 20,000 operations are decided within 300,000 steps; with the 40 never read, a stale read in the middle is found within 5 million")
    func longHistoryWithPendingUnknowns() {
        func history(staleAt stale: Int?, readAtEnd: Int) -> Builder {
            var h = Builder()
            // Writes whose answers were lost, called at the start.
            for client in 0..<40 { h.add(100 + client, .write, value: 1_000_000 + client, from: UInt64(client), to: nil, .unknown) }
            var version: UInt64 = 0
            for step in 0..<20_000 {
                let at = UInt64(100 + 4 * step)
                if step % 2 == 0 {
                    version += 1
                    h.add(0, .write, value: step, from: at, to: at + 2, version: version)
                } else {
                    h.add(1, .read, from: at, to: at + 2, version: step == stale ? version - 1 : version, read: step == stale ? step - 3 : step - 1)
                }
            }
            // The first `readAtEnd` unknown writes happened last, one before each of these reads.
            for client in 0..<readAtEnd {
                version += 1
                h.add(2, .read, from: UInt64(100_000 + 10 * client), to: UInt64(100_005 + 10 * client), version: version, read: 1_000_000 + client)
            }
            return h
        }
        // A walk over every pending unknown call at each placement took more than 40 steps an operation (800,000 in all).
        #expect(Linearizability.check(history(staleAt: nil, readAtEnd: 20).operations, stepsMax: 300_000)["k"] == .linearizable)
        // To find that no order fits, each number of the unread ones is tried at each point before the stale read.
        let stale = Linearizability.check(history(staleAt: 10_001, readAtEnd: 0).operations, stepsMax: 5_000_000)["k"]
        #expect(stale?.name == "violation", "\(String(describing: stale))")
    }

    @Test("Histories round-trip through JSON lines")
    func jsonLines() throws {
        var h = Builder()
        h.add(0, .cas, value: 3, expect: 2, from: 70, to: 80, version: 3)
        h.add(1, .read, from: 1, to: nil, .unknown)
        #expect(try HistoryFile.decode(HistoryFile.encode(h.operations)) == h.operations)
        let damaged = HistoryFile.encode(h.operations) + "\n{\"id\": 1\n"
        let error = #expect(throws: HistoryError.self) { try HistoryFile.decode(damaged) }
        #expect(error?.line == h.operations.count + 2, "the damaged line is named (after a blank one)")
    }
}
