import Foundation
import Authority
import Raft
import Policy
import Yams

/// A host and port, as written in configuration ("127.0.0.1:7401", "[::1]:7401").
public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    public init(parsing text: String, at path: String) throws(NodeConfigError) {
        let host: Substring, portText: Substring
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw NodeConfigError(path: path, problem: "'\(text)' needs a port: [host]:port") }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else {
                throw NodeConfigError(path: path, problem: "'\(text)' is not host:port (write IPv6 as [::1]:port)")
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty else { throw NodeConfigError(path: path, problem: "'\(text)' has an empty host") }
        guard let port = Int(portText), (1...65535).contains(port) else {
            throw NodeConfigError(path: path, problem: "'\(text)' has no valid port (1-65535)")
        }
        self.host = String(host)
        self.port = port
    }
}

/// One problem in a configuration file: where, and what is wrong (the
/// same shape as a problem in a policy document).
public typealias NodeConfigError = PolicyError

/// What `warrant node start --config FILE` reads. Every field is checked
/// when loaded; unknown keys are errors, so a typo never passes silently.
public struct NodeConfig: Sendable, Hashable {
    public struct Peer: Sendable, Hashable {
        public var id: NodeID
        public var address: HostPort
        /// Its HTTPS API, where this node forwards writes when it leads.
        public var api: HostPort
    }

    public var id: NodeID
    public var dataDirectory: String
    public var peerListen: HostPort
    public var apiListen: HostPort
    /// A node added to a running cluster starts with an empty log and waits
    /// to be added as a learner; the founding nodes bootstrap together.
    public var joinsExistingCluster: Bool
    public var peers: [Peer]
    public var tlsCAFile: String
    public var tlsCertificateFile: String
    public var tlsKeyFile: String
    public var keyEncryptionKeyFile: String
    /// The SPIFFE trust domain this cluster issues identities in.
    public var trustDomain: String
    /// The key type of the trust domain's authorities (the first, and each
    /// rotation unless it names another).
    public var keyAlgorithm: KeyAlgorithm
    public var tickIntervalMilliseconds: Int
    public var electionTimeoutTicks: Int
    public var heartbeatIntervalTicks: Int
    /// The log is compacted behind a ledger snapshot this often (entries).
    public var snapshotEveryEntries: Int
    /// AppendEntries messages a leader keeps unanswered per follower
    /// (`raft.inflight_messages_max`). Few means larger messages: entries
    /// that arrive while two are in flight wait and travel together.
    public var inflightMessagesMax: Int
    /// Lets issuers' keys be fetched over plain HTTP from loopback
    /// addresses (`join.allow_http_loopback_issuers`; tests only).
    public var allowHTTPLoopbackIssuers: Bool
    /// An unknown kid fetches an issuer's keys again at most this often.
    public var jwksRefetchSeconds: Int
    /// Writes are not synced to disk (`storage.unsafe_no_fsync`): a crash
    /// of the machine, not only of the process, can lose acknowledged
    /// writes. For tests whose subject is not durability, so that their
    /// elections do not wait on a disk other suites keep busy.
    public var unsafeNoFsync: Bool
    /// Identity records the ledger may keep (`storage.identity_records_max`):
    /// every node holds each in memory until the identity expires (about
    /// 1.2 KB apiece), so past this the leader signs nothing new until
    /// some expire, instead of every node running out of memory at once.
    public var identityRecordsMax: Int
    /// The URL relying parties know the cluster's JWT-SVIDs by
    /// (`jwt_issuer`): written as every JWT-SVID's `iss` and served as the
    /// discovery document's `issuer` (its `jwks_uri` under it). Cloud
    /// providers federating with JWT-SVIDs require both. Every node of a
    /// cluster is given the same one. Nil: no `iss`, and discovery names
    /// the address the client used.
    public var jwtIssuer: String?
    /// Issuance on the strength of a presented X509-SVID (renewals,
    /// workload JWT-SVIDs, steps), per identity line: at most this many at
    /// once (`limits.workload_issuance_burst`) and this many a second after
    /// (`limits.workload_issuance_per_second`).
    public var workloadIssuanceBurst: Int
    public var workloadIssuancePerSecond: Int

    /// Limits checked at load time.
    public static let peersMax = 8
    public static let tickIntervalMilliseconds = 1...1_000
    public static let electionTimeoutTicks = 2...1_000
    public static let fileBytesMax = 64 << 10
    public static let snapshotEveryEntries = 100...10_000_000
    public static let inflightMessagesMax = 1...1_024
    public static let identityRecordsMax = 1...100_000_000
    public static let identityRecordsMaxDefault = 2_000_000
    public static let workloadIssuanceBurst = 1...100_000
    public static let workloadIssuancePerSecond = 1...100_000

