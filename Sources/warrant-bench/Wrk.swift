import Foundation
import Synchronization

// The load generator: wrk (C, one thread, keep-alive HTTPS connections),
// driven by a Lua script that sends each prepared request body once. The
// clients share the two cores with the three nodes, so the cheaper they
// are the more of the machine the cluster gets; wrk spends about a third
// of what the Swift client did per request, most of it in the kernel's
// loopback TCP. Its CPU time is measured (wait4) and reported as the
// client's.

/// A process run to its end with posix_spawn and wait4 (Foundation's
/// Process polls for exits every 50 ms off the main thread).
struct Spawned {
    var status: Int32
    var wallMilliseconds: Double
    /// User plus system CPU time of the process.
    var cpuSeconds: Double

    /// Runs `executable` with `arguments`; its standard output and error go
    /// to `output` (a file path), or to /dev/null, or (`inheritErrors`) its
    /// output to this process's standard error.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String]? = nil, output: String? = nil,
                    inheritErrors: Bool = false) throws -> Spawned {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if inheritErrors {
            posix_spawn_file_actions_adddup2(&actions, 2, 1)
        } else {
            posix_spawn_file_actions_addopen(&actions, 1, output ?? "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?]? = environment.map { $0.map { strdup("\($0.key)=\($0.value)") } + [nil] }
        defer { (argv + (envp ?? [])).forEach { free($0) } }
        var pid: pid_t = 0
        let start = ContinuousClock.now
        let spawned = envp.map { posix_spawnp(&pid, executable, &actions, nil, argv, $0) } ?? posix_spawnp(&pid, executable, &actions, nil, argv, environ)
        guard spawned == 0 else { throw BenchFailure(description: "could not start \(executable): error \(spawned)") }
        var status: Int32 = 0
        var usage = rusage()
        while wait4(pid, &status, 0, &usage) == -1 && errno == EINTR {}
        let exited = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) / 1e6 }
        return Spawned(status: exited, wallMilliseconds: start.duration(to: .now).milliseconds, cpuSeconds: seconds(usage.ru_utime) + seconds(usage.ru_stime))
    }
}

enum Wrk {
    /// Whether wrk is installed.
    static var available: Bool {
        (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":").contains {
            FileManager.default.isExecutableFile(atPath: "\($0)/wrk")
        }
    }

