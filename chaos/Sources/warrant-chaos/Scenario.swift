import Foundation
import Yams

/// The faults the nemesis knows.
enum FaultKind: String, CaseIterable, Sendable {
    case isolateLeader = "isolate-leader"
    case partitionHalves = "partition-halves"
    case partialPartition = "partial-partition"
    case asymmetric
    case latency
    case stallNode = "stall-node"
    case killLeader = "kill-leader"
    case killRandom = "kill-random"
    case killMinority = "kill-minority"
    case pauseLeader = "pause-leader"
    case clockSkew = "clock-skew"
    case membership
}

/// A scenario file (chaos/scenarios/NAME.yaml): which faults, how long
/// each is held and how long the cluster is left alone between them.
struct Scenario: Sendable {
    var name: String
    var description: String
    var nodes: Int
    var durationSeconds: Double
    var faults: [FaultKind]
    var holdSeconds: ClosedRange<Double>
    var calmSeconds: ClosedRange<Double>

    static let keys: Set<String> = ["description", "nodes", "duration_seconds", "faults", "hold_seconds", "calm_seconds"]

    init(name: String, yaml: String) throws {
        guard let root = try Yams.compose(yaml: yaml), let mapping = root.mapping else {
            throw ChaosError("scenario \(name): not a YAML mapping")
        }
        for key in mapping.keys {
            guard let text = key.string, Self.keys.contains(text) else {
                throw ChaosError("scenario \(name): unknown key '\(key.string ?? "?")' (expected one of \(Self.keys.sorted().joined(separator: ", ")))")
            }
        }
        self.name = name
        description = mapping["description"]?.string ?? ""
        nodes = Int(mapping["nodes"]?.string ?? "3") ?? 0
        guard [3, 5].contains(nodes) else { throw ChaosError("scenario \(name): nodes must be 3 or 5") }
        durationSeconds = Double(mapping["duration_seconds"]?.string ?? "60") ?? 0
        guard (5...7_200).contains(durationSeconds) else { throw ChaosError("scenario \(name): duration_seconds must be 5...7200") }
        guard let list = mapping["faults"]?.sequence, !list.isEmpty else { throw ChaosError("scenario \(name): faults must be a non-empty list") }
        faults = try list.map { node in
            guard let text = node.string, let kind = FaultKind(rawValue: text) else {
                throw ChaosError("scenario \(name): unknown fault '\(node.string ?? "?")' (known: \(FaultKind.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            return kind
        }
        func range(_ key: String, _ fallback: ClosedRange<Double>) throws -> ClosedRange<Double> {
            guard let node = mapping[key] else { return fallback }
            guard let pair = node.sequence, pair.count == 2, let low = pair[0].string.flatMap(Double.init), let high = pair[1].string.flatMap(Double.init),
                  low > 0, low <= high, high <= 600 else {
                throw ChaosError("scenario \(name): \(key) must be [low, high] seconds, 0 < low <= high <= 600")
            }
            return low...high
        }
        holdSeconds = try range("hold_seconds", 2...5)
        calmSeconds = try range("calm_seconds", 1...3)
    }

    /// `name` is a file path, or a name under chaos/scenarios/ (found from
    /// the working directory upwards).
    static func load(_ name: String) throws -> Scenario {
        var path = name
        if !name.contains("/") && !name.hasSuffix(".yaml") {
            var directory = URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
            path = ""
            for _ in 0..<6 {
                let candidate = directory.appendingPathComponent("chaos/scenarios/\(name).yaml").path
                if FileManager.default.fileExists(atPath: candidate) { path = candidate; break }
                directory.deleteLastPathComponent()
            }
            guard !path.isEmpty else { throw ChaosError("no scenario '\(name)' in chaos/scenarios/ (run from the repository)") }
        }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw ChaosError("cannot read the scenario file \(path)") }
        return try Scenario(name: URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent, yaml: text)
    }
}

struct ChaosError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
