import ClusterHarness
import Foundation
import NIOCore
import NIOPosix
import Node
import Testing

/// The `warrant` binary built beside the test bundle.
func warrantBinary() -> String? {
    var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = directory.appendingPathComponent("warrant")
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate.path }
        directory = directory.deletingLastPathComponent()
    }
    return nil
}

/// Collects a harness's log lines (printed only when a test fails).
final class Lines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func add(_ line: String) { lock.withLock { lines.append(line) } }
    var text: String { lock.withLock { lines.joined(separator: "\n") } }
}

@Suite("Real node processes", .serialized)
struct ProcessTests {
    @Test("Every command's options parse (each command's help prints), and 'admin issue' writes an admin's credentials offline, refusing bad input")
    func commandLine() throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        // Every command path, from the SUBCOMMANDS sections of the help.
        var pending: [[String]] = [[]], seen: [[String]] = []
        while let path = pending.popLast(), seen.count < 200 {
            seen.append(path)
            let (status, output) = try run(path + ["--help"], executable: binary)
            #expect(status == 0 && output.contains("USAGE:"), "warrant \(path.joined(separator: " ")) --help: \(output)")
            guard let section = output.range(of: "SUBCOMMANDS:\n") else { continue }
            for line in output[section.upperBound...].split(separator: "\n", omittingEmptySubsequences: false) {
                guard line.hasPrefix("  "), !line.hasPrefix("  See ") else { break }
                // (A wrapped description goes on further in.)
                if line.hasPrefix("   ") { continue }
                if let name = line.split(separator: " ").first { pending.append(path + [String(name)]) }
            }
        }
        #expect(seen.contains(["admin", "issue"]) && seen.contains(["svid", "renew"]) && seen.count > 30, "\(seen)")

        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-cli-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try ClusterFiles.initialize(directory: directory, clusterID: "cli", members: [
            .init(id: 1, peer: try HostPort(parsing: "127.0.0.1:1", at: ""), api: try HostPort(parsing: "127.0.0.1:2", at: "")),
        ])
        var (status, output) = try run(["admin", "issue", "--dir", directory, "--name", "alice", "--ttl", "600"], executable: binary)
        #expect(status == 0 && output.contains("admin alice: serial "), "\(output)")
        let key = try FileManager.default.attributesOfItem(atPath: "\(directory)/admin-alice.key")[.posixPermissions] as? Int
        #expect(key == 0o600 && FileManager.default.fileExists(atPath: "\(directory)/admin-alice.pem"))
        for (arguments, message) in [(["--name", "alice"], "already exists"), (["--name", "a/b"], "admin name"),
                                     (["--name", "bob", "--ttl", "0"], "--ttl must be"), (["--name", "bob", "--ttl", "40000000"], "--ttl must be")] {
            (status, output) = try run(["admin", "issue", "--dir", directory] + arguments, executable: binary)
            #expect(status != 0 && output.contains(message), "\(arguments): \(output)")
        }
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/admin-bob.pem"), "a refused issue wrote nothing")
    }

    @Test("SIGKILL at 50 random moments under write load, any node: no acknowledged write is lost and every node ends with the same audit chain")
    func crashLoop() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let seed = UInt64.random(in: 1...UInt64.max)
        let lines = Lines()
        let result = try await withClusterSlot {
            try await KillLoop.run(binary: binary, kills: 50, leaderOnly: false, writers: 4, seed: seed, log: lines.add)
        }
        #expect(result.lost.isEmpty, "seed \(seed): lost \(result.lost.count) acknowledged writes\n\(lines.text)")
        #expect(result.chainsAgree, "seed \(seed): \(result.chains)\n\(lines.text)")
        #expect(result.acknowledged > 500, "seed \(seed): too little load to mean anything (\(result.acknowledged))")
    }

    @Test("The same harness catches a planted bug: a leader that acknowledges writes before they commit loses some when killed")
    func harnessCatchesPlantedBug() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let lines = Lines()
        let result = try await withClusterSlot {
            try await KillLoop.run(binary: binary, kills: 10, leaderOnly: true, writers: 8, seed: 1,
                                   environment: ["WARRANT_PLANTED_BUG": "acknowledge-before-commit"], log: lines.add)
        }
        #expect(!result.passed, "the planted bug went unnoticed\n\(lines.text)")
        #expect(!result.lost.isEmpty)
        // A failed run keeps its nodes' files for whoever looks; this failure was the point.
        try? FileManager.default.removeItem(atPath: result.directory)
    }

    @Test("SIGTERM stops a node gracefully (exit 0, leadership handed over), and a restarted node catches up")
    func gracefulStop() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-term-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try await withClusterSlot {
            let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
            let leader = try #require(await cluster.waitForLeader(seconds: 20))
            #expect(await cluster.waitUntilReady(), "\(cluster.notReadyReason())")
            // The node runs on tcmalloc, linked into the binary (Package.swift).
            let maps = (try? String(contentsOfFile: "/proc/\(cluster.processID(of: leader) ?? 0)/maps", encoding: .utf8)) ?? ""
            #expect(maps.contains("libtcmalloc_minimal"), "the node process should have tcmalloc mapped")
            for i in 0..<10 {
                let response = try await cluster.client.request(.PUT, "/v1/documents/before/\(i)", headers: [("content-type", "application/json")], body: Array("{}".utf8))
                #expect(response.status == .ok)
            }
            let exit = await cluster.terminate(leader)
            #expect(exit == 0, "a SIGTERMed node should exit 0")
            let log = (try? String(contentsOfFile: "\(directory)/node-\(leader)/log", encoding: .utf8)) ?? ""
            // Handed over: before it stopped, the node heard from the one it
            // handed leadership to (not found by an election after it went; a
            // wall-clock bound here failed on a busy machine).
            let stopping = log.components(separatedBy: "shutting down signal=SIGTERM").dropFirst().joined()
            #expect(stopping.contains(" stopped"), "\(log.suffix(2_000))")
            #expect(stopping.contains("leadership handed over to=") && !stopping.contains("leadership handed over to=\(leader) "),
                    "no hand-over logged while stopping: \(stopping.prefix(2_000))")
            let next = await cluster.waitForLeader(seconds: 30)
            #expect(next != nil && next != leader)
            let during = try await cluster.client.request(.PUT, "/v1/documents/during", headers: [("content-type", "application/json")], body: Array("{}".utf8))
            #expect(during.status == .ok, "\(during.text)")
            try cluster.start(leader)
            #expect(await cluster.waitUntilReady(), "\(cluster.notReadyReason())")
            let (agree, chains) = await cluster.auditChainsAgree()
            #expect(agree, "\(chains)")
            await cluster.close()
        }
    }

    @Test("A node that does not answer holds up neither the harness's search for the leader nor the nodes asked after it, before or after an election")
    func frozenNodeDoesNotHoldUpLeaderSearch() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-frozen-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try await withClusterSlot {
            let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: LocalProcessCluster.pickBasePort())
            _ = try #require(await cluster.waitForLeader(seconds: 60))
            #expect(await cluster.waitUntilReady(seconds: 60), "\(cluster.notReadyReason())")
            // Node 1, the first asked, frozen: its socket accepts, nothing answers.
            cluster.pause(1)
            let leader = await cluster.waitForLeader(seconds: 30)
            #expect(leader != nil && leader != 1)
            #expect(await cluster.status(of: 1, timeout: .seconds(2)) == nil)
            // Node 1's next probe may wait 30 s (probes that time out raise it
            // to 4 s; 30 outlasts any stall of a busy machine, so the bounds
            // below tell a search held up by it from a slow one).
            cluster.setProbeTimeout(of: 1, .seconds(30))
            let started = ContinuousClock.now
            let again = await cluster.waitForLeader(seconds: 60)
            let took = started.duration(to: .now)
            #expect(again != nil && again != 1)
            #expect(took < .seconds(15), "finding the leader took \(took): the frozen node's probe held it up")
            // No leader for half a second (two of three nodes frozen), then
            // one: found soon after, not after node 1's 30 s probe.
            let second = try #require(again)
            cluster.setProbeTimeout(of: 1, .seconds(30))
            cluster.pause(second)
            let thaw = Task {
                try? await Task.sleep(for: .milliseconds(500))
                cluster.resume(second)
            }
            let waitStarted = ContinuousClock.now
            let afterThaw = await cluster.waitForLeader(seconds: 60)
            let waited = waitStarted.duration(to: .now)
            await thaw.value
            #expect(afterThaw != nil && afterThaw != 1)
            #expect(waited < .seconds(15), "finding the leader after the thaw took \(waited): the frozen node's probe held it up")
            cluster.resume(1)
            await cluster.close()
        }
    }

    @Test("No two base ports the harness can hand out share a port, and each lies below the ephemeral range")
    func basePortsDisjoint() {
        var owner: [Int: Int] = [:]
        for base in LocalProcessCluster.candidateBases {
            for port in LocalProcessCluster.ports(ofBase: base) {
                #expect(port < 32768, "\(port) of base \(base)")
                if let other = owner.updateValue(base, forKey: port) { Issue.record("port \(port) belongs to bases \(other) and \(base)") }
            }
        }
        #expect(LocalProcessCluster.candidateBases.count >= 100)
        let picked = LocalProcessCluster.pickBasePort()
        #expect(LocalProcessCluster.candidateBases.contains(picked))
    }

    @Test("A node process whose peer port is taken exits saying so, and the harness reports it at once instead of carrying on with two nodes")
    func peerPortTaken() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-port-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let basePort = LocalProcessCluster.pickBasePort()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let holder = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: basePort + 1).get() // node 2's peer port
        let cluster = try LocalProcessCluster(binary: binary, directory: directory, basePort: basePort)
        let started = ContinuousClock.now
        #expect(await cluster.waitUntilReady(seconds: 20) == false)
        #expect(started.duration(to: .now) < .seconds(15), "it should not wait out the whole timeout")
        let ended = cluster.exitedOnTheirOwn()
        #expect(ended.map(\.id) == [2])
        #expect(ended.first?.logTail.contains("cannot start: cannot listen for peers on 127.0.0.1:\(basePort + 1)") == true, "\(ended)")
        #expect(cluster.notReadyReason().contains("node 2 exited"))
        await cluster.close()
        try await holder.close()
        try await group.shutdownGracefully()
    }

    @Test("Restarts the harness makes are never taken for a process ending on its own; a process killed behind its back is")
    func exitsOnTheirOwn() async throws {
        // Stand-ins for nodes: a script that ignores its arguments and waits.
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-exits-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let script = "\(directory)/stand-in"
        try "#!/bin/sh\nexec sleep 60\n".write(toFile: script, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: script)
        let cluster = try LocalProcessCluster(binary: script, directory: "\(directory)/cluster", nodes: 2, basePort: LocalProcessCluster.pickBasePort())
        let watching = Task.detached {
            var seen: [UInt64] = []
            while !Task.isCancelled {
                seen += cluster.exitedOnTheirOwn().map(\.id)
                try? await Task.sleep(for: .milliseconds(1))
            }
            return seen
        }
        for _ in 0..<100 {
            cluster.kill9(1)
            try cluster.start(1)
        }
        watching.cancel()
        #expect(await watching.value == [], "a restart was reported as an exit")
        let pid = try #require(cluster.processID(of: 2))
        kill(pid, SIGKILL)
        var reported: [UInt64] = []
        for _ in 0..<1_500 where reported.isEmpty { // 30 s at most
            reported = cluster.exitedOnTheirOwn().map(\.id)
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(reported == [2])
        await cluster.close()
    }

    @Test("A node started with a low soft limit on open files raises it to the hard limit")
    func raisesOpenFileLimit() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-nofile-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let base = LocalProcessCluster.pickBasePort()
        try ClusterFiles.initialize(directory: directory, clusterID: "nofile", members: [
            .init(id: 1, peer: try HostPort(parsing: "127.0.0.1:\(base)", at: ""), api: try HostPort(parsing: "127.0.0.1:\(base + 100)", at: "")),
        ])
        func limits(_ pid: Int32) -> (soft: String, hard: String)? {
            guard let text = try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8),
                  let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") }) else { return nil }
            let fields = line.dropFirst("Max open files".count).split(separator: " ")
            return fields.count >= 2 ? (String(fields[0]), String(fields[1])) : nil
        }
        let mine = try #require(limits(getpid()))
        try #require(mine.hard != "unlimited" && Int(mine.hard) ?? 0 > 256, "this test needs a hard limit over 256, not \(mine.hard)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", "ulimit -Sn 256 && exec \"$0\" node start --config \"$1\"", binary, "\(directory)/node-1/config.yaml"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        var raised = false
        for _ in 0..<200 where !raised {
            try await Task.sleep(for: .milliseconds(50))
            if let now = limits(process.processIdentifier), now.soft == mine.hard { raised = true }
        }
        #expect(raised, "soft limit \(limits(process.processIdentifier).map { "\($0.soft)" } ?? "?"), hard \(mine.hard)")
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }

    @Test("A node refuses to start on a bad configuration, a wrong key-encryption key or a loose KEK file, saying which file and why")
    func refusesBadFiles() async throws {
        let binary = try #require(warrantBinary(), "build the package first so the warrant executable exists")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-bad-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let base = LocalProcessCluster.pickBasePort()
        try ClusterFiles.initialize(directory: directory, clusterID: "bad", members: [
            .init(id: 1, peer: try HostPort(parsing: "127.0.0.1:\(base)", at: ""), api: try HostPort(parsing: "127.0.0.1:\(base + 100)", at: "")),
        ])
        func start() throws -> (Int32, String) {
            try run(["node", "start", "--config", "\(directory)/node-1/config.yaml"], executable: binary)
        }
        let config = "\(directory)/node-1/config.yaml"
        let original = try String(contentsOfFile: config, encoding: .utf8)
        try original.replacingOccurrences(of: "tick_interval_ms: 10", with: "tick_interval_ms: 0").write(toFile: config, atomically: true, encoding: .utf8)
        var (status, output) = try start()
        #expect(status == 1 && output.contains("config.yaml: raft.tick_interval_ms: 0 is outside 1...1000"), "\(output)")
        try original.write(toFile: config, atomically: true, encoding: .utf8)

        let kek = "\(directory)/kek"
        let realKEK = try String(contentsOfFile: kek, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: kek)
        (status, output) = try start()
        #expect(status == 1 && output.contains("kek: is readable by others"), "\(output)")
        try Data(repeating: 7, count: 32).base64EncodedString().write(toFile: kek, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: kek)
        (status, output) = try start()
        #expect(status == 1 && output.contains("node.key.sealed: cannot be opened with the key-encryption key"), "\(output)")
        #expect(!output.contains("PRIVATE KEY"), "a key reached the output")
        try realKEK.write(toFile: kek, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: kek)
        for stored in ["wal", "audit"] {
            #expect(!FileManager.default.fileExists(atPath: "\(directory)/node-1/data/\(stored)"), "a refused start created state (\(stored))")
        }
    }
}
