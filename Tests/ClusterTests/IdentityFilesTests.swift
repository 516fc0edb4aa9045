@testable import Client
import Foundation
import Node
import Synchronization
import Testing
import TestSupport

/// What `warrant join`, `exec` and `agent` leave on disk.
@Suite("Identity files", .onOwnThreads)
struct IdentityFilesTests {
    @Test("JWT-SVID file names: letters, digits, '.' and '-' kept, every other byte hex-escaped, so no two audiences share a file; long ones end with a hash and stay under 255 bytes")
    func jwtFileNames() {
        #expect(IdentityFiles.jwtFileName("sts.amazonaws.com") == "jwt-sts.amazonaws.com.token")
        #expect(IdentityFiles.jwtFileName("https://vault.example.com/v1") == "jwt-https_3A_2F_2Fvault.example.com_2Fv1.token")
        let colliding = ["a/b", "a_b", "a b", "a_2Fb", "é", "_C3_A9"]
        #expect(Set(colliding.map(IdentityFiles.jwtFileName)).count == colliding.count, "\(colliding.map(IdentityFiles.jwtFileName))")
        let long = String(repeating: "x/", count: 300), longer = long + "y"
        #expect(IdentityFiles.jwtFileName(long).utf8.count < 255 && IdentityFiles.jwtFileName(long) != IdentityFiles.jwtFileName(longer))
        #expect(!IdentityFiles.jwtFileName("../../etc/passwd").contains("/"))
    }

