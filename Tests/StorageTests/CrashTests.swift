import Foundation
import Raft
import Storage
import Testing
import TestSupport

/// The `warrant-bench` binary built beside the test bundle.
private func benchBinary() -> URL? {
    var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = directory.appendingPathComponent("warrant-bench")
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        directory = directory.deletingLastPathComponent()
    }
    return nil
}

/// Starts `warrant-bench crash-writer` on `path`, its output on a pipe.
private func startWriter(_ binary: URL, _ path: String) throws -> (Process, Pipe) {
    let process = Process()
    process.executableURL = binary
    process.arguments = ["crash-writer", "--path", path]
    let output = Pipe()
    process.standardOutput = output
    process.standardError = FileHandle.nullDevice
    try process.run()
    return (process, output)
}

@Suite("SIGKILL crash test", .serialized, .onOwnThreads)
struct CrashTests {
    @Test("A data directory in use by a running process is refused, nothing read or changed; free again once that process is gone")
    func directoryInUseIsRefused() async throws {
        let binary = try #require(benchBinary(), "build the package first (swift build) so warrant-bench exists")
        let temporary = try TemporaryStore()
        let (process, output) = try startWriter(binary, temporary.path)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        // Wait for its first acknowledged write (the store is open then).
        var first = Data()
        while !String(decoding: first, as: UTF8.self).contains("acked"), first.count < 1_000 {
            let more = output.fileHandleForReading.availableData
            guard !more.isEmpty else { break }
            first.append(more)
        }
        #expect(String(decoding: first, as: UTF8.self).contains("acked"))
        let refused = try #require(throws: StorageError.self) { try temporary.open() }
        #expect(refused.reason.contains("in use by another process (process \(process.processIdentifier))"), "\(refused.reason)")
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        #expect(try temporary.open().loadDurableState().hardState.term >= 2, "opens once the writer is gone")
    }

    @Test("A writer killed with SIGKILL at 50 random moments loses nothing it acknowledged, and its log always loads")
    func sigkillUnderWriteLoad() async throws {
        let binary = try #require(benchBinary(), "build the package first (swift build) so warrant-bench exists")
        let temporary = try TemporaryStore()
        var random = SeededGenerator(seed: 50)
        var acknowledgedMax: LogIndex = 0
        var kills = 0
        for round in 0..<50 {
            let (process, output) = try startWriter(binary, temporary.path)
            // Killed 20-140 ms after its first acknowledged write: counted
            // from its start, a busy machine spent whole lives starting up.
            var printedBytes = Data()
            while !String(decoding: printedBytes, as: UTF8.self).contains("acked") {
                let more = output.fileHandleForReading.availableData
                guard !more.isEmpty else { break } // it ended
                printedBytes.append(more)
            }
            try await Task.sleep(for: .milliseconds(20 + random.below(120)))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            #expect(process.terminationReason == .uncaughtSignal, "round \(round): the writer must die by the signal, not exit")
            if process.terminationReason == .uncaughtSignal { kills += 1 }
            printedBytes.append(output.fileHandleForReading.readDataToEndOfFile())
            let printed = String(decoding: printedBytes, as: UTF8.self)
            let acknowledged = printed.split(separator: "\n").compactMap { line in line.hasPrefix("acked ") ? LogIndex(line.dropFirst(6)) : nil }
            if let last = acknowledged.max() { acknowledgedMax = max(acknowledgedMax, last) }

            // The file must load (checksums, contiguity) and hold every acknowledged entry.
            let durable = try temporary.open().loadDurableState()
            let lastIndex = durable.entries.last?.index ?? durable.snapshot?.metadata.index ?? 0
            #expect(lastIndex >= acknowledgedMax, "round \(round): acknowledged \(acknowledgedMax) but only \(lastIndex) survived")
            #expect(durable.hardState.term >= 2, "the writer's election survived")
        }
        #expect(kills == 50)
        #expect(acknowledgedMax > 1000, "the writer made real progress between kills")
        // The entries form one unbroken run of counters per writer life.
        let final = try temporary.open().loadDurableState()
        let commands = final.entries.compactMap { entry -> UInt64? in
            guard case .command(let bytes) = entry.payload, bytes.count == 64 else { return nil }
            return bytes[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << UInt64($1.offset * 8) }
        }
        #expect(commands.count > 1000)
        #expect(zip(commands, commands.dropFirst()).allSatisfy { $1 == $0 + 1 || $1 == 1 }, "counters only increase, or restart at 1 in a new life")
    }
}
