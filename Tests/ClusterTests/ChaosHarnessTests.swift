import ClusterHarness
import Foundation
import Testing

@Suite("Chaos harness")
struct ChaosHarnessTests {
    /// The linearizability checker, fed by the real workloads under real
    /// network latency, catches nodes that serve reads without ReadIndex.
    /// Every version such a node reports is right: only the order of its
    /// reads against writes completed elsewhere gives the bug away. (The
    /// same seed without the bug passes.)
    @Test("warrant-chaos flags planted stale reads (served without ReadIndex) under network latency: a linearizability violation and exit 1, no node crashing")
    func catchesPlantedStaleReads() async throws {
        let output = try await runFailingChaos(scenario: "latency", seconds: 10, seed: 12, plantedBug: "stale-reads", failedCheck: "linearizability")
        #expect(output.contains("VIOLATION"), "\(output.suffix(2_000))")
        #expect(output.contains("pass  processes"), "no node crashed: the violation is the reads'")
    }

    /// A node process that ends without the nemesis ending it fails the run.
    @Test("warrant-chaos flags a node crashing behind the nemesis's back: the processes check names it, exit 1, the nodes' logs in the report")
    func catchesPlantedCrash() async throws {
        let output = try await runFailingChaos(scenario: "crashes", seconds: 12, seed: 11, plantedBug: "node-crash", failedCheck: "processes")
        // The node the harness killed behind the nemesis's back is named.
        #expect(output.contains("FAIL  processes: 1 node process(es) ended on their own"), "\(output.suffix(2_000))")
        let crashed = try #require(output.firstMatch(of: /planted node-crash: node (\d+) SIGKILLed/)?.output.1, "the planted crash happened")
        #expect(output.contains("node \(crashed) ended on its own"))
    }

    /// Runs `warrant-chaos` with a planted bug; expects exit 1, a FAIL
    /// naming `failedCheck` and the seed, and a whole report. Its output.
    func runFailingChaos(scenario: String, seconds: Int, seed: Int, plantedBug: String, failedCheck: String) async throws -> String {
        let warrant = try #require(warrantBinary())
        let chaos = URL(fileURLWithPath: warrant).deletingLastPathComponent().appendingPathComponent("warrant-chaos").path
        try #require(FileManager.default.isExecutableFile(atPath: chaos), "build warrant-chaos first")
        let report = FileManager.default.temporaryDirectory.appendingPathComponent("chaos-\(plantedBug)-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: report) }
        let result = try await withClusterSlot {
            try run(["--warrant-binary", warrant, "--scenario", "\(repositoryRoot)/chaos/scenarios/\(scenario).yaml", "--duration", String(seconds),
                     "--seed", String(seed), "--clients", "3", "--report", report, "--planted-bug", plantedBug], executable: chaos)
        }
        #expect(result.status == 1, "\(result.output.suffix(2_000))")
        let last = result.output.split(separator: "\n").last.map(String.init) ?? ""
        #expect(last.hasPrefix("chaos: FAIL") && last.contains(failedCheck) && last.contains("seed=\(seed)"), "\(last)")
        for file in ["history.jsonl", "faults.jsonl", "verdicts.json", "report.html", "summary.txt", "node-1.log", "node-2.log", "node-3.log"] {
            #expect(FileManager.default.fileExists(atPath: "\(report)/\(file)"), "\(file)")
        }
        return result.output
    }

    /// The clock-skew fault preloads libfaketime, under which Swift once saw
    /// no command-line arguments at all: the node printed its usage and
    /// exited, so the fault ran with a node down instead of a skewed one.
    @Test("Under libfaketime the warrant binary still reads its arguments")
    func argumentsUnderFakeTime() throws {
        let warrant = try #require(warrantBinary())
        let preload = try #require(LocalProcessCluster.fakeTimeLibrary, "libfaketime is not installed (scripts/setup.sh installs faketime)")
        var environment = ProcessInfo.processInfo.environment
        environment["LD_PRELOAD"] = preload
        environment["FAKETIME"] = "@2031-01-02 03:04:05"
        let missing = "/nonexistent-\(UUID().uuidString)/config.yaml"
        let result = try run(["node", "start", "--config", missing], executable: warrant, environment: environment)
        #expect(result.status != 0)
        #expect(result.output.contains(missing) && !result.output.contains("USAGE"), "\(result.output.prefix(400))")
        // The preload does take effect here (so the check above ran under it).
        let date = try run(["date", "-u", "+%Y"], environment: environment)
        #expect(date.output.hasPrefix("2031"), "\(date.output)")
    }
}
