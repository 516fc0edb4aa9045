/// A linearizability checker for versioned registers (one per document),
/// after Wing & Gong as improved by Lowe (the search Porcupine and Knossos
/// use): walk the history's call and return events in time order, try to
/// linearize each pending call as early as possible, backtrack when a
/// return is reached whose call could not be placed, and prune states
/// already explored (the set of linearized operations plus the register's
/// state). An operation whose outcome is unknown has no return: it may be
/// linearized at any point after its call, including never (at the end).
///
/// Two reductions keep unknown outcomes from multiplying the states:
/// - An unknown operation is never placed where it would change nothing
///   (a compare-and-set whose version does not match): having no return,
///   it constrains nothing while it waits, so placing it is the same as not.
/// - An unknown write whose value no read observed (a filler: all it can do
///   is take a version) is interchangeable with any other such write whose
///   call came earlier: swapping two of them in an order changes no
///   observation (their values are never read; writes and compare-and-sets
///   look at versions only), and neither has a return to respect. So where
///   a filler may be placed, only the earliest-called one still pending is
///   tried. The fillers placed are then always the first k by call time:
///   k + 1 sets instead of 2^n. (Unknown writes cannot simply be dropped:
///   a later version observed may need some of them to have happened.)
public enum Linearizability {
    public enum Verdict: Sendable, Equatable {
        case linearizable
        /// No order exists; the text names the operation that cannot be placed.
        case violation(String)
        /// The search ran out of time or steps.
        case undecided(String)

        public var name: String {
            switch self {
            case .linearizable: return "linearizable"
            case .violation: return "violation"
            case .undecided: return "undecided"
            }
        }
    }

    /// The register: its version (0: no document) and value.
    public struct State: Hashable, Sendable {
        public var version: UInt64
        public var value: Int?
        public init(version: UInt64 = 0, value: Int? = nil) {
            self.version = version
            self.value = value
        }
    }

    /// The register's rules: the state after `operation`, or nil if the
    /// operation could not have observed what it did from `state`.
    static func step(_ state: State, _ operation: ClientOperation) -> State? {
        switch (operation.kind, operation.outcome) {
        case (.read, .ok):
            return operation.observedVersion == state.version && operation.observedValue == state.value ? state : nil
        case (.write, .ok):
            let next = State(version: state.version + 1, value: operation.value)
            return operation.observedVersion == nil || operation.observedVersion == next.version ? next : nil
        case (.write, _):
            // Unknown: if it happened here, it made the next version.
            return State(version: state.version + 1, value: operation.value)
        case (.cas, .ok) where operation.conflict == true:
            // Refused: the version differed, and was the one it names (if it names one).
            guard state.version != operation.expectedVersion else { return nil }
            return operation.observedVersion == nil || operation.observedVersion == state.version ? state : nil
        case (.cas, .ok):
            guard state.version == operation.expectedVersion else { return nil }
            let next = State(version: state.version + 1, value: operation.value)
            return operation.observedVersion == nil || operation.observedVersion == next.version ? next : nil
        case (.cas, .unknown):
            return state.version == operation.expectedVersion ? State(version: state.version + 1, value: operation.value) : state
        case (.read, _), (.cas, .fail):
            return state
        }
    }

    /// Checks each key's operations separately (registers are independent).
    /// `stepsMax` and `timeLimit` bound the search per key. Steps cost the
    /// same however long the history, so the time limit is the usual bound
    /// in a debug build; the step bound keeps a faster build's memory in
    /// check (the explored states: 556 MB at the peak of a check whose
    /// hardest key, 16,589 operations, needed more than 40 million steps).
    public static func check(_ history: [ClientOperation], stepsMax: Int = 150_000_000, timeLimit: Duration = .seconds(30)) -> [String: Verdict] {
        var byKey: [String: [ClientOperation]] = [:]
        for operation in history where relevant(operation) { byKey[operation.key, default: []].append(operation) }
        return byKey.mapValues { checkKey($0, stepsMax: stepsMax, deadline: ContinuousClock.now.advanced(by: timeLimit)) }
    }

    /// Reads that failed or whose outcome is unknown observed nothing, and
    /// writes that certainly failed changed nothing: they are left out.
    static func relevant(_ operation: ClientOperation) -> Bool {
        switch (operation.kind, operation.outcome) {
        case (.read, .ok), (.write, .ok), (.write, .unknown), (.cas, .ok), (.cas, .unknown): return true
        default: return false
        }
    }

    /// One event of the doubly linked list the search walks.
    private struct Event {
        var operation: Int       // index into the operations
        var isCall: Bool
        var match: Int           // the other event of the same operation
        var previous: Int
        var next: Int
    }

