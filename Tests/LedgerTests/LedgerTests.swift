import Ledger
import Raft
import RaftSimulator
import Testing

private func put(_ name: String, _ text: String, expected: UInt64? = nil, actor: String = "spiffe://example.org/admin", at time: UInt64 = 1_000) -> LedgerCommand {
    LedgerCommand(timeMillis: time, actor: actor, requestID: "req-\(name)-\(text)",
                  operation: .putDocument(name: name, format: .json, content: Array(text.utf8), expectedVersion: expected))
}

private func entry(_ index: LogIndex, _ command: LedgerCommand) -> Entry {
    Entry(term: 1, index: index, payload: .command(command.encoded))
}

/// Applies commands at indices 1, 2, ... and returns the tables and outcomes.
private func applying(_ commands: [LedgerCommand]) -> (InMemoryLedgerTables, [LedgerOutcome.Result]) {
    var tables = InMemoryLedgerTables()
    var results: [LedgerOutcome.Result] = []
    for (offset, command) in commands.enumerated() {
        results.append(try! Ledger.apply(entry(LogIndex(offset + 1), command), to: &tables)!.result)
    }
    return (tables, results)
}

@Suite("Ledger: documents")
struct DocumentTests {
    @Test("Create, replace if the version matches, refuse a stale version, delete")
    func compareAndSet() {
        let (tables, results) = applying([
            put("policies/ci", "{\"v\":1}", expected: 0),
            put("policies/ci", "{\"v\":2}", expected: 1),
            put("policies/ci", "{\"v\":\"stale\"}", expected: 1),
            put("policies/ci", "{\"v\":0}", expected: 0),
            LedgerCommand(timeMillis: 5, actor: "admin", requestID: "d", operation: .deleteDocument(name: "policies/ci", expectedVersion: 2)),
            LedgerCommand(timeMillis: 6, actor: "admin", requestID: "d2", operation: .deleteDocument(name: "policies/ci", expectedVersion: nil)),
        ])
        #expect(results[0] == .written(version: 1))
        #expect(results[1] == .written(version: 2))
        #expect(results[2] == .rejected("version conflict: 'policies/ci' is at version 2, not 1"))
        #expect(results[3] == .rejected("version conflict: 'policies/ci' is at version 2, not 0"))
        #expect(results[4] == .deleted)
        #expect(results[5] == .rejected("'policies/ci' does not exist"))
        #expect(tables.documents.isEmpty)
        #expect(tables.appliedIndex() == 6)
    }

    @Test("Bad names and oversized content are refused, audited, and change nothing")
    func limits() {
        let big = [UInt8](repeating: 0x20, count: LedgerLimits.documentContentBytesMax + 1)
        let (tables, results) = applying([
            put("Policies/CI", "{}"),
            put("a/../b", "{}"),
            put("", "{}"),
            LedgerCommand(timeMillis: 1, actor: "admin", requestID: "big", operation: .putDocument(name: "big", format: .yaml, content: big, expectedVersion: nil)),
        ])
        #expect(results.allSatisfy { if case .rejected = $0 { return true } else { return false } })
        #expect(results[0] == .rejected("document name 'Policies/CI' may hold only a-z, 0-9, '.', '_', '-' and '/'"))
        #expect(results[1] == .rejected("document name 'a/../b' has an empty, '.' or '..' segment"))
        #expect(tables.documents.isEmpty)
        #expect(tables.audit.count == 4)
    }

    @Test("Malformed command bytes are refused and audited, not applied")
    func malformedCommand() throws {
        var tables = InMemoryLedgerTables()
        let outcome = try Ledger.apply(Entry(term: 1, index: 1, payload: .command([9, 9, 9])), to: &tables)
        guard case .rejected(let reason)? = outcome?.result else {
            Issue.record("expected a rejection")
            return
        }
        #expect(reason.contains("malformed command"))
        #expect(tables.audit.first?.action == "invalid")
    }

