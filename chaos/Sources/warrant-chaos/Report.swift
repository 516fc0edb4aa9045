import Chaos
import Foundation

/// The run's report directory: history.jsonl, faults.jsonl, verdicts.json,
/// summary.txt and report.html (the fault timeline and latency over time).
enum Report {
    static func write(to directory: String, scenario: Scenario, seed: UInt64, history: [ClientOperation], timeline: [FaultRecord], checks: [CheckResult],
                      verdict: String, log: [String]) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try HistoryFile.encode(history).write(toFile: "\(directory)/history.jsonl", atomically: true, encoding: .utf8)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        let faults = timeline.map { String(decoding: (try? JSONEncoder().encode($0)) ?? Data(), as: UTF8.self) }.joined(separator: "\n") + "\n"
        try faults.write(toFile: "\(directory)/faults.jsonl", atomically: true, encoding: .utf8)
        try encoder.encode(checks).write(to: URL(fileURLWithPath: "\(directory)/verdicts.json"))
        try (log.joined(separator: "\n") + "\n").write(toFile: "\(directory)/summary.txt", atomically: true, encoding: .utf8)
        try html(scenario: scenario, seed: seed, history: history, timeline: timeline, checks: checks, verdict: verdict)
            .write(toFile: "\(directory)/report.html", atomically: true, encoding: .utf8)
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    /// One self-contained page: verdicts, then an SVG of every operation's
    /// latency against time (green ok, orange refused, red unknown) over
    /// the shaded fault windows.
    static func html(scenario: Scenario, seed: UInt64, history: [ClientOperation], timeline: [FaultRecord], checks: [CheckResult], verdict: String) -> String {
        let width = 1100.0, height = 360.0, left = 60.0, bottom = 30.0
        let end = max(1, history.map { Double($0.completed ?? $0.invoked) / 1e9 }.max() ?? 1, timeline.map { $0.end ?? $0.start }.max() ?? 1)
        let latencyMax = 5_000.0
        func x(_ seconds: Double) -> Double { left + (width - left - 10) * seconds / end }
        // Latency on a log scale from 1 ms to 5 s.
        func y(_ milliseconds: Double) -> Double {
            let clamped = min(max(milliseconds, 1), latencyMax)
            return (height - bottom) - (height - bottom - 10) * log10(clamped) / log10(latencyMax)
        }
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(Int(width))' height='\(Int(height))' style='background:#fff;border:1px solid #ccc'>"
        for (index, fault) in timeline.enumerated() {
            let x0 = x(fault.start), x1 = x(fault.end ?? end)
            svg += "<rect x='\(x0)' y='0' width='\(max(1, x1 - x0))' height='\(height - bottom)' fill='\(index % 2 == 0 ? "#fde2e2" : "#e2e8fd")'><title>\(escape(fault.fault)): \(escape(fault.detail))</title></rect>"
            svg += "<text x='\(x0 + 2)' y='\(12 + Double(index % 4) * 11)' font-size='9' fill='#555'>\(escape(fault.fault))</text>"
        }
        let stride = max(1, history.count / 6_000)
        for (index, operation) in history.enumerated() where index % stride == 0 {
            let start = Double(operation.invoked) / 1e9
            let latency = operation.completed.map { Double($0 - min($0, operation.invoked)) / 1e6 } ?? latencyMax
            let colour = operation.outcome == .ok ? "#2a9d4b" : (operation.outcome == .fail ? "#e08a00" : "#d62828")
            svg += "<circle cx='\(x(start))' cy='\(y(latency))' r='1.6' fill='\(colour)'/>"
        }
        for ms in [1.0, 10, 100, 1_000] {
            svg += "<line x1='\(left)' x2='\(width - 10)' y1='\(y(ms))' y2='\(y(ms))' stroke='#eee'/><text x='4' y='\(y(ms) + 3)' font-size='10'>\(Int(ms)) ms</text>"
        }
        var tick = 0.0
        while tick <= end {
            svg += "<text x='\(x(tick))' y='\(height - 10)' font-size='10'>\(Int(tick)) s</text>"
            tick += max(5, (end / 12).rounded())
        }
        svg += "</svg>"
        var page = "<!doctype html><meta charset='utf-8'><title>warrant chaos: \(escape(scenario.name)) seed \(seed)</title>"
        page += "<body style='font-family:sans-serif;max-width:1140px;margin:20px auto'>"
        page += "<h1>\(escape(scenario.name)), seed \(seed): \(escape(verdict))</h1><p>\(escape(scenario.description))</p>"
        page += "<h2>Latency over time</h2><p>Each dot is one register operation at the time it was invoked: green ok, orange refused, red unknown (plotted at 5 s). Shaded: faults (hover for details).</p>" + svg
        page += "<h2>Checkers</h2>"
        for check in checks {
            page += "<h3>\(escape(check.name)): \(check.passed ? "pass" : "FAIL") (\(escape(check.verdict)))</h3><ul>"
            for detail in check.details { page += "<li>\(escape(detail))</li>" }
            page += "</ul>"
        }
        page += "<h2>Faults</h2><table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>start s</th><th>end s</th><th>fault</th><th>what</th></tr>"
        for fault in timeline {
            page += "<tr><td>\(String(format: "%.1f", fault.start))</td><td>\(fault.end.map { String(format: "%.1f", $0) } ?? "-")</td><td>\(escape(fault.fault))</td><td>\(escape(fault.detail))</td></tr>"
        }
        page += "</table><p>The full history is in history.jsonl, the faults in faults.jsonl, the verdicts in verdicts.json.</p></body>"
        return page
    }
}
