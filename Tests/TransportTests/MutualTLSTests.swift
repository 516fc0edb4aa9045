import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Raft
import Synchronization
import Testing
import Transport
import X509

/// Runs transports 1 and 2 on loopback (with TLS identities, or none),
/// wires their addresses, and hands back both and node 2's inbox; shuts
/// everything down afterwards.
func withPair(one oneIdentity: NodeIdentity?, two twoIdentity: NodeIdentity?, oneID: NodeID = 1,
              group: MultiThreadedEventLoopGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1),
              _ body: (_ one: TCPTransport, _ two: TCPTransport, _ inbox: Inbox) async throws -> Void) async throws {
    let one = try TCPTransport(id: oneID, peers: [2: nil], group: group, identity: oneIdentity)
    let two = try TCPTransport(id: 2, peers: [oneID: nil], group: group, identity: twoIdentity)
    let inbox = Inbox()
    let (runners, address) = try await runPair(one, two, into: inbox)
    one.setAddress(address, of: 2)
    do {
        try await body(one, two, inbox)
    } catch {
        runners.cancel(); one.finish(); two.finish(); await runners.value
        try await group.shutdownGracefully()
        throw error
    }
    runners.cancel(); one.finish(); two.finish(); await runners.value
    try await group.shutdownGracefully()
}

struct NotListening: Error {}

/// Runs both transports on loopback, node 2's deliveries going to `inbox`;
/// returns their task and node 2's address once it listens.
func runPair(_ one: TCPTransport, _ two: TCPTransport, into inbox: Inbox) async throws -> (runners: Task<Void, Never>, address: SocketAddress) {
    let bound = AddressBook()
    let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
    let runners = Task {
        await withTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try? await one.run(listeningOn: loopback) { _ in } }
            tasks.addTask { try? await two.run(listeningOn: loopback, ready: { bound.set(2, $0) }) { inbox.append($0) } }
        }
    }
    for _ in 0..<2_000 where bound.all.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
    guard let address = bound.all[2] else {
        runners.cancel()
        throw NotListening()
    }
    return (runners, address)
}

/// Runs transport 1 with a link to `peer` (a server the test made on
/// `group`, which does something unhelpful), hands it to `body`, then shuts
/// the transport, the peer and the group down.
func withLink(to peer: any Channel, group: MultiThreadedEventLoopGroup, limits: TransportLimits, identity: NodeIdentity? = nil,
              _ body: (_ one: TCPTransport) async throws -> Void) async throws {
    let one = try TCPTransport(id: 1, peers: [2: peer.localAddress!], group: group, limits: limits, identity: identity)
    let runOne = Task { try? await one.run(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 0)) { _ in } }
    var failure: (any Error)?
    do { try await body(one) } catch { failure = error }
    runOne.cancel()
    one.finish()
    await runOne.value
    try? await peer.close()
    try await group.shutdownGracefully()
    if let failure { throw failure }
}

/// Node 1 holding node 3's certificate and key.
func impostor(_ ca: ClusterCA) throws -> NodeIdentity {
    let stolen = try ca.issueNodeIdentity(3)
    return NodeIdentity(clusterID: stolen.clusterID, nodeID: 1, certificate: stolen.certificate,
                        privateKey: stolen.privateKey, caCertificate: stolen.caCertificate)
}

private func ping(_ from: NodeID, _ round: UInt64) -> Message {
    Message(from: from, to: 2, term: 1, body: .heartbeat(Heartbeat(commit: 0, readRound: round)))
}

