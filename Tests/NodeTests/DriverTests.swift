import Foundation
import NIOCore
import NIOPosix
import Ledger
import Node
import Raft
import Storage
import Synchronization
import Testing

/// An in-process network between drivers that can cut nodes off. Like a
/// node's transport, it hands each message to its driver's inbox at once
/// (`enqueue`), so it is stepped on the driver's own thread: nothing on the
/// way waits for Swift's cooperative pool, which other tests keep busy.
final class LoopbackNetwork: Sendable {
    private struct State {
        var drivers: [NodeID: RaftDriver] = [:]
        var isolated: Set<NodeID> = []
        /// Messages to these nodes wait in `held` until `releaseHeld`.
        var holding: Set<NodeID> = []
        var held: [Message] = []
    }
    private let state = Mutex(State())
    /// Every message handed to the network, in the order it was sent.
    let timeline = Timeline()

    struct Sender: MessageSender {
        let network: LoopbackNetwork
        func send(_ messages: [Message]) { network.deliver(messages) }
    }

    func sender() -> Sender { Sender(network: self) }

    func attach(_ id: NodeID, _ driver: RaftDriver) { state.withLock { $0.drivers[id] = driver } }

    func isolate(_ id: NodeID) { state.withLock { _ = $0.isolated.insert(id) } }
    func heal() { state.withLock { $0.isolated.removeAll() } }

    /// Delays (without losing) every message to `id` until `releaseHeld`.
    func hold(to id: NodeID) { state.withLock { _ = $0.holding.insert(id) } }

    /// Delivers the held messages that match, holding the rest as before.
    func releaseHeld(where matches: (Message) -> Bool) {
        let released = state.withLock { state in
            defer { state.held.removeAll(where: matches) }
            return state.held.filter(matches)
        }
        deliver(released, recording: false, holding: false)
    }

    func releaseHeld() {
        let held = state.withLock { state in
            defer { state.holding.removeAll(); state.held.removeAll() }
            return state.held
        }
        deliver(held, recording: false)
    }

    private func deliver(_ messages: [Message], recording: Bool = true, holding: Bool = true) {
        if recording { for message in messages { timeline.record(.sent(message)) } }
        let routed = state.withLock { state in
            messages.compactMap { message -> (RaftDriver, Message)? in
                guard !state.isolated.contains(message.from), !state.isolated.contains(message.to),
                      let driver = state.drivers[message.to] else { return nil }
                if holding && state.holding.contains(message.to) {
                    state.held.append(message)
                    return nil
                }
                return (driver, message)
            }
        }
        for (driver, message) in routed { driver.enqueue(message) }
    }

    /// The messages held so far.
    var held: [Message] { state.withLock { $0.held } }

    func close() { state.withLock { $0.drivers.removeAll() } }
}

/// What the drivers of a `LocalCluster` did, in order: messages sent, and
/// entries applied (with the last index then in the node's write-ahead
/// log), for tests of the order of a driver's steps.
final class Timeline: Sendable {
    enum Event: Sendable {
        case sent(Message)
        case applied(node: NodeID, through: LogIndex, lastWritten: LogIndex)
    }
    private let events = Mutex<[Event]>([])

    func record(_ event: Event) { events.withLock { $0.append(event) } }
    var all: [Event] { events.withLock { $0 } }

    /// Where `node` first applied `index`.
    func firstApplied(_ index: LogIndex, on node: NodeID) -> (position: Int, lastWritten: LogIndex)? {
        for (position, event) in all.enumerated() {
            if case .applied(node, let through, let lastWritten) = event, through >= index { return (position, lastWritten) }
        }
        return nil
    }

    /// Where `node` first sent a message matching `matches`.
    func firstSent(by node: NodeID, _ matches: (Message) -> Bool) -> Int? {
        all.firstIndex { event in
            if case .sent(let message) = event { return message.from == node && matches(message) }
            return false
        }
    }
}

/// Three drivers on SQLite files, ticking every 5 ms. Elections time out
/// after 100 ticks (0.5 to 1 s) unless a test asks otherwise: a busy CI
/// machine has held a driver's thread past 50 ms often enough to elect
/// again in the middle of a test that needs one leader throughout.
final class LocalCluster {
    let directory: URL
    let network = LoopbackNetwork()
    var drivers: [NodeID: RaftDriver] = [:]
    var stores: [NodeID: RaftStore] = [:]
    var metrics: [NodeID: NodeMetrics] = [:]
    var tickers: [RepeatedTask] = []
    /// A thread per driver, as in a node: work elsewhere in the test process
    /// (HTTP handlers, TLS) runs on NIO's shared threads, not these.
    let group: MultiThreadedEventLoopGroup

