import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import WorkloadAPI

/// The Workload API's caller, as the server stamps it on each stream: the
/// executable's path is the caller's to choose, so it must not be able to
/// pass for other fields.
@Suite("Workload API callers")
struct PeerAttestationTests {
    @Test("A path with ',', '=', '%', spaces or non-ASCII reads back as itself and cannot pass for another uid, gid, path or digest; a header naming a field twice, an unknown field or a bad escape is refused")
    func header() throws {
        let hash = String(repeating: "ab", count: 32)
        for path in ["/tmp/x,uid=1001", "/tmp/d,exe=/usr/bin/app", "/tmp/a,sha256=\(hash)", "/tmp/é x%41", "/usr/bin/python3.11"] {
            let peer = PeerCredentials(pid: 7, uid: 1002, gid: 1002, executable: path, sha256: nil)
            let read = try #require(PeerCredentials(header: peer.description), "\(peer)")
            #expect(read == peer, "\(peer.description)")
            for rule in ["uid=1001", "exe=/usr/bin/app", "sha256=\(hash)"] {
                #expect(!(try PeerRule(parsing: rule)).admits(read), "\(path) passes for \(rule)")
            }
        }
        #expect(try PeerRule(parsing: "uid=1002,exe=/usr/bin/python3.11").admits(try #require(PeerCredentials(header: "pid=7,uid=1002,gid=5,exe=/usr/bin/python3.11"))))
        for forged in ["pid=7,uid=1002,gid=1002,uid=1001", "pid=7,uid=1,gid=1,exe=/a,exe=/b", "pid=7,uid=1,gid=1,color=red",
                       "pid=7,uid=1,gid=1,exe=/a%2", "pid=7,uid=1,gid=1,exe=/a%zz", "pid=7,uid=1,gid=1,", "uid=1,gid=1"] {
            #expect(PeerCredentials(header: forged) == nil, "\(forged)")
        }
    }

    @Test("An executable is hashed once whichever process runs it (by the file the link names, not the link), and the hash is the file's SHA-256")
    func digests() throws {
        let sleepers = try (0..<2).map { _ in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/sleep")
            process.arguments = ["10"]
            try process.run()
            return process
        }
        defer { for process in sleepers { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() } }
        let before = PeerCredentials.digestsKept
        let first = try #require(PeerCredentials.digest(of: "/proc/\(sleepers[0].processIdentifier)/exe"))
        let second = try #require(PeerCredentials.digest(of: "/proc/\(sleepers[1].processIdentifier)/exe"))
        #expect(first == second)
        #expect(PeerCredentials.digestsKept <= before + 1, "one file, one digest")
        let contents = try Data(contentsOf: URL(fileURLWithPath: "/proc/\(sleepers[0].processIdentifier)/exe"))
        #expect(first == SHA256.hash(data: contents).map { String(format: "%02x", $0) }.joined())
    }

    /// A source that is never asked: the test only connects.
    private struct Unasked: WorkloadIdentitySource {
        func jwtSVID(audiences: [String]) async throws -> String { throw WorkloadRateLimited(message: "unasked") }
        func validate(jwt: String, audience: String) async throws -> (spiffeID: String, claimsJSON: [UInt8]) { throw WorkloadRateLimited(message: "unasked") }
    }

    @Test("Past its bound of open connections the Workload API closes a new one at once; those within it stay open")
    func connectionBound() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("wl-\(UUID().uuidString.prefix(8)).sock").path
        let server = try WorkloadAPIServer(path: path, feed: WorkloadIdentityFeed(), source: Unasked(), connectionsMax: 2)
        defer { Task { await server.stop() } }
        func connect() throws -> Int32 {
            let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { buffer in
                for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
            }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            try #require(connected == 0, "connect: \(String(cString: strerror(errno)))")
            return descriptor
        }
        /// What became of a connection within `seconds`: the server closed it, or sent something (its
        /// HTTP/2 settings: it has taken the connection in), or neither. Polled without blocking a
        /// thread of the shared pool (other suites' tasks run on it meanwhile).
        enum Seen { case closed, data, nothing }
        func watch(_ descriptor: Int32, within seconds: Double, untilClosed: Bool) async -> Seen {
            let deadline = Date().addingTimeInterval(seconds)
            var buffer = [UInt8](repeating: 0, count: 4096)
            var sawData = false
            repeat {
                var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
                while poll(&poller, 1, 0) > 0 {
                    if read(descriptor, &buffer, buffer.count) <= 0 { return .closed }
                    sawData = true
                    if !untilClosed { return .data }
                }
                try? await Task.sleep(for: .milliseconds(20))
            } while Date() < deadline
            return sawData ? .data : .nothing
        }
        func closedByServer(_ descriptor: Int32, within seconds: Double) async -> Bool { await watch(descriptor, within: seconds, untilClosed: true) == .closed }
        var kept = try (0..<2).map { _ in try connect() }
        defer { for descriptor in kept where descriptor >= 0 { close(descriptor) } }
        // Counted once the server has taken them in: it then sends its settings.
        for descriptor in kept { #expect(await watch(descriptor, within: 60, untilClosed: false) == .data, "the server did not take a connection in") }
        let extra = try connect()
        defer { close(extra) }
        #expect(await closedByServer(extra, within: 10), "the third connection stayed open")
        for descriptor in kept { #expect(await !closedByServer(descriptor, within: 0.3), "a connection within the bound was closed") }
        // One closed by its caller frees its place.
        close(kept[0])
        kept[0] = -1
        // Tried again until the server has seen the close (a busy machine
        // may take longer than any fixed wait), for 30 s at most.
        var again: Int32 = -1
        for _ in 0..<60 {
            let attempt = try connect()
            if await watch(attempt, within: 60, untilClosed: false) == .data, await !closedByServer(attempt, within: 0.5) {
                again = attempt
                break
            }
            close(attempt)
        }
        defer { if again >= 0 { close(again) } }
        #expect(again >= 0, "a place freed was not given again")
    }
}