    /// Sends every body once (stopping early when they run out), one wrk
    /// per endpoint at once, `connections` split between them, for at most
    /// `seconds`. Each endpoint takes the bodies at positions `k`,
    /// `k + endpoints`, ...
    static func post(endpoints: [(host: String, port: Int)], path: String, bodies: [[UInt8]], repeating: Bool = false,
                     checkVerdicts: Bool = false, connections: Int, seconds: Double, directory: String) async throws -> Timed {
        let script = "\(directory)/wrk-post.lua"
        try luaScript.write(toFile: script, atomically: true, encoding: .utf8)
        var jobs: [(bodies: String, latencies: String, output: String, connections: Int)] = []
        var counts: [Int] = []
        for (k, _) in endpoints.enumerated() {
            let prefix = "\(directory)/wrk-\(k)-\(UUID().uuidString.prefix(6))"
            var text: [UInt8] = []
            let mine = stride(from: k, to: bodies.count, by: endpoints.count).map { bodies[$0] }
            counts.append(mine.count)
            for body in mine {
                precondition(!body.contains(UInt8(ascii: "\n")), "a request body for wrk must be one line")
                text += body
                text.append(UInt8(ascii: "\n"))
            }
            try Data(text).write(to: URL(fileURLWithPath: prefix + ".bodies"))
            jobs.append((prefix + ".bodies", prefix + ".latency", prefix + ".out", connections / endpoints.count + (k < connections % endpoints.count ? 1 : 0)))
        }
        // The wrk processes run side by side, one waiting thread each.
        let results = Mutex<[Int: Result<Spawned, any Error>]>([:])
        let group = DispatchGroup()
        for (k, job) in jobs.enumerated() {
            var environment = ProcessInfo.processInfo.environment
            environment["WARRANT_WRK_BODIES"] = job.bodies
            environment["WARRANT_WRK_PATH"] = path
            environment["WARRANT_WRK_LATENCY"] = job.latencies
            if repeating { environment["WARRANT_WRK_REPEAT"] = "1" }
            if checkVerdicts { environment["WARRANT_WRK_CHECK"] = "1" }
            let arguments = ["-t1", "-c\(job.connections)", "-d\(max(1, Int(seconds.rounded(.up))))s", "--timeout", "10s", "-s", script,
                             "https://\(endpoints[k].host):\(endpoints[k].port)\(path)"]
            group.enter()
            let settings = environment, output = job.output
            Thread.detachNewThread {
                defer { group.leave() }
                let result = Result { try Spawned.run("wrk", arguments, environment: settings, output: output) }
                results.withLock { $0[k] = result }
            }
        }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in group.notify(queue: .global()) { done.resume() } }
        var timed = Timed()
        var cpu = 0.0
        for (k, job) in jobs.enumerated() {
            let spawned = try results.withLock { $0[k]! }.get()
            cpu += spawned.cpuSeconds
            let output = (try? String(contentsOfFile: job.output, encoding: .utf8)) ?? ""
            guard spawned.status == 0, let summary = output.split(separator: "\n").first(where: { $0.hasPrefix("WRK ") }) else {
                throw BenchFailure(description: "wrk failed (status \(spawned.status)): \(output.suffix(500))")
            }
            var fields: [String: Double] = [:]
            for pair in summary.dropFirst(4).split(separator: " ") {
                let kv = pair.split(separator: "=")
                if kv.count == 2 { fields[String(kv[0])] = Double(kv[1]) }
            }
            let requests = Int(fields["requests"] ?? 0)
            let refused = Int(fields["failed"] ?? 0)
            // Once the bodies run out, the connections still waiting send
            // the last one again and are refused: not failures.
            let repeated = repeating ? 0 : max(0, requests - counts[k])
            let invalid = Int(fields["invalid"] ?? 0)
            timed.ok += max(0, requests - refused - invalid)
            timed.failed += invalid + max(0, refused - repeated) + Int((fields["connect"] ?? 0) + (fields["read"] ?? 0) + (fields["write"] ?? 0) + (fields["timeout"] ?? 0))
            timed.seconds = max(timed.seconds, (fields["duration_us"] ?? 0) / 1e6)
            for line in ((try? String(contentsOfFile: job.latencies, encoding: .utf8)) ?? "").split(separator: "\n") {
                let pair = line.split(separator: " ")
                guard pair.count == 2, let value = Int(pair[0]), let count = Int(pair[1]) else { continue }
                timed.latencies += repeatElement(.microseconds(value), count: count)
            }
        }
        timed.clientCPUSeconds = cpu
        return timed
    }

    /// Sends the bodies in order, once each (each made into its whole
    /// request when the script loads); stops the thread when they
    /// run out; at the end writes a summary line and the latency histogram
    /// (microseconds and count per line).
    static let luaScript = """
        local bodies = {}
        local path = os.getenv("WARRANT_WRK_PATH")
        local repeating = os.getenv("WARRANT_WRK_REPEAT") ~= nil
        local headers = {["Content-Type"] = "application/json"}
        -- Whole requests are made before the clock starts (wrk.format
        -- builds one from a table of pieces each time it is called), in
        -- init, once wrk has set the Host header.
        init = function(args)
          for line in io.lines(os.getenv("WARRANT_WRK_BODIES")) do bodies[#bodies + 1] = wrk.format("POST", path, headers, line) end
        end
        local next = 0
        request = function()
          next = next + 1
          if next > #bodies then
            if repeating then
              next = 1
            else
              wrk.thread:stop()
              next = #bodies
            end
          end
          return bodies[next]
        end
        if os.getenv("WARRANT_WRK_CHECK") ~= nil then
          -- Verification answers 200 with the verdict inside.
          invalid = 0
          response = function(status, headers, body)
            if status == 200 and string.find(body, '"valid":false', 1, true) then invalid = invalid + 1 end
          end
        end
        local threads = {}
        setup = function(thread) table.insert(threads, thread) end
        done = function(summary, latency, requests)
          local e = summary.errors
          local invalid = 0
          for _, thread in ipairs(threads) do invalid = invalid + (thread:get("invalid") or 0) end
          io.write(string.format("WRK requests=%d failed=%d invalid=%d connect=%d read=%d write=%d timeout=%d duration_us=%d\\n",
            summary.requests, e.status, invalid, e.connect, e.read, e.write, e.timeout, summary.duration))
          local out = io.open(os.getenv("WARRANT_WRK_LATENCY"), "w")
          for i = 1, #latency do
            local value, count = latency(i)
            out:write(string.format("%d %d\\n", value, count))
          end
          out:close()
        end
        """
}
