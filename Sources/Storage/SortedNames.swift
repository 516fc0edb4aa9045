import Encoding
import Foundation

/// A sorted set of strings for range scans over document names: sorted
/// chunks of at most `chunkMax` names, found by binary search over each
/// chunk's last name, and searched within by 8-byte keys (see `Chunk`).
/// Insertion and removal move at most one chunk's names. A value type
/// whose chunks are shared until written, so a copy taken for a snapshot
/// costs one array of chunk references, and each later change copies
/// only the chunk it touches.
struct SortedNames: Sendable {
    static let chunkMax = 512
    private var chunks: [Chunk] = []
    /// Each chunk's last name, side by side: finding a name's chunk reads
    /// only these (through a chunk's array it cost one more cache miss a step).
    private var lasts: [String] = []
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

    /// Sorted names, and for each an 8-byte key: its bytes after those all
    /// the chunk's names share (`common`), so a search within the chunk
    /// compares integers side by side in one array and reads a name only
    /// when two keys tie. JWT-SVIDs' issued records share 31 bytes
    /// (`authority/issued/<expiry>/`, thousands a second with one expiry)
    /// and then differ at once, in random order; comparing them as strings
    /// read each from its own allocation. Keys exist only while every name
    /// is ASCII: then byte order is String's order (which compares
    /// canonical forms: `e` and a combining accent sort as `é`).
    struct Chunk: Sendable {
        private(set) var names: [String]
        /// Bytes every name begins with alike (those its first and last share).
        private var common = 0
        /// The first `common` bytes themselves, when they fit here (at most
        /// `prefixBytesMax`): whether a name shares them is then known
        /// without reading the first name.
        private var prefix: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        static let prefixBytesMax = 32
        /// Per name, big-endian, its bytes from `common` on (zero after its end).
        private var keys: [UInt64] = []
        private var keyed = false

        init(_ names: [String]) {
            self.names = names
            keyed = names.allSatisfy(Self.isASCII)
            if keyed { rekey(common: Self.commonPrefix(names[0], names[names.count - 1])) }
        }

        var first: String { names[0] }
        var last: String { names[names.count - 1] }
        var count: Int { names.count }

