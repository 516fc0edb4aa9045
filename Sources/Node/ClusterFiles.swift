import Authority
import Crypto
import Foundation
import Raft
import Transport
import X509
import Yams

/// A problem with a file the node or CLI reads: which file, what is wrong.
public struct FileProblem: Error, Sendable, CustomStringConvertible {
    public var path: String
    public var problem: String
    public var description: String { "\(path): \(problem)" }
}

/// Private keys at rest, sealed with the key-encryption key (AES-256-GCM,
/// the key's purpose bound as associated data):
///
///     -----BEGIN WARRANT SEALED KEY-----
///     base64("WSK1" | nonce(12) | ciphertext | tag(16))
///     -----END WARRANT SEALED KEY-----
public enum SealedKey {
    static let magic = Array("WSK1".utf8)
    static let begin = "-----BEGIN WARRANT SEALED KEY-----"
    static let end = "-----END WARRANT SEALED KEY-----"

    public static func seal(_ plaintext: String, purpose: String, with kek: SymmetricKey) throws -> String {
        let bytes = try sealBytes(Array(plaintext.utf8), magic: magic, purpose: purpose, with: kek)
        let lines = Data(bytes).base64EncodedString(options: [.lineLength64Characters, .endLineWithLineFeed])
        return "\(begin)\n\(lines)\n\(end)\n"
    }

    public static func open(_ text: String, purpose: String, with kek: SymmetricKey, path: String) throws -> String {
        let body = text.replacingOccurrences(of: begin, with: "").replacingOccurrences(of: end, with: "")
            .split(whereSeparator: \.isWhitespace).joined()
        guard text.contains(begin), let data = Data(base64Encoded: body), isSealed(Array(data), magic: magic) else {
            throw FileProblem(path: path, problem: "is not a Warrant sealed key (expected a \(begin) block)")
        }
        guard let plaintext = openBytes(Array(data), purpose: purpose, with: kek) else {
            throw FileProblem(path: path, problem: "cannot be opened with the key-encryption key (wrong key, or the file was altered)")
        }
        return String(decoding: plaintext, as: UTF8.self)
    }

    /// `magic | nonce(12) | ciphertext | tag(16)`: AES-256-GCM under the
    /// KEK, `purpose` bound as associated data.
    static func sealBytes(_ plaintext: [UInt8], magic: [UInt8], purpose: String, with kek: SymmetricKey) throws -> [UInt8] {
        let box = try AES.GCM.seal(plaintext, using: kek, authenticating: Array(purpose.utf8))
        return magic + Array(box.nonce) + Array(box.ciphertext) + Array(box.tag)
    }

    /// Whether `bytes` could be what `sealBytes` made with `magic`.
    static func isSealed(_ bytes: [UInt8], magic: [UInt8]) -> Bool {
        bytes.count > magic.count + 12 + 16 && bytes.starts(with: magic)
    }

    /// What `sealBytes` sealed (its 4-byte magic not checked here), or nil
    /// when the KEK or purpose is not the one it was sealed with, or the
    /// bytes were altered.
    static func openBytes(_ bytes: [UInt8], purpose: String, with kek: SymmetricKey) -> [UInt8]? {
        guard bytes.count > 4 + 12 + 16,
              let box = try? AES.GCM.SealedBox(nonce: AES.GCM.Nonce(data: bytes[4..<16]), ciphertext: bytes[16..<(bytes.count - 16)],
                                               tag: bytes[(bytes.count - 16)...]),
              let plaintext = try? AES.GCM.open(box, using: kek, authenticating: Array(purpose.utf8)) else { return nil }
        return Array(plaintext)
    }
}

