import Crypto
import Foundation
@testable import Node
import Testing
import Transport
import X509

private let valid = """
node:
  id: 1
  data_dir: /var/lib/warrant/node-1
  listen:
    peer: 127.0.0.1:7401
    api: "[::1]:8401"
peers:
  - id: 2
    address: 127.0.0.1:7402
    api: 127.0.0.1:8402
  - id: 3
    address: 127.0.0.1:7403
    api: 127.0.0.1:8403
tls:
  ca: ca.pem
  certificate: node-1.pem
  key: node-1.key
key_encryption_key_file: kek.bin
raft:
  tick_interval_ms: 20
"""

/// The valid file with one line replaced.
private func variant(_ line: String, with replacement: String) -> String {
    precondition(valid.contains(line), "the sample has no line '\(line)'")
    return valid.replacingOccurrences(of: line, with: replacement)
}

@Suite("Key-encryption key file")
struct KeyEncryptionKeyFileTests {
    @Test("The key is read through a symbolic link and the linked file's mode is what counts; readable by others, it is refused")
    func modeOfTheFileLinkedTo() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-kek-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let key = Data((0..<32).map { UInt8($0) })
        try ClusterFiles.writeNew("\(directory)/kek-data", Array((key.base64EncodedString() + "\n").utf8), mode: 0o600)
        try FileManager.default.createSymbolicLink(atPath: "\(directory)/kek", withDestinationPath: "\(directory)/kek-data")
        let loaded = try KeyEncryptionKey.load(path: "\(directory)/kek")
        #expect(loaded.withUnsafeBytes { Data($0) } == key, "read through the link (whose own mode is 777)")
        try FileManager.default.setAttributes([.posixPermissions: 0o640], ofItemAtPath: "\(directory)/kek-data")
        let refused = try #require(throws: FileProblem.self) { try KeyEncryptionKey.load(path: "\(directory)/kek") }
        #expect(refused.problem.contains("is readable by others (mode 640)"), "\(refused.problem)")
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: "\(directory)/kek-data")
        let handle = try #require(FileHandle(forWritingAtPath: "\(directory)/kek-data"))
        handle.write(Data(repeating: 0x41, count: 2_000))
        try handle.close()
        let tooLarge = try #require(throws: FileProblem.self) { try KeyEncryptionKey.load(path: "\(directory)/kek") }
        #expect(tooLarge.problem.contains("larger than 1024"), "\(tooLarge.problem)")
    }
}