    @Test("Each file has its mode from creation (key and tokens 0600, certificates 0644), is a link through ..data to the current version, and no older version or temporary file is left; a file is never created through a name already there, a symbolic link included")
    func modes() throws {
        let directory = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT\n", keyPEM: "KEY\n", bundlePEM: "BUNDLE\n", jwts: ["sts.amazonaws.com": "a.b.c"])
        func mode(_ name: String) -> Int { Self.mode("\(directory)/\(name)") }
        #expect(mode("svid.key") == 0o600 && mode("jwt-sts.amazonaws.com.token") == 0o600)
        #expect(mode("svid.pem") == 0o644 && mode("bundle.pem") == 0o644)
        #expect(mode("") == 0o700, "the directory it made")
        #expect(try String(contentsOfFile: "\(directory)/svid.key", encoding: .utf8) == "KEY\n")
        let names = ["bundle.pem", "jwt-sts.amazonaws.com.token", "svid.key", "svid.pem"]
        #expect(try Self.layout(directory) == names)
        for name in names { #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(name)") == "..data/\(name)") }

        // Written again over the old ones: replaced whole, the old version gone.
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT2\n", keyPEM: "KEY2\n", bundlePEM: "BUNDLE2\n")
        #expect(try String(contentsOfFile: "\(directory)/svid.key", encoding: .utf8) == "KEY2\n" && mode("svid.key") == 0o600)
        #expect(try String(contentsOfFile: "\(directory)/jwt-sts.amazonaws.com.token", encoding: .utf8) == "a.b.c", "carried over")
        #expect(try Self.layout(directory) == names)
        // What the writes did not make stays.
        try ClusterFiles.writeNew("\(directory)/..mine", Array("mine".utf8), mode: 0o644)
        try ClusterFiles.writeNew("\(directory)/..0123456789abcdef.tmp", Array("mine".utf8), mode: 0o644)
        try ClusterFiles.writeNew("\(directory)/..data.0123456789abcdeg.tmp", Array("mine".utf8), mode: 0o644)
        try FileManager.default.createDirectory(atPath: "\(directory)/..0123456789abcdef", withIntermediateDirectories: false)
        try IdentityFiles.writeBundle(directory: directory, bundlePEM: "BUNDLE3\n")
        let left = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasPrefix("..") && $0 != "..data" && $0 != "..lock" && !IdentityFiles.isMadeHere($0) }
        #expect(left.sorted() == ["..0123456789abcdef.tmp", "..data.0123456789abcdeg.tmp", "..mine"])
        #expect(!FileManager.default.fileExists(atPath: "\(directory)/..0123456789abcdef"), "an older version's shape: removed")

        let target = "\(directory)/target"
        try ClusterFiles.writeNew(target, Array("kept".utf8), mode: 0o644)
        #expect(throws: FileProblem.self) { try ClusterFiles.writeNew(target, Array("secret".utf8), mode: 0o600) }
        try FileManager.default.createSymbolicLink(atPath: "\(directory)/link", withDestinationPath: target)
        #expect(throws: FileProblem.self) { try ClusterFiles.writeNew("\(directory)/link", Array("secret".utf8), mode: 0o600) }
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "kept", "nothing written through the name or the link")
    }

    @Test("A certificate is never beside the key of another: a reader resolving ..data once always reads a matching pair while renewals replace them")
    func pairsChangeTogether() throws {
        let directory = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try IdentityFiles.write(directory: directory, certificatePEM: "0", keyPEM: "0", bundlePEM: "B")
        final class Counts: Sendable { let done = Atomic(false), reads = Atomic(0), mismatches = Atomic(0) }
        let counts = Counts()
        let reader = Thread {
            while !counts.done.load(ordering: .relaxed) {
                guard let version = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/..data"),
                      let key = try? String(contentsOfFile: "\(directory)/\(version)/svid.key", encoding: .utf8),
                      let certificate = try? String(contentsOfFile: "\(directory)/\(version)/svid.pem", encoding: .utf8) else {
                    continue // an older version removed under the reader: resolved again
                }
                counts.reads.add(1, ordering: .relaxed)
                if key != certificate { counts.mismatches.add(1, ordering: .relaxed) }
            }
        }
        reader.start()
        for round in 1...200 {
            try IdentityFiles.write(directory: directory, certificatePEM: "\(round)", keyPEM: "\(round)", bundlePEM: nil)
        }
        counts.done.store(true, ordering: .relaxed)
        while !reader.isFinished { usleep(1_000) }
        #expect(counts.reads.load(ordering: .relaxed) > 0)
        #expect(counts.mismatches.load(ordering: .relaxed) == 0)
        #expect(try String(contentsOfFile: "\(directory)/svid.pem", encoding: .utf8) == "200")
        #expect(try Self.layout(directory) == ["bundle.pem", "svid.key", "svid.pem"])
    }

    @Test("Writers in turn: a bundle refreshed while renewals write other files loses neither (each write builds on the version the last one left)")
    func writersInTurn() async throws {
        let directory = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try IdentityFiles.write(directory: directory, certificatePEM: "C", keyPEM: "K", bundlePEM: "B0")
        let rounds = 30
        // Threads of their own, so that writes do overlap.
        let failures = Mutex<[String]>([])
        let writers = (0..<4).map { writer in
            Thread {
                do {
                    for round in 1...rounds {
                        if writer == 3 {
                            try IdentityFiles.writeBundle(directory: directory, bundlePEM: "B\(round)")
                        } else {
                            // A file of its own each time: a write built on
                            // an older version would lose one for good.
                            try IdentityFiles.write(directory: directory, certificatePEM: "C", keyPEM: "K", bundlePEM: nil,
                                                    jwts: ["aud\(writer)-\(round)": "\(writer)-\(round)"])
                        }
                    }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
        }
        for thread in writers { thread.start() }
        for thread in writers { while !thread.isFinished { try await Task.sleep(for: .milliseconds(2)) } }
        #expect(failures.withLock { $0 } == [])
        func read(_ name: String) -> String? { try? String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8) }
        #expect(read("bundle.pem") == "B\(rounds)")
        var lost: [String] = []
        for writer in 0..<3 {
            for round in 1...rounds where read(IdentityFiles.jwtFileName("aud\(writer)-\(round)")) != "\(writer)-\(round)" { lost.append("\(writer)-\(round)") }
        }
        #expect(lost.isEmpty)
        #expect(try Self.layout(directory).count == 3 + 3 * rounds)
    }

    @Test("Files of an expired identity removed: gone at once, not brought back by a later bundle; a failed write changes nothing; a directory of the older layout (plain files) is taken over")
    func removalFailureAndOlderLayout() throws {
        let directory = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func read(_ name: String) -> String? { try? String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8) }
        // The older layout: plain files renamed into place one by one.
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        for (name, content) in [("svid.pem", "OLD"), ("svid.key", "OLD"), ("bundle.pem", "OLD"), ("jwt-x.token", "OLDJWT")] {
            try ClusterFiles.writeNew("\(directory)/\(name)", Array(content.utf8), mode: 0o600)
        }
        try IdentityFiles.write(directory: directory, certificatePEM: "C1", keyPEM: "K1", bundlePEM: "B1")
        #expect(read("svid.pem") == "C1" && read("svid.key") == "K1" && read("bundle.pem") == "B1" && read("jwt-x.token") == "OLDJWT")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/svid.pem") == "..data/svid.pem")
        #expect(try IdentityFiles.remove(["jwt-x.token"], from: directory), "a plain file of the older layout")
        #expect(read("jwt-x.token") == nil)

        #expect(try IdentityFiles.remove(["svid.pem", "svid.key"], from: directory))
        #expect(read("svid.pem") == nil && read("svid.key") == nil && read("bundle.pem") == "B1")
        #expect(try !IdentityFiles.remove(["svid.pem", "svid.key"], from: directory), "nothing left to remove")
        try IdentityFiles.writeBundle(directory: directory, bundlePEM: "B2")
        #expect(read("svid.pem") == nil && read("svid.key") == nil && read("bundle.pem") == "B2", "not brought back")
        #expect(try Self.layout(directory) == ["bundle.pem"])
        try IdentityFiles.write(directory: directory, certificatePEM: "C3", keyPEM: "K3", bundlePEM: nil)
        #expect(read("svid.pem") == "C3" && read("svid.key") == "K3" && read("bundle.pem") == "B2")

        // A write that cannot carry a file over (not a plain file) fails
        // before the switch: nothing changes, no version is left half made.
        let version = try FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/..data")
        try FileManager.default.createDirectory(atPath: "\(directory)/\(version)/odd", withIntermediateDirectories: false)
        #expect(throws: IdentityFiles.Problem.self) { try IdentityFiles.write(directory: directory, certificatePEM: "C4", keyPEM: "K4", bundlePEM: nil) }
        #expect(read("svid.pem") == "C3" && read("svid.key") == "K3")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/..data") == version)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasPrefix("..") }.sorted() == ["..data", "..lock", version].sorted())
    }

    @Test("A renewal written without a bundle leaves bundle.pem as it is; a refreshed bundle replaces bundle.pem alone, and not in a directory that is gone")
    func bundleAlone() throws {
        let directory = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func read(_ name: String) throws -> String { try String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8) }
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT\n", keyPEM: "KEY\n", bundlePEM: "NEWER\n")
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT2\n", keyPEM: "KEY2\n", bundlePEM: nil)
        #expect(try read("svid.pem") == "CERT2\n" && read("svid.key") == "KEY2\n" && read("bundle.pem") == "NEWER\n")
        try IdentityFiles.writeBundle(directory: directory, bundlePEM: "NEWEST\n")
        #expect(try read("bundle.pem") == "NEWEST\n" && read("svid.pem") == "CERT2\n")
        #expect(Self.mode("\(directory)/bundle.pem") == 0o644)
        #expect(try Self.layout(directory) == ["bundle.pem", "svid.key", "svid.pem"], "no temporary file left")
        try FileManager.default.removeItem(atPath: directory)
        #expect(throws: (any Error).self) { try IdentityFiles.writeBundle(directory: directory, bundlePEM: "LATE\n") }
        #expect(!FileManager.default.fileExists(atPath: directory), "not made again")
    }

    @Test("A name planted as a link elsewhere is replaced, its target left alone; a writer that holds the lock makes another wait, and give up with a clear error, nothing changed; temporary files an older build's crash left are removed")
    func plantedLinksAndTheLock() throws {
        let directory = Self.scratch(), outside = Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory); try? FileManager.default.removeItem(atPath: outside) }
        func read(_ name: String) -> String? { try? String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        try ClusterFiles.writeNew(outside, Array("not yours".utf8), mode: 0o644)
        try FileManager.default.createSymbolicLink(atPath: "\(directory)/svid.key", withDestinationPath: outside)
        try ClusterFiles.writeNew("\(directory)/.svid.key.1A2B3C4D.tmp", Array("KEY".utf8), mode: 0o600)
        try IdentityFiles.write(directory: directory, certificatePEM: "C1", keyPEM: "K1", bundlePEM: "B1")
        #expect(try String(contentsOfFile: outside, encoding: .utf8) == "not yours")
        #expect(read("svid.key") == "K1" && Self.mode("\(directory)/svid.key") == 0o600)
        #expect(try Self.layout(directory) == ["bundle.pem", "svid.key", "svid.pem"], "the older layout's temporary file removed")

        let lock = open("\(directory)/..lock", O_RDWR | O_CLOEXEC)
        #expect(lock >= 0 && flock(lock, LOCK_EX) == 0)
        let refused = #expect(throws: IdentityFiles.Problem.self) { try IdentityFiles.writeBundle(directory: directory, bundlePEM: "B2", lockWait: 0.2) }
        #expect(refused?.description.contains("is being written by another process") == true, "\(String(describing: refused))")
        #expect(read("bundle.pem") == "B1")
        flock(lock, LOCK_UN)
        close(lock)
        try IdentityFiles.writeBundle(directory: directory, bundlePEM: "B2", lockWait: 0.2)
        #expect(read("bundle.pem") == "B2")
    }

    static func scratch() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("warrant-identity-\(UUID().uuidString.prefix(8))").path
    }

    /// The mode of what `path` leads to (links followed).
    static func mode(_ path: String) -> Int {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_mode & 0o7777) : -1
    }

    /// The names in `directory`, after checking that beside them there is
    /// only `..data` and the one version it names (no older one, nothing
    /// temporary).
    static func layout(_ directory: String) throws -> [String] {
        let entries = try FileManager.default.contentsOfDirectory(atPath: directory)
        let version = try FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/..data")
        #expect(entries.filter { $0.hasPrefix("..") || $0.hasPrefix(".") }.sorted() == ["..data", "..lock", version].sorted())
        return entries.filter { !$0.hasPrefix(".") }.sorted()
    }
}
