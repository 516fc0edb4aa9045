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
        var c = chunkIndex(for: name)
        if c == chunks.count { c -= 1 } // after every name: the last chunk
        let p = Self.position(of: name, in: chunks[c])
        if p < chunks[c].count && chunks[c][p] == name { return false }
        chunks[c].insert(name, at: p)
        count += 1
        if chunks[c].count > Self.chunkMax {
            let upper = Array(chunks[c][(Self.chunkMax / 2)...])
            chunks[c].removeSubrange((Self.chunkMax / 2)...)
            chunks.insert(upper, at: c + 1)
        }
        return true
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
        if chunks[c].isEmpty { chunks.remove(at: c) }
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
            forEach(from: from, to: to) { name in
                result.append(name)
                return result.count < limit
            }
        }
        return result
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
