import Chaos
import ClusterHarness
import Foundation
import NIOCore
import NIOHTTP1
import Node
import Synchronization

/// Everything the clients did, shared by the workload tasks.
final class Recorder: Sendable {
    private let operations = Mutex<[ClientOperation]>([])
    private let nextID = Atomic<Int>(0)
    let clock: RunClock

    init(clock: RunClock) { self.clock = clock }

    func newID() -> Int { nextID.wrappingAdd(1, ordering: .relaxed).oldValue }
    func record(_ operation: ClientOperation) { operations.withLock { $0.append(operation) } }
    var history: [ClientOperation] { operations.withLock { $0 }.sorted { $0.id < $1.id } }
}

/// A request's answer as the history records it.
enum Answer {
    case response(HTTPClientResponse)
    case error(String)
}

func send(_ client: AdminClient, at node: Int, _ method: HTTPMethod, _ uri: String, body: [UInt8] = [], timeout: TimeAmount = .seconds(2)) async -> Answer {
    do {
        return .response(try await client.request(at: node, method, uri, headers: [("content-type", "application/json")], body: body, timeout: timeout))
    } catch {
        return .error("\(error)")
    }
}

/// Compare-and-set registers: `clients` loops over `keys` documents
/// reading (linearizably), writing and compare-and-setting, each through
/// one node and moving to the next when an answer is unknown.
struct RegisterWorkload {
    static let keys = 3

    static func key(_ n: Int) -> String { "chaos/register/\(n)" }

    static func run(client: AdminClient, nodes: Int, clients: Int, recorder: Recorder, seed: UInt64, until deadline: ContinuousClock.Instant) async {
        await withTaskGroup(of: Void.self) { group in
            for number in 0..<clients {
                group.addTask {
                    var random = ChaosRandom(seed: seed &+ UInt64(number) &* 7919)
                    var node = number % nodes
                    var sequence = 0
                    var seen = [UInt64](repeating: 0, count: keys)
                    var refresh: Int?
                    while ContinuousClock.now < deadline {
                        sequence += 1
                        let roll = Int.random(in: 0..<10, using: &random)
                        let drawnKey = Int.random(in: 0..<keys, using: &random)
                        // After a refused compare-and-set, read that key to learn its version.
                        let k = refresh ?? drawnKey
                        let kind: ClientOperation.Kind = refresh != nil ? .read : (roll < 4 ? .read : (roll < 7 ? .write : .cas))
                        refresh = nil
                        let value = number * 1_000_000 + sequence
                        var operation = ClientOperation(id: recorder.newID(), client: number, key: key(k), kind: kind,
                                                  value: kind == .read ? nil : value, expectedVersion: kind == .cas ? seen[k] : nil,
                                                  invoked: recorder.clock.nanos, outcome: .unknown, node: UInt64(node + 1))
                        let answer: Answer
                        switch kind {
                        case .read: answer = await send(client, at: node, .GET, "/v1/documents/\(key(k))")
                        case .write: answer = await send(client, at: node, .PUT, "/v1/documents/\(key(k))", body: Array("{\"v\":\(value)}".utf8))
                        case .cas: answer = await send(client, at: node, .PUT, "/v1/documents/\(key(k))?expected_version=\(seen[k])", body: Array("{\"v\":\(value)}".utf8))
                        }
                        let completed = recorder.clock.nanos
                        judge(&operation, answer, completed: completed)
                        if operation.outcome == .ok, let version = operation.observedVersion { seen[k] = version }
                        if operation.conflict == true { refresh = k }
                        if operation.outcome != .ok { node = (node + 1) % nodes }
                        recorder.record(operation)
                    }
                }
            }
        }
    }

    /// A 503 whose code says the write surely was not applied (the
    /// driver's `surelyNotApplied`: no leader took it, leadership changed
    /// before it committed, too many waiting, the core or a stopping node
    /// refused it). Recorded as failed, so a node that says so of a write
    /// it did apply is caught.
    static func definitelyNotProposed(_ body: [String: Any]) -> Bool {
        ["not_leader", "no_leader", "leadership_changed", "overloaded", "stopping", "raft_refused"]
            .contains((body["error"] as? [String: Any])?["code"] as? String ?? "")
    }

    /// The version a refused compare-and-set found: "is at version N", or
    /// 0 for a document that "does not exist".
    static func conflictVersion(_ body: [String: Any]) -> UInt64? {
        let message = (body["error"] as? [String: Any])?["message"] as? String ?? ""
        if let match = message.firstMatch(of: /is at version (\d+)/) { return UInt64(match.output.1) }
        return message.contains("does not exist") ? 0 : nil
    }

