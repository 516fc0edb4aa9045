import Foundation
import NIOCore
import NIOHTTP1
import Node
import Synchronization

/// Writers that keep every acknowledged write, so a test can check that
/// none is lost after crashes: each write creates a fresh document whose
/// content names it, through any node (failing over between them).
public final class AckedWriters: Sendable {
    private let client: AdminClient
    private let acknowledged = Mutex<[String: String]>([:])
    private let successTimes = Mutex<[ContinuousClock.Instant]>([])
    private let failures = Atomic<Int>(0)

    public init(client: AdminClient) {
        self.client = client
    }

    public var acknowledgedCount: Int { acknowledged.withLock { $0.count } }
    public var failureCount: Int { failures.load(ordering: .relaxed) }

    /// The first success that began after `instant`.
    public func firstSuccess(after instant: ContinuousClock.Instant) -> ContinuousClock.Instant? {
        successTimes.withLock { $0.first { $0 > instant } }
    }

    /// Runs `writers` loops until `stop` says so (checked between writes).
    public func run(writers: Int, prefix: String, stop: @escaping @Sendable () -> Bool) async {
        await withTaskGroup(of: Void.self) { group in
            for writer in 0..<writers {
                group.addTask {
                    var sequence = 0
                    while !stop() {
                        sequence += 1
                        let name = "\(prefix)/w\(writer)-\(sequence)"
                        let content = "{\"writer\":\(writer),\"sequence\":\(sequence)}"
                        let began = ContinuousClock.now
                        let response = try? await self.client.request(.PUT, "/v1/documents/\(name)?expected_version=0",
                                                                      headers: [("content-type", "application/json")], body: Array(content.utf8),
                                                                      timeout: .seconds(2), startingAt: writer)
                        if response?.status == .ok {
                            self.acknowledged.withLock { $0[name] = content }
                            self.successTimes.withLock { $0.append(began) }
                        } else {
                            self.failures.add(1, ordering: .relaxed)
                            try? await Task.sleep(for: .milliseconds(5))
                        }
                    }
                }
            }
        }
    }

    /// Names of acknowledged writes that a linearizable read does not
    /// return with the acknowledged content (should be empty).
    public func lostWrites() async -> [String] {
        var lost: [String] = []
        for (name, content) in acknowledged.withLock({ $0 }) {
            var found = false
            for _ in 0..<20 { // a node may be briefly without a leader
                guard let response = try? await client.request(.GET, "/v1/documents/\(name)", timeout: .seconds(2)) else { continue }
                if response.status == .ok, let body = try? APIJSON.decode(DocumentBody.self, from: response.body) {
                    found = body.content == content
                    break
                }
                if response.status == .notFound { break }
                try? await Task.sleep(for: .milliseconds(50))
            }
            if !found { lost.append(name) }
        }
        return lost.sorted()
    }
}
