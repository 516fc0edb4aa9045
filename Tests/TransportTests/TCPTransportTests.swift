import NIOCore
import NIOPosix
import Raft
import Synchronization
import Testing
import Transport

/// Collects what a transport delivers.
final class Inbox: Sendable {
    private let messages = Mutex<[Message]>([])
    func append(_ message: Message) { messages.withLock { $0.append(message) } }
    var all: [Message] { messages.withLock { $0 } }
}

/// The addresses transports reported once listening.
final class AddressBook: Sendable {
    private let addresses = Mutex<[NodeID: SocketAddress]>([:])
    func set(_ id: NodeID, _ address: SocketAddress) { addresses.withLock { $0[id] = address } }
    var all: [NodeID: SocketAddress] { addresses.withLock { $0 } }
}

/// Runs transports 1 and 2 on loopback (what 2 receives goes to `inbox`);
/// their bound addresses appear in the book.
private func runBoth(_ one: TCPTransport, _ two: TCPTransport, deliveringTo inbox: Inbox) throws -> (Task<Void, Never>, AddressBook) {
    let bound = AddressBook()
    let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
    let runners = Task {
        await withTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try? await one.run(listeningOn: loopback, ready: { bound.set(1, $0) }) { _ in } }
            tasks.addTask { try? await two.run(listeningOn: loopback, ready: { bound.set(2, $0) }) { inbox.append($0) } }
        }
    }
    return (runners, bound)
}

/// Transports 1 and 2 with mutual TLS on loopback (2 with `limits`), running
/// and bound, 1 not yet told 2's address.
private struct TLSPair {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let one: TCPTransport, two: TCPTransport
    let inboxTwo = Inbox()
    let runners: Task<Void, Never>
    let bound: AddressBook

    init(limitsOfTwo limits: TransportLimits) async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        one = try TCPTransport(id: 1, peers: [2: nil], group: group, identity: try ca.issueNodeIdentity(1))
        two = try TCPTransport(id: 2, peers: [1: nil], group: group, limits: limits, identity: try ca.issueNodeIdentity(2))
        (runners, bound) = try runBoth(one, two, deliveringTo: inboxTwo)
        #expect(await eventually { bound.all.count == 2 })
    }

    func stop() async throws {
        runners.cancel(); one.finish(); two.finish(); await runners.value
        try await group.shutdownGracefully()
    }
}

private func heartbeat(_ from: NodeID, _ to: NodeID, _ round: UInt64) -> Message {
    Message(from: from, to: to, term: 1, body: .heartbeat(Heartbeat(commit: 0, readRound: round)))
}