    public init(yaml text: String) throws(NodeConfigError) {
        guard text.utf8.count <= Self.fileBytesMax else {
            throw NodeConfigError(path: "", problem: "the file is larger than \(Self.fileBytesMax) bytes")
        }
        let root: Yams.Node
        do {
            guard let composed = try Yams.compose(yaml: text) else { throw NodeConfigError(path: "", problem: "the file is empty") }
            root = composed
        } catch let error as NodeConfigError {
            throw error
        } catch {
            throw NodeConfigError(path: "", problem: "not valid YAML: \(error)")
        }
        let top = try Section(root, "", keys: ["node", "peers", "tls", "key_encryption_key_file", "raft", "trust_domain", "key_algorithm", "join", "storage",
                                               "jwt_issuer", "limits"])
        let node = try top.section("node", keys: ["id", "data_dir", "listen", "join"])
        id = try node.integer("id", in: 1...Int.max).asNodeID
        dataDirectory = try node.string("data_dir")
        let listen = try node.section("listen", keys: ["peer", "api"])
        peerListen = try HostPort(parsing: listen.string("peer"), at: listen.path("peer"))
        apiListen = try HostPort(parsing: listen.string("api"), at: listen.path("api"))
        guard peerListen != apiListen else { throw NodeConfigError(path: listen.path("api"), problem: "must differ from node.listen.peer") }
        joinsExistingCluster = try node.boolean("join", default: false)

        let peerNodes = try top.sequence("peers")
        guard peerNodes.count <= Self.peersMax else {
            throw NodeConfigError(path: "peers", problem: "at most \(Self.peersMax) peers, found \(peerNodes.count)")
        }
        var peers: [Peer] = []
        for (offset, peerNode) in peerNodes.enumerated() {
            let peer = try Section(peerNode, "peers[\(offset)]", keys: ["id", "address", "api"])
            let peerID = try peer.integer("id", in: 1...Int.max).asNodeID
            guard peerID != id else { throw NodeConfigError(path: peer.path("id"), problem: "\(peerID) is this node's own id") }
            guard !peers.contains(where: { $0.id == peerID }) else { throw NodeConfigError(path: peer.path("id"), problem: "\(peerID) is listed twice") }
            peers.append(Peer(id: peerID, address: try HostPort(parsing: peer.string("address"), at: peer.path("address")),
                              api: try HostPort(parsing: peer.string("api"), at: peer.path("api"))))
        }
        self.peers = peers

        let tls = try top.section("tls", keys: ["ca", "certificate", "key"])
        tlsCAFile = try tls.string("ca")
        tlsCertificateFile = try tls.string("certificate")
        tlsKeyFile = try tls.string("key")
        keyEncryptionKeyFile = try top.string("key_encryption_key_file")
        trustDomain = try top.optionalString("trust_domain") ?? "warrant.local"
        guard !trustDomain.isEmpty, trustDomain.utf8.count <= 255,
              trustDomain.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x2E || $0 == 0x5F }) else {
            throw NodeConfigError(path: "trust_domain", problem: "'\(trustDomain)' is not a trust domain name (lower-case a-z, 0-9, '.', '-', '_'; at most 255 bytes)")
        }

        let algorithm = try top.optionalString("key_algorithm") ?? KeyAlgorithm.ecdsaP256.rawValue
        guard let keyAlgorithm = KeyAlgorithm(rawValue: algorithm) else {
            throw NodeConfigError(path: "key_algorithm", problem: "'\(algorithm)' is not one of \(KeyAlgorithm.names)")
        }
        self.keyAlgorithm = keyAlgorithm
        jwtIssuer = try top.optionalString("jwt_issuer")
        if let issuer = jwtIssuer, let problem = Self.issuerProblem(issuer) {
            throw NodeConfigError(path: "jwt_issuer", problem: "'\(issuer.prefix(300))' \(problem)")
        }

        let join = try top.section("join", keys: ["allow_http_loopback_issuers", "jwks_refetch_seconds"], optional: true)
        allowHTTPLoopbackIssuers = try join.boolean("allow_http_loopback_issuers", default: false)
        jwksRefetchSeconds = try join.integer("jwks_refetch_seconds", in: 1...3_600, default: 30)

        let storage = try top.section("storage", keys: ["unsafe_no_fsync", "identity_records_max"], optional: true)
        unsafeNoFsync = try storage.boolean("unsafe_no_fsync", default: false)
        identityRecordsMax = try storage.integer("identity_records_max", in: Self.identityRecordsMax, default: Self.identityRecordsMaxDefault)

        let limits = try top.section("limits", keys: ["workload_issuance_burst", "workload_issuance_per_second"], optional: true)
        workloadIssuanceBurst = try limits.integer("workload_issuance_burst", in: Self.workloadIssuanceBurst, default: 100)
        workloadIssuancePerSecond = try limits.integer("workload_issuance_per_second", in: Self.workloadIssuancePerSecond, default: 20)

        let raft = try top.section("raft", keys: ["tick_interval_ms", "election_timeout_ticks", "heartbeat_interval_ticks", "snapshot_every_entries",
                                                  "inflight_messages_max"], optional: true)
        inflightMessagesMax = try raft.integer("inflight_messages_max", in: Self.inflightMessagesMax, default: 2)
        snapshotEveryEntries = try raft.integer("snapshot_every_entries", in: Self.snapshotEveryEntries, default: 50_000)
        tickIntervalMilliseconds = try raft.integer("tick_interval_ms", in: Self.tickIntervalMilliseconds, default: 10)
        electionTimeoutTicks = try raft.integer("election_timeout_ticks", in: Self.electionTimeoutTicks, default: 10)
        heartbeatIntervalTicks = try raft.integer("heartbeat_interval_ticks", in: 1...Self.electionTimeoutTicks.upperBound, default: 1)
        guard electionTimeoutTicks > heartbeatIntervalTicks else {
            throw NodeConfigError(path: raft.path("election_timeout_ticks"),
                                  problem: "must exceed heartbeat_interval_ticks (\(heartbeatIntervalTicks))")
        }
    }
}

