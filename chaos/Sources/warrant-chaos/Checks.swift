import Chaos
import ClusterHarness
import Foundation
import NIOCore
import Node

/// One checker's verdict.
struct CheckResult: Codable, Sendable {
    var name: String
    var passed: Bool
    var verdict: String
    var details: [String]

    /// As the run prints it: the verdict, then each detail indented.
    var lines: [String] { ["\(passed ? "pass" : "FAIL")  \(name): \(verdict)"] + details.map { "        " + $0 } }
}

enum Checks {
    /// Linearizability of the registers, per key.
    static func linearizability(_ history: [ClientOperation]) -> CheckResult {
        let started = ContinuousClock.now
        let verdicts = Linearizability.check(history)
        var details: [String] = []
        var violated = false, undecided = false
        for (key, verdict) in verdicts.sorted(by: { $0.key < $1.key }) {
            let count = history.filter { $0.key == key }.count
            switch verdict {
            case .linearizable: details.append("\(key): linearizable (\(count) operations)")
            case .violation(let why): violated = true; details.append("\(key): VIOLATION: \(why)")
            case .undecided(let why): undecided = true; details.append("\(key): undecided: \(why)")
            }
        }
        details.append(String(format: "checked in %.1f s", started.duration(to: .now).milliseconds / 1000))
        let counts = Dictionary(grouping: history, by: \.outcome).mapValues(\.count)
        details.append("operations: \(counts[.ok] ?? 0) ok, \(counts[.fail] ?? 0) failed, \(counts[.unknown] ?? 0) unknown")
        // A history not checked to the end is not a pass: a lost write may hide in it.
        return CheckResult(name: "linearizability", passed: !violated && !undecided, verdict: violated ? "violation" : (undecided ? "undecided" : "linearizable"),
                           details: details)
    }

    /// Every audit record of one node, paged.
    static func auditRecords(_ client: AdminClient, node: Int) async -> [AuditRecordBody]? {
        var records: [AuditRecordBody] = []
        var after: UInt64 = 0
        for _ in 0..<10_000 {
            guard let response = try? await client.request(at: node, .GET, "/v1/audit?after=\(after)&limit=1000", timeout: .seconds(10)),
                  response.status == .ok, let page = try? APIJSON.decode(AuditPageBody.self, from: response.body) else { return nil }
            if page.records.isEmpty { return records }
            records += page.records
            after = page.records.last!.sequence
        }
        return records
    }

