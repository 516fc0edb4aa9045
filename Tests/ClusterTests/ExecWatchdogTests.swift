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
    /// `told`, when given, is what exec wrote on the pipe before it ended
    /// (`named` puts the sleep's group in it); the watchdog is then
    /// started for group 0, to be told it.
    private static func watch(_ binary: String, directory: String, told: ((Int32) -> [UInt8])? = nil) throws -> (pid: Int32, killed: Bool) {
        // A sleep leading a group of its own (posix_spawn's SETPGROUP:
        // setsid(1) forks when started as a group leader, and the pid it
        // gives is then gone at once, as if killed).
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        var group: pid_t = 0
        let words: [String] = ["/bin/sleep", "60"]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let spawned = posix_spawn(&group, "/bin/sleep", nil, &attributes, argv, environ)
        try #require(spawned == 0, "could not start sleep")
        defer { kill(group, SIGKILL); var status: Int32 = 0; _ = waitpid(group, &status, 0) }
        try #require(getpgid(group) == group, "the sleep leads its own group")
        var pipeFile = "/dev/null", groupArgument = String(group)
        if let told {
            pipeFile = FileManager.default.temporaryDirectory.appendingPathComponent("watchdog-pipe-\(UUID().uuidString.prefix(8))").path
            try Data(told(group)).write(to: URL(fileURLWithPath: pipeFile))
            groupArgument = "0"
        }
        defer { if told != nil { try? FileManager.default.removeItem(atPath: pipeFile) } }
        let watchdog = Process()
        watchdog.executableURL = URL(fileURLWithPath: "/bin/sh")
        watchdog.arguments = ["-c", "exec 3<\"$3\"; exec \"$0\" __exec-watchdog \"$1\" \"$2\"", binary, groupArgument, directory, pipeFile]
        watchdog.standardError = FileHandle.nullDevice
        try watchdog.run()
        watchdog.waitUntilExit()
        // Gone: no process, or a zombie (reaped by Process when it notices).
        func running() -> Bool {
            guard let stat = try? String(contentsOfFile: "/proc/\(group)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
            return !stat[close...].hasPrefix(") Z")
        }
        // (Told: the watchdog has exited, so any SIGKILL it sent was sent; 3 s is enough.)
        for _ in 0..<(told == nil ? 1_000 : 300) where running() { usleep(10_000) }
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

    /// The bytes exec writes to name the command's group.
    static func named(_ group: Int32) -> [UInt8] {
        [UInt8(ascii: "G")] + (0..<4).map { UInt8(truncatingIfNeeded: UInt32(bitPattern: group) >> UInt32($0 * 8)) }
    }

    @Test("Started before the command (group 0), it kills the group exec named once exec is gone, none after the stand-down byte or when none was named, and removes exec's directory in each case")
    func groupNamedLater() throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("watchdog-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: base) }
        for (told, kills, what) in [({ (group: Int32) in Self.named(group) }, true, "named, then exec gone"),
                                    ({ (group: Int32) in Self.named(group) + [1] }, false, "named, then stood down"),
                                    ({ (_: Int32) in [] }, false, "exec gone before naming a group")] {
            let mine = "\(base)/warrant-exec-\(String(UUID().uuidString.prefix(6)))"
            try FileManager.default.createDirectory(atPath: mine, withIntermediateDirectories: true)
            try Data("KEY".utf8).write(to: URL(fileURLWithPath: mine + "/svid.key"))
            let (group, killed) = try Self.watch(binary, directory: mine, told: told)
            #expect(killed == kills, "\(what): group \(group) \(killed ? "killed" : "left running")")
            #expect(!FileManager.default.fileExists(atPath: mine), "\(what): exec's directory left behind")
        }
    }
}