    /// Turns an answer into an outcome: 200 is ok (with what it saw); a
    /// 409 version conflict or a 404 on compare-and-set certainly did not
    /// write; anything else (5xx, timeouts, lost connections) is unknown.
    static func judge(_ operation: inout ClientOperation, _ answer: Answer, completed: UInt64) {
        guard case .response(let response) = answer else {
            if case .error(let text) = answer {
                operation.error = String(text.prefix(200))
                // Never sent: the connection was refused.
                if text.contains("Connection refused") {
                    operation.outcome = .fail
                    operation.completed = completed
                }
            }
            return
        }
        let body = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]) ?? [:]
        switch (operation.kind, response.status.code) {
        case (.read, 200):
            operation.outcome = .ok
            operation.observedVersion = (body["version"] as? NSNumber)?.uint64Value
            let content = (body["content"] as? String).flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            operation.observedValue = (content?["v"] as? NSNumber)?.intValue
        case (.read, 404):
            operation.outcome = .ok
            operation.observedVersion = 0
        case (.write, 200), (.cas, 200):
            operation.outcome = .ok
            operation.observedVersion = (body["version"] as? NSNumber)?.uint64Value
        case (.cas, 409), (.cas, 404):
            operation.outcome = .ok
            operation.conflict = true
            operation.observedVersion = conflictVersion(body)
        case (_, 503) where definitelyNotProposed(body):
            operation.outcome = .fail
            operation.error = "\(response.status.code) \(String(response.text.prefix(160)))"
        default:
            operation.error = "\(response.status.code) \(String(response.text.prefix(160)))"
            return
        }
        operation.completed = completed
    }
}

/// Identities issued under faults: join tokens made beforehand, exchanged
/// for X509-SVIDs by `clients` loops; an unknown answer is retried on the
/// next node with the same idempotency key.
final class IssuanceWorkload: Sendable {
    struct Issued: Sendable, Codable {
        var serial: String
        var certificate: String
        var node: UInt64
    }

    let acknowledged = Mutex<[Issued]>([])
    let attempts = Atomic<Int>(0)
    let unknown = Atomic<Int>(0)

    static func makeTokens(_ client: AdminClient, count: Int, prefix: String) async throws -> [String] {
        var tokens: [String] = []
        for n in 0..<count {
            let response = try await client.request(.POST, "/v1/tokens", headers: [("content-type", "application/json")],
                                                    body: Array("{\"spiffe_id\":\"spiffe://warrant.local/chaos/\(prefix)/\(n)\",\"ttl_seconds\":3600}".utf8))
            guard let token = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["token"] as? String else {
                throw ChaosError("making join tokens failed: \(response.status.code) \(response.text)")
            }
            tokens.append(token)
        }
        return tokens
    }

    func run(client: AdminClient, nodes: Int, clients: Int, tokens: [String], csr: String, until deadline: ContinuousClock.Instant) async {
        let queue = TokenQueue(tokens)
        await withTaskGroup(of: Void.self) { group in
            for number in 0..<clients {
                group.addTask {
                    var node = number % nodes
                    while ContinuousClock.now < deadline, let token = queue.next() {
                        let key = UUID().uuidString
                        let body = (try? JSONSerialization.data(withJSONObject: ["token": token, "csr": csr, "idempotency_key": key])) ?? Data()
                        // Unknown answers are retried (same key) until one is definite or time is up.
                        while ContinuousClock.now < deadline.advanced(by: .seconds(20)) {
                            self.attempts.wrappingAdd(1, ordering: .relaxed)
                            let answer = await send(client, at: node, .POST, "/v1/svid/x509", body: Array(body))
                            if case .response(let response) = answer, response.status.code < 500 {
                                if response.status == .ok, let object = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
                                   let serial = object["serial"] as? String, let certificate = object["certificate"] as? String {
                                    self.acknowledged.withLock { $0.append(Issued(serial: serial, certificate: certificate, node: UInt64(node + 1))) }
                                }
                                break
                            }
                            self.unknown.wrappingAdd(1, ordering: .relaxed)
                            node = (node + 1) % nodes
                            try? await Task.sleep(for: .milliseconds(100))
                        }
                    }
                }
            }
        }
    }
}

/// Tokens handed out to concurrent clients, each once.
final class TokenQueue: Sendable {
    private let items: Mutex<ArraySlice<String>>
    init(_ tokens: [String]) { items = Mutex(tokens[...]) }
    func next() -> String? { items.withLock { $0.popFirst() } }
}

/// One-time tokens and platform tokens presented to every node at the
/// same moment: each may succeed at most once.
final class ReplayWorkload: Sendable {
    struct Race: Sendable, Codable {
        var kind: String
        var successes: Int
        var statuses: [String]
    }

    let races = Mutex<[Race]>([])
    let serials = Mutex<[String]>([])

    func race(client: AdminClient, nodes: Int, kind: String, path: String, body: [UInt8]) async {
        let answers = await withTaskGroup(of: Answer.self) { group in
            for node in 0..<nodes { group.addTask { await send(client, at: node, .POST, path, body: body, timeout: .seconds(3)) } }
            return await group.reduce(into: [Answer]()) { $0.append($1) }
        }
        var successes = 0
        var statuses: [String] = []
        for answer in answers {
            switch answer {
            case .response(let response):
                statuses.append(String(response.status.code))
                if response.status == .ok {
                    successes += 1
                    if let serial = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["serial"] as? String {
                        serials.withLock { $0.append(serial) }
                    }
                }
            case .error: statuses.append("error")
            }
        }
        races.withLock { $0.append(Race(kind: kind, successes: successes, statuses: statuses)) }
    }
}