    static func checkKey(_ operations: [ClientOperation], stepsMax: Int, deadline: ContinuousClock.Instant) -> Verdict {
        let unknownEnd = UInt64.max
        // Events by time; at equal times calls come first (the operations
        // then count as concurrent: the more permissive reading).
        var times: [(time: UInt64, isCall: Bool, operation: Int)] = []
        for (index, operation) in operations.enumerated() {
            times.append((operation.invoked, true, index))
            times.append((operation.outcome == .unknown ? unknownEnd : (operation.completed ?? unknownEnd), false, index))
        }
        times.sort { ($0.time, $0.isCall ? 0 : 1, $0.operation) < ($1.time, $1.isCall ? 0 : 1, $1.operation) }
        // Event 0 is the head sentinel; events 1... follow in time order.
        var events = [Event(operation: -1, isCall: false, match: -1, previous: -1, next: times.isEmpty ? -1 : 1)]
        var callEvent = [Int](repeating: -1, count: operations.count)
        var returnEvent = [Int](repeating: -1, count: operations.count)
        for (position, item) in times.enumerated() {
            let index = position + 1
            events.append(Event(operation: item.operation, isCall: item.isCall, match: -1, previous: index - 1,
                                next: position + 1 < times.count ? index + 1 : -1))
            if item.isCall { callEvent[item.operation] = index } else { returnEvent[item.operation] = index }
        }
        for operation in operations.indices {
            events[callEvent[operation]].match = returnEvent[operation]
            events[returnEvent[operation]].match = callEvent[operation]
        }
        func lift(_ call: Int) {
            for event in [call, events[call].match] {
                let (previous, next) = (events[event].previous, events[event].next)
                events[previous].next = next
                if next >= 0 { events[next].previous = previous }
            }
        }
        func unlift(_ call: Int) {
            for event in [events[call].match, call] {
                let (previous, next) = (events[event].previous, events[event].next)
                events[previous].next = event
                if next >= 0 { events[next].previous = event }
            }
        }
        // A state explored is the set of operations linearized and the
        // register's state. The set is kept as a 128-bit Zobrist hash (two
        // random words per operation, XORed in and out), so remembering and
        // finding a state costs the same however long the history: keeping
        // the set itself, a bitset hashed whole at each step, made each step
        // cost the history's length (a 16,600-operation key gave up at 30 s
        // after 11 million steps). Two sets sharing both words, which would
        // wrongly prune a path, are 2^-128 likely per pair.
        struct Seen: Hashable {
            var linearized: (UInt64, UInt64)
            var state: State
            static func == (a: Seen, b: Seen) -> Bool { a.linearized == b.linearized && a.state == b.state }
            func hash(into hasher: inout Hasher) {
                hasher.combine(linearized.0)
                hasher.combine(linearized.1)
                hasher.combine(state)
            }
        }
        var mix: UInt64 = 0x5EED_0F_C4A0_5EED
        func splitmix() -> UInt64 {
            mix &+= 0x9E37_79B9_7F4A_7C15
            var z = mix
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        let keys: [(UInt64, UInt64)] = operations.indices.map { _ in (splitmix(), splitmix()) }
        var observed = Set<Int?>()
        for operation in operations where operation.kind == .read && operation.outcome == .ok { observed.insert(operation.observedValue) }
        let filler = operations.map { $0.kind == .write && $0.outcome == .unknown && !observed.contains($0.value) }
        var linearized: (UInt64, UInt64) = (0, 0)
        var seen = Set<Seen>()
        // Each choice remembers the phase it was made in: phase 1 tries the
        // calls of operations with a known outcome, phase 2 (once phase 1
        // reached a return) those whose outcome is unknown. An operation
        // that may never have happened is thus placed as late as possible,
        // which is what usually happened; the search stays complete.
        // `fillerPassed`: this pass of phase 2 has reached a filler (tried
        // it, or found its state explored): later ones are not tried here.
        var stack: [(call: Int, state: State, phase: Int, fillerPassed: Bool)] = []
        var fillerPassed = false
        var state = State()
        var entry = events[0].next
        var phase = 1
        var steps = 0
        var longest = 0
        var blocking = -1
        // Once every operation with a known outcome is placed, those left
        // (unknown outcomes) may never have happened: done.
        var knownLeft = operations.count { $0.outcome != .unknown }
        while knownLeft > 0 {
            steps += 1
            if steps % 16_384 == 0, ContinuousClock.now > deadline {
                return .undecided("gave up at the time limit after \(steps) search steps over \(operations.count) operations")
            }
            if steps > stepsMax {
                return .undecided("gave up after \(stepsMax) search steps over \(operations.count) operations (\(operations.filter { $0.outcome == .unknown }.count) with unknown outcomes)")
            }
            let event = events[entry]
            if event.isCall {
                let operation = event.operation
                let unknown = operations[operation].outcome == .unknown
                if unknown == (phase == 2), !(filler[operation] && fillerPassed), let next = step(state, operations[operation]),
                   !(unknown && next == state) {
                    let candidate = (linearized.0 ^ keys[operation].0, linearized.1 ^ keys[operation].1)
                    if seen.insert(Seen(linearized: candidate, state: next)).inserted {
                        stack.append((entry, state, phase, fillerPassed))
                        state = next
                        linearized = candidate
                        lift(entry)
                        if !unknown { knownLeft -= 1 }
                        if stack.count > longest { longest = stack.count; blocking = -1 }
                        entry = events[0].next
                        phase = 1
                        fillerPassed = false
                        continue
                    }
                }
                if phase == 2 && filler[operation] { fillerPassed = true }
                entry = event.next
            } else if phase == 1 {
                // Every known call before this return was tried: now the unknown ones.
                phase = 2
                fillerPassed = false
                entry = events[0].next
            } else {
                // A return whose call is not linearized yet: undo the last choice.
                if stack.count == longest && blocking < 0 { blocking = event.operation }
                guard let (call, previous, previousPhase, previousFillerPassed) = stack.popLast() else {
                    let culprit = blocking >= 0 ? operations[blocking].summary : operations[event.operation].summary
                    return .violation("no order of the \(operations.count) operations on this key fits a register: after at most \(longest) of them, \(culprit) cannot be placed")
                }
                state = previous
                let operation = events[call].operation
                linearized = (linearized.0 ^ keys[operation].0, linearized.1 ^ keys[operation].1)
                if operations[operation].outcome != .unknown { knownLeft += 1 }
                unlift(call)
                entry = events[call].next
                phase = previousPhase
                fillerPassed = previousFillerPassed || filler[operation]
            }
        }
        return .linearizable
    }
}
