/// A sorted set of strings for range scans over document names: sorted
/// chunks of at most `chunkMax` names, found by binary search over each
/// chunk's last name. Insertion and removal move at most one chunk's
/// names. A value type whose chunks are shared until written, so a copy
/// taken for a snapshot costs one array of chunk references, and each
/// later change copies only the chunk it touches.
struct SortedNames: Sendable {
    static let chunkMax = 512
    private var chunks: [[String]] = []
    private(set) var count = 0
    /// The first name at or after each of the last few lower bounds
    /// scanned from (nil: none), kept exact through inserts and removals.
    /// The ledger asks the same few prefixes on every issuance whether
    /// anything under them is due to be forgotten, and nearly always
    /// nothing is: the memo answers without a binary search, each step of
    /// which costs a cache miss on a name stored elsewhere.
    private var firsts: [(from: String, first: String?)] = []
    static let firstsMax = 8
    /// The chunks the last few names were inserted into, and where in
    /// each the last one went. Names made in time order (issued records,
    /// used platform tokens) land in the same chunk as the previous ones
    /// of their kind, right after the previous one (names of other kinds
    /// may follow it in the chunk): two comparisons, with names still in
    /// the cache, confirm that place, where finding the chunk and the
    /// place by binary search takes nineteen or so, each a likely cache
    /// miss. A position is only a guess, checked against the names on
    /// each side; the chunks are dropped when chunks split or go (their
    /// indexes move).
    private var recent: [(chunk: Int, position: Int)] = []
    static let recentMax = 4

    init() {}

    /// The first chunk whose last name is at or after `name` (or the end).
    private func chunkIndex(for name: String) -> Int {
        var low = 0, high = chunks.count
        while low < high {
            let middle = (low + high) / 2
            if chunks[middle][chunks[middle].count - 1] < name { low = middle + 1 } else { high = middle }
        }
        return low
    }

    private static func position(of name: String, in chunk: [String]) -> Int {
        var low = 0, high = chunk.count
        while low < high {
            let middle = (low + high) / 2
            if chunk[middle] < name { low = middle + 1 } else { high = middle }
        }
        return low
    }

    func contains(_ name: String) -> Bool {
        let c = chunkIndex(for: name)
        guard c < chunks.count else { return false }
        let p = Self.position(of: name, in: chunks[c])
        return p < chunks[c].count && chunks[c][p] == name
    }

    /// Adds `name`; false if it was there.
    @discardableResult
    mutating func insert(_ name: String) -> Bool {
        if chunks.isEmpty {
            chunks = [[name]]
            count = 1
            return true
        }
        let c: Int, p: Int, slot: Int
        if let found = recentPlace(for: name) {
            c = recent[found.slot].chunk
            p = found.position ?? Self.position(of: name, in: chunks[c])
            slot = found.slot
        } else {
            let index = chunkIndex(for: name)
            c = index == chunks.count ? index - 1 : index // after every name: the last chunk
            p = Self.position(of: name, in: chunks[c])
            if recent.count == Self.recentMax { recent.removeFirst() }
            recent.append((c, p))
            slot = recent.count - 1
        }
        recent[slot].position = p
        if p < chunks[c].count && chunks[c][p] == name { return false }
        chunks[c].insert(name, at: p)
        count += 1
        for i in firsts.indices where firsts[i].from <= name {
            if let first = firsts[i].first, first <= name { continue }
            firsts[i].first = name
        }
        if chunks[c].count > Self.chunkMax {
            let upper = Array(chunks[c][(Self.chunkMax / 2)...])
            chunks[c].removeSubrange((Self.chunkMax / 2)...)
            chunks.insert(upper, at: c + 1)
            recent.removeAll()
        }
        return true
    }

    /// A recently used chunk where `name` belongs (its slot in `recent`),
    /// and its place there when known without a search: right after the
    /// name last inserted there, or after the chunk's last name.
    private func recentPlace(for name: String) -> (slot: Int, position: Int?)? {
        for slot in recent.indices where recent[slot].chunk < chunks.count {
            let c = recent[slot].chunk, chunk = chunks[c]
            let after = recent[slot].position
            if after < chunk.count, chunk[after] < name {
                if after + 1 < chunk.count {
                    if name < chunk[after + 1] { return (slot, after + 1) }
                } else if c + 1 == chunks.count || name < chunks[c + 1][0] {
                    return (slot, after + 1)
                }
            }
            guard let first = chunk.first, let last = chunk.last, first <= name else { continue }
            if name <= last { return (slot, nil) }
            if c + 1 == chunks.count || name < chunks[c + 1][0] { return (slot, chunk.count) }
        }
        return nil
    }

    /// Removes `name`; false if it was not there.
    @discardableResult
    mutating func remove(_ name: String) -> Bool {
        let c = chunkIndex(for: name)
        guard c < chunks.count else { return false }
        let p = Self.position(of: name, in: chunks[c])
        guard p < chunks[c].count && chunks[c][p] == name else { return false }
        chunks[c].remove(at: p)
        count -= 1
        if chunks[c].isEmpty {
            chunks.remove(at: c)
            recent.removeAll()
        }
        if firsts.contains(where: { $0.first == name }) {
            // The removed name's successor: what now stands at its place.
            let next = c < chunks.count ? (p < chunks[c].count ? chunks[c][p] : (c + 1 < chunks.count ? chunks[c + 1][0] : nil)) : nil
            for i in firsts.indices where firsts[i].first == name { firsts[i].first = next }
        }
        return true
    }

    /// Names `from <= name < to` in order (from the end when `reverse`),
    /// at most `limit`.
    func names(from: String, to: String, limit: Int, reverse: Bool = false) -> [String] {
        var result: [String] = []
        guard limit > 0, from < to else { return result }
        if reverse {
            var c = min(chunkIndex(for: to), chunks.count - 1)
            guard c >= 0 else { return result }
            var p = Self.position(of: to, in: chunks[c]) - 1
            while c >= 0 && result.count < limit {
                while p >= 0 && result.count < limit {
                    let name = chunks[c][p]
                    if name < from { return result }
                    result.append(name)
                    p -= 1
                }
                c -= 1
                if c >= 0 { p = chunks[c].count - 1 }
            }
        } else {
            if let memo = firsts.first(where: { $0.from == from }), memo.first.map({ $0 >= to }) ?? true { return result }
            forEach(from: from, to: to) { name in
                result.append(name)
                return result.count < limit
            }
        }
        return result
    }

    /// `names(from:to:limit:)`, remembering the first name at or after
    /// `from` for the next scan from the same bound (a memo kept for the
    /// few most recent bounds).
    mutating func namesRemembering(from: String, to: String, limit: Int) -> [String] {
        if !firsts.contains(where: { $0.from == from }) {
            var first: String?
            forEach(from: from) { first = $0; return false }
            if firsts.count == Self.firstsMax { firsts.removeFirst() }
            firsts.append((from, first))
        }
        return names(from: from, to: to, limit: limit)
    }

    /// Calls `body` with each name `from <= name < to` in order until it
    /// returns false.
    func forEach(from: String, to: String? = nil, _ body: (String) throws -> Bool) rethrows {
        var c = chunkIndex(for: from)
        guard c < chunks.count else { return }
        var p = Self.position(of: from, in: chunks[c])
        while c < chunks.count {
            let chunk = chunks[c]
            while p < chunk.count {
                if let to, chunk[p] >= to { return }
                guard try body(chunk[p]) else { return }
                p += 1
            }
            c += 1
            p = 0
        }
    }
}
