@testable import Chaos
import Testing
import TestSupport

/// Whether some order of `history` fits a register, found by trying every
/// order the operations' times allow (an operation that completed before
/// another was invoked comes first; one whose outcome is unknown may also
/// never have happened). Slow, and plainly right: the checker's search
/// (its pruning of states already explored above all) is judged against it.
private func linearizableByExhaustion(_ history: [ClientOperation]) -> Bool {
    let operations = history.filter(Linearizability.relevant)
    func search(_ state: Linearizability.State, _ left: [Int]) -> Bool {
        if left.allSatisfy({ operations[$0].outcome == .unknown }) { return true }
        for (position, candidate) in left.enumerated() {
            let mustPrecede = left.contains { other in
                other != candidate && operations[other].outcome != .unknown
                    && operations[other].completed.map { $0 < operations[candidate].invoked } == true
            }
            if mustPrecede { continue }
            var rest = left
            rest.remove(at: position)
            if let next = Linearizability.step(state, operations[candidate]), search(next, rest) { return true }
            if operations[candidate].outcome == .unknown, search(state, rest) { return true }
        }
        return false
    }
    return search(Linearizability.State(), Array(operations.indices))
}

/// A register's history from clients that overlap: each operation takes
/// effect at a point within its interval (so the history is
/// linearizable), some outcomes are lost; then, half the time, one answer
/// is changed (which may or may not break it). With `distinctValues`
/// every write stores a value of its own, so most unknown writes' values
/// are read by no one (the checker's fillers).
private func randomHistory(_ random: inout ChaosRandom, distinctValues: Bool = false) -> [ClientOperation] {
    let count = 2 + random.below(6)
    var points = Set<UInt64>()
    while points.count < count { points.insert(UInt64(10 + random.below(60))) }
    var state = Linearizability.State()
    var history: [ClientOperation] = []
    for (id, point) in points.sorted().enumerated() {
        let invoked = point - UInt64(random.below(10)), completed = point + UInt64(random.below(10))
        let unknown = random.chance(0.2)
        let value = distinctValues ? 100 + id : random.below(3)
        var operation: ClientOperation
        switch random.below(3) {
        case 0:
            operation = ClientOperation(id: id, client: id, key: "k", kind: .read, invoked: invoked, completed: completed, outcome: .ok,
                                        observedVersion: state.version, observedValue: state.value)
        case 1:
            let happened = !unknown || random.chance(0.5)
            if happened { state = Linearizability.State(version: state.version + 1, value: value) }
            operation = ClientOperation(id: id, client: id, key: "k", kind: .write, value: value, invoked: invoked,
                                        completed: unknown ? nil : completed, outcome: unknown ? .unknown : .ok,
                                        observedVersion: unknown ? nil : state.version)
        default:
            let expected = random.chance(0.6) ? state.version : UInt64(random.below(3))
            let succeeds = expected == state.version && (!unknown || random.chance(0.5))
            if succeeds { state = Linearizability.State(version: state.version + 1, value: value) }
            operation = ClientOperation(id: id, client: id, key: "k", kind: .cas, value: value, expectedVersion: expected, invoked: invoked,
                                        completed: unknown ? nil : completed, outcome: unknown ? .unknown : .ok,
                                        observedVersion: unknown || !succeeds ? nil : state.version,
                                        conflict: unknown ? nil : !succeeds)
        }
        history.append(operation)
    }
    if random.chance(0.5) {
        let reads = history.indices.filter { history[$0].kind == .read }
        if !reads.isEmpty {
            let index = reads[random.below(reads.count)]
            if random.chance(0.5) {
                history[index].observedValue = random.below(3)
            } else {
                history[index].observedVersion = UInt64(random.below(4))
            }
        }
    }
    return history
}

@Suite("Linearizability checker against exhaustion", .onOwnThreads)
struct LinearizabilityOracleTests {
    @Test("On 4,000 random small histories (overlapping calls, lost outcomes, changed answers) the checker and a search of every order agree",
          arguments: [false, true])
    func agreesWithExhaustion(distinctValues: Bool) {
        var random = ChaosRandom(seed: distinctValues ? 20_261_207 : 20_261_206)
        var verdicts = (linearizable: 0, violation: 0)
        var fillers = 0
        for round in 0..<4_000 {
            let history = randomHistory(&random, distinctValues: distinctValues)
            let read = Set(history.filter { $0.kind == .read && $0.outcome == .ok }.map(\.observedValue))
            fillers += history.count { $0.kind == .write && $0.outcome == .unknown && !read.contains($0.value) }
            let expected = linearizableByExhaustion(history)
            let verdict = Linearizability.check(history)["k"] ?? .linearizable
            if expected { verdicts.linearizable += 1 } else { verdicts.violation += 1 }
            guard (verdict == .linearizable) == expected, verdict.name != "undecided" else {
                Issue.record("round \(round): the checker says \(verdict), exhaustion says \(expected ? "linearizable" : "violation"): \(history.map(\.summary))")
                return
            }
        }
        #expect(verdicts.linearizable >= 1_000 && verdicts.violation >= 500, "both kinds drawn: \(verdicts)")
        if distinctValues { #expect(fillers >= 1_000, "unknown writes no read observed: \(fillers)") }
    }
}
