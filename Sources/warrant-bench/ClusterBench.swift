import ClusterHarness
import Foundation
import NIOCore
import NIOSSL
import Node
import Transport
import X509

// warrant-bench cluster | failover | crash: real `warrant` node processes on
// loopback (see ClusterHarness), driven over HTTPS.

struct BenchFailure: Error, CustomStringConvertible {
    var description: String
}

func temporaryClusterDirectory(_ name: String) -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("warrant-\(name)-\(UUID().uuidString.prefix(8))").path
}

/// Load against the Warrant cluster, then (if a script is given) the same
/// load against a 3-node etcd, one after the other, with the ratio.
func runClusterBench(binary: String, clientCounts: [Int], seconds: Double, etcdScript: String?, skipWarrant: Bool = false,
                     routeToLeader: Bool = false) async throws {
    print("cluster: 3 nodes on loopback, \(seconds) s per run after 1 s warm-up, 256-byte values, clients spread over all nodes, each with one keep-alive connection")
    var warrant: [LoadReport] = []
    if !skipWarrant {
    let directory = temporaryClusterDirectory("bench")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
    guard await cluster.waitForLeader(seconds: 20) != nil, await cluster.waitUntilReady() else {
        await cluster.close()
        throw BenchFailure(description: "the Warrant cluster did not become ready: \(cluster.notReadyReason())")
    }
    for clients in clientCounts {
        let report = try await LoadGenerator.run(.warrant(clusterDirectory: directory, leaderOnly: false), clients: clients, seconds: seconds)
        print("warrant  \(report)")
        warrant.append(report)
    }
    if routeToLeader {
        for clients in clientCounts {
            let report = try await LoadGenerator.run(.warrant(clusterDirectory: directory, leaderOnly: true), clients: clients, seconds: seconds)
            print("warrant  \(report)  (all clients to the leader)")
        }
    }
    await cluster.close()
    }

    guard let etcdScript else { return }
    let endpoints = try (23791...23793).map { try SocketAddress(ipAddress: "127.0.0.1", port: $0) }
    var etcdPlain: [LoadReport] = []
    var etcdTLS: [LoadReport] = []
    for secure in [false, true] {
        let etcdDirectory = temporaryClusterDirectory(secure ? "etcd-tls" : "etcd")
        defer { try? FileManager.default.removeItem(atPath: etcdDirectory) }
        var tls: NIOSSLContext?
        if secure {
            tls = try writeEtcdCertificates(to: "\(etcdDirectory)/tls")
            setenv("ETCD_TLS_DIR", "\(etcdDirectory)/tls", 1)
        } else {
            unsetenv("ETCD_TLS_DIR")
        }
        try runScript(etcdScript, ["up", etcdDirectory])
        do {
            for clients in clientCounts {
                let report = try await LoadGenerator.run(.etcd(endpoints: endpoints, tls: tls), clients: clients, seconds: seconds)
                print("etcd     \(report)\(secure ? "  (mutual TLS)" : "  (plain HTTP)")")
                if secure { etcdTLS.append(report) } else { etcdPlain.append(report) }
            }
        } catch {
            try? runScript(etcdScript, ["down", etcdDirectory])
            throw error
        }
        try runScript(etcdScript, ["down", etcdDirectory])
    }
    unsetenv("ETCD_TLS_DIR")
    guard !warrant.isEmpty else { return }
    print("")
    print("Same run, same load generator, 256-byte values. Warrant uses mutual TLS (clients and peers) and fsyncs every batch;")
    print("etcd 3.4 (Debian) with default durability, first over plain HTTP, then with client and peer mutual TLS.")
    print("clients | warrant w/s | etcd w/s plain / TLS | ratio plain / TLS | warrant p50 / p99 ms | etcd plain p50 / p99 ms | etcd TLS p50 / p99 ms")
    for ((w, e), t) in zip(zip(warrant, etcdPlain), etcdTLS) {
        print(String(format: "%7d | %11.0f | %8.0f / %5.0f | %5.2f / %5.2f | %6.2f / %6.2f | %6.2f / %6.2f | %6.2f / %6.2f", w.clients, w.throughput,
                     e.throughput, t.throughput, w.throughput / e.throughput, w.throughput / t.throughput, w.percentile(0.5), w.percentile(0.99),
                     e.percentile(0.5), e.percentile(0.99), t.percentile(0.5), t.percentile(0.99)))
    }
}

/// A CA, a server certificate for 127.0.0.1 (used by every member, as
/// server and as peer client) and a client certificate, for etcd's TLS
/// run; returns the load generator's client context.
func writeEtcdCertificates(to directory: String) throws -> NIOSSLContext {
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let ca = try ClusterCA.create(clusterID: "etcd-bench")
    let server = try ca.issueNodeIdentity(1, hosts: ["127.0.0.1", "localhost"])
    let client = try ca.issueAdminIdentity(name: "bench")
    func write(_ text: String, _ name: String) throws {
        try text.write(toFile: "\(directory)/\(name)", atomically: true, encoding: .utf8)
    }
    try write(try ca.certificate.serializeAsPEM().pemString + "\n", "ca.pem")
    try write(try server.certificate.serializeAsPEM().pemString + "\n", "server.pem")
    try write(server.privateKey.pemRepresentation + "\n", "server.key")
    try write(try client.certificate.serializeAsPEM().pemString + "\n", "client.pem")
    try write(client.privateKey.pemRepresentation + "\n", "client.key")
    var configuration = TLSConfiguration.makeClientConfiguration()
    configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile("\(directory)/ca.pem"))
    configuration.additionalTrustRoots = []
    configuration.certificateChain = try NIOSSLCertificate.fromPEMFile("\(directory)/client.pem").map { .certificate($0) }
    configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: "\(directory)/client.key", format: .pem))
    return try NIOSSLContext(configuration: configuration)
}

