import Chaos
import ClusterHarness
import Crypto
import Foundation
import Node
import X509

// warrant-chaos: real node processes on loopback, every peer link through
// a fault-injecting proxy, a seeded nemesis, workloads recorded as a
// history, checkers, and a report directory. Exit 0: every checker passed;
// 1: a violation; 2: the harness could not run.

let usage = """
warrant-chaos: the chaos suite (see chaos/README.md).

USAGE
  warrant-chaos --warrant-binary PATH [--scenario NAME|FILE] [--quick] [--nodes 3|5]
                [--duration SECONDS] [--seed N] [--clients N] [--report DIR]
                [--planted-bug stale-reads|acknowledge-before-commit|node-crash[,...]]

  --scenario   a file in chaos/scenarios/ (default: quick)
  --quick      the quick scenario, as CI runs it (under 3 minutes)
  --nodes      override the scenario's node count (3 or 5)
  --duration   override how long faults are injected (seconds)
  --seed       the seed of the fault schedule and the workloads (default: random, printed)
  --report     the report directory (default: chaos/reports/<time>-<scenario>-seed<N>)
  --check-history FILE  check a history a run wrote (its report's history.jsonl) for
               linearizability again, and nothing else (no cluster, no binary needed)
  --planted-bug  run nodes with a deliberate bug (debug builds only) to see the harness catch it:
               stale-reads: reads served without ReadIndex; acknowledge-before-commit: writes
               answered before they commit; node-crash: the harness kills a running node 2 s in
"""

struct Options {
    var binary = ""
    var scenario = "quick"
    var nodes: Int?
    var duration: Double?
    var seed = UInt64.random(in: 1...999_999)
    var clients = 6
    var report: String?
    var plantedBug: String?
    var checkHistory: String?

    init(_ arguments: [String]) throws {
        var rest = arguments[...]
        while let option = rest.popFirst() {
            if option == "--quick" { scenario = "quick"; continue }
            if option == "--help" || option == "-h" { print(usage); exit(0) }
            guard let value = rest.popFirst() else { throw ChaosError("\(option) needs a value") }
            switch option {
            case "--warrant-binary": binary = value
            case "--scenario": scenario = value
            case "--nodes":
                guard let n = Int(value), [3, 5].contains(n) else { throw ChaosError("--nodes must be 3 or 5") }
                nodes = n
            case "--duration":
                guard let seconds = Double(value), (5...7_200).contains(seconds) else { throw ChaosError("--duration must be 5...7200 seconds") }
                duration = seconds
            case "--seed":
                guard let parsed = UInt64(value) else { throw ChaosError("--seed must be a non-negative integer") }
                seed = parsed
            case "--clients":
                guard let n = Int(value), (1...64).contains(n) else { throw ChaosError("--clients must be 1...64") }
                clients = n
            case "--report": report = value
            case "--planted-bug": plantedBug = value
            case "--check-history": checkHistory = value
            default: throw ChaosError("unknown option \(option)")
            }
        }
        if checkHistory != nil { return }
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw ChaosError("--warrant-binary must name the built warrant executable") }
    }
}

final class Log: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func callAsFunction(_ line: String) {
        lock.lock()
        lines.append(line)
        lock.unlock()
        FileHandle.standardOutput.write(Data((line + "\n").utf8))
    }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}

func makeCSR() throws -> String {
    try CertificateSigningRequest(version: .v1, subject: try DistinguishedName { CommonName("chaos") },
                                  privateKey: .init(P256.Signing.PrivateKey()), attributes: CertificateSigningRequest.Attributes())
        .serializeAsPEM().pemString
}

