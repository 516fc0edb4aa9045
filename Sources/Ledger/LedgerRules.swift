import Encoding
import Raft

/// Which rules the ledger applies entries by. Every node must apply the
/// same entry the same way, or their states and audit chains part; a
/// build that changes how an entry applies (a new operation, a new
/// refusal) would part from an older one replaying the same log. So a
/// change to how entries apply is made under a rules version: the new
/// build keeps applying by the old rules until the cluster adopts the new
/// version by an entry (`LedgerCommand.Operation.adoptRules`), which the
/// leader proposes only once every member's build knows it; from that
/// entry on every node applies by the new rules. A node whose build does
/// not know the adopted version stops there (fail-stop), and refuses to
/// load a checkpoint or snapshot taken under it, instead of parting from
/// the others.
///
/// Changing how entries apply, from here on: raise `known`, and make the
/// new behaviour depend on `version(in:)` being at least the new number.
public enum LedgerRules {
    /// The newest rules this build applies by.
    public static let known: UInt32 = 1
    /// The rules in force before any version was adopted.
    public static let initial: UInt32 = 1
    /// Where the adopted version is kept (under `authority/`: no plain
    /// document write, old or new, may make or change it).
    public static let document = "authority/ledger-rules"

    /// The version in force in `tables`.
    public static func version(in tables: some LedgerTables) throws -> UInt32 {
        try version(of: try tables.document(named: document))
    }

    /// The version a rules document holds (`initial` without one).
    public static func version(of document: Document?) throws -> UInt32 {
        guard let document else { return initial }
        guard let flat = JSONText.parseFlatObject(document.content, membersMax: 4), case .integer(let number)? = flat["version"],
              let version = UInt32(exactly: number) else {
            throw LedgerRulesError(reason: "the ledger's rules document does not read: \(String(decoding: document.content.prefix(64), as: UTF8.self))")
        }
        return version
    }

    static func content(_ version: UInt32) -> [UInt8] { Array("{\"version\":\(version)}".utf8) }

    /// Throws unless a build that knows rules up to `known` may go on with
    /// state under `version`.
    public static func check(_ version: UInt32, known: UInt32, at index: LogIndex) throws {
        guard version <= known else {
            throw LedgerRulesError(reason: "the ledger adopted rules version \(version) (log index \(index)); this node's build applies rules up to "
                + "version \(known), and would part from the other nodes: start it with the build the others run")
        }
    }
}

/// The ledger asks for rules this build does not know (or its rules
/// document is unreadable): the node must stop, not apply on.
public struct LedgerRulesError: Error, Sendable, CustomStringConvertible {
    public var reason: String
    public var description: String { reason }
}