public enum KeyEncryptionKey {
    /// Reads a KEK file: 32 random bytes in base64 on one line, readable
    /// only by its owner.
    /// The file is opened first, and what is checked (mode, owner) is the
    /// opened file's: through a symbolic link (a Kubernetes Secret volume's
    /// files are links), that is the file linked to, and nothing can
    /// change between the check and the read.
    public static func load(path: String) throws -> SymmetricKey {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileProblem(path: path, problem: "cannot be read (\(String(cString: strerror(errno))))") }
        defer { close(descriptor) }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw FileProblem(path: path, problem: "cannot be read (\(String(cString: strerror(errno))))") }
        let mode = Int(info.st_mode) & 0o777
        if mode & 0o077 != 0 {
            throw FileProblem(path: path, problem: "is readable by others (mode \(String(mode, radix: 8))); run chmod 600 on it")
        }
        if info.st_uid != geteuid() && geteuid() != 0 {
            throw FileProblem(path: path, problem: "belongs to user \(info.st_uid), not to the user this runs as (\(geteuid()))")
        }
        var bytes = [UInt8](repeating: 0, count: 1025)
        let count = bytes.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress, $0.count) }
        guard count >= 0 else { throw FileProblem(path: path, problem: "cannot be read (\(String(cString: strerror(errno))))") }
        guard count <= 1024 else { throw FileProblem(path: path, problem: "is larger than 1024 bytes") }
        let text = String(decoding: bytes[0..<count], as: UTF8.self)
        guard let data = Data(base64Encoded: text.trimmingCharacters(in: .whitespacesAndNewlines)), data.count == 32 else {
            throw FileProblem(path: path, problem: "must hold 32 bytes in base64 (a key-encryption key)")
        }
        return SymmetricKey(data: data)
    }

    public static func generate() -> SymmetricKey { SymmetricKey(size: .bits256) }

    static func encoded(_ key: SymmetricKey) -> String {
        key.withUnsafeBytes { Data($0).base64EncodedString() } + "\n"
    }
}

/// What `warrant cluster init` writes and the node and CLI read.
///
///     DIR/cluster.yaml            cluster id, members (for the CLI)
///     DIR/ca.pem, ca.key.sealed   internal CA (key sealed with the KEK)
///     DIR/kek                     key-encryption key (mode 600)
///     DIR/admin.pem, admin.key    operator client certificate (key mode 600)
///     DIR/node-N/config.yaml      node N's configuration
///     DIR/node-N/node.pem, node.key.sealed
///     DIR/node-N/data/            node N's database (created at start)
public enum ClusterFiles {
    public struct Member: Sendable, Hashable {
        public var id: NodeID
        public var peer: HostPort
        public var api: HostPort

        public init(id: NodeID, peer: HostPort, api: HostPort) {
            self.id = id
            self.peer = peer
            self.api = api
        }
    }

    public static let fileBytesMax = 1 << 20

    /// A file's text, at most one byte past `bytesMax` read (a device such
    /// as /dev/zero never ends).
    public static func read(_ path: String, bytesMax: Int = fileBytesMax) throws -> String {
        String(decoding: try readBytes(path, bytesMax: bytesMax), as: UTF8.self)
    }

    /// A file's bytes, read as `read` reads; `-` is standard input (the
    /// descriptor itself: /dev/stdin cannot be opened again when it is a socket).
    public static func readBytes(_ path: String, bytesMax: Int = fileBytesMax) throws -> [UInt8] {
        let handle: FileHandle
        if path == "-" {
            handle = FileHandle.standardInput
        } else {
            guard let opened = FileHandle(forReadingAtPath: path) else { throw FileProblem(path: path, problem: "cannot be read") }
            handle = opened
        }
        defer { if path != "-" { try? handle.close() } }
        guard let data = try? handle.read(upToCount: bytesMax + 1) ?? Data() else { throw FileProblem(path: path, problem: "cannot be read") }
        guard data.count <= bytesMax else { throw FileProblem(path: path, problem: "is larger than \(bytesMax) bytes") }
        return Array(data)
    }

    /// Writes `text` to `path` whole or not at all: a new file beside it
    /// (its mode set from the start, synced), renamed into place.
    static func write(_ text: String, to path: String, mode: Int = 0o644) throws {
        let temporary = (path as NSString).deletingLastPathComponent + "/." + (path as NSString).lastPathComponent + "." + UUID().uuidString.prefix(8) + ".tmp"
        try writeNew(temporary, Array(text.utf8), mode: mode_t(mode))
        guard rename(temporary, path) == 0 else {
            let problem = "cannot be moved into place: \(String(cString: strerror(errno)))"
            unlink(temporary)
            throw FileProblem(path: path, problem: problem)
        }
    }

