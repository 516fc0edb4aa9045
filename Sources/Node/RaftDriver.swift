import Foundation
import Ledger
import NIOCore
import NIOPosix
import Raft
import Storage
import Synchronization

/// Hands messages to the transport. Synchronous on purpose: the driver
/// calls it between `ready()` and `advance()`, where no other call may
/// reach the core, so it must not suspend (a transport queues and returns).
public protocol MessageSender: Sendable {
    func send(_ messages: [Message])
}

/// Why a write or read through the driver did not succeed.
public enum DriverError: Error, Sendable, Hashable, CustomStringConvertible {
    case notLeader(leaderHint: NodeID)
    case invalidCommand(String)
    /// The entry was replaced by a new leader's log: it will never apply.
    case lostLeadership
    case timedOut(ticks: Int)
    /// A snapshot replaced this node's log before the write's fate was
    /// known here; it may or may not have been applied (retry with the same
    /// request id once idempotency keys exist).
    case outcomeUnknown
    case raft(RaftError)
    /// The node is stopping: the write was refused before it was proposed.
    case stopped
    /// The node stopped while the write waited for its commit (proposed
    /// here, or sent on to the leader): it may have committed.
    case stoppedBeforeOutcome
    /// Too many proposals wait for the driver already.
    case overloaded(waiting: Int)

    /// The write was never applied and never will be (no leader took it,
    /// the core refused it, or the entry was replaced): trying it again
    /// cannot apply it twice.
    public var surelyNotApplied: Bool {
        switch self {
        case .notLeader, .lostLeadership, .overloaded, .raft, .stopped: return true
        case .invalidCommand, .timedOut, .outcomeUnknown, .stoppedBeforeOutcome: return false
        }
    }

    public var description: String {
        switch self {
        case .notLeader(let hint): return hint == noNode ? "this node is not the leader and knows of none" : "this node is not the leader; node \(hint) is"
        case .invalidCommand(let reason): return "invalid command: \(reason)"
        case .lostLeadership: return "leadership changed before the write committed; it was not applied"
        case .timedOut(let ticks): return "no answer within \(ticks) ticks"
        case .outcomeUnknown: return "a snapshot replaced the log before this write's outcome was known here"
        case .raft(let error): return error.description
        case .stopped: return "the node is stopping"
        case .stoppedBeforeOutcome: return "the node stopped before this write's outcome was known here; it may have committed: check elsewhere"
        case .overloaded(let waiting): return "\(waiting) proposals are waiting for this node already; retry shortly"
        }
    }
}