extension NodeConfig {
    public static let issuerBytesMax = 255

    /// What is wrong with `text` as a JWT issuer URL, or nil: https, a
    /// host, no query, fragment, user info or trailing slash (relying
    /// parties compare `iss` as a string, and cloud providers take the
    /// discovery document from `<iss>/.well-known/openid-configuration`).
    static func issuerProblem(_ text: String) -> String? {
        guard text.utf8.count <= issuerBytesMax else { return "is longer than \(issuerBytesMax) bytes" }
        guard text.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else { return "may hold only printable ASCII without spaces" }
        guard text.hasPrefix("https://"), let url = URLComponents(string: text), url.scheme == "https",
              let host = url.host, !host.isEmpty else { return "is not an https URL with a host" }
        guard url.query == nil, url.fragment == nil, url.user == nil, url.password == nil else {
            return "may not have a query, fragment or user info"
        }
        guard !text.hasSuffix("/") else { return "may not end in '/'" }
        return nil
    }
}

private extension Int {
    var asNodeID: NodeID { NodeID(self) }
}

/// A mapping read with its path, allowing only the keys given.
private struct Section {
    let path: String
    let mapping: Yams.Node.Mapping?

    init(_ node: Yams.Node?, _ path: String, keys: Set<String>, optional: Bool = false) throws(NodeConfigError) {
        self.path = path
        guard let node else {
            guard optional else { throw NodeConfigError(path: path, problem: "is missing") }
            mapping = nil
            return
        }
        guard let mapping = node.mapping else { throw NodeConfigError(path: path, problem: "must be a mapping of keys to values") }
        for key in mapping.keys {
            guard let name = key.string, keys.contains(name) else {
                throw NodeConfigError(path: path, problem: "unknown key '\(key.string ?? "?")' (expected one of: \(keys.sorted().joined(separator: ", ")))")
            }
        }
        self.mapping = mapping
    }

    func path(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func section(_ key: String, keys: Set<String>, optional: Bool = false) throws(NodeConfigError) -> Section {
        try Section(mapping?[key], path(key), keys: keys, optional: optional)
    }

    func sequence(_ key: String) throws(NodeConfigError) -> [Yams.Node] {
        guard let node = mapping?[key] else { throw NodeConfigError(path: path(key), problem: "is missing") }
        guard let sequence = node.sequence else { throw NodeConfigError(path: path(key), problem: "must be a list") }
        return Array(sequence)
    }

    func optionalString(_ key: String) throws(NodeConfigError) -> String? {
        guard mapping?[key] != nil else { return nil }
        return try string(key)
    }

    func string(_ key: String) throws(NodeConfigError) -> String {
        guard let node = mapping?[key] else { throw NodeConfigError(path: path(key), problem: "is missing") }
        guard let scalar = node.scalar, !scalar.string.isEmpty else { throw NodeConfigError(path: path(key), problem: "must be a non-empty string") }
        return scalar.string
    }

    func boolean(_ key: String, default fallback: Bool) throws(NodeConfigError) -> Bool {
        guard let node = mapping?[key] else { return fallback }
        switch node.scalar?.string {
        case "true": return true
        case "false": return false
        default: throw NodeConfigError(path: path(key), problem: "must be true or false")
        }
    }

    func integer(_ key: String, in range: ClosedRange<Int>, default fallback: Int? = nil) throws(NodeConfigError) -> Int {
        guard let node = mapping?[key] else {
            guard let fallback else { throw NodeConfigError(path: path(key), problem: "is missing") }
            return fallback
        }
        guard let text = node.scalar?.string, let value = Int(text) else {
            throw NodeConfigError(path: path(key), problem: "must be an integer")
        }
        guard range.contains(value) else {
            throw NodeConfigError(path: path(key), problem: "\(value) is outside \(range.lowerBound)...\(range.upperBound)")
        }
        return value
    }
}
