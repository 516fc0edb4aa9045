import Foundation
@_exported import struct Raft.SeededGenerator

/// One client operation on a versioned document (a register with a
/// version), as the chaos harness records it: when it was invoked, when
/// (and whether) it completed, and what it observed.
///
/// Outcomes are judged the way a client can know them: `ok` (it took
/// effect, or for a compare-and-set with `conflict`, it was refused because
/// the version differed: both are observations of the register), `fail`
/// (it certainly did not take effect and observed nothing: refused before
/// anything was proposed, or never sent), `unknown` (a timeout, a lost
/// connection, a leader change while it was in flight: it may or may not
/// have happened).
public struct ClientOperation: Sendable, Codable, Hashable {
    public enum Kind: String, Sendable, Codable { case read, write, cas }
    public enum Outcome: String, Sendable, Codable { case ok, fail, unknown }

    public var id: Int
    public var client: Int
    public var key: String
    public var kind: Kind
    /// The value a write or compare-and-set stores.
    public var value: Int?
    /// The version a compare-and-set expects.
    public var expectedVersion: UInt64?
    /// Nanoseconds since the run began.
    public var invoked: UInt64
    /// Nil while (or if) the outcome is unknown.
    public var completed: UInt64?
    public var outcome: Outcome
    /// A read's version, or the version a successful write or
    /// compare-and-set created (0: the document did not exist).
    public var observedVersion: UInt64?
    /// A read's value (nil: no document).
    public var observedValue: Int?
    /// A compare-and-set answered "version conflict".
    public var conflict: Bool?
    /// The node the request went to, and what went wrong, for the report.
    public var node: UInt64?
    public var error: String?

    public init(id: Int, client: Int, key: String, kind: Kind, value: Int? = nil, expectedVersion: UInt64? = nil, invoked: UInt64,
                completed: UInt64? = nil, outcome: Outcome, observedVersion: UInt64? = nil, observedValue: Int? = nil, conflict: Bool? = nil,
                node: UInt64? = nil, error: String? = nil) {
        self.conflict = conflict
        self.id = id
        self.client = client
        self.key = key
        self.kind = kind
        self.value = value
        self.expectedVersion = expectedVersion
        self.invoked = invoked
        self.completed = completed
        self.outcome = outcome
        self.observedVersion = observedVersion
        self.observedValue = observedValue
        self.node = node
        self.error = error
    }

    public var summary: String {
        var text = "#\(id) client \(client) \(kind.rawValue) \(key)"
        if let expectedVersion { text += " if version \(expectedVersion)" }
        if let value { text += " := \(value)" }
        text += " -> \(outcome.rawValue)" + (conflict == true ? " (version conflict)" : "")
        if let observedVersion { text += " version \(observedVersion)" }
        if kind == .read, outcome == .ok { text += " value \(observedValue.map(String.init) ?? "none")" }
        return text
    }
}

/// The recorded operations of a run, one JSON object per line.
public enum HistoryFile {
    public static func encode(_ operations: [ClientOperation]) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return operations.map { String(decoding: (try? encoder.encode($0)) ?? Data(), as: UTF8.self) }.joined(separator: "\n") + "\n"
    }

    /// One operation per line (blank lines skipped); a line that is not
    /// one is named in the error.
    public static func decode(_ text: String) throws -> [ClientOperation] {
        let decoder = JSONDecoder()
        var operations: [ClientOperation] = []
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() where !line.isEmpty {
            do {
                operations.append(try decoder.decode(ClientOperation.self, from: Data(line.utf8)))
            } catch {
                throw HistoryError(line: number + 1, reason: "\(error)")
            }
        }
        return operations
    }
}

/// A history file's line that is not an operation.
public struct HistoryError: Error, CustomStringConvertible, Equatable {
    public var line: Int
    public var reason: String
    public var description: String { "line \(line): not an operation of a history (\(reason))" }
}

/// The seeded generator of the fault schedule and the clients' choices:
/// the consensus core's own (SplitMix64), so one number repeats a run.
public typealias ChaosRandom = SeededGenerator
