import Raft

/// A directed link between two nodes.
public struct Link: Hashable, Sendable {
    public var from: NodeID
    public var to: NodeID
    public init(from: NodeID, to: NodeID) {
        self.from = from
        self.to = to
    }
}

/// The scenario tests' network: instant, in order, with links an author cuts
/// by hand. Every call is bounded and stops by itself.
public final class ScenarioNetwork {
    public let cluster: SimulatedCluster
    public private(set) var blocked: Set<Link> = []
    /// Messages that were dropped by a cut link, for assertions.
    public private(set) var dropped: [Message] = []

    public init(cluster: SimulatedCluster) {
        self.cluster = cluster
    }

    public convenience init(voters: [NodeID], options: NodeOptions = NodeOptions(), seed: UInt64 = 1) {
        self.init(cluster: SimulatedCluster(voters: voters, options: options, seed: seed))
    }

    /// Cuts both directions between `id` and every other node.
    public func isolate(_ id: NodeID) {
        for other in cluster.ids where other != id {
            blocked.insert(Link(from: id, to: other))
            blocked.insert(Link(from: other, to: id))
        }
    }

    /// Cuts every link between the two groups, both ways.
    public func partition(_ a: [NodeID], _ b: [NodeID]) {
        for x in a { for y in b { blocked.insert(Link(from: x, to: y)); blocked.insert(Link(from: y, to: x)) } }
    }

    public func cut(from: NodeID, to: NodeID) { blocked.insert(Link(from: from, to: to)) }

    public func heal() { blocked.removeAll() }

    /// Delivers queued messages in order (and whatever they cause) until
    /// none are left or `roundsMax` rounds passed; `drop` discards some.
    public func deliverAll(roundsMax: Int = 1000, drop: (Message) -> Bool = { _ in false }) {
        var rounds = 0
        while !cluster.outgoing.isEmpty && rounds < roundsMax {
            rounds += 1
            let batch = cluster.outgoing
            cluster.outgoing.removeAll()
            for message in batch {
                if blocked.contains(Link(from: message.from, to: message.to)) || drop(message) {
                    dropped.append(message)
                    continue
                }
                cluster.deliver(message)
            }
        }
    }

    /// Ticks every running node `count` times, delivering after each tick.
    public func tick(_ count: Int = 1) {
        for _ in 0..<count {
            cluster.tickAll()
            deliverAll()
        }
    }

    /// Makes `id` campaign now and delivers until quiet.
    public func elect(_ id: NodeID) {
        cluster.with(id) { $0.campaign() }
        deliverAll()
    }

    /// Proposes a command on `id` and delivers until quiet.
    @discardableResult
    public func propose(_ command: [UInt8], on id: NodeID) throws -> ProposalReceipt? {
        let receipt = try cluster.with(id) { raft throws(RaftError) in try raft.propose(command) }
        deliverAll()
        return receipt
    }

    /// Drops everything queued (messages lost in flight).
    public func dropQueued() {
        dropped.append(contentsOf: cluster.outgoing)
        cluster.outgoing.removeAll()
    }
}