    init(voters: [NodeID] = [1, 2, 3], compactEveryEntries: LogIndex = 10_000, keepPayloadsEntries: LogIndex = 4_096,
         checkQuorum: Bool = true, proposalGatherMax: Duration = .milliseconds(3), inboxProposalsMax: Int = 16_384,
         electionTimeoutTicks: Int = 100) throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: voters.count)
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-driver-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        for id in voters {
            let store = try RaftStore(directory: directory.appendingPathComponent("node-\(id)").path, synchronous: .none)
            try store.initialize(with: .bootstrap(voters: voters))
            var configuration = Configuration(id: id, randomSeed: UInt64.random(in: 1...UInt64.max))
            configuration.electionTimeoutTicks = electionTimeoutTicks
            configuration.snapshotTimeoutTicks = max(configuration.snapshotTimeoutTicks, 2 * electionTimeoutTicks)
            configuration.checkQuorum = checkQuorum
            let nodeMetrics = NodeMetrics()
            let timeline = network.timeline
            let driver = try RaftDriver(configuration: configuration, store: store, sender: network.sender(), requestTimeoutTicks: 2_000,
                                         compactEveryEntries: compactEveryEntries, keepPayloadsEntries: keepPayloadsEntries,
                                         loop: group.next(), metrics: nodeMetrics, proposalGatherMax: proposalGatherMax,
                                         inboxProposalsMax: inboxProposalsMax,
                                         onApplied: { entries in
                                             // On the driver's thread, right after the apply.
                                             var written: LogIndex = entries.last!.index
                                             while (try? store.logEntries(from: written + 1, through: written + 1))?.isEmpty == false { written += 1 }
                                             timeline.record(.applied(node: id, through: entries.last!.index, lastWritten: written))
                                         })
            metrics[id] = nodeMetrics
            drivers[id] = driver
            stores[id] = store
            network.attach(id, driver)
            // Ticks of 5 ms on the driver's thread, as in a node; they stop at shutdown.
            tickers.append(driver.startTicking(every: .milliseconds(5)) { error in Issue.record("storage failed: \(error)") })
        }
    }

    /// Polls until `condition` holds or `seconds` pass.
    /// Generous: other tests may be keeping both cores busy meanwhile.
    func eventually(within seconds: Double = 30, _ condition: () async throws -> Bool) async rethrows -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return try await condition()
    }

    /// Returns once every message already handed to a driver has been
    /// stepped: a call on each driver's thread runs after the inbox drains
    /// queued before it.
    func drainInboxes() async {
        for driver in drivers.values { _ = await driver.status }
    }

    /// Waits for a leader; its id and driver.
    func electedLeader() async throws -> (id: NodeID, driver: RaftDriver) {
        #expect(await eventually { await leader() != nil })
        let id = try #require(await leader())
        return (id, drivers[id]!)
    }

    func leader(excluding excluded: Set<NodeID> = []) async -> NodeID? {
        for (id, driver) in drivers.sorted(by: { $0.key < $1.key }) where !excluded.contains(id) {
            if await driver.status.role == .leader { return id }
        }
        return nil
    }

    /// Runs `body` against a fresh cluster and always shuts it down.
    static func running(compactEveryEntries: LogIndex = 10_000, keepPayloadsEntries: LogIndex = 4_096, checkQuorum: Bool = true,
                        proposalGatherMax: Duration = .milliseconds(3), inboxProposalsMax: Int = 16_384, electionTimeoutTicks: Int = 100,
                        _ body: (LocalCluster) async throws -> Void) async throws {
        let cluster = try LocalCluster(compactEveryEntries: compactEveryEntries, keepPayloadsEntries: keepPayloadsEntries,
                                       checkQuorum: checkQuorum, proposalGatherMax: proposalGatherMax, inboxProposalsMax: inboxProposalsMax,
                                       electionTimeoutTicks: electionTimeoutTicks)
        do {
            try await body(cluster)
        } catch {
            await cluster.shutdown()
            throw error
        }
        await cluster.shutdown()
    }

    /// Elects a leader and cuts one follower off from it.
    func isolateAFollower() async throws -> (leader: NodeID, lagging: NodeID) {
        #expect(await eventually { await leader() != nil })
        let elected = try #require(await leader())
        let lagging = drivers.keys.sorted().first { $0 != elected }!
        network.isolate(lagging)
        return (elected, lagging)
    }

    /// Heals the network; whether `lagging` then holds the same audit chain as `leader`.
    func healAndCatchUp(_ lagging: NodeID, to leader: NodeID) async throws -> Bool {
        network.heal()
        return try await eventually { try stores[lagging]!.verifyAudit() == stores[leader]!.verifyAudit() }
    }

    /// Holds every driver's thread until the returned closure is called
    /// (at the latest after 20 s): once it returns, what was queued for
    /// them before has run and new work waits in their queues.
    func holdDriverThreads() async -> @Sendable () -> Void {
        let gate = DispatchSemaphore(value: 0)
        let held = Count()
        let loops = Array(group.makeIterator())
        for loop in loops {
            loop.execute {
                held.add()
                _ = gate.wait(timeout: .now() + 20)
            }
        }
        #expect(await eventually(within: 10) { held.value == loops.count }, "every driver's thread is held")
        return { for _ in loops { gate.signal() } }
    }

    func shutdown() async {
        network.close()
        // Nothing may run on a driver's thread once its group is gone.
        for ticker in tickers {
            let cancelled = group.next().makePromise(of: Void.self)
            ticker.cancel(promise: cancelled)
            try? await cancelled.futureResult.get()
        }
        for driver in drivers.values { await driver.stop() }
        // A checkpoint still being written (on a thread of its own) and log
        // files still being unlinked would leave files behind the removal.
        for driver in drivers.values {
            var waited = 0
            while await driver.isCompacting, waited < 1_000 {
                try? await Task.sleep(for: .milliseconds(10))
                waited += 1
            }
        }
        stores.values.first?.waitForLogFileRemovals()
        try? await group.shutdownGracefully()
        try? FileManager.default.removeItem(at: directory)
    }
}

/// A count shared with tasks.
final class Count: Sendable {
    private let count = Mutex(0)
    var value: Int { count.withLock { $0 } }
    func add() { count.withLock { $0 += 1 } }
}

/// Answers recorded by tasks, by key.
final class Answers: Sendable {
    private let answers = Mutex<[Int: String]>([:])
    var value: [Int: String] { answers.withLock { $0 } }
    func record(_ key: Int, _ answer: String) { answers.withLock { $0[key] = answer } }
}

private func write(_ name: String, _ text: String) -> LedgerCommand {
    LedgerCommand(timeMillis: 1, actor: "test", requestID: "\(name)=\(text)",
                  operation: .putDocument(name: name, format: .json, content: Array(text.utf8), expectedVersion: nil))
}

@Suite("Driver loop", .serialized)
struct DriverTests {
    @Test("Three drivers elect a leader, commit writes, forward writes from followers, serve reads, survive losing the leader, and converge")
    func threeNodes() async throws {
        // Elections after 500 ms, not 50: a busy CI machine held the
        // drivers' ticks long enough to elect again in the middle of the
        // writes (leadership changed before a write committed).
        try await LocalCluster.running { try await exercise($0) }
    }

    private func exercise(_ cluster: LocalCluster) async throws {
        #expect(await cluster.eventually { await cluster.leader() != nil })
        let leader = try #require(await cluster.leader())
        let leaderDriver = cluster.drivers[leader]!

        for i in 0..<20 {
            let outcome = try await leaderDriver.propose(write("docs/\(i % 3)", "{\"i\":\(i)}"))
            guard case .written = outcome.result else {
                Issue.record("write \(i): \(outcome.result)")
                return
            }
        }
        let follower = [NodeID(1), 2, 3].first { $0 != leader }!
        // A follower sends the write to the leader and answers once it applies it.
        let forwarded = try await cluster.drivers[follower]!.write(write("docs/x", "{}"))
        #expect(forwarded.outcome.result == .written(version: 1) && forwarded.leader == leader)
        await #expect(throws: DriverError.self) {
            _ = try await leaderDriver.propose(LedgerCommand(timeMillis: 1, actor: "t", requestID: "bad",
                                                             operation: .deleteDocument(name: "Bad Name", expectedVersion: nil)))
        }
        let readIndex = try await cluster.drivers[follower]!.linearizableReadIndex()
        #expect(readIndex >= 23, "a read on a follower sees every acknowledged write")