@Suite("Cluster files")
struct ClusterFilesTests {
    @Test("A node added later gets the cluster's settings as a founding node has them, with its own id, addresses and join; its files appear whole")
    func addedNodeTakesTheClusterSettings() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-add-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func member(_ id: UInt64) throws -> ClusterFiles.Member {
            .init(id: id, peer: try HostPort(parsing: "127.0.0.1:\(7400 + id)", at: "peer"), api: try HostPort(parsing: "127.0.0.1:\(8400 + id)", at: "api"))
        }
        let founders = try [member(1), member(2)]
        try ClusterFiles.initialize(directory: directory, clusterID: "add", members: founders, tickIntervalMilliseconds: 7, electionTimeoutTicks: 30,
                                    snapshotEveryEntries: 5_000)
        // Settings an operator added to the founding nodes by hand.
        for id in [1, 2] {
            let path = "\(directory)/node-\(id)/config.yaml"
            try (try String(contentsOfFile: path, encoding: .utf8) + "jwt_issuer: https://warrant.example.com\n").write(toFile: path, atomically: true, encoding: .utf8)
        }
        try ClusterFiles.addNode(directory: directory, member: try member(3), peers: founders)
        let added = try NodeConfig(yaml: try String(contentsOfFile: "\(directory)/node-3/config.yaml", encoding: .utf8))
        #expect(added.id == 3 && added.joinsExistingCluster && added.peerListen.port == 7403 && added.apiListen.port == 8403)
        #expect(added.peers.map(\.id) == [1, 2])
        #expect(added.tickIntervalMilliseconds == 7 && added.electionTimeoutTicks == 30 && added.snapshotEveryEntries == 5_000)
        #expect(added.jwtIssuer == "https://warrant.example.com")
        #expect(FileManager.default.fileExists(atPath: "\(directory)/node-3/node.key.sealed"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).allSatisfy { !$0.hasSuffix(".tmp") }, "no temporary directory left")
        #expect(throws: FileProblem.self) { try ClusterFiles.addNode(directory: directory, member: try member(3), peers: founders) }
    }

    @Test("A node's certificate is renewed with a new key and the same names, for the days asked; the node loads it; a key and certificate that do not match are refused, saying so")
    func renewNodeCertificate() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("warrant-renew-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let members: [ClusterFiles.Member] = [
            .init(id: 1, peer: try HostPort(parsing: "127.0.0.1:7401", at: "peer"), api: try HostPort(parsing: "127.0.0.1:8401", at: "api")),
            .init(id: 2, peer: try HostPort(parsing: "node-2.warrant.internal:7402", at: "peer"), api: try HostPort(parsing: "[::1]:8402", at: "api")),
        ]
        try ClusterFiles.initialize(directory: directory, clusterID: "renew", members: members)
        let configPath = "\(directory)/node-2/config.yaml"
        let config = try NodeConfig(yaml: try String(contentsOfFile: configPath, encoding: .utf8))
        let before = try ClusterFiles.loadIdentity(config, configPath: configPath)
        #expect(Set(try NodeIdentity.hosts(in: before.certificate)) == ["node-2.warrant.internal", "::1"])
        let renewed = try ClusterFiles.renewNodeCertificate(directory: directory, id: 2, validity: 30 * 86_400)
        let after = try ClusterFiles.loadIdentity(config, configPath: configPath)
        #expect(after.certificate == renewed && after.certificate.serialNumber != before.certificate.serialNumber)
        #expect(after.privateKey.publicKey.rawRepresentation != before.privateKey.publicKey.rawRepresentation, "a new key")
        #expect(Set(try NodeIdentity.hosts(in: after.certificate)) == ["node-2.warrant.internal", "::1"], "the same names")
        #expect(abs(after.certificate.notValidAfter.timeIntervalSinceNow - 30 * 86_400) < 600)
        #expect(after.nodeID == 2)
        #expect(try FileManager.default.contentsOfDirectory(atPath: "\(directory)/node-2").allSatisfy { !$0.hasSuffix(".tmp") })
        #expect(throws: FileProblem.self) { try ClusterFiles.renewNodeCertificate(directory: directory, id: 2, validity: 3_600) }
        #expect(throws: FileProblem.self) { try ClusterFiles.renewNodeCertificate(directory: directory, id: 9) }
        // A renewal stopped between its two renames: the old certificate with the new key.
        try before.certificate.serializeAsPEM().pemString.write(toFile: "\(directory)/node-2/node.pem", atomically: true, encoding: .utf8)
        do {
            _ = try ClusterFiles.loadIdentity(config, configPath: configPath)
            Issue.record("a certificate that does not match its key was loaded")
        } catch let problem as FileProblem {
            #expect(problem.description.contains("does not match"), "\(problem)")
        }
        // Renewing again mends it.
        _ = try ClusterFiles.renewNodeCertificate(directory: directory, id: 2)
        #expect(try ClusterFiles.loadIdentity(config, configPath: configPath).nodeID == 2)
        // The node's warning: within 30 days, and past the expiry; nothing before.
        let now = Date()
        #expect(NodeServer.certificateWarning(now.addingTimeInterval(31 * 86_400), node: 2, now: now) == nil)
        #expect(NodeServer.certificateWarning(now.addingTimeInterval(10 * 86_400), node: 2, now: now)?.daysLeft == 10)
        #expect(NodeServer.certificateWarning(now.addingTimeInterval(-60), node: 2, now: now)?.message.contains("has expired") == true)
    }
}

@Suite("Node configuration")
struct NodeConfigTests {
    @Test("A complete file loads, with defaults for what it leaves out")
    func loads() throws {
        let config = try NodeConfig(yaml: valid)
        #expect(config.id == 1)
        #expect(config.peers.map(\.id) == [2, 3])
        #expect(config.peers[1].address.description == "127.0.0.1:7403")
        #expect(config.apiListen.host == "::1")
        #expect(config.apiListen.description == "[::1]:8401")
        #expect(config.tickIntervalMilliseconds == 20)
        #expect(config.electionTimeoutTicks == 10)
        #expect(config.heartbeatIntervalTicks == 1)
        #expect(config.inflightMessagesMax == 2)
        #expect(config.peers[0].api.description == "127.0.0.1:8402")
        #expect(config.joinsExistingCluster == false)
        let wide = try NodeConfig(yaml: valid.replacingOccurrences(of: "  tick_interval_ms: 20", with: "  tick_interval_ms: 20\n  inflight_messages_max: 256"))
        #expect(wide.inflightMessagesMax == 256)
        #expect(config.unsafeNoFsync == false, "writes are synced unless a file says otherwise")
        #expect(try NodeConfig(yaml: valid + "\nstorage:\n  unsafe_no_fsync: true\n").unsafeNoFsync)
        #expect(config.identityRecordsMax == 2_000_000)
        #expect(try NodeConfig(yaml: valid + "\nstorage:\n  identity_records_max: 5000\n").identityRecordsMax == 5_000)
        #expect(config.workloadIssuanceBurst == 100 && config.workloadIssuancePerSecond == 20)
        let limited = try NodeConfig(yaml: valid + "\nlimits:\n  workload_issuance_burst: 5\n  workload_issuance_per_second: 2\n")
        #expect(limited.workloadIssuanceBurst == 5 && limited.workloadIssuancePerSecond == 2)
        #expect(config.jwtIssuer == nil)
        #expect(try NodeConfig(yaml: valid + "\njwt_issuer: https://warrant.example.com/trust\n").jwtIssuer == "https://warrant.example.com/trust")
        #expect(try NodeConfig(yaml: valid + "\njwt_issuer: https://warrant.example.com:8443\n").jwtIssuer == "https://warrant.example.com:8443")
    }

