import Foundation
import Testing
import TestSupport

/// The trait the blocking suites use: their tests run off the cooperative pool.
@Suite("Tests marked onOwnThreads", .onOwnThreads)
struct OwnThreadsTests {
    private static func onOwnThread() -> Bool { OwnThreads.isCurrent }

    @Test("A synchronous test runs on one of the suite's own threads")
    func synchronous() {
        #expect(Self.onOwnThread(), "on \(Thread.current.name ?? "an unnamed thread")")
    }

    @Test("An async test stays on the own threads across a sleep and in a child task")
    func asynchronous() async throws {
        #expect(Self.onOwnThread())
        try await Task.sleep(for: .milliseconds(5))
        #expect(Self.onOwnThread(), "after a sleep")
        let child = await Task { Self.onOwnThread() }.value
        #expect(!child, "an unstructured task does not inherit the preference")
        async let structured = Self.onOwnThread()
        #expect(await structured, "a child task does")
    }
}