    @Test("Commands round-trip through their encoding; damaged ones are refused")
    func commandCodec() throws {
        let commands = [
            put("x", "{}", expected: nil),
            put("y/z", "a: 1", expected: 7),
            LedgerCommand(timeMillis: 42, actor: "ci", requestID: "r", operation: .deleteDocument(name: "y/z", expectedVersion: 0)),
        ]
        for command in commands { #expect(try LedgerCommand(decoding: command.encoded) == command) }
        // The operation's tag can be read without decoding the rest, whatever the actor and request id.
        let long = LedgerCommand(timeMillis: 1, actor: String(repeating: "a", count: 200), requestID: String(repeating: "r", count: 100),
                                 operation: .deleteDocument(name: "q", expectedVersion: nil))
        #expect((commands + [long]).map { LedgerCommand.operationTag(in: $0.encoded) } == [1, 1, 2, 2])
        #expect(LedgerCommand.operationTag(in: Array(long.encoded.prefix(60))) == nil, "cut inside the actor")
        #expect(LedgerCommand.operationTag(in: []) == nil)
        var damaged = commands[0].encoded
        damaged[damaged.count - 9] = 5
        #expect(throws: CodecError.self) { try LedgerCommand(decoding: damaged) }
    }
}

@Suite("Ledger: audit chain")
struct AuditChainTests {
    @Test("Every change is recorded with who, what, when and the result; the chain verifies")
    func chainRecordsEverything() {
        let (tables, _) = applying([put("a", "1", expected: 0, actor: "alice", at: 10), put("a", "2", expected: 5, actor: "bob", at: 20)])
        #expect(tables.audit.map(\.actor) == ["alice", "bob"])
        #expect(tables.audit.map(\.timeMillis) == [10, 20])
        #expect(tables.audit.map(\.result) == ["ok: version 1", "rejected: version conflict: 'a' is at version 1, not 5"])
        #expect(tables.audit[1].previousHash == tables.audit[0].hash)
        #expect(AuditChain.verify(tables.audit) == .intact(count: 2, head: tables.audit[1].hash))
    }

    @Test("A rewritten, removed or reordered record breaks the chain at that record")
    func tamperingIsDetected() {
        let (tables, _) = applying((0..<5).map { put("doc-\($0)", "\($0)") })
        var rewritten = tables.audit
        rewritten[2].result = "ok: version 99"
        #expect(AuditChain.verify(rewritten) == .broken(sequence: 3, reason: "its contents do not match its hash"))
        var removed = tables.audit
        removed.remove(at: 1)
        #expect(AuditChain.verify(removed) == .broken(sequence: 3, reason: "expected record 2, found 3"))
        var relinked = tables.audit
        relinked[3] = AuditRecord(sequence: 4, logIndex: 4, timeMillis: 1, actor: "mallory", action: "document.put", target: "doc-3",
                                  result: "ok: version 1", previousHash: AuditRecord.genesisHash)
        #expect(AuditChain.verify(relinked) == .broken(sequence: 4, reason: "does not link to the record before it"))
    }

    @Test("Every node of a replicated cluster ends with the same documents and the same audit head")
    func replicasAgree() throws {
        let net = ScenarioNetwork(voters: [1, 2, 3])
        var tables: [NodeID: InMemoryLedgerTables] = [1: .init(), 2: .init(), 3: .init()]
        net.cluster.onApplied = { node, entry in _ = try! Ledger.apply(entry, to: &tables[node]!) }
        net.elect(1)
        for i in 0..<20 {
            let name = "docs/\(i % 4)"
            try net.propose(put(name, "{\"i\":\(i)}", expected: nil, at: UInt64(i)).encoded, on: 1)
        }
        net.tick(3)
        let heads = [NodeID(1), 2, 3].map { tables[$0]!.auditHead().hash }
        #expect(Set(heads).count == 1)
        #expect(tables[1]!.audit.count == 21, "the bootstrap membership and twenty writes")
        #expect(tables[1]!.audit.first?.action == "membership.change")
        #expect(tables[2]!.documents == tables[1]!.documents)
        #expect(tables[3]!.documents["docs/3"]?.version == 5)
        for id: NodeID in [1, 2, 3] {
            #expect(AuditChain.verify(tables[id]!.audit) == .intact(count: 21, head: heads[0]))
        }
    }
}