    @Test("Each kind of mistake gets a specific error naming where it is", arguments: [
        ("  id: 1\n  data_dir", "  id: 0\n  data_dir", "node.id: 0 is outside 1..."),
        ("  data_dir: /var/lib/warrant/node-1", "  data_dir: /x\n  datadir: /y", "node: unknown key 'datadir'"),
        ("    peer: 127.0.0.1:7401", "    peer: 127.0.0.1", "node.listen.peer: '127.0.0.1' is not host:port"),
        ("    peer: 127.0.0.1:7401", "    peer: 127.0.0.1:70000", "node.listen.peer: '127.0.0.1:70000' has no valid port"),
        ("  - id: 3", "  - id: 2", "peers[1].id: 2 is listed twice"),
        ("  - id: 3", "  - id: 1", "peers[1].id: 1 is this node's own id"),
        ("  key: node-1.key", "  key: \"\"", "tls.key: must be a non-empty string"),
        ("  tick_interval_ms: 20", "  tick_interval_ms: 5000", "raft.tick_interval_ms: 5000 is outside 1...1000"),
        ("  tick_interval_ms: 20", "  tick_interval_ms: 20\n  election_timeout_ticks: 1", "raft.election_timeout_ticks: 1 is outside 2...1000"),
        ("  tick_interval_ms: 20", "  heartbeat_interval_ticks: 10", "raft.election_timeout_ticks: must exceed heartbeat_interval_ticks (10)"),
        ("  tick_interval_ms: 20", "  tick_interval_ms: 20\n  inflight_messages_max: 0", "raft.inflight_messages_max: 0 is outside 1...1024"),
        ("key_encryption_key_file: kek.bin", "", "key_encryption_key_file: is missing"),
        ("    api: \"[::1]:8401\"", "    api: 127.0.0.1:7401", "node.listen.api: must differ from node.listen.peer"),
        ("    api: 127.0.0.1:8403", "    apı: 127.0.0.1:8403", "peers[1]: unknown key"),
        ("    api: 127.0.0.1:8402", "    api: 8402", "peers[0].api: '8402' is not host:port"),
        ("    api: \"[::1]:8401\"", "    api: \"[::1]:8401\"\n  join: yes", "node.join: must be true or false"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\nstorage:\n  fsync: false", "storage: unknown key 'fsync'"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\nstorage:\n  unsafe_no_fsync: 1", "storage.unsafe_no_fsync: must be true or false"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\nstorage:\n  identity_records_max: 0", "storage.identity_records_max: 0 is outside 1...100000000"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\nlimits:\n  workload_issuance_burst: 0", "limits.workload_issuance_burst: 0 is outside 1...100000"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\nlimits:\n  workload_issuance_per_second: 100001", "limits.workload_issuance_per_second: 100001 is outside 1...100000"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\nlimits:\n  issuance_rate: 5", "limits: unknown key 'issuance_rate'"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: http://warrant.example.com", "jwt_issuer: 'http://warrant.example.com' is not an https URL with a host"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: https://", "jwt_issuer: 'https://' is not an https URL with a host"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: https://warrant.example.com/", "jwt_issuer: 'https://warrant.example.com/' may not end in '/'"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: https://warrant.example.com/?x=1", "may not have a query, fragment or user info"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: https://warrant.example.com#f", "may not have a query, fragment or user info"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: https://me@warrant.example.com", "may not have a query, fragment or user info"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: \"https://warrant example.com\"", "may hold only printable ASCII without spaces"),
        ("key_encryption_key_file: kek.bin", "key_encryption_key_file: kek.bin\njwt_issuer: https://\(String(repeating: "a", count: 250)).com", "is longer than 255 bytes"),
    ])
    func mistakes(line: String, replacement: String, expected: String) {
        do {
            _ = try NodeConfig(yaml: variant(line, with: replacement))
            Issue.record("expected an error containing \(expected)")
        } catch {
            #expect(error.description.contains(expected), "got: \(error)")
        }
    }

    @Test("Not YAML, an empty file or an oversized one is refused")
    func notYAML() {
        #expect(throws: NodeConfigError.self) { try NodeConfig(yaml: "node: [unclosed") }
        #expect(throws: NodeConfigError(path: "", problem: "the file is empty")) { try NodeConfig(yaml: "") }
        #expect(throws: NodeConfigError.self) { try NodeConfig(yaml: String(repeating: "# padding\n", count: 10_000)) }
    }
}
