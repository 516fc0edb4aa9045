import Raft

/// Measures the pure core alone: a 3-node cluster in one thread, an instant
/// network, no storage (persisting is a no-op), fixed-size proposals in
/// batches. The figure is entries committed and applied on the leader per
/// second of wall time.
public struct CoreBenchmark {
    public struct Result: Sendable {
        public var entries: Int
        public var seconds: Double
        public var messages: Int
        public var entriesPerSecond: Double { Double(entries) / seconds }
    }

    public var entries: Int
    public var batchSize: Int
    public var payloadBytes: Int
    /// Compact each node's log every this many applied entries.
    public var compactEvery: Int = 100_000

    public init(entries: Int = 2_000_000, batchSize: Int = 1_000, payloadBytes: Int = 256) {
        precondition(entries > 0 && batchSize > 0 && payloadBytes >= 0)
        self.entries = entries
        self.batchSize = batchSize
        self.payloadBytes = payloadBytes
    }

    public func run() -> Result {
        var nodes: [RaftNode] = (1...3).map { id in
            var configuration = Configuration(id: NodeID(id), randomSeed: UInt64(id))
            configuration.inflightMessagesMax = 512
            configuration.messageBytesMax = 4 << 20
            configuration.inflightBytesMax = 256 << 20
            configuration.uncommittedBytesMax = 256 << 20
            configuration.committedBytesPerReadyMax = 256 << 20
            return try! RaftNode(configuration: configuration, durable: .bootstrap(voters: [1, 2, 3]))
        }
        var applied = [LogIndex](repeating: 0, count: 3)
        var commandsApplied = 0
        var messages = 0
        var inbox: [Message] = []

        // Drives every node until no node has anything left to do.
        func settle() {
            var progress = true
            while progress {
                progress = false
                for i in 0..<3 where nodes[i].hasReady {
                    progress = true
                    var ready = nodes[i].ready()
                    inbox.append(contentsOf: ready.messagesToSendNow)
                    inbox.append(contentsOf: ready.messagesAfterPersist)
                    if let last = ready.committedEntries.last {
                        applied[i] = last.index
                        if i == 0 {
                            for entry in ready.committedEntries { if case .command = entry.payload { commandsApplied += 1 } }
                        }
                    }
                    ready.committedEntries.removeAll()
                    nodes[i].advance()
                    if applied[i] - nodes[i].snapshotIndex >= LogIndex(compactEvery) {
                        _ = try? nodes[i].compactLog(through: applied[i], snapshotData: [])
                    }
                }
                if !inbox.isEmpty {
                    progress = true
                    let batch = inbox
                    inbox.removeAll(keepingCapacity: true)
                    messages += batch.count
                    for message in batch { nodes[Int(message.to - 1)].step(message) }
                }
            }
        }

        nodes[0].campaign()
        settle()
        precondition(nodes[0].role == .leader, "node 1 should lead the benchmark cluster")

        let payload = [UInt8](repeating: 0xAB, count: payloadBytes)
        let batch = [[UInt8]](repeating: payload, count: batchSize)
        let clock = ContinuousClock()
        let started = clock.now
        while commandsApplied < entries {
            _ = try! nodes[0].propose(batch: batch)
            settle()
        }
        let elapsed = clock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        precondition(applied[1] == applied[0] || applied[2] == applied[0], "followers fell behind the benchmark leader")
        return Result(entries: commandsApplied, seconds: seconds, messages: messages)
    }
}
