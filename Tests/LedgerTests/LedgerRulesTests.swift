import Ledger
import Raft
import Testing

@Suite("Ledger rules versions")
struct LedgerRulesTests {
    static func adopt(_ version: UInt32, at index: LogIndex) -> Entry {
        Entry(term: 1, index: index, payload: .command(LedgerCommand(timeMillis: 1_000, actor: "admin:root", requestID: "r\(index)",
                                                                     operation: .adoptRules(version: version)).encoded))
    }

    @Test("An entry adopting rules this build does not know stops the apply and changes nothing; one that knows them adopts them, forward only")
    func adoption() throws {
        var tables = InMemoryLedgerTables()
        _ = try Ledger.apply(Entry(term: 1, index: 1, payload: .noop), to: &tables)
        #expect(try LedgerRules.version(in: tables) == LedgerRules.initial)
        // The adopting command round-trips (tag 14).
        let command = LedgerCommand(timeMillis: 1, actor: "a", requestID: "b", operation: .adoptRules(version: 7))
        #expect(try LedgerCommand(decoding: command.encoded) == command)
        #expect(LedgerCommand.operationTag(in: command.encoded) == 14)

        let before = tables
        #expect(throws: LedgerRulesError.self) { try Ledger.apply(Self.adopt(2, at: 2), to: &tables, rulesKnown: 1) }
        #expect(tables.documents == before.documents && tables.audit == before.audit && tables.applied == 1, "nothing changed")

        let outcome = try Ledger.apply(Self.adopt(2, at: 2), to: &tables, rulesKnown: 2)
        #expect(outcome?.result == .written(version: 1))
        #expect(try LedgerRules.version(in: tables) == 2 && tables.audit.last?.action == "ledger.rules")
        #expect(try Ledger.apply(Self.adopt(2, at: 3), to: &tables, rulesKnown: 5)?.result
            == .rejected("the ledger applies rules version 2 already; versions only move forward"))
        guard case .rejected? = try Ledger.apply(Self.adopt(1, at: 4), to: &tables, rulesKnown: 5)?.result else {
            Issue.record("adopting the initial rules is refused")
            return
        }
        // No plain document write makes or changes the rules.
        let put = LedgerCommand(timeMillis: 1, actor: "a", requestID: "p", operation: .putDocument(name: LedgerRules.document, format: .json,
                                                                                                  content: Array("{\"version\":1}".utf8), expectedVersion: nil))
        guard case .rejected? = try Ledger.apply(Entry(term: 1, index: 5, payload: .command(put.encoded)), to: &tables, rulesKnown: 5)?.result else {
            Issue.record("a plain write to the rules document is refused")
            return
        }
        #expect(try Ledger.apply(Self.adopt(3, at: 6), to: &tables, rulesKnown: 3)?.result == .written(version: 2))
        #expect(try LedgerRules.version(in: tables) == 3)
        #expect(throws: LedgerRulesError.self, "state under rules 3 is refused by a build that knows 2") {
            try LedgerRules.check(try LedgerRules.version(in: tables), known: 2, at: 6)
        }
    }
}
