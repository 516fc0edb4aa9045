import Ledger
import Raft

/// The encodings of the ledger's state, with the `Raft` codec.
///
/// A ledger snapshot (what a Raft snapshot carries to a follower) is a
/// stream of documents and the audit chain: see `SnapshotStream`.
///
/// A checkpoint (what a node keeps on disk so it need not replay the whole
/// log): magic, the Raft snapshot metadata (index, term, membership), the
/// audit chain's head at that index, every document in name order, and a
/// CRC-32C of everything before it. The audit records themselves are in
/// the audit table.
enum LedgerSnapshot {
    /// Every document, in name order.
    static func encodeDocuments(_ memory: LedgerMemory, into w: inout BinaryWriter) {
        w.write(UInt32(memory.documents.count))
        memory.forEachInOrder { encode($0, into: &w) }
    }

    /// `documents` (in name order) as `encodeDocuments` writes them.
    static func encodeDocuments(of documents: [Document], into w: inout BinaryWriter) {
        w.write(UInt32(documents.count))
        for document in documents { encode(document, into: &w) }
    }

    static func encode(_ document: Document, into w: inout BinaryWriter) {
        w.writeBytes(document.name.utf8)
        w.write(document.format.rawValue)
        w.writeBytes(document.content)
        w.write(document.version)
        w.write(document.logIndex)
    }

    /// Documents as `encodeDocuments` wrote them (in name order unless
    /// `ordered` is false).
    static func decodeDocuments(_ r: inout BinaryReader, ordered: Bool = true) throws -> [Document] {
        let count = Int(try r.readUInt32("document count"))
        guard count <= r.remaining else { throw CodecError.invalid(field: "document count", reason: "impossible count \(count)") }
        var documents: [Document] = []
        documents.reserveCapacity(count)
        var previous: String?
        for _ in 0..<count {
            let name = try text(&r, "name")
            if ordered {
                if let previous, previous >= name { throw CodecError.invalid(field: "documents", reason: "not in name order at '\(name)'") }
                previous = name
            }
            let rawFormat = try r.readUInt8("format")
            guard let format = DocumentFormat(rawValue: rawFormat) else { throw CodecError.invalid(field: "format", reason: "unknown format \(rawFormat)") }
            let content = try r.readBytes("content", limit: LedgerLimits.documentContentBytesMax)
            documents.append(Document(name: name, format: format, content: content, version: try r.readUInt64("version"),
                                      logIndex: try r.readUInt64("log index")))
        }
        return documents
    }

    static func encode(_ record: AuditRecord, into w: inout BinaryWriter) {
        w.write(record.sequence)
        w.write(record.logIndex)
        w.write(record.timeMillis)
        for text in [record.actor, record.action, record.target, record.result] { w.writeBytes(text.utf8) }
        w.writeBytes(record.previousHash)
        w.writeBytes(record.hash)
    }

    /// Reads one record as stored (its hash kept as read, not recomputed).
    static func decodeRecord(_ r: inout BinaryReader) throws -> AuditRecord {
        let sequence = try r.readUInt64("sequence")
        let logIndex = try r.readUInt64("log index")
        let time = try r.readUInt64("time")
        let actor = try text(&r, "actor"), action = try text(&r, "action"), target = try text(&r, "target"), result = try text(&r, "result")
        let previousHash = try r.readBytes("previous hash", limit: 64)
        let hash = try r.readBytes("hash", limit: 64)
        var record = AuditRecord(sequence: sequence, logIndex: logIndex, timeMillis: time, actor: actor, action: action,
                                 target: target, result: result, previousHash: previousHash)
        record.hash = hash
        return record
    }

    static func text(_ r: inout BinaryReader, _ field: String) throws -> String {
        try r.readString(field, limit: 1 << 20)
    }
}

/// A checkpoint file's contents.
struct Checkpoint {
    static let magic: [UInt8] = Array("WRNTCKP1".utf8)
    var metadata: SnapshotMetadata
    var head: (sequence: UInt64, hash: [UInt8])
    var documents: [Document]

    static func fileName(_ index: LogIndex) -> String {
        let digits = String(index)
        return "checkpoint-" + String(repeating: "0", count: max(0, 20 - digits.count)) + digits + ".ledger"
    }

    static func index(ofFile name: String) -> LogIndex? {
        guard name.hasPrefix("checkpoint-"), name.hasSuffix(".ledger"), name.utf8.count == 38 else { return nil }
        return LogIndex(name.dropFirst(11).prefix(20))
    }

    /// Writes the checkpoint file for `memory` at `path`, a megabyte at a
    /// time, the documents in the map's own order (the name order costs a
    /// lookup each).
    static func write(_ memory: LedgerMemory, metadata: SnapshotMetadata, to path: String, directory: String) throws {
        try FileSystem.writeSealed(to: path, directory: directory, magic: magic) { file in
            file.buffer.write(metadata)
            file.buffer.write(memory.head.sequence)
            file.buffer.writeBytes(memory.head.hash)
            file.buffer.write(UInt32(memory.documents.count))
            for (_, document) in memory.documents {
                LedgerSnapshot.encode(document, into: &file.buffer)
                try file.flushIfFull()
            }
        }
    }

    static func decode(_ bytes: [UInt8], path: String) throws -> Checkpoint {
        try FileSystem.unseal(bytes, magic: magic, damaged: { reason in
            StorageError(code: .corruptState, reason: "\(path): the ledger checkpoint is unusable (\(reason)). \(StorageError.rejoinAdvice)")
        }) { r in
            let metadata = try r.readSnapshotMetadata()
            let sequence = try r.readUInt64("audit sequence")
            let hash = try r.readBytes("audit hash", limit: 64)
            return Checkpoint(metadata: metadata, head: (sequence, hash), documents: try LedgerSnapshot.decodeDocuments(&r, ordered: false))
        }
    }
}