@Suite("Mutual TLS between nodes", .serialized)
struct MutualTLSTests {
    @Test("Nodes with certificates from the cluster CA talk over TLS 1.3")
    func sameClusterTalks() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        try await withPair(one: try ca.issueNodeIdentity(1), two: try ca.issueNodeIdentity(2)) { one, _, inbox in
            one.send((1...20).map { ping(1, $0) })
            #expect(await eventually { inbox.all.count == 20 })
            #expect(inbox.all == (1...20).map { ping(1, $0) })
        }
    }

    @Test("Certificates made where the clock ran 30 minutes ahead still work with nodes on time: cluster certificates are backdated an hour")
    func skewedIssuerIsAccepted() async throws {
        let ahead = Date().addingTimeInterval(30 * 60)
        let ca = try ClusterCA.create(clusterID: "c1", now: ahead)
        try await withPair(one: try ca.issueNodeIdentity(1, now: ahead), two: try ca.issueNodeIdentity(2, now: ahead)) { one, _, inbox in
            one.send((1...5).map { ping(1, $0) })
            #expect(await eventually(10) { inbox.all.count == 5 })
        }
    }

    @Test("A link takes messages only once its TLS handshake is done: to a peer that accepts and never answers, they wait, the queue's limit at most")
    func linkWaitsForHandshake() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Accepts TCP connections and never speaks TLS.
        let mute = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let ca = try ClusterCA.create(clusterID: "c1")
        var limits = TransportLimits()
        limits.queuedMessagesPerPeerMax = 8
        limits.connectTimeout = .milliseconds(300)
        try await withLink(to: mute, group: group, limits: limits, identity: try ca.issueNodeIdentity(1)) { one in
            try await Task.sleep(for: .milliseconds(100)) // the TCP connection is up by now
            for round in UInt64(1)...20 { one.send([ping(1, round)]) }
            #expect(one.waitingMessages(to: 2) == 8, "messages went to a connection whose handshake never finished")
            // Past the handshake timeout the link reconnects; the messages still wait.
            try await Task.sleep(for: .milliseconds(700))
            #expect(one.waitingMessages(to: 2) == 8)
        }
    }

    @Test("An accepted connection that never finishes its TLS handshake is closed at the deadline; a peer's stays open past it")
    func inboundHandshakeDeadline() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ca = try ClusterCA.create(clusterID: "c1")
        var limits = TransportLimits()
        limits.connectTimeout = .milliseconds(300)
        let one = try TCPTransport(id: 1, peers: [2: nil], group: group, limits: limits, identity: try ca.issueNodeIdentity(1))
        let two = try TCPTransport(id: 2, peers: [1: nil], group: group, limits: limits, identity: try ca.issueNodeIdentity(2))
        let inbox = Inbox()
        let (runners, address) = try await runPair(one, two, into: inbox)
        one.setAddress(address, of: 2)
        // Connects and never speaks TLS.
        // (Its port recorded as it connects: read after, a busy machine
        // had let the deadline close it first, and a closed channel has no address.)
        let recorder = PortRecorder()
        let mute = try await ClientBootstrap(group: group)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(recorder) } }
            .connect(to: address).get()
        #expect(await eventually(30) { recorder.port.load(ordering: .relaxed) != -1 }, "the silent connection became active")
        let mutePort = recorder.port.load(ordering: .relaxed)
        one.send([ping(1, 1)])
        #expect(await eventually { inbox.all.count == 1 })
        #expect(await eventually(30) { !mute.isActive }, "the silent connection is closed at its handshake deadline")
        // The mute connection's refusal names its port. (The peer's own
        // handshake has the same 300 ms deadline: on a busy machine it may
        // miss it once and connect again, which is not what this tests.)
        let timedOut = { two.rejectedConnections.filter { $0.contains(":\(mutePort): TLS handshake not done") }.count }
        #expect(timedOut() == 1, "\(two.rejectedConnections)")
        // Well past the deadline, the peer's connection still carries
        // messages over the link it had: no refusal after the first message.
        let peerRefusals = { two.rejectedConnections.filter { $0.contains("TLS handshake not done") }.count - timedOut() }
        let refusalsBefore = peerRefusals()
        try await Task.sleep(for: .milliseconds(700))
        one.send([ping(1, 2)])
        #expect(await eventually { inbox.all.count == 2 })
        #expect(timedOut() == 1, "\(two.rejectedConnections)")
        #expect(peerRefusals() == refusalsBefore, "the peer's established connection was closed: \(two.rejectedConnections)")
        runners.cancel(); one.finish(); two.finish(); await runners.value
        try await group.shutdownGracefully()
    }

    @Test("A link whose task waits for a thread past the connect timeout keeps the connection its handshake finished")
    func busyPoolKeepsTheLink() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        let groupOne = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let groupTwo = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var limits = TransportLimits()
        limits.connectTimeout = .seconds(2)
        let one = try TCPTransport(id: 1, peers: [2: nil], group: groupOne, limits: limits, identity: try ca.issueNodeIdentity(1))
        let two = try TCPTransport(id: 2, peers: [1: nil], group: groupTwo, identity: try ca.issueNodeIdentity(2))
        let inbox = Inbox()
        let (runners, address) = try await runPair(one, two, into: inbox)
        let relay = try await CountingRelay.start(to: address, group: groupOne)

        // Node 2's loop is held, so the handshake stops half-way: TCP is
        // up (the kernel accepts), and the link's task waits for it.
        let serverHeld = DispatchSemaphore(value: 0)
        groupTwo.next().execute { serverHeld.wait() }
        one.setAddress(relay.address, of: 2)
        one.send((1...20).map { ping(1, $0) })

        // On a thread of its own (the cooperative pool may be slow to run a
        // test's task on a busy machine, and the connect timeout counts):
        // once the link has connected, every thread of the pool is kept
        // busy for longer than the connect timeout, and node 2's loop is
        // let go once they all are (or after 300 ms: other tests may hold
        // the pool already), so the handshake finishes, well within its
        // timeout, while the link's task cannot run.
        let width = ProcessInfo.processInfo.activeProcessorCount
        let busy = BusyThreads()
        let connected = Atomic(false)
        Thread.detachNewThread {
            for _ in 0..<5_000 where relay.accepted < 2 { Thread.sleep(forTimeInterval: 0.002) }
            connected.store(relay.accepted == 2, ordering: .relaxed)
            for _ in 0..<width {
                Task.detached {
                    busy.count.wrappingAdd(1, ordering: .relaxed)
                    usleep(3_000_000) // blocks the thread, as a long synchronous job would
                }
            }
            for _ in 0..<150 where busy.count.load(ordering: .relaxed) < width { Thread.sleep(forTimeInterval: 0.002) }
            serverHeld.signal()
        }
        #expect(await eventually(30) { inbox.all.count == 20 })
        let linkConnected = connected.load(ordering: .relaxed)
        #expect(linkConnected, "one connection for each of the link's two lanes")
        #expect(inbox.all == (1...20).map { ping(1, $0) })
        #expect(relay.accepted == 2, "a connection was closed after its handshake finished, and another one made")

        runners.cancel(); one.finish(); two.finish(); await runners.value
        try await relay.stop()
        try await groupOne.shutdownGracefully()
        try await groupTwo.shutdownGracefully()
    }

    @Test("A peer from another cluster is refused at the handshake, and the refusal is recorded")
    func otherClusterIsRefused() async throws {
        let ours = try ClusterCA.create(clusterID: "ours")
        let theirs = try ClusterCA.create(clusterID: "theirs")
        try await withPair(one: try theirs.issueNodeIdentity(1), two: try ours.issueNodeIdentity(2)) { one, two, inbox in
            one.send([ping(1, 1)])
            #expect(await eventually { !two.rejectedConnections.isEmpty })
            try await Task.sleep(for: .milliseconds(200))
            #expect(inbox.all.isEmpty, "nothing from another cluster is delivered")
        }
    }

    @Test("A node whose certificate names node 3 cannot send as node 1")
    func impersonationIsRefused() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        // Node 3, with its own certificate (so its clock stamps pass), sends a message from 1.
        try await withPair(one: try ca.issueNodeIdentity(3), two: try ca.issueNodeIdentity(2), oneID: 3) { one, two, inbox in
            one.send([ping(1, 1)])
            #expect(await eventually { two.rejectedConnections.contains { $0.contains("message claims node 1 but the certificate names node 3") } },
                    "\(two.rejectedConnections)")
            #expect(inbox.all.isEmpty)
        }
    }

    @Test("A link sends nothing to a server whose certificate names another node than the one it is for (any node certificate of the cluster passes TLS)")
    func linkChecksItsPeer() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        let third = try ca.issueNodeIdentity(3)
        // Listening where node 2 should be, with node 3's certificate.
        let elsewhere = NodeIdentity(clusterID: third.clusterID, nodeID: 2, certificate: third.certificate, privateKey: third.privateKey,
                                     caCertificate: third.caCertificate)
        try await withPair(one: try ca.issueNodeIdentity(1), two: elsewhere) { one, _, inbox in
            for round in 1...5 {
                one.send([ping(1, UInt64(round))])
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(inbox.all.isEmpty, "\(inbox.all.count) messages reached node 3's server")
        }
    }

    @Test("A node refused (removed from the cluster) gets nothing through, though its certificate still chains to the cluster CA")
    func refusedNode() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        try await withPair(one: try ca.issueNodeIdentity(1), two: try ca.issueNodeIdentity(2)) { one, two, inbox in
            two.refuse([1])
            one.send([ping(1, 1)])
            #expect(await eventually { two.rejectedConnections.contains { $0.contains("node 1 was removed from the cluster") } }, "\(two.rejectedConnections)")
            #expect(inbox.all.isEmpty)
        }
    }

    @Test("A removed node's connection that sends nothing is closed once its TLS handshake is done, not left holding an inbound slot")
    func silentRefusedPeerIsClosed() async throws {
        let ca = try ClusterCA.create(clusterID: "c1")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let two = try TCPTransport(id: 2, peers: [:], group: group, identity: try ca.issueNodeIdentity(2))
        two.refuse([1])
        let listening = AddressBook()
        let runner = Task { try? await two.run(listeningOn: try SocketAddress(ipAddress: "127.0.0.1", port: 0), ready: { listening.set(2, $0) }) { _ in } }
        for _ in 0..<500 where listening.all.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        let address = try #require(listening.all[2])

        // Node 1's own certificate, a TLS handshake, then silence.
        let one = try ca.issueNodeIdentity(1)
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateChain = [.certificate(try one.nioCertificate)]
        configuration.privateKey = .privateKey(try one.nioPrivateKey)
        configuration.trustRoots = .certificates([try one.nioCACertificate])
        configuration.certificateVerification = .noHostnameVerification
        let context = try NIOSSLContext(configuration: configuration)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil)) }
            }
            .connect(to: address).get()
        let closed = Atomic(false)
        channel.closeFuture.whenComplete { _ in closed.store(true, ordering: .relaxed) }
        #expect(await eventually(30) { closed.load(ordering: .relaxed) }, "the silent connection stayed open")
        #expect(two.rejectedConnections.contains { $0.contains("node 1 was removed from the cluster; refused at its TLS handshake") }, "\(two.rejectedConnections)")
        try? await channel.close()
        runner.cancel(); two.finish(); await runner.value
        try await group.shutdownGracefully()
    }

    @Test("Node certificates carry what clients and verifiers expect")
    func certificateShape() throws {
        let ca = try ClusterCA.create(clusterID: "c9")
        let identity = try ca.issueNodeIdentity(7)
        #expect(NodeIdentity.nodeID(inCertificateDER: try identity.certificateDER, clusterID: "c9") == 7)
        #expect(NodeIdentity.nodeID(inCertificateDER: try identity.certificateDER, clusterID: "other") == nil)
        #expect(identity.certificate.issuer == ca.certificate.subject)
        #expect(identity.certificate.notValidAfter <= ca.certificate.notValidAfter)
        let serial = identity.certificate.serialNumber.bytes
        #expect(serial.count <= 16 && serial.first.map { $0 & 0x80 == 0 } == true)
        #expect(try ClusterCA.create(clusterID: "c9").certificate.subject != ca.certificate.subject, "every CA has a unique subject")
    }
}

