import HashTreeCollections
import Ledger
import Raft

/// The applied ledger in memory: every document by name, their names in
/// order (for range scans), the audit chain's head, and the audit records
/// applied but not yet written to the audit table. A value type: copying
/// it for a checkpoint is cheap, and the copy stays as it was while the
/// original moves on.
struct LedgerMemory: LedgerTables, Sendable {
    private(set) var documents = TreeDictionary<String, Document>()
    private(set) var names = SortedNames()
    private(set) var head: (sequence: UInt64, hash: [UInt8]) = (0, AuditRecord.genesisHash)
    /// Audit records after the last one written to the audit table, oldest first.
    var unwrittenAudit: [AuditRecord] = []
    private(set) var applied: LogIndex = 0
    /// Content bytes of every document, for sizing encodings.
    private(set) var contentBytes = 0
    /// The active authority document's content, kept out of the map's
    /// lookups (every issuance on every node checks it; each lookup in a
    /// map of a few hundred thousand documents is a few cache misses).
    private(set) var activeAuthorityContent: [UInt8]?
    /// Documents under `AuthorityDocuments.issuedPrefix`: the identities
    /// whose records are kept (those not yet expired, and expired ones not
    /// yet forgotten). The node refuses to sign past its limit of them.
    private(set) var issuedCount = 0

    init() {}

    init(documents: [Document], head: (sequence: UInt64, hash: [UInt8]), applied: LogIndex) {
        for document in documents { put(document) }
        self.head = head
        self.applied = applied
    }

    func document(named name: String) -> Document? { documents[name] }

    func activeAuthority() -> [UInt8]? { activeAuthorityContent }

    mutating func put(_ document: Document) {
        if document.name == AuthorityDocuments.active { activeAuthorityContent = document.content }
        if let old = documents.updateValue(document, forKey: document.name) {
            contentBytes -= old.content.count
        } else {
            names.insert(document.name)
            if document.name.hasPrefix(AuthorityDocuments.issuedPrefix) { issuedCount += 1 }
        }
        contentBytes += document.content.count
    }

    mutating func deleteDocument(named name: String) {
        guard let old = documents.removeValue(forKey: name) else { return }
        if name == AuthorityDocuments.active { activeAuthorityContent = nil }
        contentBytes -= old.content.count
        names.remove(name)
        if name.hasPrefix(AuthorityDocuments.issuedPrefix) { issuedCount -= 1 }
    }

    func auditHead() -> (sequence: UInt64, hash: [UInt8]) { head }

    mutating func append(_ record: AuditRecord) {
        unwrittenAudit.append(record)
        head = (record.sequence, record.hash)
    }

    func appliedIndex() -> LogIndex { applied }

    mutating func setAppliedIndex(_ index: LogIndex) { applied = index }

    func documentNames(from: String, to: String, limit: Int, reverse: Bool) -> [String] {
        names.names(from: from, to: to, limit: limit, reverse: reverse)
    }

    mutating func namesFromRepeatedBound(_ from: String, to: String, limit: Int) -> [String] {
        names.namesRemembering(from: from, to: to, limit: limit)
    }

    mutating func firstName(under prefix: String) -> String? {
        names.firstRemembering(from: prefix).flatMap { $0.hasPrefix(prefix) ? $0 : nil }
    }

    /// Every document in name order.
    func forEachInOrder(_ body: (Document) throws -> Void) rethrows {
        try names.forEach(from: "") { name in
            try body(documents[name]!)
            return true
        }
    }
}
