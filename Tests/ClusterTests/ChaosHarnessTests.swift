import ClusterHarness
import Foundation
import Testing

@Suite("Chaos harness")
struct ChaosHarnessTests {
    /// The whole harness (proxies, nemesis, workloads, checkers) catches a
    /// node that acknowledges writes before they commit, and a node process
    /// that ends without the nemesis ending it.
    @Test("warrant-chaos flags planted bugs (acknowledge before commit; a node crashing) with a violation, a failed processes check and a non-zero exit, and writes its report with the nodes' logs")
    func catchesPlantedBug() async throws {
        let warrant = try #require(warrantBinary())
        let chaos = URL(fileURLWithPath: warrant).deletingLastPathComponent().appendingPathComponent("warrant-chaos").path
        try #require(FileManager.default.isExecutableFile(atPath: chaos), "build warrant-chaos first")
        let report = FileManager.default.temporaryDirectory.appendingPathComponent("chaos-planted-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: report) }
        let result = try await withClusterSlot { try run(["--warrant-binary", warrant, "--scenario", "\(repositoryRoot)/chaos/scenarios/crashes.yaml", "--duration", "12",
                              "--seed", "11", "--clients", "3", "--report", report, "--planted-bug", "acknowledge-before-commit,node-crash"], executable: chaos) }
        #expect(result.status == 1, "\(result.output.suffix(2_000))")
        let last = result.output.split(separator: "\n").last.map(String.init) ?? ""
        #expect(last.hasPrefix("chaos: FAIL") && last.contains("seed=11"), "\(last)")
        #expect(result.output.contains("VIOLATION") || result.output.contains("missing from the audit chain"))
        // The node the harness killed behind the nemesis's back is named.
        #expect(result.output.contains("FAIL  processes: 1 node process(es) ended on their own"), "\(result.output.suffix(2_000))")
        let crashed = try #require(result.output.firstMatch(of: /planted node-crash: node (\d+) SIGKILLed/)?.output.1, "the planted crash happened")
        #expect(result.output.contains("node \(crashed) ended on its own"))
        for file in ["history.jsonl", "faults.jsonl", "verdicts.json", "report.html", "summary.txt", "node-1.log", "node-2.log", "node-3.log"] {
            #expect(FileManager.default.fileExists(atPath: "\(report)/\(file)"), "\(file)")
        }
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
