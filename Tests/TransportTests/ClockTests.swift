import NIOCore
import NIOPosix
import Raft
import Testing
import Transport

@Suite("Clocks between nodes", .serialized)
struct ClockTests {
    @Test("A clock stamp travels as a frame of its own; one of the wrong length is refused")
    func clockFrame() throws {
        let stamp = ClockStamp(from: 3, wallMillis: 1_733_400_000_123)
        var decoder = FrameDecoder()
        decoder.append(Frame.clock(stamp).encoded)
        #expect(try decoder.next() == .clock(stamp))
        #expect(try decoder.next() == nil)
        // Kind 3 with 15 bytes after it.
        var short = FrameDecoder()
        short.append([16, 0, 0, 0, 3] + [UInt8](repeating: 0, count: 15))
        #expect(throws: FrameError.self) { try short.next() }
        #expect(short.failed?.description.contains("clock") == true, "\(String(describing: short.failed))")
        // A time no clock shows (the offset subtraction would overflow).
        var far = FrameDecoder()
        far.append(Frame.clock(ClockStamp(from: 3, wallMillis: UInt64.max)).encoded)
        #expect(throws: FrameError.self) { try far.next() }
        #expect(far.failed?.description.contains("past any plausible time") == true, "\(String(describing: far.failed))")
    }

    @Test("Each node learns how far the other's clock is from its own, with no Raft traffic at all")
    func offsetsFromStamps() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Node 1's clock runs two minutes ahead.
        let ahead: @Sendable () -> UInt64 = { TCPTransport.systemWallClock() + 120_000 }
        let one = try TCPTransport(id: 1, peers: [2: nil], group: group, wallClock: ahead)
        let two = try TCPTransport(id: 2, peers: [1: nil], group: group)
        let bound = AddressBook()
        let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        let runners = Task {
            await withTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try? await one.run(listeningOn: loopback, ready: { bound.set(1, $0) }) { _ in } }
                tasks.addTask { try? await two.run(listeningOn: loopback, ready: { bound.set(2, $0) }) { _ in } }
            }
        }
        #expect(await eventually { bound.all.count == 2 })
        one.setAddress(bound.all[2]!, of: 2)
        two.setAddress(bound.all[1]!, of: 1)
        #expect(await eventually(10) { two.peerClocks.offsets(maxAge: .seconds(5))[1] != nil && one.peerClocks.offsets(maxAge: .seconds(5))[2] != nil })
        let seenByTwo = try #require(two.peerClocks.offsets(maxAge: .seconds(5))[1])
        let seenByOne = try #require(one.peerClocks.offsets(maxAge: .seconds(5))[2])
        #expect(abs(seenByTwo - 120_000) < 2_000, "node 2 sees node 1 \(seenByTwo) ms ahead")
        #expect(abs(seenByOne + 120_000) < 2_000, "node 1 sees node 2 \(seenByOne) ms ahead")
        // Stamps keep coming (every second), traffic or not.
        let first = try #require(two.peerClocks.latest(1)).at
        #expect(await eventually(10) { (two.peerClocks.latest(1)?.at).map { $0 - first >= .milliseconds(900) } ?? false },
                "no later stamp arrived")
        runners.cancel()
        one.finish()
        two.finish()
        await runners.value
        try await group.shutdownGracefully()
    }

    @Test("A clock stamp from a node other than the certificate names closes the connection")
    func forgedStampIsRefused() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        try await withPair(one: try impostor(ca), two: try ca.issueNodeIdentity(2)) { _, two, _ in
            // Nothing is sent: the link's first write is its clock stamp.
            #expect(await eventually { two.rejectedConnections.contains { $0.contains("clock stamp claims node 1 but the certificate names node 3") } },
                    "\(two.rejectedConnections)")
            #expect(two.peerClocks.offsets(maxAge: .seconds(60)).isEmpty)
        }
    }

    @Test("A node's clock disagrees only when a voter's clock is off by more than the bound and too few voters agree with it")
    func agreement() {
        let bound: Int64 = 10_000
        func judge(_ own: NodeID, _ voters: Set<NodeID>, _ offsets: [NodeID: Int64]) -> ClockAgreement {
            ClockAgreement.judge(own: own, voters: voters, offsets: offsets, boundMillis: bound)
        }
        // Node 2 runs 5 minutes ahead of nodes 1 and 3.
        #expect(judge(1, [1, 2, 3], [2: 300_000, 3: 40]) == .agrees)
        #expect(judge(2, [1, 2, 3], [1: -300_000, 3: -299_950]) == .disagrees(voters: [1, 3], medianOffsetMillis: -299_950))
        #expect(judge(2, [1, 2, 3], [1: -300_000, 3: -299_950]).description == "300.0 s ahead of nodes 1, 3")
        // Within the bound, exactly, agrees.
        #expect(judge(2, [1, 2, 3], [1: -10_000, 3: 10_000]) == .agrees)
        // No readings yet, or a single-node cluster: nothing says it is off.
        #expect(judge(1, [1, 2, 3], [:]) == .agrees)
        #expect(judge(1, [1], [:]) == .agrees)
        // One voter off and the other unheard of: too few agree.
        #expect(judge(1, [1, 2, 3], [2: 60_000]) == .disagrees(voters: [2], medianOffsetMillis: 60_000))
        // Five voters: two off is a minority, three off a majority.
        #expect(judge(1, [1, 2, 3, 4, 5], [2: 60_000, 3: 61_000, 4: 0, 5: 5]) == .agrees)
        #expect(judge(1, [1, 2, 3, 4, 5], [2: 60_000, 3: 61_000, 4: 62_000, 5: 5]) == .disagrees(voters: [2, 3, 4], medianOffsetMillis: 61_000))
        // Hand-over candidates: by node 2's readings (it is 5 minutes ahead),
        // nodes 1 and 3 agree with each other, so each has a quorum; node 2
        // has only itself. With 1 and 3 off in opposite directions, no two clocks agree.
        #expect(ClockAgreement.agreeing(with: 1, own: 2, voters: [1, 2, 3], offsets: [1: -300_000, 3: -299_950], boundMillis: bound) == 2)
        #expect(ClockAgreement.agreeing(with: 2, own: 2, voters: [1, 2, 3], offsets: [1: -300_000, 3: -299_950], boundMillis: bound) == 1)
        #expect(ClockAgreement.agreeing(with: 1, own: 2, voters: [1, 2, 3], offsets: [1: -300_000, 3: 300_000], boundMillis: bound) == 1)
        #expect(ClockAgreement.agreeing(with: 4, own: 2, voters: [1, 2, 3], offsets: [1: 0], boundMillis: bound) == 0, "no reading of node 4")
        // A learner's (non-voter's) clock is not counted.
        #expect(judge(1, [1, 2, 3], [2: 0, 3: 0, 4: 600_000]) == .agrees)
        #expect(judge(1, [1, 2, 3], [2: 600_000, 3: 600_000, 4: 0]).disagreeing == [2, 3])
    }
}
