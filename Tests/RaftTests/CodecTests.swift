import Encoding
import Raft
import RaftSimulator
import Testing

@Suite("Binary codec")
struct CodecTests {
    /// Every message a busy scenario sends (elections, replication, a
    /// snapshot, reads, a transfer, membership changes), plus the kinds it
    /// may not produce, round-trips through the encoding.
    @Test("Every message kind round-trips")
    func messagesRoundTrip() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3], options: scenarioOptions { $0.messageBytesMax = 256 })
        var kinds: Set<String> = []
        var failures = 0
        let check = { (message: Message) -> Bool in
            kinds.insert(String(describing: message.body).prefix { $0 != "(" }.description)
            if (try? Message(decoding: message.encoded)) != message { failures += 1 }
            return false
        }
        net.cluster.with(1) { $0.campaign() }
        net.deliverAll(drop: check)
        net.cluster.crash(3)
        for i in 0..<20 { _ = try net.cluster.with(1) { raft throws(RaftError) in try raft.propose(Array("e\(i)".utf8)) } }
        net.deliverAll(drop: check)
        net.cluster.compact(1)
        net.cluster.restart(3)
        for _ in 0..<3 { net.cluster.tickAll(); net.deliverAll(drop: check) }
        try net.cluster.with(2) { raft throws(RaftError) in try raft.readIndex(requestID: 1) }
        _ = try net.cluster.with(2) { raft throws(RaftError) in try raft.propose(Array("forwarded".utf8)) }
        net.deliverAll(drop: check)
        try net.cluster.with(1) { raft throws(RaftError) in try raft.transferLeadership(to: 2) }
        net.deliverAll(drop: check)
        #expect(failures == 0)
        let extra: [MessageBody] = [
            .readIndexRefused(requestID: 7),
            .requestVote(RequestVote(lastLogIndex: 5, lastLogTerm: 2, preVote: true, leadershipTransfer: false)),
            .forwardedProposal([.noop, .command([1]), .configChange(.removeNode(3))]),
            .snapshotChunk(SnapshotChunk(metadata: SnapshotMetadata(index: 9, term: 3, membership: Membership(voters: [1, 2], learners: [4])),
                                         totalBytes: 10, checksum: 0xDEAD_BEEF, offset: 7, bytes: [1, 2, 3])),
            .snapshotChunkAck(index: 9, snapshotTerm: 3, received: 10),
        ]
        for body in extra {
            let message = Message(from: 1, to: 2, term: 9, body: body)
            #expect(try Message(decoding: message.encoded) == message)
        }
        for kind in ["appendEntries", "appendEntriesResponse", "requestVote", "requestVoteResponse", "heartbeat",
                     "heartbeatResponse", "installSnapshot", "timeoutNow", "forwardedProposal", "readIndexRequest", "readIndexResponse"] {
            #expect(kinds.contains(kind), "the scenario never sent \(kind)")
        }
    }

    @Test("A message of another version, with a bad flag or trailing bytes is refused")
    func malformedMessages() throws {
        let good = Message(from: 1, to: 2, term: 3, body: .requestVoteResponse(RequestVoteResponse(granted: true, preVote: false))).encoded
        var otherVersion = good
        otherVersion[0] = 2
        #expect(throws: CodecError.self) { try Message(decoding: otherVersion) }
        var badFlag = good
        badFlag[good.count - 2] = 7
        #expect(throws: CodecError.invalid(field: "granted", reason: "7 is neither 0 nor 1")) { try Message(decoding: badFlag) }
        #expect(throws: CodecError.trailingBytes(count: 1)) { try Message(decoding: good + [0]) }
        var hugeCount = Message(from: 1, to: 2, term: 3, body: .appendEntries(AppendEntries(prevLogIndex: 0, prevLogTerm: 0, entries: [], leaderCommit: 0))).encoded
        hugeCount.replaceSubrange((hugeCount.count - 4)..., with: [0xFF, 0xFF, 0xFF, 0x7F])
        #expect(throws: CodecError.tooLarge(field: "entries", length: 0x7FFF_FFFF, limit: CodecLimits.entriesPerMessageMax)) {
            try Message(decoding: hugeCount)
        }
        // A piece of a snapshot stream must lie inside the stream it names.
        let metadata = SnapshotMetadata(index: 9, term: 3, membership: Membership(voters: [1]))
        for (total, offset, count) in [(10, 8, 3), (10, 11, 0), (UInt64.max, UInt64.max - 1, 3)] as [(UInt64, UInt64, Int)] {
            let outside = Message(from: 1, to: 2, term: 3, body: .snapshotChunk(SnapshotChunk(metadata: metadata, totalBytes: total, checksum: 0, offset: offset,
                                                                                              bytes: [UInt8](repeating: 1, count: count))))
            #expect(throws: CodecError.self, "\(offset) + \(count) in \(total)") { try Message(decoding: outside.encoded) }
        }
        let inside = Message(from: 1, to: 2, term: 3, body: .snapshotChunk(SnapshotChunk(metadata: metadata, totalBytes: 10, checksum: 0, offset: 7, bytes: [1, 2, 3])))
        #expect(try Message(decoding: inside.encoded) == inside)
    }

    @Test("100,000 random and mutated messages never crash the decoder")
    func fuzzMessageDecoder() async {
        var random = SeededGenerator(seed: 77)
        let corpus: [[UInt8]] = [
            Message(from: 1, to: 2, term: 3, body: .appendEntries(AppendEntries(prevLogIndex: 4, prevLogTerm: 2, entries: [Entry(term: 3, index: 5, payload: .command([1, 2, 3])), Entry(term: 3, index: 6, payload: .noop)], leaderCommit: 4))).encoded,
            Message(from: 2, to: 1, term: 3, body: .appendEntriesResponse(AppendEntriesResponse(index: 6, rejected: false, hintIndex: 0, hintTerm: 0, commitIndex: 4))).encoded,
            Message(from: 1, to: 3, term: 3, body: .installSnapshot(Snapshot(metadata: SnapshotMetadata(index: 9, term: 3, membership: Membership(voters: [1, 2, 3])), data: [5, 5]))).encoded,
            Message(from: 1, to: 3, term: 3, body: .heartbeat(Heartbeat(commit: 4, readRound: 2))).encoded,
            Message(from: 3, to: 1, term: 3, body: .forwardedProposal([.command([9]), .configChange(.addLearner(4))])).encoded,
            Message(from: 1, to: 3, term: 3, body: .snapshotChunk(SnapshotChunk(metadata: SnapshotMetadata(index: 9, term: 3, membership: Membership(voters: [1, 2, 3])),
                                                                               totalBytes: 40, checksum: 7, offset: 30, bytes: [1, 2, 3, 4]))).encoded,
        ]
        var decoded = 0
        for round in 0..<100_000 {
            if round % 100 == 0 { await Task.yield() } // CPU-bound: leave the shared pool to other tests often
            var input: [UInt8]
            if round % 4 == 0 {
                input = (0..<random.below(64)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                if !input.isEmpty { input[0] = Message.encodingVersion }
            } else {
                input = corpus[random.below(corpus.count)]
                for _ in 0...random.below(4) { input[random.below(input.count)] = UInt8(truncatingIfNeeded: random.next()) }
                if random.chance(0.2) { input.removeLast(random.below(input.count)) }
                if random.chance(0.1) { input.append(UInt8(truncatingIfNeeded: random.next())) }
            }
            if let message = try? Message(decoding: input) {
                decoded += 1
                #expect((try? Message(decoding: message.encoded)) == message, "decoding is stable under re-encoding")
            }
        }
        #expect(decoded > 1000, "mutations also produce valid messages, so both paths run")
    }

    @Test("Every payload kind round-trips")
    func payloadsRoundTrip() throws {
        let payloads: [EntryPayload] = [
            .noop, .command([]), .command(Array(0...255)),
            .configChange(.bootstrap(voters: [1, 2, 3])), .configChange(.addLearner(9)),
            .configChange(.promoteLearner(9)), .configChange(.removeNode(UInt64.max)),
        ]
        for payload in payloads {
            #expect(try EntryPayload(decoding: payload.encoded) == payload)
        }
        let membership = Membership(voters: [1, 2], learners: [3], removed: [4, 5])
        #expect(try Membership(decoding: membership.encoded) == membership)
    }

    @Test("Malformed input is refused with a specific error")
    func malformedInput() {
        #expect(throws: CodecError.unknownTag(field: "payload", tag: 7)) { try EntryPayload(decoding: [7]) }
        #expect(throws: CodecError.truncated(field: "command", needed: 5, remaining: 2)) { try EntryPayload(decoding: [1, 5, 0, 0, 0, 1, 2]) }
        #expect(throws: CodecError.trailingBytes(count: 1)) { try EntryPayload(decoding: [0, 0]) }
        #expect(throws: CodecError.tooLarge(field: "bootstrap voters", length: 0xFFFF_FFFF, limit: CodecLimits.nodeIDsMax)) {
            try EntryPayload(decoding: [2, 0, 0xFF, 0xFF, 0xFF, 0xFF])
        }
    }

    @Test("100,000 random and mutated inputs never crash the decoder")
    func fuzzDecoder() async {
        var random = SeededGenerator(seed: 2026)
        let seeds: [[UInt8]] = [
            EntryPayload.command(Array("seed".utf8)).encoded, EntryPayload.noop.encoded,
            EntryPayload.configChange(.bootstrap(voters: [1, 2, 3])).encoded, Membership(voters: [1], learners: [2]).encoded,
        ]
        var decoded = 0
        for round in 0..<100_000 {
            if round % 100 == 0 { await Task.yield() } // CPU-bound: leave the shared pool to other tests often
            var input: [UInt8]
            if round % 2 == 0 {
                input = (0..<random.below(24)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            } else {
                input = seeds[random.below(seeds.count)]
                for _ in 0...random.below(3) where !input.isEmpty {
                    input[random.below(input.count)] = UInt8(truncatingIfNeeded: random.next())
                }
                if random.chance(0.3) { input.removeLast(random.below(input.count + 1)) }
            }
            if let payload = try? EntryPayload(decoding: input) {
                decoded += 1
                #expect(payload.encoded == input, "a decoded payload re-encodes to the same bytes")
            }
            _ = try? Membership(decoding: input)
        }
        #expect(decoded > 1000, "the mutations also produce valid inputs, so both paths are exercised")
    }

    /// The ASCII fast path must agree with the standard library's
    /// validation on every input: non-ASCII bytes at each position of an
    /// eight-byte word and in the tail, truncated, overlong and surrogate
    /// sequences, and random bytes.
    @Test("An ASCII text's byte prefix is its character prefix, whole when shorter")
    func asciiPrefix() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        for count in [0, 1, 16, 32, 63, 64, 65, 1_000] {
            #expect(UTF8Text.prefix(digest, bytes: count) == String(digest.prefix(count)), "\(count) bytes")
        }
        #expect(UTF8Text.prefix("", bytes: 16) == "")
    }

    @Test("Strings read from bytes: ASCII fast path agrees with full UTF-8 validation")
    func utf8Strings() {
        func check(_ bytes: [UInt8]) {
            let fast = bytes.withUnsafeBufferPointer { UTF8Text.string($0) }
            #expect(fast == String(validating: bytes, as: UTF8.self), "bytes \(bytes)")
        }
        let ascii = Array("spiffe://example.org/ci/job".utf8)
        check([])
        check(ascii)
        let bad: [[UInt8]] = [[0x80], [0xC0, 0x80], [0xE2, 0x82], [0xED, 0xA0, 0x80], [0xF0, 0x9F, 0x98], [0xFF]]
        let good: [[UInt8]] = [Array("é".utf8), Array("€".utf8), Array("😀".utf8)]
        for position in 0...17 {
            for insert in bad + good {
                var bytes = Array(ascii.prefix(position))
                bytes += insert
                bytes += ascii.prefix(5)
                check(bytes)
            }
        }
        var random = SeededGenerator(seed: 7)
        for _ in 0..<20_000 {
            check((0..<random.below(24)).map { _ in random.chance(0.9) ? UInt8(random.below(0x80)) : UInt8(truncatingIfNeeded: random.next()) })
        }
        // A reader refuses what is not UTF-8, naming the field.
        var writer = BinaryWriter()
        writer.writeBytes([0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0xC3])
        var reader = BinaryReader(writer.bytes)
        #expect(throws: CodecError.invalid(field: "name", reason: "not UTF-8")) { try reader.readString("name", limit: 100) }
        var short = BinaryReader([1, 0])
        #expect(throws: CodecError.truncated(field: "name length", needed: 4, remaining: 2)) { try short.readString("name", limit: 100) }
    }
}