        // Cut the leader off: the others elect a new one and keep writing.
        cluster.network.isolate(leader)
        #expect(await cluster.eventually { await cluster.leader(excluding: [leader]) != nil })
        let newLeader = try #require(await cluster.leader(excluding: [leader]))
        let outcome = try await cluster.drivers[newLeader]!.propose(write("docs/after", "{}"))
        #expect(outcome.result == .written(version: 1))

        cluster.network.heal()
        let converged = try await cluster.eventually {
            let applied = try cluster.stores.values.map { try $0.ledgerAppliedIndex() }
            let heads = try cluster.stores.values.map { try $0.verifyAudit() }
            return Set(applied).count == 1 && Set(heads).count == 1
        }
        #expect(converged, "every node applied the same entries and holds the same audit chain")
        for store in cluster.stores.values {
            #expect(try store.document(named: "docs/after")?.version == 1)
            guard case .intact(let count, _) = try store.verifyAudit() else {
                Issue.record("broken audit chain")
                continue
            }
            #expect(count == 23, "bootstrap membership, twenty writes, the forwarded one and the write after failover (invalid commands never reach the log)")
        }
    }

    @Test("A removed node's messages count for nothing (its certificate still chains to the cluster CA): commands it forwards are not proposed, nor a non-member's, nor ones addressed to another node; a member's are")
    func removedNodesAreIgnored() async throws {
        try await LocalCluster.running { cluster in
            let (leader, driver) = try await cluster.electedLeader()
            let removed = try #require([NodeID(1), 2, 3].first { $0 != leader })
            let member = try #require([NodeID(1), 2, 3].first { $0 != leader && $0 != removed })
            _ = try await driver.proposeConfigChange(.removeNode(removed))
            #expect(await cluster.eventually { await driver.status.membership.removed.contains(removed) })
            let term = await driver.status.term
            func forwarded(from: NodeID, to: NodeID, _ name: String) -> Message {
                Message(from: from, to: to, term: term, body: .forwardedProposal([.command(write(name, "{}").encoded)]))
            }
            driver.enqueue(forwarded(from: removed, to: leader, "docs/from-removed"))
            driver.enqueue(forwarded(from: 9, to: leader, "docs/from-stranger"))
            driver.enqueue(forwarded(from: member, to: 7, "docs/misaddressed"))
            driver.enqueue(forwarded(from: member, to: leader, "docs/from-member"))
            #expect(await cluster.eventually { (try? cluster.stores[leader]!.document(named: "docs/from-member")) != nil }, "a member's is proposed")
            try await Task.sleep(for: .milliseconds(200))
            for name in ["docs/from-removed", "docs/from-stranger", "docs/misaddressed"] {
                #expect(try cluster.stores[leader]!.document(named: name) == nil, "\(name) was written")
            }
            #expect(cluster.metrics[leader]!.messagesFromRemoved.current >= 3, "the three (and whatever else the removed node sent)")
            #expect(driver.removedNodes == [removed])
        }
    }

    @Test("A command forwarded at a later term than the leader's makes it step down (the core's rule for any newer term) and is not appended; one from an earlier term is")
    func forwardedAtLaterTermDeposes() async throws {
        try await LocalCluster.running { cluster in
            let (leader, driver) = try await cluster.electedLeader()
            let member = try #require([NodeID(1), 2, 3].first { $0 != leader })
            let term = await driver.status.term
            driver.enqueue(Message(from: member, to: leader, term: term + 1, body: .forwardedProposal([.command(write("docs/later-term", "{}").encoded)])))
            #expect(await cluster.eventually { await driver.status.term > term }, "the leader took the newer term")
            // Whoever leads now takes a command forwarded at the old term.
            let (newLeader, newDriver) = try await cluster.electedLeader()
            let sender = try #require([NodeID(1), 2, 3].first { $0 != newLeader })
            newDriver.enqueue(Message(from: sender, to: newLeader, term: term, body: .forwardedProposal([.command(write("docs/earlier-term", "{}").encoded)])))
            #expect(await cluster.eventually { (try? cluster.stores[newLeader]!.document(named: "docs/earlier-term")) != nil })
            for store in cluster.stores.values {
                #expect(try store.document(named: "docs/later-term") == nil, "appended by a leader a newer term had deposed")
            }
        }
    }

    @Test("Forwarded commands get the leader's time, unless the leader's clock disagrees with the cluster's: then they keep the forwarding node's")
    func forwardedTimeFollowsTheClockCheck() async throws {
        try await LocalCluster.running { cluster in
            #expect(await cluster.eventually { await cluster.leader() != nil })
            let leader = try #require(await cluster.leader())
            let follower = try #require([NodeID(1), 2, 3].first { $0 != leader })
            func recordedTime(_ name: String) throws -> UInt64? {
                try cluster.stores[leader]!.auditRecords(limit: 1_000).last { $0.target == name }?.timeMillis
            }
            let before = UInt64(Date().timeIntervalSince1970 * 1000)
            // The follower answers once it applied the write; the leader may
            // apply it a moment later (it sends the commit before applying).
            func appliedOnLeader(_ name: String) async throws -> UInt64? {
                _ = try await cluster.eventually { try recordedTime(name) != nil }
                return try recordedTime(name)
            }
            _ = try await cluster.drivers[follower]!.write(write("docs/on-time", "{}")) // stamped 1 by the follower
            #expect(try await appliedOnLeader("docs/on-time").map { $0 >= before } == true, "restamped with the leader's time")
            cluster.drivers[leader]!.setClockCheck { false }
            _ = try await cluster.drivers[follower]!.write(write("docs/leader-off", "{}"))
            let kept = try await appliedOnLeader("docs/leader-off")
            #expect(kept == 1, "kept the forwarding node's time, not \(kept.map(String.init) ?? "none")")
        }
    }

    @Test("The clock check answers the same after a million reads (read from a Mutex directly, each read had wrapped it once more, until calling it overflowed the stack)")
    func clockCheckSurvivesManyReads() async throws {
        try await LocalCluster.running { cluster in
            let driver = cluster.drivers[1]!
            let answer = Count()
            driver.setClockCheck { answer.value == 0 }
            for _ in 0..<1_000_000 { _ = driver.clockAgreesNow() }
            #expect(driver.clockAgreesNow())
            answer.add()
            #expect(!driver.clockAgreesNow())
        }
    }

    @Test("A write arriving while no leader is known waits for the election (bounded) instead of being refused at once")
    func writeWaitsOutElection() async throws {
        try await LocalCluster.running { cluster in
            #expect(await cluster.eventually { await cluster.leader() != nil })
            let leader = try #require(await cluster.leader())
            let follower = try #require(cluster.drivers[[NodeID(1), 2, 3].first { $0 != leader }!])
            // Nobody hears anybody: the follower forgets the leader and campaigns in vain.
            // (Messages sent before the cut still arrive, and one from the
            // leader would make the follower know it again: wait them out.)
            for id in cluster.drivers.keys { cluster.network.isolate(id) }
            await cluster.drainInboxes()
            #expect(await cluster.eventually { follower.leadership.leaderID == noNode })
            // With no leader to come, the wait ends in a refusal naming none.
            let started = ContinuousClock.now
            await #expect(throws: DriverError.notLeader(leaderHint: noNode)) { _ = try await follower.write(write("docs/refused", "{}")) }
            #expect(started.duration(to: .now) >= .milliseconds(5 * follower.leaderWaitTicks / 2), "it waited (ticks of 5 ms) before refusing")
            // A write made mid-election is served once the network heals and
            // a leader is elected. Made right after the heal (no election
            // ends within microseconds), so the whole bounded wait is left
            // for the election: under full-suite load a write made 20 ms
            // before the heal once saw it take longer than the rest.
            #expect(follower.leadership.leaderID == noNode)
            cluster.network.heal()
            let waiting = Task.immediate { try await follower.write(write("docs/waited", "{}")) }
            let outcome = try await waiting.value
            #expect(outcome.outcome.result == .written(version: 1))
            #expect(await follower.awaitLeadership().leaderID == outcome.leader)
        }
    }

    @Test("A follower cut off while the log was compacted is caught up by a ledger snapshot")
    func snapshotCatchUp() async throws {
        try await LocalCluster.running(compactEveryEntries: 10) { try await catchUp($0) }
    }

    @Test("A snapshot streamed in small pieces, some lost on the way, catches a follower up: what was lost is sent again, nothing is given up")
    func snapshotStreamWithLostPieces() async throws {
        try await LocalCluster.running(compactEveryEntries: 10) { cluster in
            // A lost piece goes again after a stall of 1 s (given up after five
            // in a row with no progress: 300 ms each was too short for a busy CI machine).
            for driver in cluster.drivers.values { await driver.setSnapshotStreaming(chunkBytes: 256, stallLimit: .seconds(1)) }
            let (leader, lagging) = try await cluster.isolateAFollower()
            // Every fifth piece is lost the first time it is sent.
            let lost = Mutex<Set<UInt64>>([])
            await cluster.drivers[lagging]!.setDropIncoming { message in
                guard case .snapshotChunk(let chunk) = message.body, (chunk.offset / 256) % 5 == 3 else { return false }
                return lost.withLock { $0.insert(chunk.offset).inserted }
            }
            for i in 0..<80 {
                _ = try await cluster.drivers[leader]!.propose(write("docs/\(i % 5)", "{\"i\":\(i)}"))
            }
            #expect(await cluster.eventually { await cluster.drivers[leader]!.status.snapshotIndex >= 30 }, "the leader compacted its log")
            #expect(try await cluster.healAndCatchUp(lagging, to: leader))
            #expect(await cluster.drivers[lagging]!.status.snapshotIndex >= 30, "it was brought up by a snapshot")
            for i in 0..<5 {
                #expect(try cluster.stores[lagging]!.document(named: "docs/\(i)") == cluster.stores[leader]!.document(named: "docs/\(i)"))
            }
            let (sent, staged) = (cluster.metrics[leader]!.snapshotBytesSent.current, cluster.metrics[lagging]!.snapshotBytesStaged.current)
            let lostCount = lost.withLock { $0.count }
            #expect(lostCount >= 3, "pieces were lost: \(lostCount)")
            #expect(staged >= 256 * 20, "a stream of many pieces: \(staged) bytes staged")
            #expect(sent > staged, "lost pieces were sent again: \(sent) bytes sent, \(staged) staged")
            #expect(cluster.metrics[leader]!.snapshotTransfersAbandoned.current == 0, "the stream went on from where it stopped, not from the start")
            #expect(await cluster.eventually { cluster.metrics[lagging]!.snapshotsInstalled.current >= 1 })
        }
    }

    @Test("Writes left waiting on a leader cut off, then overtaken by a later term, are answered lost leadership when it leads again and writes at their indices, not left waiting for ever")
    func displacedWritesAreAnswered() async throws {
        // Without CheckQuorum the cut-off leader keeps leading, so its writes
        // are appended however late their tasks run (under CI's load it had
        // stepped down first and refused them).
        try await LocalCluster.running(checkQuorum: false) { cluster in
            #expect(await cluster.eventually { await cluster.leader() != nil })
            let first = try #require(await cluster.leader())
            let old = cluster.drivers[first]!
            _ = try await old.propose(write("docs/base", "{}"))
            let before = await old.status.lastIndex
            cluster.network.isolate(first)
            // Appended on the cut-off leader alone: they wait.
            let answers = Answers()
            for i in 0..<3 {
                Task {
                    let answer: String
                    do { _ = try await old.propose(write("docs/stranded-\(i)", "{}")); answer = "written" } catch { answer = "\(error)" }
                    answers.record(i, answer)
                }
            }
            #expect(await cluster.eventually { await old.status.lastIndex == before + 3 })
            #expect(await cluster.eventually { await cluster.leader(excluding: [first]) != nil }, "the others elect a leader of a later term")
            let second = try #require(await cluster.leader(excluding: [first]))
            cluster.network.heal()
            // The old leader follows it, its uncommitted tail replaced, and leads again at once.
            let newLeader = cluster.drivers[second]!
            #expect(await cluster.eventually {
                let status = await old.status
                let target = await newLeader.status.lastIndex
                return status.leaderID == second && status.commitIndex >= target
            })
            try await cluster.drivers[second]!.transferLeadership(to: first)
            #expect(await cluster.eventually { await old.status.role == .leader })
            // New writes land on the indices the stranded ones waited at.
            for i in 0..<5 { _ = try await old.propose(write("docs/new-\(i)", "{}")) }
            // Each stranded write is answered lost leadership, not timed out.
            // (Generous: a request timeout would answer something else, checked below.)
            #expect(await cluster.eventually(within: 60) { answers.value.count == 3 }, "answered: \(answers.value)")
            #expect(answers.value == [0: "\(DriverError.lostLeadership)", 1: "\(DriverError.lostLeadership)", 2: "\(DriverError.lostLeadership)"])
        }
    }

    @Test("A follower that takes no snapshot streams (a build before them) is sent its snapshot as one message in the older encoding, and catches up")
    func followerWithoutStreams() async throws {
        try await LocalCluster.running(compactEveryEntries: 10) { cluster in
            for driver in cluster.drivers.values { await driver.setSnapshotStreaming(chunkBytes: 256, stallLimit: .milliseconds(100)) }
            let (leader, lagging) = try await cluster.isolateAFollower()
            // What an older build does with a piece: it cannot read it.
            await cluster.drivers[lagging]!.setDropIncoming { message in
                if case .snapshotChunk = message.body { return true }
                return false
            }
            for i in 0..<40 { _ = try await cluster.drivers[leader]!.propose(write("docs/\(i % 5)", "{\"i\":\(i)}")) }
            // Both nodes that have the entries compacted them: whichever
            // leads when the follower is back (a loaded CI machine saw the
            // other follower, its checkpoints behind, take over and send
            // plain entries) has only a snapshot for it.
            for other in cluster.drivers.keys where other != lagging {
                #expect(await cluster.eventually { await cluster.drivers[other]!.status.snapshotIndex >= 10 }, "node \(other) compacted its log")
            }
            #expect(try await cluster.healAndCatchUp(lagging, to: leader))
            let senders = cluster.metrics.filter { $0.key != lagging }.values
            #expect(senders.map(\.snapshotTransfersAbandoned.current).reduce(0, +) >= 1, "the stream was given up")
            // (Counters are counted after what they count is done: the sender's after the send, the install's after the ledger is in place.)
            #expect(await cluster.eventually { senders.map(\.snapshotsSentWhole.current).reduce(0, +) >= 1 })
            #expect(await cluster.eventually { cluster.metrics[lagging]!.snapshotsInstalled.current >= 1 })
            #expect(cluster.metrics[lagging]!.snapshotBytesStaged.current == 0)
        }
    }

    @Test("The leader does not compact while a follower is being sent its snapshot (a newer one would start the follower over), and compacts again once it is caught up")
    func compactionWaitsForSnapshotTransfer() async throws {
        try await LocalCluster.running(compactEveryEntries: 10) { cluster in
            // Given up only after five stalls of 6 s: a loaded machine took
            // more than 2.5 s over the proposals below with stalls of 0.5 s,
            // and a CI run more than 10 s with stalls of 2 s.
            for driver in cluster.drivers.values { await driver.setSnapshotStreaming(chunkBytes: 256, stallLimit: .seconds(6)) }
            let (leader, lagging) = try await cluster.isolateAFollower()
            let stalled = Mutex(true)
            await cluster.drivers[lagging]!.setDropIncoming { message in
                guard case .snapshotChunk = message.body else { return false }
                return stalled.withLock { $0 }
            }
            for i in 0..<40 { _ = try await cluster.drivers[leader]!.propose(write("docs/\(i % 5)", "{\"i\":\(i)}")) }
            #expect(await cluster.eventually { await cluster.drivers[leader]!.status.snapshotIndex >= 10 }, "the leader compacted its log")
            cluster.network.heal()
            #expect(await cluster.eventually { cluster.metrics[leader]!.snapshotBytesSent.current > 0 }, "the transfer began")
            // A compaction begun before the transfer was asked for may end
            // during it (none begins during it): the index held is the one after.
            #expect(await cluster.eventually { await !cluster.drivers[leader]!.isCompacting })
            let held = await cluster.drivers[leader]!.status.snapshotIndex
            // Far more than the compaction interval, while no piece arrives.
            for i in 0..<120 { _ = try await cluster.drivers[leader]!.propose(write("docs/more-\(i % 5)", "{\"i\":\(i)}")) }
            try await Task.sleep(for: .milliseconds(300))
            #expect(await cluster.drivers[leader]!.status.snapshotIndex == held, "no compaction while the follower is being sent the snapshot")
            stalled.withLock { $0 = false }
            #expect(try await cluster.eventually { try cluster.stores[lagging]!.verifyAudit() == cluster.stores[leader]!.verifyAudit() })
            #expect(await cluster.eventually { cluster.metrics[lagging]!.snapshotsInstalled.current >= 1 })
            #expect(cluster.metrics[lagging]!.snapshotsInstalled.current == 1, "caught up from that snapshot and the entries after it")
            #expect(cluster.metrics[leader]!.snapshotTransfersAbandoned.current == 0)
            _ = try await cluster.drivers[leader]!.propose(write("docs/last", "{}"))
            #expect(await cluster.eventually { await cluster.drivers[leader]!.status.snapshotIndex > held }, "compaction goes on afterwards")
        }
    }

    @Test("Proposals arriving while the leader's previous batch awaits its commit wait for it, and go together in the next batch")
    func proposalsGatherBehindAnUncommittedBatch() async throws {
        // Held answers keep the first batch uncommitted; the leader keeps
        // leading (no check-quorum) and would hold the rest for 30 s.
        try await LocalCluster.running(checkQuorum: false, proposalGatherMax: .seconds(30), electionTimeoutTicks: 100_000) { cluster in
            let (leader, metrics, before, first) = try await Self.firstBatchHeld(cluster)
            let batches = metrics.proposalBatches.current
            let rest = (0..<5).map { k in Task { try await leader.propose(write("next-\(k)", "1")) } }
            #expect(await cluster.eventually { await leader.pendingRequestCount == 6 }, "the five reached the leader")
            #expect(await leader.statusSnapshot.lastIndex == before + 1, "proposed while the first batch awaited its commit")
            cluster.network.releaseHeld()
            #expect(try await first.value.logIndex == before + 1)
            var indexes: Set<LogIndex> = []
            for task in rest { indexes.insert(try await task.value.logIndex) }
            #expect(indexes == Set((before + 2)...(before + 6)))
            #expect(metrics.proposalBatches.current == batches + 1, "the five waiting proposals went in one batch")
        }
    }

    @Test("Proposals held behind a batch that does not commit are proposed once they have waited the bound")
    func heldProposalsAreBounded() async throws {
        try await LocalCluster.running(checkQuorum: false, proposalGatherMax: .milliseconds(100), electionTimeoutTicks: 100_000) { cluster in
            let (leader, _, before, first) = try await Self.firstBatchHeld(cluster)
            let started = ContinuousClock.now
            let second = Task { try await leader.propose(write("second", "1")) }
            // Appended although the first batch never commits meanwhile,
            // and not before the bound.
            #expect(await cluster.eventually(within: 10) { await leader.statusSnapshot.lastIndex == before + 2 })
            let waited = started.duration(to: .now)
            #expect(waited >= .milliseconds(100), "proposed after \(waited)")
            #expect(await leader.statusSnapshot.commitIndex <= before)
            cluster.network.releaseHeld()
            #expect(try await first.value.logIndex == before + 1)
            #expect(try await second.value.logIndex == before + 2)
        }
    }

    @Test("Proposals arriving while the leader holds them behind an uncommitted batch schedule no drain of their own; the commit brings them in")
    func heldProposalsWakeNoDriver() async throws {
        try await LocalCluster.running(checkQuorum: false, proposalGatherMax: .seconds(30), electionTimeoutTicks: 100_000) { cluster in
            let (leader, metrics, before, first) = try await Self.firstBatchHeld(cluster)
            // The loop that proposed the first batch has left, holding.
            await cluster.drainInboxes()
            let drains = leader.drainsScheduled
            let batches = metrics.proposalBatches.current
            let rest = (0..<5).map { k in Task { try await leader.propose(write("held-\(k)", "1")) } }
            #expect(await cluster.eventually { await leader.pendingRequestCount == 6 })
            try await Task.sleep(for: .milliseconds(200))
            #expect(leader.drainsScheduled == drains, "\(leader.drainsScheduled - drains) drains scheduled for held proposals")
            #expect(await leader.statusSnapshot.lastIndex == before + 1)
            // The answers that commit the first batch schedule the drain that proposes the rest.
            cluster.network.releaseHeld()
            #expect(try await first.value.logIndex == before + 1)
            var indexes: Set<LogIndex> = []
            for task in rest { indexes.insert(try await task.value.logIndex) }
            #expect(indexes == Set((before + 2)...(before + 6)))
            #expect(metrics.proposalBatches.current == batches + 1, "the five held proposals went in one batch")
        }
    }

    @Test("A proposal held behind a batch that does not commit is proposed at its bound by the driver's own timer, with no tick and no message to wake it")
    func heldProposalWakesItsDriverAtTheBound() async throws {
        // Elections only when asked (a stall under load must not elect
        // another leader while nothing ticks: the writes would wait forever).
        try await LocalCluster.running(checkQuorum: false, proposalGatherMax: .milliseconds(200), electionTimeoutTicks: 100_000) { cluster in
            let (leader, _, before, first) = try await Self.firstBatchHeld(cluster)
            // No node ticks from here.
            for ticker in cluster.tickers {
                let cancelled = cluster.group.next().makePromise(of: Void.self)
                ticker.cancel(promise: cancelled)
                try await cancelled.futureResult.get()
            }
            await cluster.drainInboxes()
            let started = ContinuousClock.now
            let second = Task { try await leader.propose(write("second", "1")) }
            #expect(await cluster.eventually(within: 10) { await leader.statusSnapshot.lastIndex == before + 2 })
            let waited = started.duration(to: .now)
            // (Without the timer nothing would wake it: the wait above would fail.)
            #expect(waited >= .milliseconds(200), "proposed after \(waited)")
            cluster.network.releaseHeld()
            #expect(try await first.value.logIndex == before + 1)
            #expect(try await second.value.logIndex == before + 2)
        }
    }

    @Test("Writes a follower forwards wait at the leader's gate behind an uncommitted batch and go in one batch with the leader's own")
    func forwardedWritesJoinTheLeadersBatches() async throws {
        try await LocalCluster.running(checkQuorum: false, proposalGatherMax: .seconds(30), electionTimeoutTicks: 100_000) { cluster in
            let (leader, metrics, before, first) = try await Self.firstBatchHeld(cluster)
            let leaderID = await leader.status.id
            let follower = try #require(cluster.drivers.first { $0.key != leaderID }?.value)
            let batches = metrics.proposalBatches.current
            let forwarded = (0..<4).map { k in Task { try await follower.write(write("forwarded-\(k)", "1")) } }
            let local = Task { try await leader.propose(write("local", "1")) }
            #expect(await cluster.eventually { await leader.pendingRequestCount == 2 }, "the first write and the local one wait")
            // The forwarded commands reach the leader; the answers that would
            // commit its first batch stay held.
            #expect(await cluster.eventually {
                let commands = cluster.network.held.map { message -> Int in
                    if case .forwardedProposal(let payloads) = message.body { return payloads.count } else { return 0 }
                }
                return commands.reduce(0, +) == 4
            })
            cluster.network.releaseHeld { if case .forwardedProposal = $0.body { return true } else { return false } }
            try await Task.sleep(for: .milliseconds(300))
            #expect(await leader.statusSnapshot.lastIndex == before + 1, "nothing appended while the first batch awaits its commit")
            cluster.network.releaseHeld()
            #expect(try await first.value.logIndex == before + 1)
            var indexes: Set<LogIndex> = [try await local.value.logIndex]
            for task in forwarded {
                let outcome = try await task.value
                #expect(outcome.outcome.result == .written(version: 1))
                indexes.insert(outcome.outcome.logIndex)
            }
            #expect(indexes == Set((before + 2)...(before + 6)))
            #expect(metrics.proposalBatches.current == batches + 1, "the local and the four forwarded writes went in one batch")
        }
    }

    @Test("A follower answers the append that tells it of a commit before it applies what committed")
    func followersAnswerBeforeApplying() async throws {
        try await LocalCluster.running { cluster in
            let (leaderID, leader) = try await cluster.electedLeader()
            var committed: [LogIndex] = []
            for k in 0..<5 { committed.append(try await leader.propose(write("docs/\(k)", "1")).logIndex) }
            for follower in cluster.drivers.keys where follower != leaderID {
                for index in committed {
                    #expect(await cluster.eventually { cluster.network.timeline.firstApplied(index, on: follower) != nil })
                    let applied = try #require(cluster.network.timeline.firstApplied(index, on: follower)).position
                    // Its answer saying it knows the commit (an append's or a heartbeat's).
                    let answered = try #require(cluster.network.timeline.firstSent(by: follower) { message in
                        switch message.body {
                        case .appendEntriesResponse(let response): return response.commitIndex >= index
                        case .heartbeatResponse(let response): return response.commitIndex >= index
                        default: return false
                        }
                    })
                    #expect(answered < applied, "node \(follower) applied \(index) before answering")
                }
            }
        }
    }

    @Test("When a batch commits, the leader sends the proposals held behind it, then answers the batch before its own write of them")
    func leaderAnswersBeforeWritingTheNextBatch() async throws {
        try await LocalCluster.running(checkQuorum: false, proposalGatherMax: .seconds(30), electionTimeoutTicks: 100_000) { cluster in
            let (leader, _, before, first) = try await Self.firstBatchHeld(cluster)
            let leaderID = await leader.status.id
            let second = Task { try await leader.propose(write("second", "1")) }
            #expect(await cluster.eventually { await leader.pendingRequestCount == 2 }, "the second reached the leader")
            #expect(await leader.statusSnapshot.lastIndex == before + 1, "held behind the first batch")
            cluster.network.releaseHeld()
            #expect(try await first.value.logIndex == before + 1)
            #expect(try await second.value.logIndex == before + 2)
            let timeline = cluster.network.timeline
            let applied = try #require(timeline.firstApplied(before + 1, on: leaderID))
            let sentSecond = try #require(timeline.firstSent(by: leaderID) { message in
                if case .appendEntries(let append) = message.body { return append.entries.contains { $0.index == before + 2 } }
                return false
            })
            #expect(sentSecond < applied.position, "the second batch went out when the first committed, before the first was applied")
            #expect(applied.lastWritten == before + 1, "the first batch was answered before the leader wrote the second")
        }
    }

    /// Elects node 1 (the cluster must elect only when asked: with
    /// messages to the leader held, a stall that let a follower elect
    /// another would go unseen), commits a write, then holds every message
    /// to the leader (the followers' answers) and proposes a first write:
    /// appended at `before + 1`, it cannot commit until `releaseHeld`.
    private static func firstBatchHeld(_ cluster: LocalCluster) async throws
        -> (leader: RaftDriver, metrics: NodeMetrics, before: LogIndex, first: Task<LedgerOutcome, any Error>) {
        try await cluster.drivers[1]!.campaign()
        #expect(await cluster.eventually { await cluster.leader() != nil })
        let id = try #require(await cluster.leader())
        let leader = cluster.drivers[id]!
        _ = try await leader.propose(write("settle", "1"))
        let before = await leader.statusSnapshot.lastIndex
        cluster.network.hold(to: id)
        let first = Task { try await leader.propose(write("first", "1")) }
        #expect(await cluster.eventually { await leader.statusSnapshot.lastIndex == before + 1 })
        return (leader, cluster.metrics[id]!, before, first)
    }

    @Test("A leader's own writes queue from their callers' threads while its thread is busy, go in one batch, and past the inbox's bound are refused at once")
    func proposalsQueueWithoutTheDriversThread() async throws {
        try await LocalCluster.running(inboxProposalsMax: 8) { cluster in
            let (id, leader) = try await cluster.electedLeader()
            _ = try await leader.write(write("settle", "1"))
            let batches = cluster.metrics[id]!.proposalBatches.current
            let release = await cluster.holdDriverThreads()
            let refused = Count()
            let writes = (0..<9).map { k in
                Task {
                    do {
                        return try await leader.write(write("queued-\(k)", "1")).outcome
                    } catch DriverError.overloaded(let waiting) {
                        refused.add()
                        #expect(waiting == 8)
                        throw DriverError.overloaded(waiting: waiting)
                    }
                }
            }
            // The ninth is refused while the driver's thread is still held.
            let refusedInTime = await cluster.eventually(within: 10) { refused.value == 1 }
            release()
            #expect(refusedInTime, "a proposal past the inbox's bound was refused without the driver's thread")
            var indexes: Set<LogIndex> = []
            for task in writes {
                if let outcome = try? await task.value {
                    #expect(outcome.result == .written(version: 1))
                    indexes.insert(outcome.logIndex)
                }
            }
            #expect(indexes.count == 8 && refused.value == 1)
            #expect(cluster.metrics[id]!.proposalBatches.current == batches + 1, "the eight queued writes went in one batch")
        }
    }

    @Test("Writes queued while the driver is in its loop schedule no drain of their own and are taken before the loop ends; past its rounds of input, the loop leaves them one drain",
          arguments: [8, 1])
    func writesDuringTheLoopNeedNoDrain(inputRoundsMax: Int) async throws {
        try await LocalCluster.running { cluster in
            let (_, leader) = try await cluster.electedLeader()
            _ = try await leader.write(write("settle", "1"))
            // The next loop (a tick starts one soon) waits, just before it
            // looks whether it may leave, until four writes from other
            // threads are in its inbox, counting the drains scheduled meanwhile.
            let window = Mutex<(entered: Bool, before: Int, scheduled: Int?, leftAtEnd: Int?, scheduledAtEnd: Int?)>((false, 0, nil, nil, nil))
            await withCheckedContinuation { (installed: CheckedContinuation<Void, Never>) in
                leader.onDriversThread { driver in
                    driver.loopInputRoundsMax = inputRoundsMax
                    driver.loopHook = (beforeLeaving: {
                        let before = driver.drainsScheduled
                        window.withLock { $0.entered = true; $0.before = before }
                        let deadline = ContinuousClock.now + .seconds(10)
                        while driver.inboxProposalCount < 4 && ContinuousClock.now < deadline { usleep(200) }
                        window.withLock { $0.scheduled = driver.drainsScheduled - before }
                    }, atEnd: {
                        window.withLock { $0.leftAtEnd = driver.inboxProposalCount; $0.scheduledAtEnd = driver.drainsScheduled - $0.before }
                    })
                    installed.resume()
                }
            }
            #expect(await cluster.eventually(within: 10) { window.withLock { $0.entered } })
            let writes = (0..<4).map { k in Task { try await leader.write(write("during-\(k)", "1")).outcome } }
            for task in writes { #expect(try await task.value.result == .written(version: 1)) }
            #expect(window.withLock { $0.scheduled } == 0, "no drain was scheduled while the loop ran")
            #expect(await cluster.eventually(within: 10) { window.withLock { $0.leftAtEnd } != nil })
            if inputRoundsMax > 1 {
                #expect(window.withLock { $0.leftAtEnd } == 0, "the loop took the writes before it ended")
            } else {
                // One round of input taken: the loop left the writes and one drain for them.
                #expect(window.withLock { $0.leftAtEnd } == 4)
                #expect((window.withLock { $0.scheduledAtEnd } ?? 0) >= 1, "a drain for the writes left in the inbox")
            }
        }
    }

    @Test("A write proposed and waiting for its commit when the node stops is answered as of unknown outcome (it may still commit), not as refused")
    func stopWhileWaitingIsOutcomeUnknown() async throws {
        try await LocalCluster.running { cluster in
            let (id, leader) = try await cluster.electedLeader()
            let before = await leader.status.lastIndex
            cluster.network.isolate(id)
            let waiting = Task { try await leader.propose(write("in-flight", "1")) }
            #expect(await cluster.eventually { await leader.status.lastIndex == before + 1 }, "proposed, not committed")
            await leader.stop()
            await #expect(throws: DriverError.stoppedBeforeOutcome) { _ = try await waiting.value }
            #expect(!DriverError.stoppedBeforeOutcome.surelyNotApplied && DriverError.stopped.surelyNotApplied)
        }
    }

    @Test("Writes waiting in a stopping leader's inbox, and every write after it stops, are refused: none waits forever")
    func stoppedDriverRefusesQueuedProposals() async throws {
        try await LocalCluster.running { cluster in
            let (id, leader) = try await cluster.electedLeader()
            _ = try await leader.write(write("settle", "1"))
            // Nothing else may drain the leader's inbox first: no messages
            // (cut off, those on their way stepped), no ticks.
            cluster.network.isolate(id)
            let cancelled = cluster.group.next().makePromise(of: Void.self)
            cluster.tickers[Int(id) - 1].cancel(promise: cancelled)
            try await cancelled.futureResult.get()
            await cluster.drainInboxes()
            let release = await cluster.holdDriverThreads()
            // The stop reaches the driver's thread before the inbox's drain.
            leader.onDriversThread { $0.stop() }
            let finished = Count()
            let writes = (0..<5).map { k in
                Task.immediate {
                    defer { finished.add() }
                    _ = try await leader.write(write("late-\(k)", "1"))
                }
            }
            try await Task.sleep(for: .milliseconds(100))
            release()
            // (A write left waiting would hang the test: its value is read only once all have finished.)
            try #require(await cluster.eventually(within: 10) { finished.value == 5 }, "every queued write was answered")
            for task in writes { await #expect(throws: DriverError.stopped) { try await task.value } }
            #expect(leader.leadership.isLeader, "the view still says leader: the next write takes the inbox's way")
            let after = Task {
                defer { finished.add() }
                _ = try await leader.write(write("after", "1"))
            }
            try #require(await cluster.eventually(within: 10) { finished.value == 6 }, "a write after the stop was answered")
            await #expect(throws: DriverError.stopped) { try await after.value }
        }
    }

    @Test("A follower cut off for longer than the payloads kept in memory catches up entry by entry, from the leader's write-ahead log")
    func releasedPayloadsCatchUp() async throws {
        try await LocalCluster.running(keepPayloadsEntries: 8) { cluster in
            let (leader, lagging) = try await cluster.isolateAFollower()
            // Payloads are released 256 at a time, 8 behind the applied index.
            for i in 0..<300 {
                _ = try await cluster.drivers[leader]!.propose(write("docs/\(i)", "{\"i\":\(i)}"))
            }
            #expect(cluster.metrics[leader]!.releasedEntriesRead.current == 0)
            #expect(try await cluster.healAndCatchUp(lagging, to: leader))
            #expect(await cluster.drivers[lagging]!.status.snapshotIndex == 0, "entry by entry: no snapshot was taken")
            #expect(cluster.metrics[leader]!.releasedEntriesRead.current >= 250, "what it lacked was read back from the leader's log")
            #expect(cluster.metrics[leader]!.releasedEntryReadFailures.current == 0)
            for i in [0, 1, 150, 299] {
                let document = try cluster.stores[lagging]!.document(named: "docs/\(i)")
                let original = try cluster.stores[leader]!.document(named: "docs/\(i)")
                #expect(document != nil && document == original)
            }
        }
    }

    private func catchUp(_ cluster: LocalCluster) async throws {
        let (leader, lagging) = try await cluster.isolateAFollower()
        // The compaction interval grows with the ledger (10 entries, then
        // as many as the last snapshot's rows), so 80 writes compact twice or more.
        for i in 0..<80 {
            _ = try await cluster.drivers[leader]!.propose(write("docs/\(i % 5)", "{\"i\":\(i)}"))
        }
        #expect(await cluster.eventually { await cluster.drivers[leader]!.status.snapshotIndex >= 30 }, "the leader compacted its log")
        let counted = cluster.metrics[leader]!
        let (begun, taken) = (counted.checkpointsBegun.current, counted.snapshotsTaken.current)
        #expect(taken >= 1 && begun >= taken && begun <= taken + 1, "each snapshot taken was a checkpoint begun (one may still be being written): \(begun) begun, \(taken) taken")
        #expect(try await cluster.healAndCatchUp(lagging, to: leader))
        #expect(await cluster.drivers[lagging]!.status.snapshotIndex >= 30, "it was brought up by a snapshot, not entry by entry")
        for i in 0..<5 {
            #expect(try cluster.stores[lagging]!.document(named: "docs/\(i)") == cluster.stores[leader]!.document(named: "docs/\(i)"))
        }
        // And it keeps up afterwards.
        _ = try await cluster.drivers[leader]!.propose(write("docs/after", "{}"))
        #expect(try await cluster.eventually { try cluster.stores[lagging]!.document(named: "docs/after") != nil })
    }
}
