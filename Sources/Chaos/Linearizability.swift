/// A linearizability checker for versioned registers (one per document),
/// after Wing & Gong as improved by Lowe (the search Porcupine and Knossos
/// use): walk the history's call and return events in time order, try to
/// linearize each pending call as early as possible, backtrack when a
/// return is reached whose call could not be placed, and prune states
/// already explored (the set of linearized operations plus the register's
/// state). An operation whose outcome is unknown has no return: it may be
/// linearized at any point after its call, including never (at the end).
///
/// Known calls and returns, unknown calls, and fillers' calls (below) are
/// kept in three lists, each in time order, so a walk steps only over what
/// it may place.
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
    /// `stepsMax` and `timeLimit` bound the search per key; by default they
    /// grow with the key's operations (at least 150 million steps and 30 s;
    /// 1,000 steps and 0.2 ms an operation), since a sound history needs
    /// steps in proportion to its length: a 15-minute release run's keys
    /// (393,000 operations, 100 unknown) needed 67-103 million, and gave up
    /// as undecided under a fixed 150 million before the search walked only
    /// what it may place. Steps cost the same however long the history; the
    /// explored states (2.5-3.2 million for those keys) are what take memory.
    /// `statesMax` bounds the memory: explored states are about 100 bytes
    /// each, so 10 million is about a gigabyte.
    public static func check(_ history: [ClientOperation], stepsMax: Int? = nil, timeLimit: Duration? = nil,
                             statesMax: Int = 10_000_000) -> [String: Verdict] {
        var byKey: [String: [ClientOperation]] = [:]
        for operation in history where relevant(operation) { byKey[operation.key, default: []].append(operation) }
        return byKey.mapValues { operations in
            let steps = stepsMax ?? max(150_000_000, 1_000 * operations.count)
            let time = timeLimit ?? .milliseconds(max(30_000, operations.count / 5))
            return checkKey(operations, stepsMax: steps, statesMax: statesMax, deadline: ContinuousClock.now.advanced(by: time))
        }
    }

    /// Reads that failed or whose outcome is unknown observed nothing, and
    /// writes that certainly failed changed nothing: they are left out.
    static func relevant(_ operation: ClientOperation) -> Bool {
        switch (operation.kind, operation.outcome) {
        case (.read, .ok), (.write, .ok), (.write, .unknown), (.cas, .ok), (.cas, .unknown): return true
        default: return false
        }
    }

    /// One event of the doubly linked lists the search walks.
    private struct Event {
        var operation: Int       // index into the operations
        var isCall: Bool
        var match: Int           // the other event of the same operation (-1: none, an unknown outcome's call)
        var previous: Int
        var next: Int
        var rank: Int            // place in the time order of all events
    }

    static func checkKey(_ operations: [ClientOperation], stepsMax: Int, statesMax: Int = 10_000_000, deadline: ContinuousClock.Instant) -> Verdict {
        var observed = Set<Int?>()
        for operation in operations where operation.kind == .read && operation.outcome == .ok { observed.insert(operation.observedValue) }
        let filler = operations.map { $0.kind == .write && $0.outcome == .unknown && !observed.contains($0.value) }
        // Events by time; at equal times calls come first (the operations
        // then count as concurrent: the more permissive reading). An
        // operation whose outcome is unknown has a call and no return.
        var times: [(time: UInt64, isCall: Bool, operation: Int)] = []
        for (index, operation) in operations.enumerated() {
            times.append((operation.invoked, true, index))
            if operation.outcome != .unknown { times.append((operation.completed ?? UInt64.max, false, index)) }
        }
        times.sort { ($0.time, $0.isCall ? 0 : 1, $0.operation) < ($1.time, $1.isCall ? 0 : 1, $1.operation) }
        // Three lists in time order, headed by events 0, 1 and 2: the calls
        // and returns of operations with a known outcome; the calls of
        // unknown ones that are not fillers; the calls of fillers. Kept
        // apart, a walk looks only at what it may place: unknown calls stay
        // pending to the end, and a single list had every walk step over
        // them all (a 15-minute run, 390,000 operations a key and 100 of
        // them unknown, took 300 million steps).
        let known = 0, unknownList = 1, fillerList = 2
        var events = (0..<3).map { _ in Event(operation: -1, isCall: false, match: -1, previous: -1, next: -1, rank: -1) }
        var callEvent = [Int](repeating: -1, count: operations.count)
        var returnEvent = [Int](repeating: -1, count: operations.count)
        var tails = [known, unknownList, fillerList]
        for (rank, item) in times.enumerated() {
            let list = operations[item.operation].outcome != .unknown ? known : filler[item.operation] ? fillerList : unknownList
            let index = events.count
            events.append(Event(operation: item.operation, isCall: item.isCall, match: -1, previous: tails[list], next: -1, rank: rank))
            events[tails[list]].next = index
            tails[list] = index
            if item.isCall { callEvent[item.operation] = index } else { returnEvent[item.operation] = index }
        }
        for operation in operations.indices where returnEvent[operation] >= 0 {
            events[callEvent[operation]].match = returnEvent[operation]
            events[returnEvent[operation]].match = callEvent[operation]
        }
        func lift(_ call: Int) {
            for event in [call, events[call].match] where event >= 0 {
                let (previous, next) = (events[event].previous, events[event].next)
                events[previous].next = next
                if next >= 0 { events[next].previous = previous }
            }
        }
        func unlift(_ call: Int) {
            for event in [events[call].match, call] where event >= 0 {
                let (previous, next) = (events[event].previous, events[event].next)
                events[previous].next = event
                if next >= 0 { events[next].previous = event }
            }
        }
        /// The first return among the known operations left (-1: none):
        /// unknown calls before it are the ones phases 2 and 3 may place.
        func firstReturn() -> Int {
            var event = events[known].next
            while event >= 0, events[event].isCall { event = events[event].next }
            return event
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
        var linearized: (UInt64, UInt64) = (0, 0)
        var seen = Set<Seen>()
        // Each choice remembers the phase it was made in. Phase 1 tries the
        // calls of operations with a known outcome; once it reaches a return
        // (every known call before it tried), phase 2 tries the unknown calls
        // before that return that are not fillers, then phase 3 the first
        // filler before it (fillers are interchangeable: the earliest-called
        // stands for all of them). An operation that may never have happened
        // is thus placed as late as possible, which is what usually
        // happened; the search stays complete. Nothing left to try in phase
        // 3: the last choice is undone.
        var stack: [(call: Int, state: State, phase: Int)] = []
        var state = State()
        var entry = events[known].next
        var phase = 1
        var bound = Int.max // in phases 2 and 3, the rank of the first return
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
            if seen.count > statesMax {
                return .undecided("gave up after exploring \(statesMax) states (\(steps) search steps) over \(operations.count) operations")
            }
            if steps > stepsMax {
                return .undecided("gave up after \(stepsMax) search steps over \(operations.count) operations (\(operations.filter { $0.outcome == .unknown }.count) with unknown outcomes)")
            }
            if entry >= 0, events[entry].isCall, phase == 1 || events[entry].rank < bound {
                let operation = events[entry].operation
                let unknown = operations[operation].outcome == .unknown
                if let next = step(state, operations[operation]), !(unknown && next == state) {
                    let candidate = (linearized.0 ^ keys[operation].0, linearized.1 ^ keys[operation].1)
                    if seen.insert(Seen(linearized: candidate, state: next)).inserted {
                        stack.append((entry, state, phase))
                        state = next
                        linearized = candidate
                        lift(entry)
                        if !unknown { knownLeft -= 1 }
                        if stack.count > longest { longest = stack.count; blocking = -1 }
                        entry = events[known].next
                        phase = 1
                        continue
                    }
                }
                // Phase 3 tries one filler only.
                entry = phase == 3 ? -1 : events[entry].next
            } else if phase == 1 {
                // Every known call before this return was tried: now the
                // unknown ones called before it.
                phase = 2
                bound = entry >= 0 ? events[entry].rank : Int.max
                entry = events[unknownList].next
            } else if phase == 2 {
                phase = 3
                entry = events[fillerList].next
            } else {
                // Nothing called before the first return is left to try: undo the last choice.
                let returning = firstReturn()
                if stack.count == longest && blocking < 0, returning >= 0 { blocking = events[returning].operation }
                guard let (call, previous, previousPhase) = stack.popLast() else {
                    let culprit = blocking >= 0 ? blocking : returning >= 0 ? events[returning].operation : -1
                    return .violation("no order of the \(operations.count) operations on this key fits a register: after at most \(longest) of them, "
                                      + "\(culprit >= 0 ? operations[culprit].summary : "an operation") cannot be placed")
                }
                state = previous
                let operation = events[call].operation
                linearized = (linearized.0 ^ keys[operation].0, linearized.1 ^ keys[operation].1)
                if operations[operation].outcome != .unknown { knownLeft += 1 }
                unlift(call)
                phase = previousPhase
                entry = phase == 3 ? -1 : events[call].next
                // The lists are as they were when the choice was made: the
                // first return is the one that bounded it.
                if phase > 1 { bound = firstReturn() >= 0 ? events[firstReturn()].rank : Int.max }
            }
        }
        return .linearizable
    }
}