/// Polls until `condition` holds or about `seconds` pass (bounded).
func eventually(_ seconds: Double = 20, _ condition: () -> Bool) async -> Bool {
    for _ in 0..<Int(seconds * 100) {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}

@Suite("TCP transport", .serialized)
struct TCPTransportTests {
    @Test("Two nodes exchange framed messages over loopback, in order; garbage closes only its own connection")
    func exchangeOverLoopback() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let one = try TCPTransport(id: 1, peers: [2: nil], group: group)
        let two = try TCPTransport(id: 2, peers: [1: nil], group: group)
        let inboxOne = Inbox(), inboxTwo = Inbox()
        let bound = AddressBook()
        let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        let runners = Task {
            await withTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try? await one.run(listeningOn: loopback, ready: { bound.set(1, $0) }) { inboxOne.append($0) } }
                tasks.addTask { try? await two.run(listeningOn: loopback, ready: { bound.set(2, $0) }) { inboxTwo.append($0) } }
            }
        }
        #expect(await eventually { bound.all.count == 2 })
        let addresses = bound.all
        one.setAddress(addresses[2]!, of: 2)
        two.setAddress(addresses[1]!, of: 1)

        let sent = (1...200).map { heartbeat(1, 2, $0) }
        one.send(sent)
        two.send([heartbeat(2, 1, 7)])
        #expect(await eventually { inboxTwo.all.count == 200 })
        #expect(inboxTwo.all == sent, "every message arrives once, in order")
        #expect(await eventually { inboxOne.all.count == 1 })

        // A client that sends garbage is cut off and logged; traffic goes on.
        let garbage = try await ClientBootstrap(group: group).connect(to: addresses[2]!).get()
        var junk = ByteBuffer()
        junk.writeBytes([0xFF, 0xFF, 0xFF, 0x7F, 1, 2, 3])
        try await garbage.writeAndFlush(junk)
        #expect(await eventually { two.rejectedConnections.contains { $0.contains("exceeds") } })
        try? await garbage.closeFuture.get()
        one.send([heartbeat(1, 2, 999)])
        #expect(await eventually { inboxTwo.all.last == heartbeat(1, 2, 999) })

        runners.cancel()
        one.finish()
        two.finish()
        await runners.value
        try await group.shutdownGracefully()
    }

    @Test("A peer named by host name is looked up at each connection attempt: while it names nothing listening, nothing goes and the link keeps trying; once it names the peer, messages arrive")
    func peerByHostName() async throws {
        #expect(PeerAddress(host: "127.0.0.1", port: 7) == .resolved(try SocketAddress(ipAddress: "127.0.0.1", port: 7)))
        #expect(PeerAddress(host: "::1", port: 7) == .resolved(try SocketAddress(ipAddress: "::1", port: 7)))
        #expect(PeerAddress(host: "node-2.warrant.internal", port: 7) == .named(host: "node-2.warrant.internal", port: 7))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var limits = TransportLimits()
        limits.reconnectBackoffMax = .milliseconds(200)
        let one = try TCPTransport(id: 1, peers: [2: nil], group: group, limits: limits)
        let two = try TCPTransport(id: 2, peers: [1: nil], group: group)
        let inboxTwo = Inbox()
        let (runners, bound) = try runBoth(one, two, deliveringTo: inboxTwo)
        #expect(await eventually { bound.all.count == 2 })
        let port = try #require(bound.all[2]?.port)
        // The name, from /etc/hosts (no DNS), at a port where nothing
        // listens: attempts fail and go on. (Not a name that does not
        // resolve: without a reachable DNS server each lookup could take
        // seconds, and lookups queue one at a time.)
        let closed = try await ServerBootstrap(group: group).bind(to: try SocketAddress(ipAddress: "127.0.0.1", port: 0)).get()
        let closedPort = try #require(closed.localAddress?.port)
        try await closed.close()
        one.setAddress(host: "localhost", port: closedPort, of: 2)
        one.send([heartbeat(1, 2, 1)])
        try await Task.sleep(for: .milliseconds(600))
        #expect(inboxTwo.all.isEmpty)
        one.setAddress(host: "localhost", port: port, of: 2)
        #expect(await eventually { inboxTwo.all.count == 1 }, "the queued message arrives once the name resolves to the peer")
        one.send([heartbeat(1, 2, 2)])
        #expect(await eventually { inboxTwo.all == [heartbeat(1, 2, 1), heartbeat(1, 2, 2)] })
        runners.cancel(); one.finish(); two.finish(); await runners.value
        try await group.shutdownGracefully()
    }

    @Test("Accepted connections are served on the inbound group: messages are delivered on its thread, the links' traffic stays on the other group")
    func inboundGroupServesAcceptedConnections() async throws {
        let links = MultiThreadedEventLoopGroup(numberOfThreads: 1), accepted = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let linksLoop = links.next(), acceptedLoop = accepted.next()
        let ca = try ClusterCA.create(clusterID: "c1")
        let one = try TCPTransport(id: 1, peers: [2: nil], group: links, inboundGroup: accepted, identity: try ca.issueNodeIdentity(1))
        let two = try TCPTransport(id: 2, peers: [1: nil], group: links, inboundGroup: accepted, identity: try ca.issueNodeIdentity(2))
        // Where each delivery ran: on the accepted group's loop, on the links' loop.
        final class Places: Sendable { let seen = Mutex<[(accepted: Bool, links: Bool)]>([]) }
        let places = Places()
        let inboxTwo = Inbox(), bound = AddressBook()
        let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        let runners = Task {
            await withTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try? await one.run(listeningOn: loopback, ready: { bound.set(1, $0) }) { _ in } }
                tasks.addTask {
                    try? await two.run(listeningOn: loopback, ready: { bound.set(2, $0) }) { message in
                        places.seen.withLock { $0.append((acceptedLoop.inEventLoop, linksLoop.inEventLoop)) }
                        inboxTwo.append(message)
                    }
                }
            }
        }
        #expect(await eventually { bound.all.count == 2 })
        one.setAddress(bound.all[2]!, of: 2)
        let sent = (1...50).map { heartbeat(1, 2, $0) }
        one.send(sent)
        #expect(await eventually { inboxTwo.all.count == 50 })
        #expect(inboxTwo.all == sent)
        let seen = places.seen.withLock { $0 }
        #expect(seen.count == 50 && seen.allSatisfy { $0.accepted && !$0.links }, "every message was delivered on the inbound group's thread")
        runners.cancel(); one.finish(); two.finish(); await runners.value
        try await links.shutdownGracefully()
        try await accepted.shutdownGracefully()
    }

    @Test("Accepted connections past the open limit or the accept rate are closed unread, each refusal recorded")
    func inboundConnectionLimits() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        /// Runs a transport with `limits`, opens `count` plain connections
        /// to it, and returns how many it closed, its refusals, and how many
        /// seconds of the clock the connecting spanned. It waits (up to 30 s)
        /// until at least `least(windows)` are closed, one for each refusal.
        func flood(_ limits: TransportLimits, count: Int, least: (Int) -> Int) async throws -> (closed: Int, refusals: [String], windows: Int) {
            let transport = try TCPTransport(id: 2, peers: [:], group: group, limits: limits)
            let bound = AddressBook()
            let runner = Task { try? await transport.run(listeningOn: loopback, ready: { bound.set(2, $0) }) { _ in } }
            #expect(await eventually { !bound.all.isEmpty })
            // All at once: under load, connections opened one after another
            // could spread over several seconds of the accept rate's clock.
            let address = bound.all[2]!
            let started = ContinuousClock.now
            let clients = try await withThrowingTaskGroup(of: (any Channel).self) { connecting in
                for _ in 0..<count { connecting.addTask { try await ClientBootstrap(group: group).connect(to: address).get() } }
                return try await connecting.reduce(into: [any Channel]()) { $0.append($1) }
            }
            let windows = secondsSpanned(since: started)
            // The refusals close their connections meanwhile.
            _ = await eventually(30) {
                let closed = clients.filter { !$0.isActive }.count
                return closed >= least(windows) && closed == transport.rejectedConnections.count
            }
            let closed = clients.filter { !$0.isActive }.count
            for client in clients { try? await client.close() }
            runner.cancel(); transport.finish(); await runner.value
            return (closed, transport.rejectedConnections, windows)
        }
        var limits = TransportLimits()
        limits.inboundConnectionsMax = 3
        limits.inboundConnectionsPerSecond = 1000
        let full = try await flood(limits, count: 5) { _ in 2 }
        #expect(full.closed == 2)
        #expect(full.refusals.filter { $0.contains("too many inbound connections open") }.count == 2)

        limits.inboundConnectionsMax = 100
        limits.inboundConnectionsPerSecond = 3
        let fast = try await flood(limits, count: 20) { 20 - 3 * $0 }
        // Three in a second of the clock: at most seventeen refused, and
        // all but three for each second the twenty spanned.
        #expect(fast.closed >= 20 - 3 * fast.windows && fast.closed <= 17 && fast.closed > 0, "\(fast.closed) closed over \(fast.windows) seconds of the clock")
        #expect(fast.refusals.filter { $0.contains("too many inbound connections a second from its address") }.count == fast.closed)
        try await group.shutdownGracefully()
    }

    @Test("When every inbound slot is taken by bare connections, a peer's links take the slots of the oldest whose TLS handshake is not done")
    func peerEvictsUnshakenConnections() async throws {
        var limits = TransportLimits()
        limits.inboundConnectionsMax = 3
        // Bare connections would hold their slots this long.
        limits.connectTimeout = .seconds(30)
        let pair = try await TLSPair(limitsOfTwo: limits)
        var bare: [any Channel] = []
        for _ in 0..<3 { bare.append(try await ClientBootstrap(group: pair.group).connect(to: pair.bound.all[2]!).get()) }
        _ = await eventually(0.3) { false }
        #expect(bare.allSatisfy { $0.isActive }, "three bare connections hold every slot")
        pair.one.setAddress(pair.bound.all[2]!, of: 2)
        let sent = (1...20).map { heartbeat(1, 2, $0) }
        pair.one.send(sent)
        #expect(await eventually(10) { pair.inboxTwo.all.count == 20 }, "the peer got in while the bare connections held every slot")
        #expect(bare.filter { !$0.isActive }.count >= 1)
        #expect(pair.two.rejectedConnections.contains { $0.contains("TLS handshake was not done when every slot was taken") })
        for channel in bare { try? await channel.close() }
        try await pair.stop()
    }

    @Test("The accept rate is counted per address: a flood from 127.0.0.2 is cut at its share and leaves 127.0.0.3 its own")
    func acceptRatePerAddress() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var limits = TransportLimits()
        limits.inboundConnectionsMax = 100
        limits.inboundConnectionsPerSecond = 3
        limits.inboundConnectionsPerSecondTotal = 1_000
        let transport = try TCPTransport(id: 2, peers: [:], group: group, limits: limits)
        let bound = AddressBook()
        let runner = Task { try? await transport.run(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 0), ready: { bound.set(2, $0) }) { _ in } }
        #expect(await eventually { !bound.all.isEmpty })
        let address = bound.all[2]!
        func connect(from source: String) async throws -> any Channel {
            try await ClientBootstrap(group: group).bind(to: try SocketAddress(ipAddress: source, port: 0)).connect(to: address).get()
        }
        var flood: [any Channel] = []
        let started = ContinuousClock.now
        for _ in 0..<20 { flood.append(try await connect(from: "127.0.0.2")) }
        let windows = secondsSpanned(since: started)
        var other: [any Channel] = []
        for _ in 0..<3 { other.append(try await connect(from: "127.0.0.3")) }
        // The refusals close their connections meanwhile (a refused one of
        // 127.0.0.3's would keep the counts apart until the wait ends).
        _ = await eventually(30) {
            let closed = flood.filter { !$0.isActive }.count
            return closed >= max(1, 20 - 3 * windows) && closed == transport.rejectedConnections.count
        }
        let floodClosed = flood.filter { !$0.isActive }.count
        #expect(floodClosed >= 20 - 3 * windows && floodClosed > 0, "\(floodClosed) of the flood closed (over \(windows) seconds of the clock)")
        #expect(other.allSatisfy { $0.isActive }, "127.0.0.3's three were refused: \(transport.rejectedConnections.suffix(3))")
        #expect(transport.rejectedConnections.filter { $0.contains("from its address") }.count == floodClosed)
        for channel in flood + other { try? await channel.close() }
        runner.cancel(); transport.finish(); await runner.value
        try await group.shutdownGracefully()
    }

    @Test("An address that finished a TLS handshake is not refused for others' floods: past the accept total, 127.0.0.1 (a peer's) still gets in")
    func knownPeersPassTheTotal() async throws {
        var limits = TransportLimits()
        limits.inboundConnectionsMax = 100
        limits.inboundConnectionsPerSecond = 1_000
        limits.inboundConnectionsPerSecondTotal = 3
        // The bare connections never handshake: not closed for it while
        // a busy machine holds this test between its steps.
        limits.connectTimeout = .seconds(60)
        let pair = try await TLSPair(limitsOfTwo: limits)
        pair.one.setAddress(pair.bound.all[2]!, of: 2)
        pair.one.send([heartbeat(1, 2, 1)])
        #expect(await eventually(10) { pair.inboxTwo.all.count == 1 }, "the peer's handshake made 127.0.0.1 known")
        func connect(from source: String) async throws -> any Channel {
            try await ClientBootstrap(group: pair.group).bind(to: try SocketAddress(ipAddress: source, port: 0)).connect(to: pair.bound.all[2]!).get()
        }
        var flood: [any Channel] = []
        let started = ContinuousClock.now
        for _ in 0..<20 { flood.append(try await connect(from: "127.0.0.2")) }
        let windows = secondsSpanned(since: started)
        let known = try await connect(from: "127.0.0.1")
        // The refusals close their connections meanwhile (the known one's,
        // if refused, would keep the counts apart until the wait ends).
        _ = await eventually(30) {
            let closed = flood.filter { !$0.isActive }.count
            return closed >= max(1, 20 - 3 * windows) && closed == pair.two.rejectedConnections.count
        }
        let floodClosed = flood.filter { !$0.isActive }.count
        #expect(floodClosed >= 20 - 3 * windows && floodClosed > 0, "the flood was cut at the total: \(floodClosed) closed over \(windows) seconds of the clock")
        #expect(known.isActive, "the known address was refused: \(pair.two.rejectedConnections.suffix(2))")
        for channel in flood + [known] { try? await channel.close() }
        try await pair.stop()
    }

    @Test("A link waits for its peer to come up and reconnects after it restarts")
    func reconnects() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Reserve a port for node 2 by binding and releasing it.
        let probe = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let address = probe.localAddress!
        try await probe.close()

        let one = try TCPTransport(id: 1, peers: [2: address], group: group)
        let runOne = Task { try? await one.run(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 0)) { _ in } }
        one.send([heartbeat(1, 2, 1)]) // queued while node 2 is down

        func startTwo(_ inbox: Inbox) throws -> Task<Void, Never> {
            let two = try TCPTransport(id: 2, peers: [1: nil], group: group)
            return Task { try? await two.run(listeningOn: address) { inbox.append($0) } }
        }
        let firstInbox = Inbox()
        var runTwo = try startTwo(firstInbox)
        #expect(await eventually { firstInbox.all.count == 1 }, "the queued message arrives once node 2 listens")

        runTwo.cancel()
        await runTwo.value
        let secondInbox = Inbox()
        runTwo = try startTwo(secondInbox)
        // Messages sent around the restart may be lost (Raft retransmits);
        // keep sending until one arrives over the new connection.
        var delivered = false
        for round in UInt64(2)..<UInt64(2_000) where !delivered {
            one.send([heartbeat(1, 2, round)])
            try await Task.sleep(for: .milliseconds(10))
            delivered = !secondInbox.all.isEmpty
        }
        #expect(delivered, "the link reconnected to the restarted peer")

        runTwo.cancel()
        runOne.cancel()
        one.finish()
        await runTwo.value
        await runOne.value
        try await group.shutdownGracefully()
    }

    @Test("A peer that stops reading gets no more writes: its messages wait, at most the queue's limit, the oldest dropped")
    func slowPeerIsBounded() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // A peer that accepts and never reads.
        let silent = try await ServerBootstrap(group: group)
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.socketOption(.so_rcvbuf), value: 4096)
            .bind(host: "127.0.0.1", port: 0).get()
        var limits = TransportLimits()
        limits.queuedMessagesPerPeerMax = 8
        try await withLink(to: silent, group: group, limits: limits) { one in
            let snapshot = Snapshot(metadata: SnapshotMetadata(index: 9, term: 1, membership: Membership(voters: [1, 2])),
                                    data: [UInt8](repeating: 7, count: 256 << 10))
            var sent = 0
            // Sends until the link stops taking writes and messages pile up to the limit (bounded: 400 sends, 40 s).
            for _ in 0..<400 where one.waitingMessages(to: 2) < 8 {
                one.send([Message(from: 1, to: 2, term: 1, body: .installSnapshot(snapshot))])
                sent += 1
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(one.waitingMessages(to: 2) == 8, "after \(sent) sends of 256 KiB to a peer that reads nothing")
            for _ in 0..<20 { one.send([Message(from: 1, to: 2, term: 1, body: .installSnapshot(snapshot))]) }
            #expect(one.waitingMessages(to: 2) == 8)
            #expect(sent < 400)
        }
    }

    @Test("A heartbeat overtakes a queue of large snapshots to the same peer")
    func controlLaneOvertakesBulk() async throws {
        try await withPair(one: nil, two: nil) { one, _, inbox in
            try await overtake(one, inbox)
        }
    }

    @Test("An AppendEntries without entries stays behind the entries sent before it; a heartbeat sent after both overtakes them")
    func emptyAppendKeepsItsPlace() async throws {
        try await withPair(one: nil, two: nil) { one, _, inbox in
            // Twelve appends of a 4 MiB entry each, then one without entries
            // (a leader asking whether they all arrived), then a heartbeat.
            let big = [UInt8](repeating: 3, count: 4 << 20)
            let appends = (UInt64(0)..<12).map { k in
                Message(from: 1, to: 2, term: 1, body: .appendEntries(AppendEntries(prevLogIndex: k, prevLogTerm: 1,
                    entries: [Entry(term: 1, index: k + 1, payload: .command(big))], leaderCommit: 0)))
            }
            let check = Message(from: 1, to: 2, term: 1, body: .appendEntries(AppendEntries(prevLogIndex: 12, prevLogTerm: 1, entries: [], leaderCommit: 0)))
            one.send(appends)
            one.send([check])
            one.send([heartbeat(1, 2, 7)])
            #expect(await eventually(60) { inbox.all.count == 14 })
            let received = inbox.all
            // Compared by summary: a failure printing 48 MiB of entries takes minutes.
            func summary(_ messages: [Message]) -> [String] {
                messages.compactMap { message in
                    guard case .appendEntries(let append) = message.body else { return nil }
                    return "after \(append.prevLogIndex): \(append.entries.count) entries of \(append.entries.map(\.byteCount).reduce(0, +)) bytes"
                }
            }
            #expect(summary(received) == summary(appends + [check]), "the entry-less append arrived after every entry sent before it")
            let whole = received.filter { $0.body != heartbeat(1, 2, 7).body } == appends + [check]
            #expect(whole, "every append arrived whole")
            #expect((received.firstIndex(of: heartbeat(1, 2, 7)) ?? 99) < 12, "the heartbeat did not wait for the appends")
        }
    }

    @Test("A large write goes a piece per loop task: work queued on the loop behind it runs before it is all written; every message arrives whole, in order")
    func largeWritesLetTheLoopRun() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        try await withPair(one: nil, two: nil, group: group) { one, _, inbox in
            @Sendable func append(_ k: UInt64) -> Message {
                Message(from: 1, to: 2, term: 1, body: .appendEntries(AppendEntries(prevLogIndex: k, prevLogTerm: 1,
                    entries: [Entry(term: 1, index: k + 1, payload: .command(Array("entry \(k)".utf8)))], leaderCommit: k)))
            }
            @Sendable func snapshot(_ k: UInt64) -> Message {
                Message(from: 1, to: 2, term: 1, body: .installSnapshot(Snapshot(
                    metadata: SnapshotMetadata(index: k, term: 1, membership: Membership(voters: [1, 2])),
                    data: [UInt8](repeating: UInt8(truncatingIfNeeded: k), count: 6 << 20))))
            }
            one.send([append(0)])
            #expect(await eventually { inbox.all.count == 1 }, "the link is up")
            // Sent on the connection's loop (as a node's driver does): the
            // first piece is written at once, the rest in later tasks. The
            // probe is queued by the same task, right behind the write: queued
            // from this thread instead, it could land after the last piece
            // when this thread is descheduled (a CI run saw that).
            let midway = try await loop.flatSubmit {
                one.send([snapshot(1)])
                return loop.submit { one.writing(to: 2, lane: .bulk) }
            }.get()
            #expect(midway, "a task queued behind the 6 MiB write ran before it was all written")
            // More, from the loop and from elsewhere, behind and between large ones.
            var expected = [append(0), snapshot(1)]
            for k in UInt64(2)...9 {
                let message = k % 3 == 0 ? snapshot(k) : append(k)
                expected.append(message)
                if k % 2 == 0 { try await loop.submit { one.send([message]) }.get() } else { one.send([message]) }
            }
            #expect(await eventually(60) { inbox.all.count == expected.count })
            #expect(inbox.all == expected, "every message arrived once, whole, in the order sent")
            #expect(!one.writing(to: 2, lane: .bulk))
        }
    }

    private func overtake(_ one: TCPTransport, _ inbox: Inbox) async throws {
        let big = Snapshot(metadata: SnapshotMetadata(index: 9, term: 1, membership: Membership(voters: [1, 2])),
                           data: [UInt8](repeating: 7, count: 4 << 20))
        let snapshots = (0..<12).map { _ in Message(from: 1, to: 2, term: 1, body: .installSnapshot(big)) }
        one.send(snapshots)
        one.send([heartbeat(1, 2, 42)])
        #expect(await eventually(60) { inbox.all.count == 13 })
        let position = inbox.all.firstIndex(of: heartbeat(1, 2, 42))
        #expect(position != nil)
        #expect((position ?? 99) < 12, "the heartbeat did not wait for all twelve 4 MiB snapshots")
    }
}

/// How many seconds of the clock (the rate limits' fixed windows) the time
/// since `started` touched, at most: on a busy machine a loop meant for one
/// second spans several, each with its own allowance.
private func secondsSpanned(since started: ContinuousClock.Instant) -> Int {
    let elapsed = started.duration(to: .now)
    return Int(elapsed.components.seconds) + 2
}