    /// Creates `path` (which must not exist; a symbolic link there is
    /// refused too) with `mode` from the start, whatever the umask, and
    /// writes and syncs `bytes`: a private key is never readable by others,
    /// not even for a moment. On failure nothing is left.
    public static func writeNew(_ path: String, _ bytes: [UInt8], mode: mode_t) throws(FileProblem) {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode)
        guard descriptor >= 0 else { throw FileProblem(path: path, problem: "cannot be created: \(String(cString: strerror(errno)))") }
        var failure: String?
        if fchmod(descriptor, mode) != 0 { failure = "cannot have its mode set: \(String(cString: strerror(errno)))" }
        var written = 0
        while failure == nil, written < bytes.count {
            let count = bytes[written...].withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { failure = "cannot be written: \(String(cString: strerror(errno)))"; break }
            written += count
        }
        if failure == nil, fsync(descriptor) != 0 { failure = "cannot be synced: \(String(cString: strerror(errno)))" }
        close(descriptor)
        if let failure {
            unlink(path)
            throw FileProblem(path: path, problem: failure)
        }
    }

    static func pem(_ certificate: Certificate) throws -> String { try certificate.serializeAsPEM().pemString + "\n" }

    /// Creates a new cluster's files in `directory` (which must not exist or
    /// be empty): a CA, a KEK, an admin certificate, and one configuration,
    /// certificate and sealed key per member.
    public static func initialize(directory: String, clusterID: String, members: [Member], tickIntervalMilliseconds: Int = 10,
                                  electionTimeoutTicks: Int = 20, snapshotEveryEntries: Int? = nil, trustDomain: String = "warrant.local",
                                  keyAlgorithm: KeyAlgorithm = .ecdsaP256) throws {
        let fm = FileManager.default
        if let existing = try? fm.contentsOfDirectory(atPath: directory), !existing.isEmpty {
            throw FileProblem(path: directory, problem: "already exists and is not empty; refusing to overwrite a cluster")
        }
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let ca = try ClusterCA.create(clusterID: clusterID)
        let kek = KeyEncryptionKey.generate()
        try write(KeyEncryptionKey.encoded(kek), to: "\(directory)/kek", mode: 0o600)
        try write(pem(ca.certificate), to: "\(directory)/ca.pem")
        try write(SealedKey.seal(ca.privateKeyPEM, purpose: "warrant ca key", with: kek), to: "\(directory)/ca.key.sealed", mode: 0o600)
        let admin = try ca.issueAdminIdentity(name: "admin")
        try write(pem(admin.certificate), to: "\(directory)/admin.pem")
        try write(admin.privateKey.pemRepresentation + "\n", to: "\(directory)/admin.key", mode: 0o600)
        var listing = "cluster_id: \(clusterID)\ntrust_domain: \(trustDomain)\nkey_algorithm: \(keyAlgorithm.rawValue)\nmembers:\n"
        for member in members {
            listing += "  - id: \(member.id)\n    peer: \"\(member.peer)\"\n    api: \"\(member.api)\"\n"
        }
        try write(listing, to: "\(directory)/cluster.yaml")
        for member in members {
            try writeNode(member, peers: members.filter { $0.id != member.id }, ca: ca, kek: kek, nodeDirectory: "\(directory)/node-\(member.id)", joining: false,
                          tickIntervalMilliseconds: tickIntervalMilliseconds, electionTimeoutTicks: electionTimeoutTicks,
                          snapshotEveryEntries: snapshotEveryEntries, trustDomain: trustDomain, keyAlgorithm: keyAlgorithm)
        }
    }

    /// Writes the files of a node that will join the running cluster in
    /// `directory` (made by `initialize`).
    public static func addNode(directory: String, member: Member, peers: [Member], tickIntervalMilliseconds: Int = 10,
                               electionTimeoutTicks: Int = 20, snapshotEveryEntries: Int? = nil) throws {
        let (listing, kek, ca) = try openCA(directory: directory)
        let final = "\(directory)/node-\(member.id)"
        if FileManager.default.fileExists(atPath: final) {
            throw FileProblem(path: final, problem: "already exists; node ids are never reused")
        }
        // Written beside it and renamed into place: a failure halfway leaves
        // nothing that would block the id.
        let temporary = "\(directory)/.node-\(member.id).\(UUID().uuidString.prefix(8)).tmp"
        do {
            try writeNode(member, peers: peers, ca: ca, kek: kek, nodeDirectory: temporary, joining: true,
                          tickIntervalMilliseconds: tickIntervalMilliseconds, electionTimeoutTicks: electionTimeoutTicks,
                          snapshotEveryEntries: snapshotEveryEntries, trustDomain: listing.trustDomain, keyAlgorithm: listing.keyAlgorithm)
            // The cluster's own settings (raft timing, limits, storage, the
            // JWT issuer, ...) as a founding node has them, with this node's
            // own section and peers.
            if let founding = listing.members.lazy.map({ "\(directory)/node-\($0.id)/config.yaml" }).first(where: { FileManager.default.fileExists(atPath: $0) }) {
                let own = try read("\(temporary)/config.yaml")
                try write(try configLike(founding: try read(founding), own: own, path: founding), to: "\(temporary)/config.yaml")
            }
            guard rename(temporary, final) == 0 else {
                throw FileProblem(path: final, problem: "cannot be moved into place: \(String(cString: strerror(errno)))")
            }
        } catch {
            try? FileManager.default.removeItem(atPath: temporary)
            throw error
        }
    }

    /// A new node's configuration: a founding node's (`founding`), with the
    /// `node` and `peers` sections of `own`. Both must parse.
    static func configLike(founding: String, own: String, path: String) throws -> String {
        guard var template = try Yams.load(yaml: founding) as? [String: Any], let mine = try Yams.load(yaml: own) as? [String: Any] else {
            throw FileProblem(path: path, problem: "is not a YAML mapping")
        }
        for key in ["node", "peers"] { template[key] = mine[key] }
        let text = try Yams.dump(object: template, sortKeys: true)
        do {
            _ = try NodeConfig(yaml: text)
        } catch {
            throw FileProblem(path: path, problem: "a configuration made from it does not load: \(error)")
        }
        return text
    }

    /// The cluster CA in `directory`, its key opened with the KEK there.
    private static func openCA(directory: String) throws -> (ClusterListing, SymmetricKey, ClusterCA) {
        let listing = try ClusterListing(directory: directory)
        let kek = try KeyEncryptionKey.load(path: "\(directory)/kek")
        let caKey = try SealedKey.open(read("\(directory)/ca.key.sealed"), purpose: "warrant ca key", with: kek, path: "\(directory)/ca.key.sealed")
        let ca = try ClusterCA(clusterID: listing.clusterID, certificate: Certificate(pemEncoded: read("\(directory)/ca.pem")),
                               privateKey: P256.Signing.PrivateKey(pemRepresentation: caKey))
        return (listing, kek, ca)
    }

    /// Makes an admin certificate and key for `name` from the cluster CA in
    /// `directory`, valid for `validity` seconds, and writes them to
    /// `<out>/admin-<name>.pem` and `.key` (refusing to overwrite either).
    /// Returns the certificate.
    public static func issueAdmin(directory: String, name: String, validity: TimeInterval, out: String, now: Date = Date()) throws -> Certificate {
        let (_, _, ca) = try openCA(directory: directory)
        let paths = ("\(out)/admin-\(name).pem", "\(out)/admin-\(name).key")
        for path in [paths.0, paths.1] where FileManager.default.fileExists(atPath: path) {
            throw FileProblem(path: path, problem: "already exists; refusing to overwrite an admin's credentials")
        }
        let admin = try ca.issueAdminIdentity(name: name, now: now, validity: validity)
        try write(admin.privateKey.pemRepresentation + "\n", to: paths.1, mode: 0o600)
        try write(pem(admin.certificate), to: paths.0)
        return admin.certificate
    }

    /// Renews node `id`'s certificate in `directory` (the files its
    /// `node-N/config.yaml` names, the key sealed with the KEK it names,
    /// each owned as the file it replaces): a new key, the names
    /// (addresses) of the certificate it replaces, valid for `validity`
    /// seconds (never past the cluster CA). Both files are written beside
    /// the old ones, then renamed into place, the key first: a renewal
    /// stopped between the two renames leaves a key and certificate that
    /// do not match, which the node refuses at start, saying so; renewing
    /// again mends it. The node uses the new files from its next start.
    /// Returns the new certificate.
    public static func renewNodeCertificate(directory: String, id: NodeID, validity: TimeInterval = 365 * 86_400, now: Date = Date()) throws -> Certificate {
        guard validity >= 86_400, validity <= 5 * 365 * 86_400 else {
            throw FileProblem(path: directory, problem: "a node certificate lives from 1 to 1,825 days")
        }
        let (_, _, ca) = try openCA(directory: directory)
        // The files the node's configuration names, sealed with its KEK.
        let configPath = "\(directory)/node-\(id)/config.yaml"
        let config = try NodeConfig(yaml: read(configPath))
        let certificatePath = resolve(config.tlsCertificateFile, relativeTo: configPath), keyPath = resolve(config.tlsKeyFile, relativeTo: configPath)
        let kek = try KeyEncryptionKey.load(path: resolve(config.keyEncryptionKeyFile, relativeTo: configPath))
        let current: Certificate, hosts: [String]
        do {
            current = try Certificate(pemEncoded: read(certificatePath))
            hosts = try NodeIdentity.hosts(in: current)
        } catch let problem as FileProblem {
            throw problem
        } catch {
            throw FileProblem(path: certificatePath, problem: "is not a certificate whose names can be read: \(error)")
        }
        let identity = try ca.issueNodeIdentity(id, hosts: hosts, now: now, validity: validity)
        let suffix = UUID().uuidString.prefix(8)
        let staged = [(keyPath, try SealedKey.seal(identity.privateKey.pemRepresentation, purpose: nodeKeyPurpose(id), with: kek), mode_t(0o600)),
                      (certificatePath, try pem(identity.certificate), mode_t(0o644))]
        var written: [(String, String)] = []
        defer { for (temporary, _) in written { unlink(temporary) } }
        for (path, text, mode) in staged {
            let temporary = "\(path).\(suffix).tmp"
            try writeNew(temporary, Array(text.utf8), mode: mode)
            written.append((temporary, path))
            // Owned as the file it replaces (a renewal run with sudo for a
            // node that runs as a service user must leave it readable).
            var old = stat()
            if stat(path, &old) == 0, old.st_uid != geteuid() || old.st_gid != getegid() {
                guard chown(temporary, old.st_uid, old.st_gid) == 0 else {
                    throw FileProblem(path: path, problem: "belongs to uid \(old.st_uid), gid \(old.st_gid), and its replacement cannot be given to them: \(String(cString: strerror(errno)))")
                }
            }
        }
        for (temporary, path) in written {
            guard rename(temporary, path) == 0 else {
                throw FileProblem(path: path, problem: "cannot be replaced: \(String(cString: strerror(errno)))")
            }
        }
        return identity.certificate
    }

    private static func writeNode(_ member: Member, peers: [Member], ca: ClusterCA, kek: SymmetricKey, nodeDirectory: String, joining: Bool,
                                  tickIntervalMilliseconds: Int, electionTimeoutTicks: Int, snapshotEveryEntries: Int?, trustDomain: String,
                                  keyAlgorithm: KeyAlgorithm) throws {
        try FileManager.default.createDirectory(atPath: nodeDirectory, withIntermediateDirectories: true)
        let identity = try ca.issueNodeIdentity(member.id, hosts: Array(Set([member.api.host, member.peer.host])).sorted())
        try write(pem(identity.certificate), to: "\(nodeDirectory)/node.pem")
        try write(SealedKey.seal(identity.privateKey.pemRepresentation, purpose: nodeKeyPurpose(member.id), with: kek),
                  to: "\(nodeDirectory)/node.key.sealed", mode: 0o600)
        var config = """
            node:
              id: \(member.id)
              data_dir: data
              listen:
                peer: "\(member.peer)"
                api: "\(member.api)"
              join: \(joining)
            peers:\(peers.isEmpty ? " []" : "")

            """
        for peer in peers {
            config += "  - id: \(peer.id)\n    address: \"\(peer.peer)\"\n    api: \"\(peer.api)\"\n"
        }
        config += """
            tls:
              ca: ../ca.pem
              certificate: node.pem
              key: node.key.sealed
            key_encryption_key_file: ../kek
            trust_domain: \(trustDomain)
            key_algorithm: \(keyAlgorithm.rawValue)
            raft:
              tick_interval_ms: \(tickIntervalMilliseconds)
              election_timeout_ticks: \(electionTimeoutTicks)

            """
        if let snapshotEveryEntries { config += "  snapshot_every_entries: \(snapshotEveryEntries)\n" }
        try write(config, to: "\(nodeDirectory)/config.yaml")
    }

    static func nodeKeyPurpose(_ id: NodeID) -> String { "warrant node \(id) key" }

    /// Resolves `path` against the directory holding the configuration.
    public static func resolve(_ path: String, relativeTo configPath: String) -> String {
        if path.hasPrefix("/") { return path }
        return URL(fileURLWithPath: configPath).deletingLastPathComponent().appendingPathComponent(path).standardizedFileURL.path
    }

    /// The node's identity from the files its configuration names.
    public static func loadIdentity(_ config: NodeConfig, configPath: String) throws -> NodeIdentity {
        let kekPath = resolve(config.keyEncryptionKeyFile, relativeTo: configPath)
        let keyPath = resolve(config.tlsKeyFile, relativeTo: configPath)
        let certificatePath = resolve(config.tlsCertificateFile, relativeTo: configPath)
        let kek = try KeyEncryptionKey.load(path: kekPath)
        let key = try SealedKey.open(read(keyPath), purpose: nodeKeyPurpose(config.id), with: kek, path: keyPath)
        let identity: NodeIdentity
        do {
            identity = try NodeIdentity(certificatePEM: read(certificatePath), privateKeyPEM: key,
                                        caCertificatePEM: read(resolve(config.tlsCAFile, relativeTo: configPath)))
        } catch let problem as FileProblem {
            throw problem
        } catch {
            throw FileProblem(path: certificatePath, problem: "\(error)")
        }
        guard identity.nodeID == config.id else {
            throw FileProblem(path: certificatePath, problem: "names node \(identity.nodeID), but the configuration is node \(config.id)")
        }
        return identity
    }
}

