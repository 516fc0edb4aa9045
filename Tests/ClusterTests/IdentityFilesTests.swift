@testable import Client
import Foundation
import Node
import Testing

/// What `warrant join`, `exec` and `agent` leave on disk.
@Suite("Identity files")
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

    @Test("Each file has its mode from creation (key and tokens 0600, certificates 0644), is renamed into place whole, leaves no temporary file; a file is never created through a name already there, a symbolic link included")
    func modes() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-identity-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT\n", keyPEM: "KEY\n", bundlePEM: "BUNDLE\n", jwts: ["sts.amazonaws.com": "a.b.c"])
        func mode(_ name: String) throws -> Int { try FileManager.default.attributesOfItem(atPath: "\(directory)/\(name)")[.posixPermissions] as? Int ?? -1 }
        #expect(try mode("svid.key") == 0o600 && mode("jwt-sts.amazonaws.com.token") == 0o600)
        #expect(try mode("svid.pem") == 0o644 && mode("bundle.pem") == 0o644)
        #expect(try mode("") == 0o700, "the directory it made")
        #expect(try String(contentsOfFile: "\(directory)/svid.key", encoding: .utf8) == "KEY\n")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == ["bundle.pem", "jwt-sts.amazonaws.com.token", "svid.key", "svid.pem"])

        // Written again over the old ones: replaced whole.
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT2\n", keyPEM: "KEY2\n", bundlePEM: "BUNDLE2\n")
        #expect(try String(contentsOfFile: "\(directory)/svid.key", encoding: .utf8) == "KEY2\n" && mode("svid.key") == 0o600)

        let target = "\(directory)/target"
        try ClusterFiles.writeNew(target, Array("kept".utf8), mode: 0o644)
        #expect(throws: FileProblem.self) { try ClusterFiles.writeNew(target, Array("secret".utf8), mode: 0o600) }
        try FileManager.default.createSymbolicLink(atPath: "\(directory)/link", withDestinationPath: target)
        #expect(throws: FileProblem.self) { try ClusterFiles.writeNew("\(directory)/link", Array("secret".utf8), mode: 0o600) }
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "kept", "nothing written through the name or the link")
    }

    @Test("A renewal written without a bundle leaves bundle.pem as it is; a refreshed bundle replaces bundle.pem alone, and not in a directory that is gone")
    func bundleAlone() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-identity-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func read(_ name: String) throws -> String { try String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8) }
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT\n", keyPEM: "KEY\n", bundlePEM: "NEWER\n")
        try IdentityFiles.write(directory: directory, certificatePEM: "CERT2\n", keyPEM: "KEY2\n", bundlePEM: nil)
        #expect(try read("svid.pem") == "CERT2\n" && read("svid.key") == "KEY2\n" && read("bundle.pem") == "NEWER\n")
        try IdentityFiles.writeBundle(directory: directory, bundlePEM: "NEWEST\n")
        #expect(try read("bundle.pem") == "NEWEST\n" && read("svid.pem") == "CERT2\n")
        let mode = try FileManager.default.attributesOfItem(atPath: "\(directory)/bundle.pem")[.posixPermissions] as? Int
        #expect(mode == 0o644)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == ["bundle.pem", "svid.key", "svid.pem"], "no temporary file left")
        try FileManager.default.removeItem(atPath: directory)
        #expect(throws: (any Error).self) { try IdentityFiles.writeBundle(directory: directory, bundlePEM: "LATE\n") }
        #expect(!FileManager.default.fileExists(atPath: directory), "not made again")
    }
}