    /// Acknowledged identities: each appears exactly once among every
    /// node's issuance records, no serial repeats, and a sample verifies on
    /// every node.
    static func issuance(_ client: AdminClient, nodes: Int, acknowledged: [IssuanceWorkload.Issued], raced: [String]) async -> CheckResult {
        var details: [String] = []
        var passed = true
        let acknowledgedSerials = acknowledged.map(\.serial) + raced
        let repeatedAcks = Dictionary(grouping: acknowledgedSerials, by: { $0 }).filter { $0.value.count > 1 }
        if !repeatedAcks.isEmpty {
            passed = false
            details.append("serials acknowledged more than once: \(repeatedAcks.keys.prefix(5).joined(separator: ", "))")
        }
        for node in 0..<nodes {
            guard let records = await auditRecords(client, node: node) else {
                passed = false
                details.append("node \(node + 1): the audit chain could not be read")
                continue
            }
            var counts: [String: Int] = [:]
            // Each join token was made for a SPIFFE ID of its own and works
            // once: two identities for one such ID are a double issuance,
            // whatever their serials (a retry that minted again).
            var perToken: [String: Int] = [:]
            for record in records where record.action == "identity.issue" && record.result.hasPrefix("ok:")
                && (record.target.contains("/chaos/issue/") || record.target.contains("/chaos/race/")) {
                perToken[record.target, default: 0] += 1
            }
            let doubled = perToken.filter { $0.value > 1 }
            if !doubled.isEmpty { passed = false; details.append("node \(node + 1): join tokens that gave more than one identity: \(doubled.keys.sorted().prefix(3))") }
            for record in records where record.action == "identity.issue" && record.result.hasPrefix("ok:") {
                guard let range = record.result.range(of: "serial=") else { continue }
                let serial = record.result[range.upperBound...].prefix { $0 != " " }
                counts[String(serial), default: 0] += 1
            }
            let missing = acknowledgedSerials.filter { counts[$0] == nil }
            let repeated = counts.filter { $0.value > 1 }
            if !missing.isEmpty { passed = false; details.append("node \(node + 1): \(missing.count) acknowledged identities missing from the audit chain, e.g. \(missing.prefix(3))") }
            if !repeated.isEmpty { passed = false; details.append("node \(node + 1): serials issued more than once: \(repeated.keys.prefix(3))") }
            details.append("node \(node + 1): \(counts.count) identities in the audit chain, \(acknowledgedSerials.count) acknowledged, all present once: \(missing.isEmpty && repeated.isEmpty)")
            // The acknowledged certificates verify here (at most 1,000 per node).
            var refused = 0
            for issued in acknowledged.prefix(1_000) {
                let body = Array((try? JSONSerialization.data(withJSONObject: ["x509_chain": issued.certificate])) ?? Data())
                let response = try? await client.request(at: node, .POST, "/v1/verify", headers: [("content-type", "application/json")], body: body,
                                                         timeout: .seconds(5))
                let valid = response.flatMap { try? JSONSerialization.jsonObject(with: Data($0.body)) as? [String: Any] }?["valid"] as? Bool
                if valid != true { refused += 1 }
            }
            if refused > 0 { passed = false; details.append("node \(node + 1): \(refused) of \(min(1_000, acknowledged.count)) acknowledged identities do not verify") }
        }
        return CheckResult(name: "issuance", passed: passed, verdict: passed ? "every acknowledged identity recorded exactly once" : "violation",
                           details: details)
    }

    static func replays(_ races: [ReplayWorkload.Race]) -> CheckResult {
        let doubled = races.filter { $0.successes > 1 }
        let byKind = Dictionary(grouping: races, by: \.kind)
        var details = byKind.sorted { $0.key < $1.key }.map { kind, races in
            "\(kind): \(races.count) tokens raced on every node, \(races.filter { $0.successes == 1 }.count) joined once, \(races.filter { $0.successes == 0 }.count) not at all"
        }
        details += doubled.map { "\($0.kind) token joined \($0.successes) times: \($0.statuses)" }
        return CheckResult(name: "replay", passed: doubled.isEmpty, verdict: doubled.isEmpty ? "at most one success per token" : "violation", details: details)
    }

    static func convergence(_ cluster: LocalProcessCluster) async -> CheckResult {
        let (agree, description) = await cluster.auditChainsAgree(seconds: 60)
        var details = [description]
        var applied: [String] = []
        for id in cluster.nodeIDs {
            if let status = await cluster.status(of: id, timeout: .seconds(2)) { applied.append("node \(id): term \(status.term), applied \(status.appliedIndex)") }
        }
        details += applied
        return CheckResult(name: "convergence", passed: agree, verdict: agree ? "every node holds the same intact audit chain" : "violation",
                           details: details)
    }

    /// For each fault, the longest time (within it and up to 5 s after, but
    /// not past the end of the workload) with no successful write.
    static func availability(_ history: [ClientOperation], timeline: [FaultRecord], workloadEnd: Double) -> (CheckResult, [Double]) {
        let successes = history.filter { ($0.kind == .write || $0.kind == .cas) && $0.outcome == .ok }.compactMap(\.completed).map { Double($0) / 1e9 }.sorted()
        var details: [String] = []
        var gaps: [Double] = []
        for fault in timeline {
            let end = min((fault.end ?? fault.start) + 5, workloadEnd)
            guard end > fault.start else { continue }
            var last = fault.start
            var gap = 0.0
            for time in successes where time > fault.start && time <= end {
                gap = max(gap, time - last)
                last = time
            }
            gap = max(gap, end - last)
            gaps.append(gap)
            details.append(String(format: "%7.1fs %@: longest time without a successful write %.2f s", fault.start, fault.fault, gap))
        }
        return (CheckResult(name: "availability", passed: true, verdict: "measured (not judged)", details: details), gaps)
    }
}