/// `cluster.yaml`: the cluster id and its founding members, for the CLI.
public struct ClusterListing: Sendable {
    public var clusterID: String
    public var trustDomain: String
    public var keyAlgorithm: KeyAlgorithm
    public var members: [ClusterFiles.Member]

    private struct File: Decodable {
        struct Member: Decodable {
            var id: UInt64
            var peer: String
            var api: String
        }
        var cluster_id: String
        var trust_domain: String?
        var key_algorithm: String?
        var members: [Member]
    }

    public init(directory: String) throws {
        let path = "\(directory)/cluster.yaml"
        let file: File
        do {
            file = try YAMLDecoder().decode(File.self, from: ClusterFiles.read(path, bytesMax: 64 << 10))
        } catch let problem as FileProblem {
            throw problem
        } catch {
            throw FileProblem(path: path, problem: "is not a cluster listing: \(error)")
        }
        guard !file.cluster_id.isEmpty else { throw FileProblem(path: path, problem: "has an empty cluster_id") }
        clusterID = file.cluster_id
        trustDomain = file.trust_domain ?? "warrant.local"
        guard let algorithm = KeyAlgorithm(rawValue: file.key_algorithm ?? KeyAlgorithm.ecdsaP256.rawValue) else {
            throw FileProblem(path: path, problem: "key_algorithm '\(file.key_algorithm ?? "")' is not one of \(KeyAlgorithm.names)")
        }
        keyAlgorithm = algorithm
        do {
            members = try file.members.map { ClusterFiles.Member(id: $0.id, peer: try HostPort(parsing: $0.peer, at: "peer"), api: try HostPort(parsing: $0.api, at: "api")) }
        } catch {
            throw FileProblem(path: path, problem: "\(error)")
        }
    }
}
