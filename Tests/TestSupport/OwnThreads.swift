import Foundation
import Testing

/// Swift's cooperative pool has as many threads as the machine has cores
/// (two here), and every test in the process shares it: it runs the tests
/// themselves, and wakes every `Task.sleep` and every task resumed from
/// another thread. A test that holds a pool thread for seconds without a
/// suspension point (fsyncs, a CPU-bound loop, a child process waited
/// for) holds up every other test's timers and network hops meanwhile. A
/// CI run's first 30 s once went by with both threads held by such tests:
/// an HTTP test's handler, asleep for 150 ms, woke after its client's
/// 30 s bound had passed.
///
/// The tools here keep such work off the pool.

/// Runs `work` on a thread of its own and waits for it.
public func offThePool<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: work()) }
        thread.stackSize = 8 << 20
        thread.start()
    }
}

/// A task executor with threads of its own: the tests of a suite marked
/// `.onOwnThreads` run on these (their synchronous code, and their async
/// code between awaits) instead of on the cooperative pool.
public final class OwnThreads: TaskExecutor, @unchecked Sendable {
    /// Shared by every suite so marked; started on first use.
    public static let shared = OwnThreads(count: 2)

    private let condition = NSCondition()
    /// Guarded by `condition`.
    private var jobs: [UnownedJob] = []
    private var head = 0

    private init(count: Int) {
        for index in 0..<count {
            let thread = Thread { [unowned self] in self.run() }
            thread.name = "tests-own-\(index)"
            thread.stackSize = 8 << 20
            thread.start()
        }
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Whether the calling thread is one of these.
    public static var isCurrent: Bool { Thread.current.threadDictionary[marker] != nil }
    private static let marker = "warrant.tests.own-thread"

    private func run() {
        Thread.current.threadDictionary[Self.marker] = true
        while true {
            condition.lock()
            while head == jobs.count { condition.wait() }
            let job = jobs[head]
            head += 1
            if head > 1_024, head * 2 > jobs.count {
                jobs.removeFirst(head)
                head = 0
            }
            condition.unlock()
            job.runSynchronously(on: asUnownedTaskExecutor())
        }
    }
}

/// Runs each test of the suite (or the test) on `OwnThreads`.
public struct OnOwnThreads: SuiteTrait, TestTrait, TestScoping {
    public var isRecursive: Bool { true }

    public func scopeProvider(for test: Test, testCase: Test.Case?) -> Self? {
        testCase == nil ? nil : self
    }

    public func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        try await withTaskExecutorPreference(OwnThreads.shared) { try await function() }
    }
}

extension Trait where Self == OnOwnThreads {
    /// The suite's tests block (file syncs, long CPU-bound loops, child
    /// processes waited for): they run on threads of their own, not on
    /// the cooperative pool every other test needs.
    public static var onOwnThreads: Self { OnOwnThreads() }
}
