import Raft
import RaftSimulator

/// A single core driven by hand, for the receiver rules of Figure 2.
func makeNode(_ id: NodeID, voters: [NodeID] = [1, 2, 3], preVote: Bool = false, checkQuorum: Bool = false,
              _ configure: (inout Configuration) -> Void = { _ in }) throws -> RaftNode {
    var configuration = Configuration(id: id, randomSeed: id)
    configuration.preVote = preVote
    configuration.checkQuorum = checkQuorum
    configure(&configuration)
    return try RaftNode(configuration: configuration, durable: .bootstrap(voters: voters))
}

/// A node that won term 2 with node 2's vote and handed out its no-op.
/// With `acknowledgedBy`, those followers also acknowledged the no-op.
func makeLeader(_ id: NodeID = 1, voters: [NodeID] = [1, 2, 3], checkQuorum: Bool = false, acknowledgedBy followers: [NodeID] = [],
                _ configure: (inout Configuration) -> Void = { _ in }) throws -> RaftNode {
    var node = try makeNode(id, voters: voters, checkQuorum: checkQuorum, configure)
    node.campaign()
    _ = node.drain()
    if node.role != .leader {
        let voter = voters.first { $0 != id }!
        node.step(message(from: voter, to: id, term: node.term, .requestVoteResponse(RequestVoteResponse(granted: true, preVote: false))))
        _ = node.drain()
    }
    precondition(node.role == .leader, "node \(id) should lead")
    for follower in followers {
        node.step(message(from: follower, to: id, term: node.term,
                          .appendEntriesResponse(AppendEntriesResponse(index: node.lastIndex, rejected: false, hintIndex: 0, hintTerm: 0))))
        _ = node.drain()
    }
    return node
}

extension RaftNode {
    /// Takes the Ready and acknowledges it at once (nothing to persist for real).
    mutating func drain() -> Ready {
        let ready = ready()
        advance()
        return ready
    }

    /// All messages of the next Ready, in order.
    mutating func sentMessages() -> [Message] {
        let ready = drain()
        return ready.messagesToSendNow + ready.messagesAfterPersist
    }
}

func message(from: NodeID, to: NodeID, term: Term, _ body: MessageBody) -> Message {
    Message(from: from, to: to, term: term, body: body)
}

func append(prevIndex: LogIndex, prevTerm: Term, entries: [Entry], commit: LogIndex) -> MessageBody {
    .appendEntries(AppendEntries(prevLogIndex: prevIndex, prevLogTerm: prevTerm, entries: entries, leaderCommit: commit))
}

func entry(_ index: LogIndex, _ term: Term, _ text: String = "x") -> Entry {
    Entry(term: term, index: index, payload: .command(Array(text.utf8)))
}

extension Message {
    var appendResponse: AppendEntriesResponse? {
        if case .appendEntriesResponse(let response) = body { return response }
        return nil
    }
    var voteResponse: RequestVoteResponse? {
        if case .requestVoteResponse(let response) = body { return response }
        return nil
    }
    var voteRequest: RequestVote? {
        if case .requestVote(let request) = body { return request }
        return nil
    }
    var appendRequest: AppendEntries? {
        if case .appendEntries(let append) = body { return append }
        return nil
    }
}

/// Options for scenario clusters; plain Raft unless a test turns features on.
func scenarioOptions(preVote: Bool = true, checkQuorum: Bool = true, _ configure: (inout NodeOptions) -> Void = { _ in }) -> NodeOptions {
    var options = NodeOptions()
    options.preVote = preVote
    options.checkQuorum = checkQuorum
    configure(&options)
    return options
}

func commands(_ node: SimulatedNode) -> [String] {
    node.appliedCommands.map { String(decoding: $0, as: UTF8.self) }
}