/// Runs a shell script and waits for it (posix_spawn and wait4: the
/// script leaves daemons behind, which Foundation's Process waits on).
func runScript(_ script: String, _ arguments: [String]) throws {
    let run = try Spawned.run("/bin/bash", [script] + arguments, inheritErrors: true)
    guard run.status == 0 else { throw BenchFailure(description: "\(script) \(arguments.joined(separator: " ")) failed (status \(run.status))") }
}

/// Parses and runs `cluster`, `failover` or `crash`; returns the exit status.
func runClusterCommand(_ arguments: [String]) async -> Int32 {
    var options: [String: String] = [:]
    var rest = arguments.dropFirst()
    while let option = rest.popFirst() {
        guard option.hasPrefix("--"), let value = rest.popFirst() else {
            FileHandle.standardError.write(Data("warrant-bench: \(option) needs a value\n".utf8))
            return 2
        }
        options[String(option.dropFirst(2))] = value
    }
    let known: Set<String> = ["warrant-binary", "clients", "seconds", "etcd-script", "kills", "writers", "seed", "only", "also-leader-only", "phases"]
    if let unknown = options.keys.first(where: { !known.contains($0) }) {
        FileHandle.standardError.write(Data("warrant-bench: unknown option --\(unknown)\n".utf8))
        return 2
    }
    guard let binary = options["warrant-binary"], FileManager.default.isExecutableFile(atPath: binary) else {
        FileHandle.standardError.write(Data("warrant-bench: --warrant-binary must name the built warrant executable\n".utf8))
        return 2
    }
    func integer(_ name: String, _ fallback: Int, _ range: ClosedRange<Int>) -> Int? {
        guard let text = options[name] else { return fallback }
        guard let value = Int(text), range.contains(value) else {
            FileHandle.standardError.write(Data("warrant-bench: --\(name) must be in \(range)\n".utf8))
            return nil
        }
        return value
    }
    do {
        switch arguments[0] {
        case "issue", "join":
            guard let clients = integer("clients", 64, 1...1024) else { return 2 }
            guard let seconds = Double(options["seconds"] ?? "5"), seconds > 0, seconds <= 60 else {
                FileHandle.standardError.write(Data("warrant-bench: --seconds must be in (0, 60]\n".utf8))
                return 2
            }
            if arguments[0] == "issue" {
                let phases = (options["phases"] ?? issuePhases.joined(separator: ",")).split(separator: ",").map(String.init)
                guard !phases.isEmpty, phases.allSatisfy(issuePhases.contains) else {
                    FileHandle.standardError.write(Data("warrant-bench: --phases takes some of \(issuePhases.joined(separator: ","))\n".utf8))
                    return 2
                }
                try await runIssueBench(binary: binary, clients: clients, seconds: seconds, phases: Set(phases))
            } else {
                try await runJoinBench(binary: binary, clients: clients, seconds: seconds)
            }
            return 0
        case "cluster":
            let clients = (options["clients"] ?? "1,64").split(separator: ",").compactMap { Int($0) }
            guard !clients.isEmpty, clients.allSatisfy({ (1...1024).contains($0) }) else {
                FileHandle.standardError.write(Data("warrant-bench: --clients takes counts in 1...1024, like 1,64\n".utf8))
                return 2
            }
            guard let seconds = Double(options["seconds"] ?? "10"), seconds > 0, seconds <= 600 else {
                FileHandle.standardError.write(Data("warrant-bench: --seconds must be in (0, 600]\n".utf8))
                return 2
            }
            try await runClusterBench(binary: binary, clientCounts: clients, seconds: seconds, etcdScript: options["etcd-script"],
                                      skipWarrant: options["only"] == "etcd", routeToLeader: options["also-leader-only"] == "yes")
            return 0
        default:
            let leaderOnly = arguments[0] == "failover"
            guard let kills = integer("kills", leaderOnly ? 20 : 50, 1...1000), let writers = integer("writers", 4, 1...64) else { return 2 }
            let seed = UInt64(options["seed"] ?? "") ?? UInt64.random(in: 1...UInt64.max)
            if !leaderOnly { print("crash: seed \(seed)") }
            let result = try await KillLoop.run(binary: binary, kills: kills, leaderOnly: leaderOnly, writers: writers, seed: seed, log: { print($0) })
            return result.passed ? 0 : 1
        }
    } catch {
        FileHandle.standardError.write(Data("warrant-bench: \(error)\n".utf8))
        return 1
    }
}
