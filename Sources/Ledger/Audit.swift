import Crypto
import Raft

/// One link of the tamper-evident audit chain: what happened, to what, by
/// whom, with what result, when (leader-stamped), and the SHA-256 of the
/// previous record, all covered by this record's own SHA-256.
public struct AuditRecord: Sendable, Hashable {
    public var sequence: UInt64
    public var logIndex: LogIndex
    public var timeMillis: UInt64
    public var actor: String
    public var action: String
    public var target: String
    public var result: String
    public var previousHash: [UInt8]
    public var hash: [UInt8]

    public static let genesisHash = [UInt8](repeating: 0, count: 32)

    /// A record linked after `previousHash`, its hash computed.
    public init(sequence: UInt64, logIndex: LogIndex, timeMillis: UInt64, actor: String, action: String, target: String,
                result: String, previousHash: [UInt8]) {
        self.sequence = sequence
        self.logIndex = logIndex
        self.timeMillis = timeMillis
        self.actor = actor
        self.action = action
        self.target = target
        self.result = result
        self.previousHash = previousHash
        self.hash = []
        self.hash = computedHash
    }

    /// SHA-256 over every field but `hash`, length-prefixed so no two
    /// records share an encoding.
    public var computedHash: [UInt8] {
        var w = BinaryWriter(capacity: 48 + actor.utf8.count + action.utf8.count + target.utf8.count + result.utf8.count + previousHash.count)
        w.write(sequence)
        w.write(logIndex)
        w.write(timeMillis)
        w.writeBytes(actor.utf8)
        w.writeBytes(action.utf8)
        w.writeBytes(target.utf8)
        w.writeBytes(result.utf8)
        w.writeBytes(previousHash)
        return w.bytes.withUnsafeBytes { bytes in
            var hasher = SHA256() // in one pass, not hash(data:)'s generic walk
            hasher.update(bufferPointer: bytes)
            return hasher.finalize()
        }.withUnsafeBytes { Array($0) }
    }
}

public enum AuditVerification: Sendable, Hashable {
    /// Every record links to the one before and matches its hash.
    case intact(count: UInt64, head: [UInt8])
    /// The first record that does not; nothing after it can be trusted.
    case broken(sequence: UInt64, reason: String)
}

public enum AuditChain {
    /// Recomputes the chain from the genesis hash.
    public static func verify(_ records: some Sequence<AuditRecord>) -> AuditVerification {
        var previous = AuditRecord.genesisHash
        var expectedSequence: UInt64 = 1
        for record in records {
            guard record.sequence == expectedSequence else {
                return .broken(sequence: record.sequence, reason: "expected record \(expectedSequence), found \(record.sequence)")
            }
            guard record.previousHash == previous else {
                return .broken(sequence: record.sequence, reason: "does not link to the record before it")
            }
            guard record.computedHash == record.hash else {
                return .broken(sequence: record.sequence, reason: "its contents do not match its hash")
            }
            previous = record.hash
            expectedSequence += 1
        }
        return .intact(count: expectedSequence - 1, head: previous)
    }
}