func run(_ options: Options) async throws -> Int32 {
    var scenario = try Scenario.load(options.scenario)
    if let nodes = options.nodes { scenario.nodes = nodes }
    if let duration = options.duration { scenario.durationSeconds = duration }
    let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
    let reportDirectory = options.report ?? "chaos/reports/\(stamp)-\(scenario.name)-seed\(options.seed)"
    let log = Log()
    log("chaos: scenario \(scenario.name) (\(scenario.nodes) nodes, \(Int(scenario.durationSeconds)) s of faults: \(scenario.faults.map(\.rawValue).joined(separator: ", "))), seed \(options.seed)"
        + (options.plantedBug.map { ", planted bug \($0)" } ?? ""))
    let clusterDirectory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-chaos-\(UUID().uuidString.prefix(8))").path
    defer { try? FileManager.default.removeItem(atPath: clusterDirectory) }
    // "node-crash" is the harness's own: a node killed behind the nemesis's
    // back (the processes check must see it); the others go to the nodes.
    let plantedBugs = Set((options.plantedBug ?? "").split(separator: ",").map(String.init))
    let nodeBugs = plantedBugs.subtracting(["node-crash"]).sorted()
    let environment = nodeBugs.isEmpty ? [:] : ["WARRANT_PLANTED_BUG": nodeBugs.joined(separator: ",")]
    let chaos = try await ChaosCluster.start(binary: options.binary, nodes: scenario.nodes, directory: clusterDirectory, environment: environment)
    let cluster = chaos.cluster
    // Generous: a test run may start this while other suites keep both
    // cores and the disk busy.
    guard await cluster.waitForLeader(seconds: 60) != nil, await cluster.waitUntilReady(seconds: 30) else {
        await chaos.close()
        // The directory goes with this process: what the nodes said, here.
        for id in 1...scenario.nodes {
            let lines = ((try? String(contentsOfFile: "\(clusterDirectory)/node-\(id)/log", encoding: .utf8)) ?? "").split(separator: "\n")
            log("  node \(id), last \(min(lines.count, 25)) of \(lines.count) log lines:")
            for line in lines.suffix(25) { log("    " + line) }
        }
        throw ChaosError("the cluster did not become ready (no leader within 60 s, or not ready 30 s after)")
    }
    let client = cluster.client
    // Attested join needs an issuer: a local OIDC provider over HTTPS, and one rule.
    // A failure setting up stops the nodes (they would outlive this process).
    let provider: TestIssuer, csr: String, issuanceTokens: [String], raceTokens: [String]
    do {
        (provider, csr, issuanceTokens, raceTokens) = try await prepare(client, scenario: scenario)
    } catch {
        await chaos.close()
        throw error
    }
    log("cluster ready in \(clusterDirectory); \(issuanceTokens.count + raceTokens.count) join tokens made; running workloads and faults")

    let clock = RunClock()
    log("time 0 of this run is \(Date().formatted(NodeLog.timeFormat)) (node logs are in wall-clock UTC)")
    let recorder = Recorder(clock: clock)
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int(scenario.durationSeconds * 1000)))
    // The last fault may start just before the deadline: the clients keep going until it has healed.
    let workloadDeadline = deadline.advanced(by: .milliseconds(Int((scenario.holdSeconds.upperBound + scenario.calmSeconds.upperBound) * 1000)))
    let nemesis = Nemesis(chaos: chaos, scenario: scenario, seed: options.seed, clock: clock) { log($0) }
    let issuance = IssuanceWorkload()
    let replays = ReplayWorkload()
    let nodes = scenario.nodes
    async let registers: Void = RegisterWorkload.run(client: client, nodes: nodes, clients: options.clients, recorder: recorder, seed: options.seed,
                                                     until: workloadDeadline)
    async let issuing: Void = issuance.run(client: client, nodes: nodes, clients: 2, tokens: issuanceTokens, csr: csr, until: workloadDeadline)
    async let racing: Void = {
        var index = 0
        while ContinuousClock.now < workloadDeadline {
            if index % 2 == 0, index / 2 < raceTokens.count {
                let body = (try? JSONSerialization.data(withJSONObject: ["token": raceTokens[index / 2], "csr": csr])) ?? Data()
                await replays.race(client: client, nodes: nodes, kind: "join token", path: "/v1/svid/x509", body: Array(body))
            } else if let token = try? provider.mint(provider.githubClaims(audience: "warrant.local", lifetime: 600)) {
                let body = (try? JSONSerialization.data(withJSONObject: ["token": token, "csr": csr])) ?? Data()
                await replays.race(client: client, nodes: nodes, kind: "platform token", path: "/v1/join", body: Array(body))
            }
            index += 1
            try? await Task.sleep(for: .milliseconds(1_500))
        }
    }()
    // A node process that ends without the nemesis ending it (a crash, or a
    // node that could not start under a fault's settings) fails the run.
    let watcher = Task {
        var exits: [String] = []
        var ended: Set<UInt64> = []
        while !Task.isCancelled {
            let now = cluster.exitedOnTheirOwn()
            for (id, tail) in now where !ended.contains(id) {
                let line = String(format: "%7.1fs  node %llu ended on its own; its log ends: ", clock.seconds, id)
                    + tail.split(separator: "\n").suffix(3).joined(separator: " | ")
                exits.append(line)
                log(line)
            }
            ended = Set(now.map(\.id))
            try? await Task.sleep(for: .milliseconds(250))
        }
        return exits
    }
    if plantedBugs.contains("node-crash") {
        Task {
            // A running node: the nemesis may have just killed the one picked first.
            try? await Task.sleep(for: .seconds(2))
            for _ in 0..<50 {
                if let id = chaos.nodes.reversed().first(where: { cluster.processID(of: $0) != nil }), let pid = cluster.processID(of: id) {
                    kill(pid, SIGKILL)
                    log(String(format: "%7.1fs  planted node-crash: node %llu SIGKILLed behind the nemesis's back", clock.seconds, id))
                    return
                }
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
    }
    await nemesis.run(until: deadline)
    _ = await (registers, issuing, racing)
    let workloadEnd = clock.seconds
    nemesis.healAll()
    log(String(format: "%7.1fs  faults over; every link healed, every node running; waiting for the cluster to settle", clock.seconds))
    // Recovery is judged: with every fault healed, a leader and every node
    // ready within a minute. Without it, the checks that need the cluster
    // cannot run; the history is still checked and the report written.
    let led = await cluster.waitForLeader(seconds: 60) != nil
    let recovered = led ? await cluster.waitUntilReady(seconds: 60) : false
    var unread: [String] = []
    if recovered {
        // Final reads of every register, once healed: a lost write shows here.
        for k in 0..<RegisterWorkload.keys {
            var operation = ClientOperation(id: recorder.newID(), client: -1, key: RegisterWorkload.key(k), kind: .read, invoked: clock.nanos, outcome: .unknown, node: 1)
            for attempt in 0..<20 {
                let answer = await send(client, at: attempt % nodes, .GET, "/v1/documents/\(RegisterWorkload.key(k))", timeout: .seconds(5))
                RegisterWorkload.judge(&operation, answer, completed: clock.nanos)
                if operation.outcome == .ok { break }
                try? await Task.sleep(for: .milliseconds(250))
            }
            if operation.outcome != .ok { unread.append("\(RegisterWorkload.key(k)): \(operation.error ?? "no answer")") }
            recorder.record(operation)
        }
    }
    let history = recorder.history
    var checks: [CheckResult] = []
    if !recovered {
        checks.append(CheckResult(name: "recovery", passed: false, verdict: "the cluster did not recover within 60 s of the heal",
                                  details: cluster.notReadyReason().split(separator: "\n").map(String.init)))
    }
    if !unread.isEmpty {
        checks.append(CheckResult(name: "final reads", passed: false, verdict: "registers not read after the heal (20 tries each)", details: unread))
    }
    checks.append(Checks.linearizability(history))
    if recovered {
        checks.append(await Checks.issuance(client, nodes: nodes, acknowledged: issuance.acknowledged.withLock { $0 },
                                            raced: replays.serials.withLock { $0 }))
    }
    checks.append(Checks.replays(replays.races.withLock { $0 }))
    if recovered { checks.append(await Checks.convergence(cluster)) }
    checks.append(Checks.availability(history, timeline: nemesis.timeline, workloadEnd: workloadEnd).0)
    watcher.cancel()
    var ownExits = await watcher.value
    // Crashes a heal restarted before the watcher looked.
    let seen = Set(ownExits.compactMap { $0.firstMatch(of: /node (\d+) ended on its own/).flatMap { UInt64($0.output.1) } })
    for (id, tail) in cluster.restartedAfterEndingOnTheirOwn where !seen.contains(id) {
        ownExits.append("node \(id) ended on its own and was restarted at a heal; its log then ended: " + tail.split(separator: "\n").suffix(3).joined(separator: " | "))
    }
    checks.append(CheckResult(name: "processes", passed: ownExits.isEmpty,
                              verdict: ownExits.isEmpty ? "no node process ended on its own" : "\(ownExits.count) node process(es) ended on their own",
                              details: ownExits))
    await provider.stop()
    await chaos.close()
    for check in checks { for line in check.lines { log(line) } }
    let failed = checks.filter { !$0.passed }.map(\.name)
    let verdict = failed.isEmpty ? "PASS" : "FAIL (\(failed.joined(separator: ", ")))"
    try Report.write(to: reportDirectory, scenario: scenario, seed: options.seed, history: history, timeline: nemesis.timeline, checks: checks,
                     verdict: verdict, log: log.all)
    // The cluster directory goes with this process; what the nodes said stays with the report.
    for node in ((try? FileManager.default.contentsOfDirectory(atPath: clusterDirectory)) ?? []) where node.hasPrefix("node-") {
        try? FileManager.default.copyItem(atPath: "\(clusterDirectory)/\(node)/log", toPath: "\(reportDirectory)/\(node).log")
    }
    print("report: \(reportDirectory)/report.html")
    print("chaos: \(verdict) scenario=\(scenario.name) seed=\(options.seed)")
    return failed.isEmpty ? 0 : 1
}

/// The issuer and rule for attested joins, a CSR and the join tokens.
func prepare(_ client: AdminClient, scenario: Scenario) async throws -> (TestIssuer, String, [String], [String]) {
    let provider = try TestIssuer(keys: [.rsa2048])
    try await provider.serve()
    let issuerYAML = "method: github\nissuer: \(provider.issuer)\nca_pem: |\n" + provider.caPEM.split(separator: "\n").map { "  \($0)" }.joined(separator: "\n") + "\n"
    let ruleYAML = "issuer: github\nspiffe_id: spiffe://warrant.local/gh/{repository}/{workflow}\nconditions:\n  repository_owner_id: \"1342004\"\n  event_name: push\n"
    for (name, body) in [("policy/issuers/github", issuerYAML), ("policy/join/chaos", ruleYAML)] {
        let response = try await client.request(.PUT, "/v1/documents/\(name)", headers: [("content-type", "application/yaml")], body: Array(body.utf8))
        guard response.status == .ok else { throw ChaosError("writing \(name): \(response.text)") }
    }
    let csr = try makeCSR()
    let issuanceTokens = try await IssuanceWorkload.makeTokens(client, count: min(800, Int(scenario.durationSeconds * 6)), prefix: "issue")
    let raceTokens = try await IssuanceWorkload.makeTokens(client, count: Int(scenario.durationSeconds / 3) + 1, prefix: "race")
    return (provider, csr, issuanceTokens, raceTokens)
}

/// `--check-history`: the linearizability checker alone, on a saved history.
func checkHistory(_ path: String) throws -> Int32 {
    let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
    guard size <= 1 << 30 else { throw ChaosError("\(path) is larger than 1 GiB") }
    let history: [ClientOperation]
    do {
        history = try HistoryFile.decode(String(decoding: try Data(contentsOf: URL(fileURLWithPath: path)), as: UTF8.self))
    } catch let error as HistoryError {
        throw ChaosError("\(path): \(error)")
    }
    let check = Checks.linearizability(history)
    check.lines.forEach { print($0) }
    return check.passed ? 0 : 1
}

do {
    let options = try Options(Array(CommandLine.arguments.dropFirst()))
    if let path = options.checkHistory { exit(try checkHistory(path)) }
    exit(try await run(options))
} catch {
    FileHandle.standardError.write(Data("warrant-chaos: \(error)\n".utf8))
    print("chaos: ERROR (\(error))")
    exit(2)
}
