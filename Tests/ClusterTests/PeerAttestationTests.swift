import Crypto
import Foundation
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
}