/// One node's driver loop (DESIGN.md): take input (peer messages, ticks,
/// proposals), step the core, persist the Ready and apply its committed
/// entries in one transaction, send, answer the callers waiting on them,
/// advance.
///
/// Group commit: proposals, peer messages and read requests only step the
/// core and schedule one flush; everything that arrived meanwhile shares
/// that flush's transaction and fsync. The actor runs on its own event
/// loop thread, so a blocking fsync never holds Swift's cooperative pool.
public actor RaftDriver {
    public nonisolated let id: NodeID
    private nonisolated let loop: any EventLoop
    public nonisolated var unownedExecutor: UnownedSerialExecutor { loop.executor.asUnownedSerialExecutor() }

    /// Waits on the driver's event-loop timer (monotonic; see `Transport.sleep(for:on:)`).
    public nonisolated func sleep(for duration: Duration) async throws {
        try await Transport.sleep(for: duration, on: loop)
    }
    public nonisolated let metrics: NodeMetrics
    /// Called on the driver's thread with each batch of applied entries
    /// (the node watches membership and member addresses this way).
    private let onApplied: (@Sendable ([Entry]) -> Void)?
    private var flushScheduled = false
    /// A deliberate bug for showing that the crash harness catches lost
    /// acknowledged writes: writes are answered as soon as the leader
    /// appends them in memory (persisted, sent and committed at the next
    /// tick), or as soon as a follower sends them on.
    /// Only debug builds let a node turn it on (WARRANT_PLANTED_BUG).
    /// Read off the driver's thread too: writes then take the driver's own
    /// path, where the bug lives.
    private nonisolated let bugPlanted = Atomic<Bool>(false)
    private nonisolated var acknowledgeBeforeCommit: Bool { bugPlanted.load(ordering: .acquiring) }

    package func plantAcknowledgeBeforeCommit() { bugPlanted.store(true, ordering: .releasing) }
    /// A second deliberate bug, for the chaos harness's linearizability
    /// checker: a read is served from whatever this node has applied,
    /// without confirming leadership (no ReadIndex). A node cut off from
    /// the majority, or behind it, answers stale reads.
    private var staleReads = false
    package func plantStaleReads() { staleReads = true }
    private var raft: RaftNode
    private let store: RaftStore
    private let sender: any MessageSender
    /// A caller gets an answer or an error within this many ticks.
    public nonisolated let requestTimeoutTicks: Int
    /// A request that finds no leader known waits this long for one.
    public nonisolated let leaderWaitTicks: Int
    /// The log is compacted behind a ledger snapshot every this many
    /// applied entries.
    public nonisolated let compactEveryEntries: LogIndex
    /// The payloads of this many newest applied entries stay in memory;
    /// older ones are released (they are in the write-ahead log, and read
    /// back for a peer that lags), so memory does not grow with every
    /// command between compactions.
    public nonisolated let keepPayloadsEntries: LogIndex
    /// Told why released entries could not be read back, or a snapshot's
    /// stream could not be made, read or staged (the node logs it).
    private let onReplicationTrouble: (@Sendable (String) -> Void)?
    /// How long the leader may hold new proposals while its previous batch
    /// awaits commit (see `proposeQueued`); checked whenever the loop runs,
    /// ticks included.
    public nonisolated let proposalGatherMax: Duration
    /// Held proposals beyond this many are proposed at once.
    public static let proposalsGatheredMax = 256
    private var ticks = 0
    private var stopped = false

    private struct PendingWrite {
        var term: Term
        var deadlineTick: Int
        var startedAt: ContinuousClock.Instant
        var continuation: CheckedContinuation<LedgerOutcome?, any Error>
    }
    /// Writes appended on this node, by log index.
    private var pendingWrites: [LogIndex: PendingWrite] = [:]

    private struct PendingRead {
        var deadlineTick: Int
        var index: LogIndex?
        var continuation: CheckedContinuation<LogIndex, any Error>
    }
    private var pendingReads: [UInt64: PendingRead] = [:]
    /// Read ids start at random: an answer to a read of an earlier process
    /// of this node, still queued for it, must not match a new read.
    private var nextReadID = UInt64.random(in: 1...(UInt64.max >> 1))
    private var appliedIndex: LogIndex

    /// Opens the node from its store (which must be initialized).
    /// `loop` should be a thread of its own in a node (a blocking fsync
    /// runs on it); tests may share one.
    public init(configuration: Configuration, store: RaftStore, sender: any MessageSender, requestTimeoutTicks: Int = 100,
                compactEveryEntries: LogIndex = 10_000, keepPayloadsEntries: LogIndex = 4_096,
                loop: any EventLoop = MultiThreadedEventLoopGroup.singleton.next(),
                metrics: NodeMetrics = NodeMetrics(), proposalGatherMax: Duration = .milliseconds(3),
                inboxProposalsMax: Int = 16_384,
                onApplied: (@Sendable ([Entry]) -> Void)? = nil,
                onReplicationTrouble: (@Sendable (String) -> Void)? = nil) throws {
        precondition(requestTimeoutTicks > 0 && compactEveryEntries > 0 && inboxProposalsMax > 0)
        self.inboxProposalsMax = inboxProposalsMax
        self.proposalGatherMax = proposalGatherMax
        self.keepPayloadsEntries = keepPayloadsEntries
        self.onReplicationTrouble = onReplicationTrouble
        self.loop = loop
        self.metrics = metrics
        self.onApplied = onApplied
        self.compactEveryEntries = compactEveryEntries
        id = configuration.id
        // The ledger comes back at its newest checkpoint; the committed
        // entries after it are applied again.
        let durable = try store.loadDurableState()
        raft = try RaftNode(configuration: configuration, durable: durable)
        publishedMembership = raft.membership
        membersView = Mutex(raft.membership.members)
        removedView = Mutex(raft.membership.removed)
        appliedIndex = durable.appliedIndex
        self.store = store
        self.sender = sender
        self.requestTimeoutTicks = requestTimeoutTicks
        // Two election rounds at their longest (a split vote, then a
        // second round), and never more than half a request's time.
        leaderWaitTicks = max(1, min(requestTimeoutTicks / 2, 4 * configuration.electionTimeoutTicks))
    }

    public var status: Status { raft.status }
    /// A checkpoint is being written (tests: one begun before a snapshot
    /// transfer may finish during it).
    package var isCompacting: Bool { compactionInProgress }

    /// Whether this node leads, and whom it believes leads, as of the last
    /// Ready handled: read without a hop to the driver's thread (every
    /// issuance asks, to decide whether to forward).
    public nonisolated var leadership: (isLeader: Bool, leaderID: NodeID) { leadershipView.withLock { $0 } }
    private nonisolated let leadershipView = Mutex<(isLeader: Bool, leaderID: NodeID)>((false, 0))

    /// Whether `id` is a voter or learner of the membership this node
    /// holds, as of the last Ready handled (read from any thread: the API
    /// asks for every request a node's certificate makes).
    public nonisolated func isMember(_ id: NodeID) -> Bool { membersView.withLock { $0.contains(id) } }
    private nonisolated let membersView: Mutex<Set<NodeID>>
    /// The nodes removed from the cluster (for ever: ids are never reused).
    public nonisolated var removedNodes: Set<NodeID> { removedView.withLock { $0 } }
    private nonisolated let removedView: Mutex<Set<NodeID>>
    private var publishedMembership: Membership

    public var statusSnapshot: NodeStatusSnapshot {
        NodeStatusSnapshot(term: raft.term, role: raft.role.rawValue, leaderID: raft.leaderID, commitIndex: raft.commitIndex,
                           appliedIndex: appliedIndex, lastIndex: raft.lastIndex, snapshotIndex: raft.snapshotIndex)
    }

    /// Writes and reads waiting for an answer.
    public var pendingRequestCount: Int {
        pendingWrites.count + pendingReads.count + queuedProposals.count + forwardedWrites.count + inbox.withLock { $0.proposals.count }
    }

    // MARK: - Input

    /// Tests: peers' messages for which this returns true are dropped
    /// before the core sees them (a one-sided partition of some kinds of
    /// message, for example a follower that stops getting entries but
    /// still answers heartbeats). Nil in service.
    package private(set) var dropIncoming: (@Sendable (Message) -> Bool)?

    package func setDropIncoming(_ drop: (@Sendable (Message) -> Bool)?) { dropIncoming = drop }

    private struct Inbox {
        var messages: [Message] = []
        /// A leader's own proposals, queued by their callers' threads.
        var proposals: [QueuedProposal] = []
        var scheduled = false
        /// The driver is in its loop and looks here again before it leaves
        /// (`leaveLoop`): what arrives meanwhile needs no drain of its own.
        var running = false
        /// The driver stopped: proposals are refused from then on.
        var closed = false
        /// The driver holds new proposals anyway (its previous batch awaits
        /// its commit) and looks here when that ends: the commit comes as
        /// a peer's message, which schedules a drain, and the driver's own
        /// timer wakes it at the gathering bound. A proposal arriving
        /// meanwhile needs no drain of its own: each had cost the caller an
        /// eventfd write and the driver a wake-up only to hold it.
        var holdingProposals = false

        /// Whether the caller must schedule a drain (none is scheduled and
        /// the driver is not in its loop). A drain scheduled while the
        /// driver was busy cost the caller an eventfd write and the driver
        /// a wake-up to find its input already taken: ~2% of a JWT-SVID
        /// issuance's CPU, on the leader's request threads.
        mutating func scheduleDrain() -> Bool {
            guard !scheduled && !running else { return false }
            scheduled = true
            return true
        }
    }
    /// Rounds of input a loop takes before it leaves the rest to a drain of
    /// its own, so ticks and other work on the driver's thread run between
    /// (settable for tests).
    package var loopInputRoundsMax = 8
    private nonisolated let inbox = Mutex(Inbox())
    /// Messages beyond this many waiting are dropped (Raft resends).
    public static let inboxMessagesMax = 16_384
    /// Proposals beyond this many waiting in the inbox are refused.
    public nonisolated let inboxProposalsMax: Int

    /// Queues a peer's message without waiting: messages arriving together
    /// are stepped together, in one hop to the driver's thread, and share
    /// one flush.
    public nonisolated func enqueue(_ message: Message) {
        let schedule = inbox.withLock { inbox in
            guard inbox.messages.count < Self.inboxMessagesMax else { return false }
            inbox.messages.append(message)
            return inbox.scheduleDrain()
        }
        if schedule { scheduleDrain() }
    }

    /// Queues a leader's proposal from its caller's thread: proposals
    /// arriving together reach the driver's thread in one hop. Refused at
    /// once (the continuation resumed) if the driver stopped or too many
    /// wait.
    private nonisolated func enqueue(_ proposal: QueuedProposal) {
        let refusal: DriverError?, schedule: Bool
        (refusal, schedule) = inbox.withLock { inbox in
            if inbox.closed { return (.stopped, false) }
            guard inbox.proposals.count < inboxProposalsMax else { return (.overloaded(waiting: inbox.proposals.count), false) }
            inbox.proposals.append(proposal)
            if inbox.holdingProposals && inbox.proposals.count < Self.proposalsGatheredMax { return (nil, false) }
            return (nil, inbox.scheduleDrain())
        }
        if let refusal { proposal.continuation?.resume(throwing: refusal) }
        if schedule { scheduleDrain() }
    }

    private nonisolated func scheduleDrain() {
        drainsScheduledCount.add(1, ordering: .relaxed)
        onDriversThread { $0.drainInbox() }
    }

    /// Drains of the inbox scheduled so far (tests).
    package nonisolated var drainsScheduled: Int { drainsScheduledCount.load(ordering: .relaxed) }
    private nonisolated let drainsScheduledCount = Atomic<Int>(0)
    /// Proposals waiting in the inbox (tests).
    package nonisolated var inboxProposalCount: Int { inbox.withLock { $0.proposals.count } }
    /// Run once on the driver's thread, in the next loop just before it
    /// first looks whether it may leave, and once as that loop ends (tests:
    /// work queued meanwhile meets a running loop, which must take it, or
    /// leave it a drain).
    package var loopHook: (beforeLeaving: @Sendable () -> Void, atEnd: @Sendable () -> Void)?

    /// Runs `body` on the driver's thread, in order with the inbox's
    /// drains (tests order work against them this way).
    package nonisolated func onDriversThread(_ body: @escaping @Sendable (isolated RaftDriver) -> Void) {
        loop.execute { self.assumeIsolated(body) }
    }

    private func drainInbox() {
        guard !stopped else { return }
        try? processReadies() // steps the inbox first; a failure stops the node and fails every caller
    }

    /// Steps every message queued so far, and queues the proposals that
    /// came with them (sent back to their callers' own path if this node
    /// no longer leads: they were never proposed).
    private func stepInbox() {
        let (messages, proposals) = inbox.withLock { inbox in
            defer {
                inbox.messages.removeAll(keepingCapacity: true)
                inbox.proposals.removeAll(keepingCapacity: true)
                inbox.scheduled = false
                inbox.running = true
            }
            return (inbox.messages, inbox.proposals)
        }
        if !messages.isEmpty { metrics.messagesReceived.add(messages.count) }
        for message in messages {
            if let dropIncoming, dropIncoming(message) { continue }
            // A removed node's certificate still chains to the cluster CA:
            // what it sends counts for nothing (the transport also closes
            // its connections).
            if raft.membership.removed.contains(message.from) {
                metrics.messagesFromRemoved.add(1)
                continue
            }
            if handleSnapshotStream(message) { continue }
            let message = restamp(message)
            // Commands a follower forwarded join this leader's own queue:
            // they wait at the same gate and go in the same batches (stepped
            // into the core, each message was a batch of its own). Only a
            // member's, addressed to this node. One sent at a later term
            // than this leader's goes to the core, which steps down on it
            // (a newer leader exists; appending here could never commit);
            // one from an earlier term is still a member's command, as
            // good as any client's.
            if raft.role == .leader, message.term <= raft.term, case .forwardedProposal(let payloads) = message.body {
                guard message.to == id, raft.membership.members.contains(message.from) else {
                    metrics.messagesFromRemoved.add(1)
                    continue
                }
                for case .command(let bytes) in payloads {
                    queuedProposals.append(QueuedProposal(bytes: bytes, startedAt: .now, continuation: nil))
                }
                continue
            }
            raft.step(message)
        }
        guard !proposals.isEmpty else { return }
        if raft.role == .leader {
            metrics.proposals.add(proposals.count)
            queuedProposals.append(contentsOf: proposals)
        } else {
            for proposal in proposals { proposal.continuation?.resume(throwing: NotLeadingAnyMore()) }
        }
    }

    public func tick() throws {
        guard !stopped else {
            // A failure on another path (a message's drain) is reported here, once: the ticking stops at it.
            if let failure { throw failure }
            return
        }
        ticks += 1
        raft.tick()
        expireRequests()
        checkSnapshotTransfers()
        try processReadies()
        do {
            try store.writeAuditIfDue()
        } catch {
            // A batch the audit writer failed: as on any storage failure
            // (before, the ticking stopped but the node served on, its
            // waiting callers never answered).
            failStop(error)
            throw error
        }
    }

    /// Ticks every `interval` on the driver's own thread (not Swift's
    /// cooperative pool, so busy tasks elsewhere cannot delay elections).
    /// A failure that stops the node (storage, or ledger rules its build
    /// does not know; on any path) stops the ticking and is reported once.
    public nonisolated func startTicking(every interval: TimeAmount, onStorageFailure: @escaping @Sendable (any Error) -> Void) -> RepeatedTask {
        loop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { task in
            self.assumeIsolated { driver in
                do {
                    try driver.tick()
                } catch {
                    task.cancel()
                    onStorageFailure(error)
                }
            }
        }
    }

    public func campaign() throws {
        guard !stopped else { return }
        raft.campaign()
        try processReadies()
    }

    /// Proposes a ledger command on this node (the leader) and returns its
    /// outcome once it is committed and applied here: no outcome before the
    /// audit record is durable.
    public func propose(_ command: LedgerCommand) async throws -> LedgerOutcome {
        try await write(command).outcome
    }

    /// Proposes a ledger command from any node: the leader appends it; a
    /// follower sends it to the leader over the Raft links (batched with
    /// whatever else goes there) and answers when it applies the entry
    /// carrying the command's request id. Returns the outcome and the
    /// node that led.
    ///
    /// On a leader the command is encoded on the caller's thread and
    /// queued in the inbox without a hop to the driver's thread (the hop
    /// there and back was ~2% of the CPU of a JWT-SVID issuance in all
    /// processes); the caller is answered from the driver's thread,
    /// straight to its own executor. Elsewhere, or if leadership moved
    /// before the driver took the command, it goes the driver's way.
    public nonisolated func write(_ command: LedgerCommand) async throws -> (outcome: LedgerOutcome, leader: NodeID) {
        if let reason = command.invalidReason { throw DriverError.invalidCommand(reason) }
        guard leadership.isLeader, !acknowledgeBeforeCommit else { return try await writeOnDriver(command) }
        let bytes = command.encoded
        let outcome: LedgerOutcome?
        do {
            outcome = try await withCheckedThrowingContinuation { continuation in
                enqueue(QueuedProposal(bytes: bytes, startedAt: .now, continuation: continuation))
            }
        } catch is NotLeadingAnyMore {
            return try await writeOnDriver(command)
        }
        guard let outcome else { throw DriverError.lostLeadership }
        return (outcome, id)
    }

    /// A proposal taken from the inbox after this node stopped leading.
    private struct NotLeadingAnyMore: Error {}

    private func writeOnDriver(_ command: LedgerCommand) async throws -> (outcome: LedgerOutcome, leader: NodeID) {
        guard !stopped else { throw DriverError.stopped }
        if raft.leaderID == noNode { await waitForLeader() }
        guard !stopped else { throw DriverError.stopped }
        if raft.role != .leader {
            return try await forward(command)
        }
        metrics.proposals.add(1)
        let bytes = command.encoded
        if acknowledgeBeforeCommit {
            // The planted bug: answered now; persisted and sent at the next tick.
            guard case .appended(_, let index, _) = try? raft.propose(bytes) else { throw DriverError.notLeader(leaderHint: raft.leaderID) }
            return (LedgerOutcome(logIndex: index, requestID: command.requestID, result: .written(version: 1)), id)
        }
        guard let outcome = try await withCheckedThrowingContinuation({ continuation in
            queuedProposals.append(QueuedProposal(bytes: bytes, startedAt: .now, continuation: continuation))
            scheduleFlush()
        }) else {
            throw DriverError.lostLeadership
        }
        return (outcome, id)
    }

    private struct ForwardedWrite {
        var term: Term
        var deadlineTick: Int
        var continuation: CheckedContinuation<(outcome: LedgerOutcome, leader: NodeID), any Error>
    }
    /// Writes this follower sent to the leader, by request id.
    private var forwardedWrites: [String: ForwardedWrite] = [:]
    public static let forwardedWritesMax = 10_000

    private func forward(_ command: LedgerCommand) async throws -> (outcome: LedgerOutcome, leader: NodeID) {
        guard raft.leaderID != noNode else { throw DriverError.notLeader(leaderHint: noNode) }
        guard !command.requestID.isEmpty, forwardedWrites[command.requestID] == nil else {
            throw DriverError.invalidCommand("request id '\(command.requestID)' is empty or already in flight on this node")
        }
        guard forwardedWrites.count < Self.forwardedWritesMax else {
            throw DriverError.raft(.uncommittedLimitReached(limitBytes: 0))
        }
        do {
            _ = try raft.propose(command.encoded)
        } catch {
            throw DriverError.raft(error)
        }
        metrics.forwardedWrites.add(1)
        if acknowledgeBeforeCommit {
            // The planted bug, follower side: answered as soon as it is sent on.
            return (LedgerOutcome(logIndex: 0, requestID: command.requestID, result: .written(version: 1)), raft.leaderID)
        }
        let term = raft.term
        return try await withCheckedThrowingContinuation { continuation in
            forwardedWrites[command.requestID] = ForwardedWrite(term: term, deadlineTick: ticks + requestTimeoutTicks, continuation: continuation)
            scheduleFlush()
        }
    }

    /// Answers forwarded writes that just applied; gives up on those sent
    /// in an earlier term (the old leader may or may not have kept them).
    private func settleForwarded(_ outcomes: [LedgerOutcome]) {
        guard !forwardedWrites.isEmpty else { return }
        for outcome in outcomes where !outcome.requestID.isEmpty {
            forwardedWrites.removeValue(forKey: outcome.requestID)?.continuation.resume(returning: (outcome, raft.leaderID))
        }
        for (requestID, write) in forwardedWrites where write.term < raft.term {
            forwardedWrites.removeValue(forKey: requestID)
            write.continuation.resume(throwing: DriverError.outcomeUnknown)
        }
    }

    /// Whether this node's wall clock agrees with the cluster's (the
    /// node's `ClockCheck`; always, unless set). In a struct: a function
    /// kept directly as a Mutex's value came back wrapped in one more
    /// reabstraction thunk each time `withLock` handed it out (its inout
    /// value is written back), so after a few hundred thousand forwarded
    /// commands calling it overflowed the stack (a leader crashed in a
    /// benchmark after 240,000 join tokens made through all nodes).
    private struct ClockHook: Sendable {
        var agrees: @Sendable () -> Bool
    }
    private nonisolated let clockHook = Mutex(ClockHook(agrees: { true }))

    /// Tells the driver how to ask whether this node's clock agrees with
    /// the cluster's: while it does not, forwarded commands keep the time
    /// the node they came through gave them.
    public nonisolated func setClockCheck(_ agrees: @escaping @Sendable () -> Bool) {
        clockHook.withLock { $0.agrees = agrees }
    }

    /// What the clock check says now, read as forwarded commands read it.
    package nonisolated func clockAgreesNow() -> Bool {
        clockHook.withLock { $0.agrees }()
    }

    /// Forwarded commands get the leader's time, as the leader's own do,
    /// unless the leader's clock disagrees with the cluster's (a
    /// revocation's rule would carry it): then they keep the time stamped
    /// where they came in, by a node whose own clock check let them through.
    private func restamp(_ message: Message) -> Message {
        guard raft.role == .leader, case .forwardedProposal(let payloads) = message.body, clockAgreesNow() else { return message }
        let now = UInt64(Date().timeIntervalSince1970 * 1000)
        var restamped = message
        restamped.body = .forwardedProposal(payloads.map { payload in
            guard case .command(let bytes) = payload, var command = try? LedgerCommand(decoding: bytes) else { return payload }
            command.timeMillis = now
            return .command(command.encoded)
        })
        return restamped
    }

    private struct QueuedProposal {
        var bytes: [UInt8]
        var startedAt: ContinuousClock.Instant
        /// Nil for a command a follower forwarded (its caller is answered
        /// there, when the follower applies the entry).
        var continuation: CheckedContinuation<LedgerOutcome?, any Error>?
    }
    /// Commands waiting for the next flush, proposed to the core together
    /// (one append, one AppendEntries per follower).
    private var queuedProposals: [QueuedProposal] = []
    /// The last index of the newest batch this node proposed as leader.
    private var lastBatchEnd: LogIndex = 0
    /// The loop's run scheduled for the end of a hold.
    private var holdWake: (at: ContinuousClock.Instant, task: Scheduled<Void>)?

    /// Proposes the queued commands as one batch, unless this leader's
    /// previous batch is still waiting for its commit: then they wait for
    /// it (up to `proposalGatherMax`, or `proposalsGatheredMax` commands),
    /// and whatever arrived meanwhile goes in the next batch, proposed as
    /// the previous one commits. A batch's commit waits for a follower's
    /// synced write anyway, so holding the next one costs little latency,
    /// and the leader makes one synced write and one AppendEntries per
    /// follower per round where it made one for every few commands (a
    /// JWT-SVID run: 1,500 -> 470 synced writes/s on the leader, 6% less
    /// CPU per issuance in all processes).
    private func proposeQueued() {
        guard !queuedProposals.isEmpty else { return }
        if proposalsHeldUntil() != nil { return }
        let queued = queuedProposals
        queuedProposals.removeAll(keepingCapacity: true)
        let receipt: ProposalReceipt
        do {
            guard raft.role == .leader else { throw DriverError.notLeader(leaderHint: raft.leaderID) }
            do {
                receipt = try raft.propose(batch: queued.map(\.bytes))
            } catch {
                throw DriverError.raft(error)
            }
            guard case .appended = receipt else { throw DriverError.notLeader(leaderHint: raft.leaderID) }
        } catch {
            for proposal in queued { proposal.continuation?.resume(throwing: error) }
            return
        }
        guard case .appended(let term, let first, _) = receipt else { return }
        lastBatchEnd = first + LogIndex(queued.count) - 1
        metrics.proposalBatches.add(1)
        for (offset, proposal) in queued.enumerated() {
            guard let continuation = proposal.continuation else { continue }
            let index = first + LogIndex(offset)
            awaitCommit(at: index, PendingWrite(term: term, deadlineTick: ticks + requestTimeoutTicks, startedAt: proposal.startedAt,
                                                continuation: continuation))
        }
    }

    /// Proposes a single-server membership change and returns once it is
    /// committed and in effect on this node.
    public func proposeConfigChange(_ change: ConfigChange) async throws -> LogIndex {
        guard !stopped else { throw DriverError.stopped }
        var appendedAt: LogIndex = 0
        _ = try await appendAndWait { (raft: inout RaftNode) throws(RaftError) in
            let receipt = try raft.proposeConfigChange(change)
            if case .appended(_, let index, _) = receipt { appendedAt = index }
            return receipt
        }
        return appendedAt
    }

    /// Asks the leader (this node) to hand leadership to `target`.
    public func transferLeadership(to target: NodeID) throws {
        guard !stopped else { throw DriverError.stopped }
        do {
            try raft.transferLeadership(to: target)
        } catch {
            throw DriverError.raft(error)
        }
        scheduleFlush()
    }

    /// Appends through `append` and waits until the entry is applied here.
    private func appendAndWait(_ append: (inout RaftNode) throws(RaftError) -> ProposalReceipt) async throws -> LedgerOutcome? {
        guard raft.role == .leader else { throw DriverError.notLeader(leaderHint: raft.leaderID) }
        let receipt: ProposalReceipt
        do {
            receipt = try append(&raft)
        } catch {
            throw DriverError.raft(error)
        }
        guard case .appended(let term, let index, _) = receipt else { throw DriverError.notLeader(leaderHint: raft.leaderID) }
        let startedAt = ContinuousClock.now
        return try await withCheckedThrowingContinuation { continuation in
            awaitCommit(at: index, PendingWrite(term: term, deadlineTick: ticks + requestTimeoutTicks, startedAt: startedAt, continuation: continuation))
            scheduleFlush()
        }
    }

    /// A linearizable read point: returns once this node has applied every
    /// write acknowledged before the call, confirmed through ReadIndex.
    /// Fails after `timeoutTicks` (at most the request timeout, which is
    /// also the default).
    public func linearizableReadIndex(timeoutTicks: Int? = nil) async throws -> LogIndex {
        guard !stopped else { throw DriverError.stopped }
        if staleReads { return appliedIndex } // the planted bug
        let requestID = nextReadID
        nextReadID += 1
        do {
            try raft.readIndex(requestID: requestID)
        } catch {
            throw DriverError.raft(error)
        }
        return try await withCheckedThrowingContinuation { continuation in
            pendingReads[requestID] = PendingRead(deadlineTick: ticks + max(1, min(timeoutTicks ?? requestTimeoutTicks, requestTimeoutTicks)),
                                                  index: nil, continuation: continuation)
            scheduleFlush()
        }
    }

    /// Fails every waiting caller and ignores further input; returns once
    /// no audit batch is being written.
    public func stop() {
        stopped = true
        failAll(DriverError.stopped)
        store.finishAuditWrites()
    }

    // MARK: - The loop

    /// Handles the core's Ready once, after every input already queued on
    /// this actor: they all share one transaction.
    private func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        Task { self.flush() }
    }

    private func flush() {
        flushScheduled = false
        guard !stopped else { return }
        try? processReadies() // a failure stops the node and fails every caller
    }

    /// Runs the loop; a storage failure stops the node (fail-stop): the
    /// core is left mid-Ready and must not be fed again, so every waiting
    /// caller gets the error and further input is ignored.
    private func processReadies() throws {
        do {
            try runLoop()
        } catch {
            failStop(error)
            throw error
        }
    }

    /// Stops the node for `error` (storage, or ledger rules its build does
    /// not know): every waiting caller gets it, and every later input is
    /// refused.
    private func failStop(_ error: any Error) {
        stopped = true
        if failure == nil {
            failure = error
            failureView.withLock { $0 = "\(error)" }
            failed.store(true, ordering: .releasing)
        }
        failAll(error)
    }

    /// What stopped the node (a storage failure, or ledger rules its build
    /// does not know), if anything did.
    private var failure: (any Error)?
    private nonisolated let failureView = Mutex<String?>(nil)
    private nonisolated let failed = Atomic<Bool>(false)

    /// Why the node stopped, if a failure stopped it (not `stop()`): read
    /// on every request, so without a lock until one has.
    public nonisolated var failureDescription: String? {
        guard failed.load(ordering: .acquiring) else { return nil }
        return failureView.withLock { $0 }
    }

    private func runLoop() throws {
        takeInput()
        let hook = loopHook
        loopHook = nil
        defer { hook?.atEnd() }
        var beforeLeaving = hook?.beforeLeaving
        var rounds = 0
        var inputRounds = 1
        while true {
            try runReadies(&rounds)
            beforeLeaving?()
            beforeLeaving = nil
            // Leave only with the inbox empty: what arrived since it was
            // last taken (its senders scheduled nothing) is taken now.
            if leaveLoop(inputRounds: inputRounds) { break }
            inputRounds += 1
            takeInput()
        }
        let view = (raft.role == .leader, raft.leaderID)
        leadershipView.withLock { $0 = view }
        if raft.membership != publishedMembership {
            publishedMembership = raft.membership
            let members = publishedMembership.members, removed = publishedMembership.removed
            membersView.withLock { $0 = members }
            removedView.withLock { $0 = removed }
        }
        if view.1 != noNode { releaseLeaderWaiters() }
    }

    /// Whether the loop may end: the inbox is empty (and senders schedule
    /// drains again), or the loop took its rounds of input (a drain is
    /// scheduled for what waits). False: take the input and go on.
    private func leaveLoop(inputRounds: Int) -> Bool {
        let roundsTaken = inputRounds >= loopInputRoundsMax
        let wake = proposalsHeldUntil()
        let (leave, schedule) = inbox.withLock { inbox -> (Bool, Bool) in
            let empty = inbox.messages.isEmpty && inbox.proposals.isEmpty
            guard empty || roundsTaken else { return (false, false) }
            inbox.running = false
            inbox.holdingProposals = wake != nil
            return (true, !empty && inbox.scheduleDrain())
        }
        if schedule { scheduleDrain() }
        if leave { setHoldWake(wake) }
        return leave
    }

    /// While new proposals are held (`proposeQueued`), when the driver
    /// must look at them again if the commit it waits for has not brought
    /// it back first: the oldest one's gathering bound (for proposals not
    /// yet taken from the inbox, at least a bound from now). Nil when a
    /// proposal would go at once.
    private func proposalsHeldUntil() -> ContinuousClock.Instant? {
        guard raft.role == .leader, !stopped, lastBatchEnd > raft.commitIndex, queuedProposals.count < Self.proposalsGatheredMax else {
            return nil
        }
        let now = ContinuousClock.now
        let bound = (queuedProposals.first?.startedAt ?? now) + proposalGatherMax
        return now < bound ? bound : nil
    }

    /// Schedules the driver's loop for `instant` (nil: cancels it), unless
    /// one is scheduled no later.
    private func setHoldWake(_ instant: ContinuousClock.Instant?) {
        guard let instant else {
            holdWake?.task.cancel()
            holdWake = nil
            return
        }
        if let holdWake, holdWake.at <= instant { return }
        holdWake?.task.cancel()
        holdWake = (instant, loop.scheduleTask(in: TimeAmount(max(.zero, ContinuousClock.now.duration(to: instant)))) { [self] in
            assumeIsolated { driver in
                driver.holdWake = nil
                driver.drainInbox()
            }
        })
    }

    private func runReadies(_ rounds: inout Int) throws {
        while raft.hasReady {
            rounds += 1
            precondition(rounds <= 10_000, "the core never runs out of work")
            let ready = raft.ready()
            send(ready.messagesToSendNow)
            // Committed entries this node has made durable already (a
            // leader's always are: it counts itself only for what it has
            // written) are applied and answered before the write of the new
            // entries, unless messages wait for that write: their callers
            // do not wait for a synced write that is not theirs. Otherwise
            // the write comes first, then what waited for it goes out, then
            // the apply: a follower's acknowledgement of new entries does
            // not wait for it to apply the entries committed before them
            // (that apply was on every round's critical path: the leader
            // commits on the acknowledgement).
            let applyFirst = ready.snapshot == nil && ready.messagesAfterPersist.isEmpty
                && (ready.committedEntries.last?.index ?? 0) <= raft.stableIndex
            if applyFirst { try apply(ready) }
            let writeStart = ContinuousClock.now
            let syncedBefore = store.syncedWrites
            try store.persist(ready)
            if store.syncedWrites != syncedBefore {
                metrics.storageWriteSeconds.observe(writeStart.duration(to: .now))
            }
            metrics.messagesSent.add(ready.messagesToSendNow.count + ready.messagesAfterPersist.count)
            send(ready.messagesAfterPersist)
            if let snapshot = ready.snapshot {
                metrics.snapshotsInstalled.add(1)
                // persist() installed the ledger from it in the same transaction.
                appliedIndex = snapshot.metadata.index
                for (index, write) in pendingWrites where index <= snapshot.metadata.index {
                    pendingWrites.removeValue(forKey: index)
                    write.continuation.resume(throwing: DriverError.outcomeUnknown)
                }
            }
            if !applyFirst { try apply(ready) }
            for state in ready.readStates { pendingReads[state.requestID]?.index = state.index }
            for requestID in ready.abandonedReads {
                pendingReads.removeValue(forKey: requestID)?.continuation.resume(throwing: DriverError.notLeader(leaderHint: ready.leaderID))
            }
            raft.advance()
            releasePayloadsIfDue()
            answerReads()
            try compactIfDue()
            // What arrived during the write joins the next Ready (group
            // commit: one write for all of it).
            takeInput()
        }
    }

    /// Steps the peers' messages that arrived, then proposes what is
    /// queued: proposals held behind a batch that an acknowledgement just
    /// committed go out in the next Ready, before that batch is applied.
    private func takeInput() {
        stepInbox()
        proposeQueued()
    }

    /// Applies a Ready's committed entries to the ledger and settles
    /// their callers.
    private func apply(_ ready: Ready) throws {
        guard !ready.committedEntries.isEmpty else { return }
        let applyStart = ContinuousClock.now
        let outcomes = try store.apply(ready.committedEntries)
        metrics.applySeconds.observe(applyStart.duration(to: .now))
        for entry in ready.committedEntries { settleWrite(at: entry, outcomes: outcomes) }
        settleForwarded(outcomes)
        appliedIndex = ready.committedEntries.last!.index
        onApplied?(ready.committedEntries)
    }

    // MARK: - Waiting out an election

    private struct LeaderWaiter {
        var deadlineTick: Int
        var continuation: CheckedContinuation<Void, Never>
    }
    private var leaderWaiters: [LeaderWaiter] = []
    /// Callers waiting for a leader, at most this many (more are answered
    /// at once with whatever is known).
    public static let leaderWaitersMax = 10_000

    /// Whether this node leads and whom it believes leads; while no leader
    /// is known (an election), waits for one for up to `leaderWaitTicks`,
    /// so a request arriving mid-election is served a moment later instead
    /// of refused. Known leadership is answered without a hop to the
    /// driver's thread.
    public nonisolated func awaitLeadership() async -> (isLeader: Bool, leaderID: NodeID) {
        let known = leadership
        guard known.leaderID == noNode else { return known }
        await waitForLeader()
        return leadership
    }

    private func waitForLeader() async {
        guard !stopped, raft.leaderID == noNode, leaderWaiters.count < Self.leaderWaitersMax else { return }
        await withCheckedContinuation { continuation in
            leaderWaiters.append(LeaderWaiter(deadlineTick: ticks + leaderWaitTicks, continuation: continuation))
        }
    }

    /// Resumes every waiter (a leader is known, or the node stops), or,
    /// with `expiredOnly`, those whose wait is over.
    private func releaseLeaderWaiters(expiredOnly: Bool = false) {
        guard !leaderWaiters.isEmpty else { return }
        var kept: [LeaderWaiter] = []
        for waiter in leaderWaiters {
            if expiredOnly && waiter.deadlineTick > ticks { kept.append(waiter) } else { waiter.continuation.resume() }
        }
        leaderWaiters = kept
    }

    /// Every `compactEveryEntries` applied entries, pins the ledger's state
    /// and encodes it off this thread; `finishCompaction` then drops the
    /// log behind it, in the core and the store. The node keeps serving
    /// while the snapshot is encoded.
    ///
    /// A snapshot copies the whole ledger, so the interval also grows with
    /// the ledger: at least as many entries as the last snapshot had rows.
    /// Compaction then costs a bounded amount per applied entry however
    /// large the ledger gets (at a fixed interval it took a third of the
    /// leader's CPU once the ledger held a few hundred thousand rows).
    private var compactionInProgress = false
    private var rowsAtLastSnapshot: LogIndex = 0
    /// Since when a due compaction waits for a snapshot transfer.
    private var compactionHeldSince: ContinuousClock.Instant?
    static let compactionHoldMax: Duration = .seconds(300)

    private func compactIfDue() throws {
        guard !compactionInProgress, appliedIndex >= raft.snapshotIndex + max(compactEveryEntries, rowsAtLastSnapshot),
              let metadata = raft.snapshotMetadata(at: appliedIndex) else { return }
        // Not while a follower is being sent the snapshot (or its stream is
        // made): a new one would replace it, and the follower, which needs
        // the entries after the old one, would start over, for ever if the
        // stream takes longer than the writes between compactions. For
        // `compactionHoldMax` at most: the log grows meanwhile.
        if !snapshotTransfers.isEmpty || !snapshotsBeingMade.isEmpty {
            let since = compactionHeldSince ?? .now
            compactionHeldSince = since
            if since.duration(to: .now) < Self.compactionHoldMax { return }
        }
        compactionHeldSince = nil
        let checkpoint = try store.beginCheckpoint(metadata)
        compactionInProgress = true
        metrics.checkpointsBegun.add(1)
        // On a thread of its own at a lower scheduling priority: encoding a
        // large ledger takes a core for a while, and requests come first.
        Thread.detachNewThread { [self] in
            #if os(Linux)
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10) // this thread only, on Linux
            #endif
            let result = Result { try checkpoint.write() }
            Task { await self.finishCompaction(metadata, result) }
        }
    }

    private func finishCompaction(_ metadata: SnapshotMetadata, _ result: Result<Int, any Error>) {
        compactionInProgress = false
        guard !stopped else { return }
        do {
            rowsAtLastSnapshot = LogIndex(try result.get())
            // A snapshot from the leader may have replaced the log meanwhile.
            guard metadata.index > raft.snapshotIndex, metadata.index <= appliedIndex else { return }
            // The core keeps the snapshot without its bytes: `send` makes
            // them from the checkpoint when a follower needs them.
            let compacted = try raft.compactLog(through: metadata.index, snapshotData: [])
            precondition(compacted == metadata, "the core compacted to \(compacted), not the checkpoint's \(metadata)")
            try store.compact(through: metadata, data: [])
            metrics.snapshotsTaken.add(1)
        } catch {
            // Compaction is an optimisation: the log simply stays longer.
            metrics.compactionFailures.add(1)
        }
    }

    /// Followers whose snapshot stream is being made.
    private var snapshotsBeingMade: Set<NodeID> = []

    /// Sends messages; a snapshot the core holds without its bytes (a
    /// checkpoint) goes as a stream (`startSnapshotTransfer`), one at a
    /// time per follower (the core asks again if it is lost).
    private func send(_ messages: [Message]) {
        var messages = messages
        fillReleasedEntries(&messages)
        guard messages.contains(where: { if case .installSnapshot(let snapshot) = $0.body { return snapshot.data.isEmpty } else { return false } }) else {
            return sender.send(messages)
        }
        var now: [Message] = []
        for message in messages {
            guard case .installSnapshot(let snapshot) = message.body, snapshot.data.isEmpty, store.snapshotsHoldLedger else {
                now.append(message)
                continue
            }
            startSnapshotTransfer(to: message.to, snapshot.metadata)
        }
        sender.send(now)
    }

    // MARK: - Snapshot streams

    /// A snapshot stream being sent to one follower: pieces go out while
    /// fewer than `snapshotChunksInFlight` are unacknowledged; with no
    /// progress for `snapshotStallLimit`, they go again from the last
    /// acknowledged byte, and after `snapshotResendsMax` such rounds the
    /// transfer is given up (the core probes the follower again and asks
    /// for a snapshot anew).
    private struct SnapshotTransfer {
        var source: OutgoingSnapshot
        /// The term this node leads in: the pieces carry it, and the
        /// transfer ends with it.
        var term: Term
        var acknowledged: UInt64 = 0
        var sentThrough: UInt64 = 0
        var lastProgress: ContinuousClock.Instant = .now
        var resends = 0
        /// Whether the follower sent any receipt (a build that takes streams).
        var heard = false
    }
    /// Followers that sent no receipt for a whole transfer (builds before
    /// streams, which cannot read a piece): since when, and when they were
    /// last sent their snapshot as one message, in the older encoding.
    private var peersTakingNoStreams: [NodeID: (since: ContinuousClock.Instant, lastSent: ContinuousClock.Instant?)] = [:]
    static let noStreamsRemembered: Duration = .seconds(60)
    static let wholeSnapshotInterval: Duration = .seconds(10)
    private var snapshotTransfers: [NodeID: SnapshotTransfer] = [:]
    /// Bytes in one piece of a snapshot stream (settable for tests).
    private var snapshotChunkBytes = 1 << 20
    static let snapshotChunksInFlight: UInt64 = 4
    private var snapshotStallLimit: Duration = .seconds(2)

    /// Tests: smaller pieces, and a shorter wait before sending again.
    package func setSnapshotStreaming(chunkBytes: Int, stallLimit: Duration) {
        snapshotChunkBytes = chunkBytes
        snapshotStallLimit = stallLimit
    }
    static let snapshotResendsMax = 5

    /// Starts streaming the snapshot at `metadata` to `peer`, unless that
    /// stream is under way or being made already: the stream's file is
    /// made on a thread of its own at a lower priority (reading the
    /// checkpoint and the whole audit chain takes a while).
    private func startSnapshotTransfer(to peer: NodeID, _ metadata: SnapshotMetadata) {
        if snapshotTransfers[peer]?.source.metadata == metadata { return }
        if let noStreams = peersTakingNoStreams[peer], noStreams.since.duration(to: .now) < Self.noStreamsRemembered {
            return sendWholeSnapshot(to: peer, metadata)
        }
        peersTakingNoStreams[peer] = nil
        guard snapshotsBeingMade.insert(peer).inserted else { return }
        let store = self.store
        Thread.detachNewThread { [self] in
            #if os(Linux)
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
            #endif
            let made = Result { try store.outgoingSnapshot(for: metadata) }
            Task { await self.snapshotMade(for: peer, metadata, made) }
        }
    }

    private func snapshotMade(for peer: NodeID, _ metadata: SnapshotMetadata, _ made: Result<OutgoingSnapshot, any Error>) {
        snapshotsBeingMade.remove(peer)
        guard !stopped else { return }
        guard raft.role == .leader else { return }
        guard case .success(let source) = made else {
            if raft.snapshotIndex > metadata.index {
                // A compaction that had begun before the stream was asked
                // for replaced its checkpoint meanwhile: the core probes
                // again and asks for the newer one. Nothing was sent, and
                // nothing is given up (no trouble, no abandoned transfer).
                raft.reportSnapshotFailure(to: peer)
                scheduleFlush()
                return
            }
            if case .failure(let error) = made { onReplicationTrouble?("the snapshot stream for node \(peer) could not be made: \(error)") }
            abandonSnapshotTransfer(to: peer)
            return
        }
        snapshotTransfers[peer] = SnapshotTransfer(source: source, term: raft.term)
        sendSnapshotChunks(to: peer)
    }

    /// Sends pieces of `peer`'s stream while few enough are unacknowledged.
    private func sendSnapshotChunks(to peer: NodeID) {
        guard var transfer = snapshotTransfers[peer] else { return }
        let window = UInt64(snapshotChunkBytes) * Self.snapshotChunksInFlight
        var chunks: [Message] = []
        while transfer.sentThrough < transfer.source.byteCount && transfer.sentThrough < transfer.acknowledged + window {
            do {
                let chunk = try transfer.source.chunk(at: transfer.sentThrough, count: snapshotChunkBytes)
                transfer.sentThrough += UInt64(chunk.bytes.count)
                metrics.snapshotBytesSent.add(chunk.bytes.count)
                chunks.append(Message(from: id, to: peer, term: transfer.term, body: .snapshotChunk(chunk)))
            } catch {
                onReplicationTrouble?("the snapshot stream for node \(peer) could not be read: \(error)")
                return abandonSnapshotTransfer(to: peer)
            }
        }
        snapshotTransfers[peer] = transfer
        sender.send(chunks)
    }

    /// Sends a follower that takes no streams its snapshot as one message
    /// in the older encoding (if it fits: such a build could take no
    /// larger one), at most every `wholeSnapshotInterval`.
    private func sendWholeSnapshot(to peer: NodeID, _ metadata: SnapshotMetadata) {
        let now = ContinuousClock.now
        if let last = peersTakingNoStreams[peer]?.lastSent, last.duration(to: now) < Self.wholeSnapshotInterval { return }
        guard snapshotsBeingMade.insert(peer).inserted else { return }
        peersTakingNoStreams[peer]?.lastSent = now
        let store = self.store, sender = self.sender, term = raft.term
        Thread.detachNewThread { [self] in
            #if os(Linux)
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
            #endif
            let made = Result { try store.legacySnapshotData(for: metadata) }
            if case .success(let data) = made {
                sender.send([Message(from: id, to: peer, term: term, body: .installSnapshot(Snapshot(metadata: metadata, data: data)))])
                metrics.snapshotsSentWhole.add(1)
            }
            Task { await self.wholeSnapshotSent(to: peer, made.map { _ in () }) }
        }
    }

    private func wholeSnapshotSent(to peer: NodeID, _ result: Result<Void, any Error>) {
        snapshotsBeingMade.remove(peer)
        if case .failure(let error) = result {
            onReplicationTrouble?("node \(peer) sent no receipt for a snapshot stream (a build before streams, or unreachable), and its snapshot cannot go as one message: \(error)")
            if !stopped { abandonSnapshotTransfer(to: peer) }
        }
    }

    private func abandonSnapshotTransfer(to peer: NodeID) {
        if let transfer = snapshotTransfers[peer], !transfer.heard { peersTakingNoStreams[peer] = (.now, nil) }
        snapshotTransfers[peer] = nil
        metrics.snapshotTransfersAbandoned.add(1)
        raft.reportSnapshotFailure(to: peer)
        scheduleFlush()
    }

    /// Takes what belongs to snapshot streams (pieces on a follower,
    /// receipts on the leader); false for any other message.
    private func handleSnapshotStream(_ message: Message) -> Bool {
        switch message.body {
        case .snapshotChunk(let chunk):
            // From a leader of this term or a later one (its own core
            // decides, once the whole has arrived, whether to install it).
            // From the leader of this term (or of a later one, which its own
            // core then follows, as for any snapshot it is sent).
            guard store.snapshotsHoldLedger, message.term > raft.term
                    || (message.term == raft.term && raft.role == .follower && (raft.leaderID == noNode || raft.leaderID == message.from)) else { return true }
            var receipt = (received: UInt64(0), complete: false)
            if chunk.metadata.index <= raft.commitIndex {
                receipt.received = chunk.totalBytes // installed already, or caught up otherwise: nothing more is needed
            } else {
                do {
                    let staged = try store.receiveSnapshotChunk(chunk, from: message.from)
                    receipt = (staged.received, staged.complete)
                    metrics.snapshotBytesStaged.add(staged.added)
                } catch {
                    // No receipt: the leader sends again from the last one.
                    metrics.snapshotStagingFailures.add(1)
                    onReplicationTrouble?("a piece of the snapshot from node \(message.from) could not be staged: \(error)")
                    return true
                }
            }
            sender.send([Message(from: id, to: message.from, term: raft.term,
                                 body: .snapshotChunkAck(index: chunk.metadata.index, snapshotTerm: chunk.metadata.term, received: receipt.received))])
            if receipt.complete {
                raft.step(Message(from: message.from, to: id, term: message.term,
                                  body: .installSnapshot(Snapshot(metadata: chunk.metadata, data: []))))
            }
            return true
        case .snapshotChunkAck(let index, let snapshotTerm, let received):
            let peer = message.from
            guard var transfer = snapshotTransfers[peer], transfer.source.metadata.index == index,
                  transfer.source.metadata.term == snapshotTerm else { return true }
            guard raft.role == .leader, raft.term == transfer.term else {
                snapshotTransfers.removeAll()
                return true
            }
            transfer.heard = true
            if received > transfer.acknowledged {
                transfer.acknowledged = min(received, transfer.source.byteCount)
                transfer.lastProgress = .now
                transfer.resends = 0
            } else if received < transfer.acknowledged {
                // The follower started over (it dropped what it had staged,
                // a whole that failed its checksum for one): that counts as
                // a round sent again.
                transfer.resends += 1
                guard transfer.resends <= Self.snapshotResendsMax else {
                    abandonSnapshotTransfer(to: peer)
                    return true
                }
                transfer.acknowledged = received
                transfer.sentThrough = received
                transfer.lastProgress = .now
            }
            transfer.sentThrough = max(transfer.sentThrough, transfer.acknowledged)
            snapshotTransfers[peer] = transfer
            // Once all of it arrived, the follower's core answers as for any
            // snapshot; the transfer is kept until then (the core asks for
            // the snapshot again meanwhile, and must not get it twice).
            sendSnapshotChunks(to: peer)
            return true
        default:
            return false
        }
    }

    /// On every tick: streams to followers that stopped acknowledging go
    /// again from their last receipt, or are given up; a node that no
    /// longer leads, or a follower no longer a member, has none.
    private func checkSnapshotTransfers() {
        guard !snapshotTransfers.isEmpty else { return }
        guard raft.role == .leader, snapshotTransfers.values.allSatisfy({ $0.term == raft.term }) else {
            snapshotTransfers.removeAll()
            return
        }
        let now = ContinuousClock.now
        let followers = raft.status.followers
        for (peer, var transfer) in snapshotTransfers {
            guard raft.membership.members.contains(peer), (followers[peer]?.matchIndex ?? 0) < transfer.source.metadata.index else {
                snapshotTransfers[peer] = nil // gone, or caught up (installed)
                continue
            }
            let stalled = transfer.lastProgress.duration(to: now)
            if transfer.acknowledged == transfer.source.byteCount {
                // Arrived whole; the follower installs it (a while, for a
                // large one). If it never says so, the core's next request
                // for a snapshot starts a new transfer.
                if stalled >= snapshotStallLimit * 10 { snapshotTransfers[peer] = nil }
                continue
            }
            guard stalled >= snapshotStallLimit else { continue }
            guard transfer.resends < Self.snapshotResendsMax else {
                abandonSnapshotTransfer(to: peer)
                continue
            }
            transfer.resends += 1
            transfer.sentThrough = transfer.acknowledged
            transfer.lastProgress = now
            snapshotTransfers[peer] = transfer
            sendSnapshotChunks(to: peer)
        }
    }

    /// Released entries in batches of at least this many (one pass over
    /// the log's tail each).
    private static let releaseStep: LogIndex = 256

    private func releasePayloadsIfDue() {
        guard appliedIndex >= raft.payloadsReleasedThrough + keepPayloadsEntries + Self.releaseStep else { return }
        raft.releasePayloads(through: appliedIndex - keepPayloadsEntries)
    }

    /// Entries whose payloads the core released go out with their bytes,
    /// read back from the write-ahead log (checked against its checksums,
    /// and against the entries' terms and sizes here). If that fails the
    /// message is dropped: the peer is probed again, and is sent a
    /// snapshot once a compaction covers what it lacks.
    private func fillReleasedEntries(_ messages: inout [Message]) {
        guard messages.contains(where: \.carriesReleasedEntries) else { return }
        messages = messages.compactMap { message in
            do {
                return try message.fillingReleased { entries in metrics.releasedEntriesRead.add(try store.fillReleased(&entries)) }
            } catch {
                metrics.releasedEntryReadFailures.add(1)
                onReplicationTrouble?("log entries for a lagging peer could not be read back; it waits for a snapshot: \(error)")
                return nil
            }
        }
    }

    /// Waits for the write appended at `index`. A write of an earlier term
    /// still waiting there (this node led before, lost its uncommitted
    /// tail to another leader, and leads again before that index was
    /// applied) is answered now: this leader's log holds another entry at
    /// its index, so it never committed and never will. Overwritten, its
    /// caller had waited for ever (no timeout finds what is not there).
    private func awaitCommit(at index: LogIndex, _ write: PendingWrite) {
        if let displaced = pendingWrites.updateValue(write, forKey: index) {
            displaced.continuation.resume(throwing: DriverError.lostLeadership)
        }
    }

    private func settleWrite(at entry: Entry, outcomes: [LedgerOutcome]) {
        guard let pending = pendingWrites.removeValue(forKey: entry.index) else { return }
        metrics.commitSeconds.observe(pending.startedAt.duration(to: .now))
        if entry.term != pending.term {
            pending.continuation.resume(throwing: DriverError.lostLeadership)
        } else if case .configChange = entry.payload {
            pending.continuation.resume(returning: nil)
        } else if let outcome = outcomes.first(where: { $0.logIndex == entry.index }) {
            pending.continuation.resume(returning: outcome)
        } else {
            pending.continuation.resume(throwing: DriverError.lostLeadership)
        }
    }

    private func answerReads() {
        for (requestID, read) in pendingReads {
            guard let index = read.index, index <= appliedIndex else { continue }
            pendingReads.removeValue(forKey: requestID)
            read.continuation.resume(returning: index)
        }
    }

    private func expireRequests() {
        releaseLeaderWaiters(expiredOnly: true)
        for (requestID, write) in forwardedWrites where write.deadlineTick <= ticks {
            forwardedWrites.removeValue(forKey: requestID)
            write.continuation.resume(throwing: DriverError.timedOut(ticks: requestTimeoutTicks))
        }
        for (index, write) in pendingWrites where write.deadlineTick <= ticks {
            pendingWrites.removeValue(forKey: index)
            write.continuation.resume(throwing: DriverError.timedOut(ticks: requestTimeoutTicks))
        }
        for (requestID, read) in pendingReads where read.deadlineTick <= ticks {
            pendingReads.removeValue(forKey: requestID)
            read.continuation.resume(throwing: DriverError.timedOut(ticks: requestTimeoutTicks))
        }
    }

    private func failAll(_ error: any Error) {
        releaseLeaderWaiters()
        // Writes proposed, or sent on to the leader, may commit all the same.
        let waitingError = (error as? DriverError) == .stopped ? DriverError.stoppedBeforeOutcome : error
        for (_, write) in forwardedWrites { write.continuation.resume(throwing: waitingError) }
        forwardedWrites.removeAll()
        for proposal in queuedProposals { proposal.continuation?.resume(throwing: error) }
        queuedProposals.removeAll()
        let waiting = inbox.withLock { inbox in
            inbox.closed = true
            defer { inbox.proposals.removeAll() }
            return inbox.proposals
        }
        for proposal in waiting { proposal.continuation?.resume(throwing: error) }
        for (_, write) in pendingWrites { write.continuation.resume(throwing: waitingError) }
        pendingWrites.removeAll()
        for (_, read) in pendingReads { read.continuation.resume(throwing: error) }
        pendingReads.removeAll()
    }
}

import Transport

/// The TCP transport queues without suspending, as the driver requires.
extension TCPTransport: MessageSender {}
