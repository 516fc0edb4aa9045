import Foundation
import Testing

@Suite("Chaos harness")
struct ChaosHarnessTests {
    /// The whole harness (proxies, nemesis, workloads, checkers) catches a
    /// node that acknowledges writes before they commit.
    @Test("warrant-chaos flags a planted bug (acknowledge before commit) with a violation and a non-zero exit, and writes its report")
    func catchesPlantedBug() async throws {
        let warrant = try #require(warrantBinary())
        let chaos = URL(fileURLWithPath: warrant).deletingLastPathComponent().appendingPathComponent("warrant-chaos").path
        try #require(FileManager.default.isExecutableFile(atPath: chaos), "build warrant-chaos first")
        let report = FileManager.default.temporaryDirectory.appendingPathComponent("chaos-planted-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: report) }
        let result = try await withClusterSlot { try run(["--warrant-binary", warrant, "--scenario", "\(repositoryRoot)/chaos/scenarios/crashes.yaml", "--duration", "12",
                              "--seed", "11", "--clients", "3", "--report", report, "--planted-bug", "acknowledge-before-commit"], executable: chaos) }
        #expect(result.status == 1, "\(result.output.suffix(2_000))")
        let last = result.output.split(separator: "\n").last.map(String.init) ?? ""
        #expect(last.hasPrefix("chaos: FAIL") && last.contains("seed=11"), "\(last)")
        #expect(result.output.contains("VIOLATION") || result.output.contains("missing from the audit chain"))
        for file in ["history.jsonl", "faults.jsonl", "verdicts.json", "report.html", "summary.txt"] {
            #expect(FileManager.default.fileExists(atPath: "\(report)/\(file)"), "\(file)")
        }
    }
}