final class BusyThreads: Sendable { let count = Atomic(0) }

/// Relays TCP connections to `target` byte for byte, counting those it accepts.
final class CountingRelay: Sendable {
    private let server: any Channel
    private let counter: Counter
    var address: SocketAddress { server.localAddress! }
    var accepted: Int { counter.value.load(ordering: .relaxed) }

    private init(server: any Channel, counter: Counter) {
        self.server = server
        self.counter = counter
    }

    static func start(to target: SocketAddress, group: any EventLoopGroup) async throws -> CountingRelay {
        let counter = Counter()
        let server = try await ServerBootstrap(group: group)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { inbound in
                counter.value.wrappingAdd(1, ordering: .relaxed)
                return ClientBootstrap(group: inbound.eventLoop).connect(to: target).flatMap { outbound in
                    let (a, b) = (Pipe(partner: outbound), Pipe(partner: inbound))
                    return inbound.pipeline.addHandler(a).flatMap { outbound.pipeline.addHandler(b) }.flatMap { inbound.setOption(.autoRead, value: true) }
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return CountingRelay(server: server, counter: counter)
    }

    func stop() async throws { try await server.close() }

    private final class Counter: Sendable { let value = Atomic(0) }

    /// Writes what one side reads to the other; closes both together.
    private final class Pipe: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let partner: any Channel
        init(partner: any Channel) { self.partner = partner }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            partner.writeAndFlush(unwrapInboundIn(data), promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            partner.close(promise: nil)
            context.fireChannelInactive()
        }
    }
}

/// The local port of the channel it is in, as it becomes active.
private final class PortRecorder: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let port = Atomic<Int>(-1)

    func channelActive(context: ChannelHandlerContext) {
        port.store(context.localAddress?.port ?? -1, ordering: .relaxed)
        context.fireChannelActive()
    }
}
