import Foundation
import Testing
import TestSupport

/// `warrant exec`'s watchdog run by itself: descriptor 3 at its end at
/// once (exec gone without a word), the command's group a `sleep` in a
/// session of its own.
@Suite("warrant exec's watchdog", .onOwnThreads)
struct ExecWatchdogTests {
    /// Runs the watchdog for a new `sleep`'s group with `directory`; the
    /// sleep's pid (its group) and whether it was gone within 10 s.
    private static func watch(_ binary: String, directory: String) throws -> (pid: Int32, killed: Bool) {
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/usr/bin/setsid")
        sleeper.arguments = ["sleep", "60"]
        try sleeper.run()
        let group = sleeper.processIdentifier
        // The sleep leads its own group once setsid has run.
        for _ in 0..<500 where getpgid(group) != group { usleep(10_000) }
        let watchdog = Process()
        watchdog.executableURL = URL(fileURLWithPath: "/bin/sh")
        watchdog.arguments = ["-c", "exec 3</dev/null; exec \"$0\" __exec-watchdog \"$1\" \"$2\"", binary, String(group), directory]
        watchdog.standardError = FileHandle.nullDevice
        try watchdog.run()
        watchdog.waitUntilExit()
        // Gone: no process, or a zombie (reaped by Process when it notices).
        func running() -> Bool {
            guard let stat = try? String(contentsOfFile: "/proc/\(group)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
            return !stat[close...].hasPrefix(") Z")
        }
        for _ in 0..<1_000 where running() { usleep(10_000) }
        let killed = !running()
        if !killed { kill(group, SIGKILL) }
        return (group, killed)
    }

    @Test("Told exec is gone, it kills the group and removes exec's private directory; a directory of another shape, a link or one reached through '..' is left, and the group killed all the same")
    func removesOnlyExecsDirectory() throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("watchdog-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: base) }
        let mine = "\(base)/warrant-exec-a1b2c3"
        try FileManager.default.createDirectory(atPath: mine + "/..0123456789abcdef", withIntermediateDirectories: true)
        try Data("KEY".utf8).write(to: URL(fileURLWithPath: mine + "/..0123456789abcdef/svid.key"))
        try FileManager.default.createSymbolicLink(atPath: mine + "/..data", withDestinationPath: "..0123456789abcdef")
        // A link inside pointing out: the target is not followed.
        let outside = "\(base)/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try Data("keep".utf8).write(to: URL(fileURLWithPath: outside + "/file"))
        try FileManager.default.createSymbolicLink(atPath: mine + "/elsewhere", withDestinationPath: outside)

        let others = ["\(base)/not-exec-a1b2c3", "\(base)/warrant-exec-toolong1", "\(base)/sub/../warrant-exec-d4e5f6", "\(base)/warrant-exec-linkxx"]
        try FileManager.default.createDirectory(atPath: others[0], withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: others[1], withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: "\(base)/sub", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: "\(base)/warrant-exec-d4e5f6", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: others[3], withDestinationPath: others[0])
        for other in others {
            let (group, killed) = try Self.watch(binary, directory: other)
            #expect(killed, "group \(group) outlived the watchdog given \(other)")
            #expect(FileManager.default.fileExists(atPath: other), "\(other) removed")
        }
        #expect(FileManager.default.fileExists(atPath: "\(base)/warrant-exec-d4e5f6"))

        let (group, killed) = try Self.watch(binary, directory: mine)
        #expect(killed, "group \(group) outlived the watchdog")
        #expect(!FileManager.default.fileExists(atPath: mine), "exec's directory left behind")
        #expect(try String(contentsOfFile: outside + "/file", encoding: .utf8) == "keep", "a link inside was followed")
    }
}