        private mutating func rekey(common: Int) {
            self.common = common
            keys = names.map { Self.key($0, from: common) }
            prefix = (0, 0, 0, 0)
            if common <= Self.prefixBytesMax {
                UTF8Text.withBytes(of: names[0]) { bytes in
                    withUnsafeMutableBytes(of: &prefix) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(bytes)[..<common])) }
                }
            }
        }

        /// The first place whose name is not before `name` (`ascii`:
        /// whether it is), and whether the name there may be `name` (false
        /// only when their keys differ: the name is then not read).
        func position(of name: String, ascii: Bool) -> (position: Int, mayBeEqual: Bool) {
            if keyed && ascii {
                guard let probe = key(of: name) else {
                    // Not sharing the bytes every name here shares: before them all or after.
                    return (name < names[0] ? 0 : names.count, false)
                }
                var low = 0, high = keys.count
                while low < high {
                    let middle = (low + high) / 2
                    let key = keys[middle]
                    if key < probe || (key == probe && names[middle] < name) { low = middle + 1 } else { high = middle }
                }
                return (low, low < keys.count && keys[low] == probe)
            }
            var low = 0, high = names.count
            while low < high {
                let middle = (low + high) / 2
                if names[middle] < name { low = middle + 1 } else { high = middle }
            }
            return (low, true)
        }

        /// Whether `name` stands at `position` (as found by `position(of:ascii:)`).
        func holds(_ name: String, at found: (position: Int, mayBeEqual: Bool)) -> Bool {
            found.mayBeEqual && found.position < names.count && names[found.position] == name
        }

        mutating func insert(_ name: String, at position: Int, ascii: Bool) {
            names.insert(name, at: position)
            guard keyed else { return }
            guard ascii else {
                keyed = false
                keys = []
                return
            }
            if position == 0 || position == names.count - 1 {
                // A new first or last may share fewer bytes with the other end.
                let shared = Self.commonPrefix(name, position == 0 ? last : first)
                if shared < common {
                    rekey(common: shared)
                    return
                }
            }
            keys.insert(Self.key(name, from: common), at: position)
        }

        mutating func remove(at position: Int) {
            names.remove(at: position)
            if keyed { keys.remove(at: position) }
        }

        /// Splits off the upper half. The halves keep the keys (and the
        /// shared bytes) unless their names now share 4 bytes or more
        /// beyond them: then the keys begin alike, and are made anew,
        /// which reads every name. A chunk without keys (a name that is not
        /// ASCII came) looks at its names again.
        mutating func splitUpper() -> Chunk {
            let half = names.count / 2
            guard keyed else {
                let upper = Chunk(Array(names[half...]))
                self = Chunk(Array(names[..<half]))
                return upper
            }
            var upper = self
            upper.names = Array(names[half...])
            names.removeSubrange(half...)
            upper.keys = Array(keys[half...])
            keys.removeSubrange(half...)
            let lower = Self.commonPrefix(first, last), higher = Self.commonPrefix(upper.first, upper.last)
            if lower >= common + 4 { rekey(common: lower) }
            if higher >= upper.common + 4 { upper.rekey(common: higher) }
            return upper
        }

        /// `name`'s key, if it begins with the `common` bytes every name here begins with.
        private func key(of name: String) -> UInt64? {
            UTF8Text.withBytes(of: name) { bytes -> UInt64? in
                guard bytes.count >= common else { return nil }
                let shares = common <= Self.prefixBytesMax
                    ? withUnsafeBytes(of: prefix) { memcmp(bytes.baseAddress!, $0.baseAddress!, common) == 0 }
                    : UTF8Text.withBytes(of: names[0]) { memcmp(bytes.baseAddress!, $0.baseAddress!, common) == 0 }
                return shares ? Self.key(UnsafeRawBufferPointer(bytes), from: common) : nil
            }
        }

        enum Placement { case inside, after, elsewhere, unknown }

        /// Where `name` stands against this chunk's names, from the keys
        /// (a name is read only when keys tie or the name does not share
        /// the chunk's bytes): among them, after the last, or before the
        /// first; unknown when the chunk has no keys.
        func placement(of name: String, ascii: Bool) -> Placement {
            guard keyed && ascii else { return .unknown }
            guard let probe = key(of: name) else { return name > last ? .after : .elsewhere }
            let low = keys[0], high = keys[keys.count - 1]
            if probe > low && probe < high { return .inside }
            if probe > high || (probe == high && name > last) { return .after }
            if probe < low || (probe == low && name < first) { return .elsewhere }
            return .inside
        }

        static func isASCII(_ name: String) -> Bool { UTF8Text.withBytes(of: name, UTF8Text.isASCII) }

        /// How many leading bytes `a` and `b` share.
        static func commonPrefix(_ a: String, _ b: String) -> Int {
            func shared(_ a: UnsafeBufferPointer<UInt8>, _ b: UnsafeBufferPointer<UInt8>) -> Int {
                var n = 0
                while n < a.count && n < b.count && a[n] == b[n] { n += 1 }
                return n
            }
            return UTF8Text.withBytes(of: a) { a in UTF8Text.withBytes(of: b) { b in shared(a, b) } }
        }

        /// `name`'s 8 bytes from `offset` on, big-endian, zero after its end.
        static func key(_ name: String, from offset: Int) -> UInt64 {
            UTF8Text.withBytes(of: name) { key(UnsafeRawBufferPointer($0), from: offset) }
        }

        private static func key(_ bytes: UnsafeRawBufferPointer, from offset: Int) -> UInt64 {
            if offset + 8 <= bytes.count { return UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
            var key: UInt64 = 0
            for n in 0..<8 {
                key <<= 8
                if offset + n < bytes.count { key |= UInt64(bytes[offset + n]) }
            }
            return key
        }
    }

    init() {}

    /// The first chunk whose last name is at or after `name` (or the end).
    private func chunkIndex(for name: String) -> Int {
        var low = 0, high = lasts.count
        while low < high {
            let middle = (low + high) / 2
            if lasts[middle] < name { low = middle + 1 } else { high = middle }
        }
        return low
    }

    func contains(_ name: String) -> Bool {
        let c = chunkIndex(for: name)
        guard c < chunks.count else { return false }
        return chunks[c].holds(name, at: chunks[c].position(of: name, ascii: Chunk.isASCII(name)))
    }

    /// Adds `name`; false if it was there.
    @discardableResult
    mutating func insert(_ name: String) -> Bool {
        let ascii = Chunk.isASCII(name)
        if chunks.isEmpty {
            chunks = [Chunk([name])]
            lasts = [name]
            count = 1
            return true
        }
        let c: Int, found: (position: Int, mayBeEqual: Bool), slot: Int
        if let place = recentPlace(for: name, ascii: ascii) {
            c = recent[place.slot].chunk
            found = place.position.map { ($0, true) } ?? chunks[c].position(of: name, ascii: ascii)
            slot = place.slot
        } else {
            let index = chunkIndex(for: name)
            c = index == chunks.count ? index - 1 : index // after every name: the last chunk
            found = chunks[c].position(of: name, ascii: ascii)
            if recent.count == Self.recentMax { recent.removeFirst() }
            recent.append((c, found.position))
            slot = recent.count - 1
        }
        let p = found.position
        recent[slot].position = p
        if chunks[c].holds(name, at: found) { return false }
        chunks[c].insert(name, at: p, ascii: ascii)
        if p == chunks[c].count - 1 { lasts[c] = name }
        count += 1
        for i in firsts.indices where firsts[i].from <= name {
            if let first = firsts[i].first, first <= name { continue }
            firsts[i].first = name
        }
        if chunks[c].count > Self.chunkMax {
            let upper = chunks[c].splitUpper()
            chunks.insert(upper, at: c + 1)
            lasts[c] = chunks[c].last
            lasts.insert(upper.last, at: c + 1)
            recent.removeAll()
        }
        return true
    }

    /// A recently used chunk where `name` belongs (its slot in `recent`),
    /// and its place there when known without a search: right after the
    /// name last inserted there, or after the chunk's last name. Chunks
    /// with keys answer from them (see `Chunk.placement`).
    private func recentPlace(for name: String, ascii: Bool) -> (slot: Int, position: Int?)? {
        for slot in recent.indices where recent[slot].chunk < chunks.count {
            let c = recent[slot].chunk
            func fitsAfterLast() -> Bool {
                guard c + 1 < chunks.count else { return true }
                switch chunks[c + 1].placement(of: name, ascii: ascii) {
                case .elsewhere: return true // before its first name
                case .inside, .after: return false
                case .unknown: return name < chunks[c + 1].first
                }
            }
            switch chunks[c].placement(of: name, ascii: ascii) {
            case .inside: return (slot, nil)
            case .after:
                if fitsAfterLast() { return (slot, chunks[c].count) }
                continue
            case .elsewhere: continue
            case .unknown: break
            }
            let names = chunks[c].names
            let after = recent[slot].position
            if after < names.count, names[after] < name {
                if after + 1 < names.count {
                    if name < names[after + 1] { return (slot, after + 1) }
                } else if fitsAfterLast() {
                    return (slot, after + 1)
                }
            }
            guard names[0] <= name else { continue }
            if name <= lasts[c] { return (slot, nil) }
            if fitsAfterLast() { return (slot, names.count) }
        }
        return nil
    }

    /// Removes `name`; false if it was not there.
    @discardableResult
    mutating func remove(_ name: String) -> Bool {
        let c = chunkIndex(for: name)
        guard c < chunks.count else { return false }
        let found = chunks[c].position(of: name, ascii: Chunk.isASCII(name)), p = found.position
        guard chunks[c].holds(name, at: found) else { return false }
        chunks[c].remove(at: p)
        count -= 1
        if chunks[c].names.isEmpty {
            chunks.remove(at: c)
            lasts.remove(at: c)
            recent.removeAll()
        } else if p == chunks[c].count {
            lasts[c] = chunks[c].last
        }
        if firsts.contains(where: { $0.first == name }) {
            // The removed name's successor: what now stands at its place.
            let next = c < chunks.count ? (p < chunks[c].count ? chunks[c].names[p] : (c + 1 < chunks.count ? chunks[c + 1].first : nil)) : nil
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
            var p = chunks[c].position(of: to, ascii: Chunk.isASCII(to)).position - 1
            while c >= 0 && result.count < limit {
                let names = chunks[c].names
                while p >= 0 && result.count < limit {
                    let name = names[p]
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
        _ = firstRemembering(from: from)
        return names(from: from, to: to, limit: limit)
    }

    /// The first name at or after `from` (nil: none), remembered for the
    /// next time (a memo kept for the few most recent bounds).
    mutating func firstRemembering(from: String) -> String? {
        if let memo = firsts.first(where: { $0.from == from }) { return memo.first }
        var first: String?
        forEach(from: from) { first = $0; return false }
        if firsts.count == Self.firstsMax { firsts.removeFirst() }
        firsts.append((from, first))
        return first
    }

    /// Calls `body` with each name `from <= name < to` in order until it
    /// returns false.
    func forEach(from: String, to: String? = nil, _ body: (String) throws -> Bool) rethrows {
        var c = chunkIndex(for: from)
        guard c < chunks.count else { return }
        var p = chunks[c].position(of: from, ascii: Chunk.isASCII(from)).position
        while c < chunks.count {
            let names = chunks[c].names
            while p < names.count {
                if let to, names[p] >= to { return }
                guard try body(names[p]) else { return }
                p += 1
            }
            c += 1
            p = 0
        }
    }
}
