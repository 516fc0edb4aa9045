import Authority
import ClusterHarness
import Crypto
import Foundation
import NIOCore
import NIOSSL
import Node
import X509

// warrant-bench join: GitHub-style RS256 platform tokens -> attested join
// -> X509-SVID on the running 3-node cluster, with the issuer's JWKS served
// from each node's cache (the benchmark counts the provider's fetches).

func runJoinBench(binary: String, clients: Int, seconds: Double) async throws {
    print("join: 3 nodes on loopback, \(clients) clients (\(usesWrk ? "wrk" : "the Swift client")), \(seconds) s per run; GitHub-style RS256 tokens from a local OIDC provider over HTTPS")
    let provider = try TestIssuer(keys: [.rsa2048])
    try await provider.serve()
    defer { Task { await provider.stop() } }
    let directory = temporaryClusterDirectory("join")
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let cluster = try await startReadyCluster(binary: binary, directory: directory)
    let admin = cluster.client
    let yaml = [("content-type", "application/yaml")]
    let issuer = "method: github\nissuer: \(provider.issuer)\nca_pem: |\n" + provider.caPEM.split(separator: "\n").map { "  \($0)" }.joined(separator: "\n") + "\n"
    let rule = """
        issuer: github
        spiffe_id: spiffe://warrant.local/gh/{repository}/{workflow}
        ttl_max_seconds: 600
        conditions:
          repository_owner_id: "1342004"
          repository_id: "72855771"
          ref: {glob: "refs/heads/*"}
          event_name: {not_one_of: [pull_request_target]}
        """
    for (name, body) in [("policy/issuers/github", issuer), ("policy/join/deploy", rule)] {
        let response = try await admin.request(.PUT, "/v1/documents/\(name)", headers: yaml, body: Array(body.utf8))
        guard response.status == .ok else { throw BenchFailure(description: "writing \(name): \(response.text)") }
    }
    let tls = try AdminClient.tlsContext(clusterDirectory: directory)
    let listing = try ClusterListing(directory: directory)
    let endpoints = try listing.members.map { try SocketAddress(ipAddress: "127.0.0.1", port: $0.api.port) }
    let phases = Phases(cluster: cluster, listing: listing, endpoints: endpoints)
    let csrPEM = try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName("bench") },
                                               privateKey: .init(P256.Signing.PrivateKey()), attributes: CertificateSigningRequest.Attributes())
        .serializeAsPEM().pemString
    // Tokens are minted beforehand (RSA signing is the provider's cost, not ours), one per join, each with its own jti.
    let perRun = Int(seconds * 6_000)
    print("minting \(2 * perRun + 2) RS256 tokens (not timed)...")
    let mintStart = ContinuousClock.now
    let minted = try await withThrowingTaskGroup(of: [String].self) { group in
        for _ in 0..<2 {
            group.addTask {
                // Each with its own jti (githubClaims draws one).
                try (0..<(perRun + 1)).map { _ in try provider.mint(provider.githubClaims(audience: "warrant.local", lifetime: 900)) }
            }
        }
        return try await group.reduce(into: [String]()) { $0 += $1 }
    }
    print(String(format: "  %.1f s", mintStart.duration(to: .now).milliseconds / 1000))
    // Warm up: the leader fetches the JWKS once; every later join uses its cache.
    let warm = try await admin.request(.POST, "/v1/join", headers: [("content-type", "application/json")],
                                       body: jsonBytes(["token": minted[0], "csr": csrPEM]))
    guard warm.status == .ok else { throw BenchFailure(description: "the first join failed: \(warm.text)") }
    let fetchesBefore = provider.jwksFetches + provider.discoveryFetches
    // Request bodies are encoded beforehand too: the client shares the machine with the cluster.
    let bodies = minted.map { jsonBytes(["token": $0, "csr": csrPEM]) }
    _ = try await phases.run("join -> X509-SVID, clients on all nodes") { _ in
        try await load(.each(Array(bodies[1...perRun])), to: endpoints, path: "/v1/join", tls: tls, clients: clients, seconds: seconds, directory: directory)
    }
    _ = try await phases.run("join -> X509-SVID, clients on the leader") { leaderEndpoint in
        try await load(.each(Array(bodies[(perRun + 1)...])), to: leaderEndpoint, path: "/v1/join", tls: tls, clients: clients, seconds: seconds,
                       directory: directory)
    }
    print("JWKS and discovery fetches during the timed runs: \(provider.jwksFetches + provider.discoveryFetches - fetchesBefore)")
    // Replays are refused: a token already used gets 403 on every node.
    let replay = try await admin.request(.POST, "/v1/join", headers: [("content-type", "application/json")],
                                         body: jsonBytes(["token": minted[0], "csr": csrPEM]))
    print("replaying the first token: \(replay.status.code) (\(replay.text.contains("token_used") ? "token_used" : replay.text))")
    print("target: at least 4000 joins/s with p99 under 30 ms")

    // warrant exec -- true, as a whole process, in a simulated GitHub Actions job, against `true` alone.
    let caFile = "\(directory)/provider-ca.pem"
    try provider.caPEM.write(toFile: caFile, atomically: true, encoding: .utf8)
    let environment = ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin", "GITHUB_ACTIONS": "true",
                       "ACTIONS_ID_TOKEN_REQUEST_URL": "\(provider.issuer)/actions/token?api-version=2.0",
                       "ACTIONS_ID_TOKEN_REQUEST_TOKEN": provider.actionsRequestToken]
    let leaderPort = try await phases.leader().endpoint[0].port ?? 0
    let execArguments = ["exec", "--endpoint", "127.0.0.1:\(leaderPort)", "--ca-file", "\(directory)/ca.pem",
                         "--audience", "warrant.local", "--token-request-ca", caFile, "--", "true"]
    func timed(_ executable: String, _ arguments: [String]) throws -> (Double, Int32) {
        let run = try Spawned.run(executable, arguments, environment: environment)
        return (run.wallMilliseconds, run.status)
    }
    var plain: [Double] = [], exec: [Double] = []
    var failures = 0
    for _ in 0..<30 {
        plain.append(try timed("/usr/bin/env", ["true"]).0)
        let (ms, status) = try timed(binary, execArguments)
        if status == 0 { exec.append(ms) } else { failures += 1 }
    }
    func median(_ values: [Double]) -> Double { values.isEmpty ? .nan : values.sorted()[values.count / 2] }
    func p90(_ values: [Double]) -> Double { values.isEmpty ? .nan : values.sorted()[min(values.count - 1, values.count * 9 / 10)] }
    print(String(format: "warrant exec -- true (token request, join, files, run, exit), 30 runs: median %.1f ms, p90 %.1f ms; `true` alone: median %.1f ms; added: median %.1f ms (%d failed)",
                 median(exec), p90(exec), median(plain), median(exec) - median(plain), failures))
    print("target: under 100 ms median added to a step")
    await cluster.close()
}
