import Raft
import Testing
import Transport

private let sample: [Message] = [
    Message(from: 1, to: 2, term: 3, body: .appendEntries(AppendEntries(prevLogIndex: 4, prevLogTerm: 2, entries: [Entry(term: 3, index: 5, payload: .command(Array(repeating: 7, count: 300)))], leaderCommit: 4))),
    Message(from: 2, to: 1, term: 3, body: .appendEntriesResponse(AppendEntriesResponse(index: 5, rejected: false, hintIndex: 0, hintTerm: 0, commitIndex: 4))),
    Message(from: 1, to: 2, term: 3, body: .heartbeat(Heartbeat(commit: 5, readRound: 1))),
    Message(from: 3, to: 1, term: 4, body: .requestVote(RequestVote(lastLogIndex: 5, lastLogTerm: 3, preVote: true, leadershipTransfer: false))),
]

@Suite("Frames")
struct FrameTests {
    @Test("A stream split at every possible point yields the same frames")
    func splitAnywhere() throws {
        let stream = sample.flatMap { Frame.raftMessage($0).encoded }
        for cut in 0...stream.count {
            var decoder = FrameDecoder()
            var frames: [Frame] = []
            decoder.append(stream[..<cut])
            while let frame = try decoder.next() { frames.append(frame) }
            decoder.append(stream[cut...])
            while let frame = try decoder.next() { frames.append(frame) }
            #expect(frames == sample.map(Frame.raftMessage), "cut at \(cut)")
            #expect(decoder.bufferedBytes == 0)
        }
    }

    @Test("An oversized length is refused before its body arrives, and the stream stays refused")
    func oversizedFrame() {
        var decoder = FrameDecoder(frameBytesMax: 1024)
        decoder.append([0x01, 0x10, 0x00, 0x00]) // 4097 bytes announced
        #expect(throws: FrameError.oversized(length: 4097, limitBytes: 1024)) { try decoder.next() }
        #expect(decoder.bufferedBytes == 0, "nothing of the bad stream is kept")
        decoder.append(Frame.raftMessage(sample[2]).encoded)
        #expect(throws: FrameError.oversized(length: 4097, limitBytes: 1024)) { try decoder.next() }
    }

    @Test("Empty, unknown and malformed frames are refused with their reason")
    func badFrames() {
        var empty = FrameDecoder()
        empty.append([0, 0, 0, 0])
        #expect(throws: FrameError.empty) { try empty.next() }
        var unknown = FrameDecoder()
        unknown.append([1, 0, 0, 0, 99])
        #expect(throws: FrameError.unknownKind(99)) { try unknown.next() }
        var malformed = FrameDecoder()
        malformed.append([2, 0, 0, 0, 1, 9])
        #expect(throws: FrameError.self) { try malformed.next() }
        #expect(malformed.failed.map { "\($0)" }?.contains("malformed frame of kind 1") == true)
    }

    @Test("100,000 random and mutated streams never crash the decoder or grow its buffer past one frame")
    func fuzzFrames() async {
        var random = SeededGenerator(seed: 99)
        let frameBytesMax = 2048
        let valid = sample.map { Frame.raftMessage($0).encoded } + Frame.frames(for: sample[0], chunkBytes: 100, messageID: 1).map(\.encoded)
        var framesDecoded = 0
        var refused = 0
        for round in 0..<100_000 {
            if round % 100 == 0 { await Task.yield() } // CPU-bound: leave the shared pool to other tests often
            var stream: [UInt8] = []
            if round % 3 == 0 {
                stream = (0..<random.below(80)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            } else {
                for _ in 0...random.below(3) { stream += valid[random.below(valid.count)] }
                for _ in 0..<random.below(3) { stream[random.below(stream.count)] = UInt8(truncatingIfNeeded: random.next()) }
            }
            var decoder = FrameDecoder(frameBytesMax: frameBytesMax)
            var offset = 0
            streaming: while offset < stream.count {
                let piece = 1 + random.below(64)
                decoder.append(stream[offset..<min(stream.count, offset + piece)])
                offset += piece
                while true {
                    do {
                        guard try decoder.next() != nil else { break }
                        framesDecoded += 1
                    } catch {
                        refused += 1
                        break streaming
                    }
                }
                #expect(decoder.bufferedBytes <= frameBytesMax + Frame.headerBytes + 64)
            }
        }
        #expect(framesDecoded > 10_000)
        #expect(refused > 10_000)
    }

    @Test("A large message travels in bounded pieces and is put back together; pieces out of order, interleaved or over the limit are refused")
    func chunkedMessages() throws {
        let snapshot = Snapshot(metadata: SnapshotMetadata(index: 9, term: 2, membership: Membership(voters: [1, 2, 3])),
                                data: (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        let message = Message(from: 1, to: 2, term: 2, body: .installSnapshot(snapshot))
        let frames = Frame.frames(for: message, chunkBytes: 64 << 10, messageID: 7)
        #expect(frames.count == 5)
        #expect(Frame.frames(for: sample[0], chunkBytes: 64 << 10, messageID: 8) == [.raftMessage(sample[0])], "small messages stay whole")
        // Through the byte decoder, with a frame limit the whole message would exceed.
        var decoder = FrameDecoder(frameBytesMax: 70 << 10)
        decoder.append(frames.flatMap(\.encoded))
        var assembler = ChunkAssembler(messageBytesMax: 1 << 20)
        var rebuilt: Message?
        while let frame = try decoder.next() {
            guard case .chunk(let chunk) = frame else { Issue.record("expected a chunk"); continue }
            #expect(chunk.bytes.count <= 64 << 10)
            if let whole = try assembler.add(chunk) { rebuilt = whole }
        }
        #expect(rebuilt == message)

        func pieces(_ frames: [Frame]) -> [MessageChunk] { frames.compactMap { if case .chunk(let c) = $0 { c } else { nil } } }
        let parts = pieces(frames)
        var skipping = ChunkAssembler(messageBytesMax: 1 << 20)
        _ = try skipping.add(parts[0])
        #expect(throws: FrameError.self) { _ = try skipping.add(parts[2]) }
        var interleaved = ChunkAssembler(messageBytesMax: 1 << 20)
        _ = try interleaved.add(parts[0])
        #expect(throws: FrameError.self) { _ = try interleaved.add(pieces(Frame.frames(for: message, chunkBytes: 64 << 10, messageID: 9))[0]) }
        var small = ChunkAssembler(messageBytesMax: 100_000)
        #expect(throws: FrameError.oversized(length: Int(parts[0].totalBytes), limitBytes: 100_000)) { _ = try small.add(parts[0]) }
        var orphan = ChunkAssembler(messageBytesMax: 1 << 20)
        #expect(throws: FrameError.self) { _ = try orphan.add(parts[1]) }
        // A first piece claiming a huge message reserves a bounded buffer.
        var claimed = ChunkAssembler(messageBytesMax: 1 << 30)
        _ = try claimed.add(MessageChunk(messageID: 1, totalBytes: 1 << 30, offset: 0, bytes: [1, 2, 3]))
        #expect(claimed.bufferedCapacity >= 3 && claimed.bufferedCapacity <= 17 << 20, "\(claimed.bufferedCapacity) bytes held")
    }
}
