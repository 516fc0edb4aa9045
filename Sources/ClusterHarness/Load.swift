import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Node
import Synchronization

/// Latencies of one run, and what they add up to.
public struct LoadReport: Sendable, CustomStringConvertible {
    public var clients: Int
    public var seconds: Double
    public var succeeded: Int
    public var failed: Int
    public var latencies: [Duration]

    public var throughput: Double { Double(succeeded) / seconds }
    public func percentile(_ p: Double) -> Double {
        guard !latencies.isEmpty else { return .nan }
        let sorted = latencies.sorted()
        let index = min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)
        return sorted[max(0, index)].milliseconds
    }
    public var maxMilliseconds: Double { latencies.max()?.milliseconds ?? .nan }

    public var description: String {
        String(format: "%3d clients  %8.0f writes/s  p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  (%d ok, %d failed)",
               clients, throughput, percentile(0.5), percentile(0.99), maxMilliseconds, succeeded, failed)
    }
}

extension Duration {
    public var milliseconds: Double { Double(components.seconds) * 1000 + Double(components.attoseconds) / 1e15 }
}

/// Where the load goes: Warrant's document API (mutual TLS, admin
/// certificate) or etcd's v3 JSON gateway (plain HTTP), the same value
/// size and concurrency either way.
public enum LoadTarget: Sendable {
    /// `leaderOnly`: every client talks to the leader (found through the
    /// status endpoint), as a leader-aware client would; otherwise clients
    /// are spread over all nodes and followers forward.
    case warrant(clusterDirectory: String, leaderOnly: Bool)
    /// With `tls`, etcd is reached over mutual TLS (its client-cert-auth).
    case etcd(endpoints: [SocketAddress], tls: NIOSSLContext?)
}

public enum LoadGenerator {
    /// `clients` concurrent writers, each with its own keep-alive connection
    /// to endpoint (client mod endpoints), writing `valueBytes`-byte values
    /// one after another for `seconds` after `warmup`.
    public static func run(_ target: LoadTarget, clients: Int, seconds: Double, warmup: Double = 1, valueBytes: Int = 256,
                           keys: Int = 10_000) async throws -> LoadReport {
        precondition(clients > 0 && seconds > 0 && valueBytes >= 16)
        let writer = try await Writer(target)
        let start = ContinuousClock.now
        let measureFrom = start.advanced(by: .milliseconds(Int(warmup * 1000)))
        let end = measureFrom.advanced(by: .milliseconds(Int(seconds * 1000)))
        let results = try await withThrowingTaskGroup(of: (Int, Int, [Duration]).self) { group in
            for client in 0..<clients {
                group.addTask {
                    var ok = 0, failed = 0, latencies: [Duration] = []
                    var connection: HTTPConnection?
                    var sequence = 0
                    while ContinuousClock.now < end {
                        sequence += 1
                        let began = ContinuousClock.now
                        let success: Bool
                        do {
                            if connection == nil || !(connection!.isActive) { connection = try await writer.connect(client) }
                            success = try await writer.put(connection!, key: "k\((client * 7919 + sequence) % keys)", valueBytes: valueBytes, client: client, sequence: sequence)
                        } catch {
                            connection = nil
                            success = false
                            try? await Task.sleep(for: .milliseconds(10))
                        }
                        let finished = ContinuousClock.now
                        guard began >= measureFrom, finished <= end else { continue }
                        if success {
                            ok += 1
                            latencies.append(began.duration(to: finished))
                        } else {
                            failed += 1
                        }
                    }
                    await connection?.close()
                    return (ok, failed, latencies)
                }
            }
            var total = (0, 0, [Duration]())
            for try await (ok, failed, latencies) in group {
                total.0 += ok
                total.1 += failed
                total.2 += latencies
            }
            return total
        }
        return LoadReport(clients: clients, seconds: seconds, succeeded: results.0, failed: results.1, latencies: results.2)
    }

    private struct Writer: Sendable {
        let endpoints: [SocketAddress]
        let tls: NIOSSLContext?
        let isEtcd: Bool

        init(_ target: LoadTarget) async throws {
            switch target {
            case .warrant(let directory, let leaderOnly):
                let client = try AdminClient(clusterDirectory: directory)
                if leaderOnly {
                    let response = try await client.request(.GET, "/v1/cluster/status")
                    let leader = try APIJSON.decode(ClusterStatusBody.self, from: response.body).leader
                    let listing = try ClusterListing(directory: directory)
                    guard let index = listing.members.firstIndex(where: { $0.id == leader }) else {
                        throw HarnessFailure(description: "no leader known to aim the load at")
                    }
                    endpoints = [client.endpoints[index]]
                } else {
                    endpoints = client.endpoints
                }
                await client.closeAll()
                tls = try AdminClient.tlsContext(clusterDirectory: directory)
                isEtcd = false
            case .etcd(let endpoints, let tls):
                self.endpoints = endpoints
                self.tls = tls
                isEtcd = true
            }
        }

        func connect(_ client: Int) async throws -> HTTPConnection {
            try await HTTPConnection.connect(to: endpoints[client % endpoints.count], tls: tls)
        }

        func put(_ connection: HTTPConnection, key: String, valueBytes: Int, client: Int, sequence: Int) async throws -> Bool {
            if isEtcd {
                let value = Data(Self.value(valueBytes, client, sequence).utf8).base64EncodedString()
                let body = "{\"key\":\"\(Data("bench/\(key)".utf8).base64EncodedString())\",\"value\":\"\(value)\"}"
                let response = try await connection.request(.POST, "/v3/kv/put", headers: [("content-type", "application/json")], body: Array(body.utf8))
                return response.status == .ok
            } else {
                let response = try await connection.request(.PUT, "/v1/documents/bench/\(key)", headers: [("content-type", "application/json")],
                                                            body: Array(Self.value(valueBytes, client, sequence).utf8))
                return response.status == .ok
            }
        }

        /// A JSON document of exactly `bytes` bytes.
        static func value(_ bytes: Int, _ client: Int, _ sequence: Int) -> String {
            let head = "{\"c\":\(client),\"s\":\(sequence),\"p\":\""
            let tail = "\"}"
            return head + String(repeating: "x", count: max(0, bytes - head.utf8.count - tail.utf8.count)) + tail
        }
    }
}
