/// The group's members as of some log index. A change takes effect on every
/// node when its entry commits; ids once removed stay in `removed` forever so
/// they can never be added again.
public struct Membership: Sendable, Hashable {
    public private(set) var voters: Set<NodeID>
    public private(set) var learners: Set<NodeID>
    public private(set) var removed: Set<NodeID>

    public init(voters: Set<NodeID> = [], learners: Set<NodeID> = [], removed: Set<NodeID> = []) {
        precondition(voters.isDisjoint(with: learners), "a node cannot be both voter and learner")
        precondition(!voters.contains(noNode) && !learners.contains(noNode), "node id 0 is reserved")
        self.voters = voters
        self.learners = learners
        self.removed = removed
    }

    public var members: Set<NodeID> { voters.union(learners) }

    public func contains(_ id: NodeID) -> Bool { voters.contains(id) || learners.contains(id) }

    /// Votes needed to win an election or commit an entry.
    public var quorum: Int { voters.count / 2 + 1 }

    /// Checks a change against this membership without applying it.
    public func validate(_ change: ConfigChange) throws(RaftError) {
        switch change {
        case .bootstrap(let ids):
            guard voters.isEmpty && learners.isEmpty else {
                throw RaftError.invalidConfigChange("bootstrap is only valid for an empty cluster")
            }
            guard !ids.isEmpty, !ids.contains(noNode), Set(ids).count == ids.count else {
                throw RaftError.invalidConfigChange("bootstrap needs at least one distinct, non-zero voter id")
            }
        case .addLearner(let id):
            guard id != noNode else { throw RaftError.invalidConfigChange("node id 0 is reserved") }
            guard !removed.contains(id) else {
                throw RaftError.invalidConfigChange("node \(id) was removed before; ids are never reused")
            }
            guard !contains(id) else { throw RaftError.invalidConfigChange("node \(id) is already a member") }
        case .promoteLearner(let id):
            guard learners.contains(id) else {
                throw RaftError.invalidConfigChange("node \(id) is not a learner; add it as a learner first")
            }
        case .removeNode(let id):
            guard contains(id) else { throw RaftError.invalidConfigChange("node \(id) is not a member") }
            if voters.contains(id) && voters.count == 1 {
                throw RaftError.invalidConfigChange("cannot remove the last voter")
            }
        }
    }

    /// The membership after `change`. Invalid changes (which a leader never
    /// proposes, but a log may still hold) leave it unchanged, so every node
    /// applying the same log reaches the same membership.
    public func applying(_ change: ConfigChange) -> Membership {
        do { try validate(change) } catch { return self }
        var next = self
        switch change {
        case .bootstrap(let ids):
            next.voters = Set(ids)
        case .addLearner(let id):
            next.learners.insert(id)
        case .promoteLearner(let id):
            next.learners.remove(id)
            next.voters.insert(id)
        case .removeNode(let id):
            next.voters.remove(id)
            next.learners.remove(id)
            next.removed.insert(id)
        }
        return next
    }
}
