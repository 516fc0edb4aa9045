import Raft
import RaftSimulator

import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

let usage = """
warrant-sim: the deterministic Raft cluster simulator and the core benchmark.

USAGE
  warrant-sim run [--seeds N] [--start S] [--nodes 3|5|7] [--fault-ticks T] [--planted-bug NAME]
      Runs seeds S..<S+N (default 0..<1000), each a whole cluster under random
      faults, checking Raft's safety properties after every step and recovery
      after healing. Prints seeds/s and a verdict; exits 1 on a violation and
      prints the command that replays it.
  warrant-sim replay --seed S [--nodes K] [--fault-ticks T] [--planted-bug NAME] [--trace]
      Runs one seed again, exactly, optionally printing every fault it injects.
  warrant-sim bench [--entries N] [--batch B] [--payload-bytes P]
      Entries committed per second by a 3-node cluster of pure cores with an
      instant network (build with -c release for meaningful figures).

EXAMPLES
  swift run -c release warrant-sim run --seeds 100000
  swift run warrant-sim replay --seed 4242 --trace
  swift run -c release warrant-sim bench

PLANTED BUGS (to show the checks bite)
  commit-previous-term, vote-without-log-check, read-without-quorum, ack-before-persist
"""

struct UsageError: Error, CustomStringConvertible {
    var description: String
}

struct Arguments {
    var values: [String: String] = [:]
    var flags: Set<String> = []

    init(_ raw: ArraySlice<String>, valued: Set<String>, boolean: Set<String>) throws {
        var iterator = raw.makeIterator()
        while let argument = iterator.next() {
            guard argument.hasPrefix("--") else { throw UsageError(description: "unexpected argument '\(argument)'") }
            let name = String(argument.dropFirst(2))
            if boolean.contains(name) {
                flags.insert(name)
            } else if valued.contains(name) {
                guard let value = iterator.next() else { throw UsageError(description: "--\(name) needs a value") }
                values[name] = value
            } else {
                throw UsageError(description: "unknown option --\(name)")
            }
        }
    }

    func integer(_ name: String, default fallback: Int, range: ClosedRange<Int>) throws -> Int {
        guard let text = values[name] else { return fallback }
        guard let value = Int(text), range.contains(value) else {
            throw UsageError(description: "--\(name) must be an integer in \(range.lowerBound)...\(range.upperBound), got '\(text)'")
        }
        return value
    }

    func simulationOptions() throws -> SimulationOptions {
        var options = SimulationOptions()
        if values["nodes"] != nil {
            let nodes = try integer("nodes", default: 3, range: 3...7)
            guard nodes % 2 == 1 else { throw UsageError(description: "--nodes must be 3, 5 or 7") }
            options.nodeCount = nodes
        }
        options.faultTicks = try integer("fault-ticks", default: options.faultTicks, range: 10...1_000_000)
        if let name = values["planted-bug"] {
            guard let bug = PlantedBug(flagName: name) else { throw UsageError(description: "unknown planted bug '\(name)'") }
            options.plantedBug = bug
        }
        return options
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}

func runSeeds(_ arguments: Arguments) throws -> Int32 {
    let count = try arguments.integer("seeds", default: 1000, range: 1...100_000_000)
    let start = try arguments.integer("start", default: 0, range: 0...Int.max - 100_000_000)
    let options = try arguments.simulationOptions()
    let clock = ContinuousClock()
    let began = clock.now
    var totals = SimulationStats()
    var lastReport = began
    for offset in 0..<count {
        let seed = UInt64(start + offset)
        let result = Simulation(seed: seed, options: options).run()
        totals.add(result.stats)
        if let violation = result.violation {
            print("FAIL seed \(seed) (\(result.nodeCount) nodes): \(violation)")
            print("replay: \(result.replayCommand) --trace")
            return 1
        }
        if clock.now - lastReport > .seconds(10) {
            lastReport = clock.now
            let rate = Double(offset + 1) / seconds(clock.now - began)
            print("... \(offset + 1)/\(count) seeds clean, \(String(format: "%.1f", rate)) seeds/s")
            fflush(nil) // progress should show as it happens, even when piped
        }
    }
    let elapsed = seconds(clock.now - began)
    print("seeds \(start)..<\(start + count): \(count) runs, \(totals.crashes) crashes, \(totals.partitions) partitions, \(totals.membershipChanges) membership changes, \(totals.commandsApplied) commands applied, \(totals.readsAnswered) reads checked, \(totals.messagesDelivered) messages")
    print("\(String(format: "%.1f", Double(count) / elapsed)) seeds/s over \(String(format: "%.1f", elapsed)) s")
    print("verdict: PASS (no safety or liveness violation)")
    return 0
}

func replay(_ arguments: Arguments) throws -> Int32 {
    guard let text = arguments.values["seed"], let seed = UInt64(text) else {
        throw UsageError(description: "replay needs --seed N (a non-negative integer)")
    }
    let options = try arguments.simulationOptions()
    let result = Simulation(seed: seed, options: options, tracing: arguments.flags.contains("trace")).run()
    for line in result.trace { print(line) }
    let s = result.stats
    print("seed \(seed), \(result.nodeCount) nodes: \(s.leaderTerms) leader terms, \(s.crashes) crashes, \(s.partitions) partitions, \(s.membershipChanges) membership changes, \(s.compactions) compactions, \(s.commandsApplied) commands applied, \(s.readsAnswered) reads, final index \(s.finalCommitIndex)")
    if let violation = result.violation {
        print("verdict: FAIL: \(violation)")
        return 1
    }
    print("verdict: PASS")
    return 0
}

func bench(_ arguments: Arguments) throws -> Int32 {
    let entries = try arguments.integer("entries", default: 2_000_000, range: 1...1_000_000_000)
    let batch = try arguments.integer("batch", default: 1_000, range: 1...1_000_000)
    let payload = try arguments.integer("payload-bytes", default: 256, range: 0...1_000_000)
    #if DEBUG
    print("note: debug build; use `swift run -c release warrant-sim bench` for the real figure")
    #endif
    let benchmark = CoreBenchmark(entries: entries, batchSize: batch, payloadBytes: payload)
    _ = CoreBenchmark(entries: min(entries, 100_000), batchSize: batch, payloadBytes: payload).run() // warm-up
    let result = benchmark.run()
    print("raft core, 3 nodes, instant network, \(payload)-byte proposals in batches of \(batch), one thread")
    print("\(result.entries) entries committed in \(String(format: "%.3f", result.seconds)) s: \(String(format: "%.0f", result.entriesPerSecond)) entries/s (\(result.messages) messages)")
    return 0
}

var raw = CommandLine.arguments.dropFirst()
let command = raw.popFirst() ?? "--help"
let status: Int32
do {
    switch command {
    case "run":
        status = try runSeeds(Arguments(raw, valued: ["seeds", "start", "nodes", "fault-ticks", "planted-bug"], boolean: []))
    case "replay":
        status = try replay(Arguments(raw, valued: ["seed", "nodes", "fault-ticks", "planted-bug"], boolean: ["trace"]))
    case "bench":
        status = try bench(Arguments(raw, valued: ["entries", "batch", "payload-bytes"], boolean: []))
    case "--help", "-h", "help":
        print(usage)
        status = 0
    default:
        throw UsageError(description: "unknown command '\(command)'")
    }
} catch {
    FileHandle.standardError.write(Data("warrant-sim: \(error). Run `warrant-sim --help` for usage.\n".utf8))
    status = 2
}
exit(status)
