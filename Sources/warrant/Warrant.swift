import Authority
import Client
import ArgumentParser
import Foundation
import Encoding
import NIOCore
import NIOHTTP1
import Node
import Transport
import X509

@main
struct Warrant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "warrant",
        abstract: "Short-lived machine identity, issued by a replicated cluster.",
        subcommands: [NodeCommand.self, ClusterCommand.self, DocumentCommand.self, AuditCommand.self, MemberCommand.self, LeaderCommand.self,
                      TokenCommand.self, SVIDCommand.self, BundleCommand.self, CACommand.self, RevokeCommand.self, AdminCommand.self, CRLCommand.self, JoinCommand.self, ExecCommand.self, AgentCommand.self])

    static func main() async {
        let arguments = arguments()
        if arguments.first == ExecWatchdog.argument { ExecWatchdog.watch(arguments) }
        await main(arguments)
    }

    /// The command line. Under some preloaded libraries (libfaketime
    /// 0.9.10, which the chaos suite's clock-skew fault uses) Swift sees
    /// no arguments at all: then they are read back from the kernel.
    static func arguments() -> [String] {
        if !CommandLine.arguments.isEmpty { return Array(CommandLine.arguments.dropFirst()) }
        guard let bytes = FileManager.default.contents(atPath: "/proc/self/cmdline"), !bytes.isEmpty else { return [] }
        return Array(bytes.split(separator: 0, omittingEmptySubsequences: false).dropFirst().dropLast(bytes.last == 0 ? 1 : 0)
            .map { String(decoding: $0, as: UTF8.self) })
    }
}

/// How the CLI reaches the cluster: the directory `cluster init` wrote
/// (CA, admin certificate, member list), or explicit endpoints.
struct ConnectionOptions: ParsableArguments {
    @Option(name: .customLong("dir"), help: "The cluster directory written by 'warrant cluster init' (or $WARRANT_DIR).")
    var directory: String?

    @Option(help: "Comma-separated API addresses (host:port) to try in order; default: every member in the cluster directory.")
    var endpoints: String?

    @Option(help: "The admin certificate to present (PEM; or $WARRANT_ADMIN_CERT); default: admin.pem in the cluster directory.")
    var adminCert: String?

    @Option(help: "Its private key (PEM; or $WARRANT_ADMIN_KEY); default: admin.key in the cluster directory.")
    var adminKey: String?

    var clusterDirectory: String {
        get throws { try Self.clusterDirectory(directory) }
    }

    /// `given`, else $WARRANT_DIR.
    static func clusterDirectory(_ given: String?) throws -> String {
        guard let directory = given ?? ProcessInfo.processInfo.environment["WARRANT_DIR"] else {
            throw ValidationError("say where the cluster's files are: --dir DIR or WARRANT_DIR")
        }
        return directory
    }

    func client() throws -> AdminClient {
        let directory = try clusterDirectory
        var addresses: [SocketAddress]?
        if let endpoints {
            addresses = try endpoints.split(separator: ",").map { text in
                let hostPort = try HostPort(parsing: String(text), at: "--endpoints")
                return try SocketAddress.makeAddressResolvingHost(hostPort.host, port: hostPort.port)
            }
        }
        let environment = ProcessInfo.processInfo.environment
        return try AdminClient(clusterDirectory: directory, endpoints: addresses, certificatePath: adminCert ?? environment["WARRANT_ADMIN_CERT"],
                               keyPath: adminKey ?? environment["WARRANT_ADMIN_KEY"])
    }
}

/// Prints a response body and fails (exit 1) on an error status.
func finish(_ response: HTTPClientResponse) throws {
    // What the cluster says may quote a caller's text (claims, names).
    let text = UTF8Text.forDisplay(response.text)
    if response.status.code >= 400 {
        FileHandle.standardError.write(Data("error: \(response.status.code) \(text)\n".utf8))
        throw ExitCode.failure
    }
    print(text)
}

extension AdminClient {
    /// POSTs `object` as JSON.
    func post(_ path: String, json object: [String: Any]) async throws -> HTTPClientResponse {
        try await request(.POST, path, headers: [("content-type", "application/json")], body: Array(try JSONSerialization.data(withJSONObject: object)))
    }
}

func percentEncoded(_ text: String) -> String {
    text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? text
}

struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "node", abstract: "Run a node.", subcommands: [Start.self])

    struct Start: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Start a node from its configuration; SIGTERM stops it gracefully.")
        @Option(help: "The node's YAML configuration.") var config: String

        func run() async throws {
            let server: NodeServer
            do {
                server = try NodeServer(configPath: config)
            } catch {
                FileHandle.standardError.write(Data("warrant: cannot start: \(error)\n".utf8))
                throw ExitCode.failure
            }
            do {
                try await server.run()
            } catch let error as NodeStartError {
                FileHandle.standardError.write(Data("warrant: cannot start: \(error)\n".utf8))
                throw ExitCode.failure
            }
        }
    }
}

struct ClusterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cluster", abstract: "Create and inspect a cluster.",
                                                    subcommands: [Init.self, AddNode.self, RenewCert.self, Status.self, AdoptRules.self])

    struct Init: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a new cluster's CA, certificates, key-encryption key and node configurations.")
        @Option(name: .customLong("dir"), help: "Directory to create (must not exist or be empty).") var directory: String
        @Option(help: "Number of nodes.") var nodes = 3
        @Option(help: "Host the nodes listen on.") var host = "127.0.0.1"
        @Option(help: "Peer port of node 1 (node N uses this + N - 1).") var peerPort = 7401
        @Option(help: "API port of node 1 (node N uses this + N - 1).") var apiPort = 8401
        @Option(help: "Cluster id (default: random).") var clusterID: String?
        @Option(help: "Raft tick interval in milliseconds.") var tickMs = 10
        @Option(help: "Election timeout in ticks.") var electionTicks = 20
        @Option(help: "Key type of the trust domain's authorities: \(KeyAlgorithm.names).") var keyAlgorithm = KeyAlgorithm.ecdsaP256.rawValue

        func validate() throws {
            guard (1...7).contains(nodes) else { throw ValidationError("--nodes must be 1...7") }
            guard (1...65_000).contains(peerPort), (1...65_000).contains(apiPort) else { throw ValidationError("ports must be 1...65000") }
            if let clusterID, clusterID.isEmpty || !clusterID.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D }) {
                throw ValidationError("--cluster-id may hold only a-z, 0-9 and '-'")
            }
            guard KeyAlgorithm(rawValue: keyAlgorithm) != nil else { throw ValidationError("--key-algorithm must be one of \(KeyAlgorithm.names)") }
        }

        func run() throws {
            let clusterID = self.clusterID ?? "c" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(12)
            let members = try (1...nodes).map { n in
                ClusterFiles.Member(id: UInt64(n), peer: try HostPort(parsing: "\(host):\(peerPort + n - 1)", at: "--host"),
                                    api: try HostPort(parsing: "\(host):\(apiPort + n - 1)", at: "--host"))
            }
            try ClusterFiles.initialize(directory: directory, clusterID: clusterID, members: members,
                                        tickIntervalMilliseconds: tickMs, electionTimeoutTicks: electionTicks,
                                        keyAlgorithm: KeyAlgorithm(rawValue: keyAlgorithm) ?? .ecdsaP256)
            print("cluster \(clusterID): \(nodes) node configurations, CA, admin certificate and key-encryption key written to \(directory)")
            for member in members { print("  node \(member.id): \(directory)/node-\(member.id)/config.yaml  peer \(member.peer)  api https://\(member.api)") }
        }
    }

    struct AddNode: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add-node",
            abstract: "Write a configuration and certificate for a node that will join the running cluster (then start it and run 'warrant member add').")
        @Option(name: .customLong("dir")) var directory: String
        @Option var id: UInt64
        @Option(help: "host:port for peer traffic.") var peerAddress: String
        @Option(help: "host:port for the API.") var apiAddress: String

        func run() throws {
            let listing = try ClusterListing(directory: directory)
            let member = ClusterFiles.Member(id: id, peer: try HostPort(parsing: peerAddress, at: "--peer-address"),
                                             api: try HostPort(parsing: apiAddress, at: "--api-address"))
            guard id != 0, !listing.members.contains(where: { $0.id == id }) else { throw ValidationError("node \(id) is already a founding member") }
            try ClusterFiles.addNode(directory: directory, member: member, peers: listing.members)
            print("node \(id): \(directory)/node-\(id)/config.yaml written; start it, then: warrant member add --dir \(directory) --id \(id) --peer-address \(peerAddress) --api-address \(apiAddress)")
        }
    }

    struct RenewCert: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "renew-cert",
            abstract: "Give a node a new certificate and key from the cluster CA (same names); the node uses them from its next start.",
            discussion: """
                Node certificates last a year (warrant_node_certificate_expiry_timestamp_seconds says when; a node warns 30 days before). \
                Renew and restart one node at a time: the cluster keeps its quorum, and old and new certificates chain to the same CA.
                """)
        @Option(name: .customLong("dir")) var directory: String
        @Option(help: "The node's id.") var node: UInt64
        @Option(help: "How long the new certificate lives, in days (1-1825; never past the cluster CA).") var days: Int = 365

        func run() throws {
            guard node != 0 else { throw ValidationError("--node must name a node (1 or more)") }
            guard (1...1_825).contains(days) else { throw ValidationError("--days must be 1 to 1825") }
            let certificate = try ClusterFiles.renewNodeCertificate(directory: directory, id: node, validity: TimeInterval(days) * 86_400)
            print("node \(node): \(directory)/node-\(node)/node.pem renewed, valid until \(certificate.notValidAfter.formatted(.iso8601)); restart node \(node) to use it")
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Members, roles, terms, indexes, lag and health, asking every node.")
        @OptionGroup var connection: ConnectionOptions
        @Flag(help: "Print each node's JSON instead of the table.") var json = false

        func run() async throws {
            let client = try connection.client()
            defer { Task { await client.closeAll() } }
            var rows: [(String, ClusterStatusBody?, String)] = []
            for (index, endpoint) in client.endpoints.enumerated() {
                do {
                    let response = try await client.request(at: index, .GET, "/v1/cluster/status", timeout: .seconds(3))
                    guard response.status == .ok else { rows.append((endpoint.hostPort, nil, "HTTP \(response.status.code)")); continue }
                    if json { print(response.text) }
                    let status = try APIJSON.decode(ClusterStatusBody.self, from: response.body)
                    let ready = try await client.request(at: index, .GET, "/readyz", timeout: .seconds(3))
                    rows.append((endpoint.hostPort, status, ready.status == .ok ? "ready" : "not ready"))
                } catch {
                    rows.append((endpoint.hostPort, nil, "unreachable"))
                }
            }
            if json { return }
            print(StatusTable.render(rows))
            if rows.allSatisfy({ $0.1 == nil }) { throw ExitCode.failure }
        }
    }
}

extension ClusterCommand {
    struct AdoptRules: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "adopt-rules",
            abstract: "Finish an upgrade: apply the ledger by newer rules from now on, once every member runs a build that knows them (see 'cluster status', RULES).")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "The rules version to adopt.") var version: UInt32

        func run() async throws {
            try finish(try await connection.client().post("/v1/cluster/rules", json: ["version": version]))
        }
    }
}

enum StatusTable {
    static func render(_ rows: [(String, ClusterStatusBody?, String)]) -> String {
        var lines = [["NODE", "API", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "MATCH", "LAG", "RULES", "HEALTH"]]
        let leader = rows.compactMap(\.1).first { $0.role == "leader" }
        for (endpoint, status, health) in rows {
            guard let status else {
                lines.append(["?", endpoint, "-", "-", "-", "-", "-", "-", "-", "-", health])
                continue
            }
            let member = leader?.members.first { $0.id == status.id }
            lines.append(["\(status.id)", endpoint, status.role, "\(status.term)", "\(status.leader)", "\(status.commitIndex)", "\(status.appliedIndex)",
                          member?.matchIndex.map(String.init) ?? "-", member?.lag.map(String.init) ?? "-",
                          "\(status.rulesInForce.map(String.init) ?? "?")/\(status.rulesKnown.map(String.init) ?? "?")", health])
        }
        if let leader {
            let shown = Set(rows.compactMap { $0.1?.id })
            for member in leader.members where !shown.contains(member.id) {
                lines.append(["\(member.id)", member.apiAddress ?? "?", member.role, "-", "-", "-", "-",
                              member.matchIndex.map(String.init) ?? "-", member.lag.map(String.init) ?? "-", "-", "not asked"])
            }
        }
        let widths = lines[0].indices.map { column in lines.map { $0[column].count }.max() ?? 0 }
        return lines.map { line in
            zip(line, widths).map { $0.0.padding(toLength: $0.1, withPad: " ", startingAt: 0) }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}

struct DocumentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "doc", abstract: "Versioned documents.",
                                                    subcommands: [Put.self, Get.self, Delete.self, List.self])

    struct Put: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create or replace a document (compare-and-set with --expected-version).")
        @OptionGroup var connection: ConnectionOptions
        @Argument var name: String
        @Option(help: "Read the content from this file ('-' for stdin).") var file: String?
        @Option(help: "The content itself.") var value: String?
        @Flag(help: "The content is YAML (default: JSON).") var yaml = false
        @Option(help: "Write only if the document is at this version (0: only if it does not exist).") var expectedVersion: UInt64?

        func run() async throws {
            let content: [UInt8]
            switch (file, value) {
            case (let file?, nil): content = try ClusterFiles.readBytes(file)
            case (nil, let value?): content = Array(value.utf8)
            default: throw ValidationError("give exactly one of --file or --value")
            }
            let client = try connection.client()
            var uri = "/v1/documents/\(percentEncoded(name))"
            if let expectedVersion { uri += "?expected_version=\(expectedVersion)" }
            try finish(try await client.request(.PUT, uri, headers: [("content-type", yaml ? "application/yaml" : "application/json")], body: content))
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Read a document (linearizable unless --serializable).")
        @OptionGroup var connection: ConnectionOptions
        @Argument var name: String
        @Flag(help: "Read this node's applied state without confirming leadership (may be stale).") var serializable = false

        func run() async throws {
            let client = try connection.client()
            try finish(try await client.request(.GET, "/v1/documents/\(percentEncoded(name))?consistency=\(serializable ? "serializable" : "linearizable")"))
        }
    }

    struct Delete: AsyncParsableCommand {
        @OptionGroup var connection: ConnectionOptions
        @Argument var name: String
        @Option var expectedVersion: UInt64?

        func run() async throws {
            let client = try connection.client()
            var uri = "/v1/documents/\(percentEncoded(name))"
            if let expectedVersion { uri += "?expected_version=\(expectedVersion)" }
            try finish(try await client.request(.DELETE, uri))
        }
    }

    struct List: AsyncParsableCommand {
        @OptionGroup var connection: ConnectionOptions
        @Option var prefix = ""
        @Option var limit = 100

        func run() async throws {
            let client = try connection.client()
            try finish(try await client.request(.GET, "/v1/documents?prefix=\(percentEncoded(prefix))&limit=\(limit)"))
        }
    }
}

struct AuditCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "audit", abstract: "The replicated, hash-chained audit log.",
                                                    subcommands: [Tail.self, Verify.self])

    struct Tail: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the latest audit records, one per line.")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "How many of the latest records.") var count = 20

        func run() async throws {
            guard (1...1_000).contains(count) else { throw ValidationError("--count must be 1...1000") }
            let client = try connection.client()
            let verify = try await client.request(.GET, "/v1/audit/verify")
            guard verify.status == .ok else { return try finish(verify) }
            let total = try APIJSON.decode(AuditVerifyBody.self, from: verify.body).records
            let response = try await client.request(.GET, "/v1/audit?after=\(total > UInt64(count) ? total - UInt64(count) : 0)&limit=\(count)")
            guard response.status == .ok else { return try finish(response) }
            for record in try APIJSON.decode(AuditPageBody.self, from: response.body).records { print(record.line) }
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Recompute the chain on every node and compare the heads.")
        @OptionGroup var connection: ConnectionOptions

        func run() async throws {
            let client = try connection.client()
            var results: [(Int, AuditVerifyBody)] = []
            var failed = false
            for index in client.endpoints.indices {
                do {
                    let response = try await client.request(at: index, .GET, "/v1/audit/verify")
                    let body = try APIJSON.decode(AuditVerifyBody.self, from: response.body)
                    results.append((index, body))
                    print("node \(body.node): \(body.intact ? "intact" : "BROKEN at record \(body.brokenAt ?? 0): \(UTF8Text.forDisplay(body.reason ?? ""))"), \(body.records) records, head \(body.headHash?.prefix(16) ?? "-")")
                    if !body.intact { failed = true }
                } catch {
                    // A tamper check passes only if every node was checked.
                    print("\(client.endpoints[index].hostPort): NOT VERIFIED, unreachable (\(error))")
                    failed = true
                }
            }
            // Nodes may be at different lengths: compare each at the shortest.
            if let common = results.map(\.1.records).min(), common > 0 {
                var hashes: [UInt64: String] = [:]
                for (index, body) in results where body.intact {
                    let response = try await client.request(at: index, .GET, "/v1/audit?after=\(common - 1)&limit=1")
                    hashes[body.node] = try APIJSON.decode(AuditPageBody.self, from: response.body).records.first?.hash
                }
                if Set(hashes.values).count == 1 {
                    print("all \(hashes.count) nodes agree on record \(common): \(hashes.values.first!.prefix(16))")
                } else {
                    print("DISAGREEMENT at record \(common): " + hashes.sorted { $0.key < $1.key }.map { "node \($0.key) \($0.value.prefix(16))" }.joined(separator: ", "))
                    failed = true
                }
            }
            if failed || results.isEmpty { throw ExitCode.failure }
        }
    }
}

struct MemberCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "member", abstract: "Change the cluster's membership.",
                                                    subcommands: [Add.self, Remove.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Add a node as a learner; the leader promotes it to voter once it has caught up.")
        @OptionGroup var connection: ConnectionOptions
        @Option var id: UInt64
        @Option var peerAddress: String
        @Option var apiAddress: String

        func run() async throws {
            let client = try connection.client()
            let body = APIJSON.encode(AddMemberRequest(id: id, peerAddress: peerAddress, apiAddress: apiAddress))
            try finish(try await client.request(.POST, "/v1/cluster/members", headers: [("content-type", "application/json")], body: body))
        }
    }

    struct Remove: AsyncParsableCommand {
        @OptionGroup var connection: ConnectionOptions
        @Argument var id: UInt64

        func run() async throws {
            let client = try connection.client()
            try finish(try await client.request(.DELETE, "/v1/cluster/members/\(id)"))
        }
    }
}

struct LeaderCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "leader", abstract: "Leadership.", subcommands: [Transfer.self])

    struct Transfer: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Hand leadership to another voter.")
        @OptionGroup var connection: ConnectionOptions
        @Option var to: UInt64

        func run() async throws {
            let client = try connection.client()
            try finish(try await client.request(.POST, "/v1/cluster/leader", headers: [("content-type", "application/json")],
                                                body: APIJSON.encode(TransferRequest(to: to))))
        }
    }
}

struct TokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "token", abstract: "One-time join tokens.", subcommands: [Create.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make a join token that one job can exchange, once, for an identity.")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "The SPIFFE ID the token may be exchanged for.") var spiffeId: String
        @Option(help: "The longest the identity may live, in seconds.") var ttl: UInt32 = 3_600
        @Option(help: "How long the token itself stays valid, in seconds.") var validFor: UInt32 = 600
        @Option(help: "How long identities from this token may be renewed, from the first issuance, in seconds (default: a day, or the TTL if longer).")
        var maxLifetime: UInt32?
        @Flag(help: "Print only the token (for scripts).") var quiet = false

        func run() async throws {
            let client = try connection.client()
            var request: [String: Any] = ["spiffe_id": spiffeId, "ttl_seconds": ttl, "valid_for_seconds": validFor]
            if let maxLifetime { request["max_lifetime_seconds"] = maxLifetime }
            let response = try await client.post("/v1/tokens", json: request)
            if quiet, response.status == .created, let body = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
               let token = body["token"] as? String {
                print(token)
                return
            }
            try finish(response)
        }
    }
}

/// Posts an X509-SVID request; on success writes the certificate and the
/// bundle as PEM and says what was issued, else prints the error (exit 1).
func requestX509SVID(_ client: AdminClient, _ path: String, _ request: [String: Any], out: String, bundleOut: String) async throws {
    let response = try await client.post(path, json: request)
    guard response.status == .ok, let body = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
          let certificate = body["certificate"] as? String, let bundle = body["bundle"] as? String else { return try finish(response) }
    try certificate.write(toFile: out, atomically: true, encoding: .utf8)
    try bundle.write(toFile: bundleOut, atomically: true, encoding: .utf8)
    print("\(body["spiffe_id"] ?? "") serial \(body["serial"] ?? "") until \(body["expires_at"] ?? ""): wrote \(out) and \(bundleOut)")
}

struct SVIDCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "svid", abstract: "Exchange a join token for an identity, or renew one.",
                                                    subcommands: [X509.self, JWT.self, Renew.self])

    struct Renew: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Renew an X509-SVID over mutual TLS (presenting it), for a new CSR; write the new one.")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "The current X509-SVID (PEM).") var cert: String
        @Option(help: "Its private key (PEM).") var key: String
        @Option(help: "A PEM PKCS#10 request for the new key (may be the same key).") var csr: String
        @Option(help: "Where to write the new certificate.") var out: String = "svid.pem"
        @Option(help: "Where to write the trust bundle.") var bundleOut: String = "bundle.pem"

        func run() async throws {
            let directory = try connection.clusterDirectory
            let listing = try ClusterListing(directory: directory)
            let addresses = try listing.members.map { try SocketAddress.makeAddressResolvingHost($0.api.host, port: $0.api.port) }
            let client = try AdminClient(endpoints: addresses, caPEM: try ClusterFiles.read("\(directory)/ca.pem"),
                                         certificatePEM: try ClusterFiles.read(cert), keyPEM: try ClusterFiles.read(key))
            let request: [String: Any] = ["csr": try ClusterFiles.read(csr, bytesMax: 64 << 10)]
            try await requestX509SVID(client, "/v1/svid/x509/renew", request, out: out, bundleOut: bundleOut)
        }
    }

    struct X509: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Send a CSR and a join token; write the X509-SVID and the trust bundle as PEM.",
                                                        discussion: JoinTokenOptions.discussion)
        @OptionGroup var connection: ConnectionOptions
        @OptionGroup var joinToken: JoinTokenOptions
        @Option(help: "A PEM PKCS#10 request (its key is the only thing used).") var csr: String
        @Option(help: "Where to write the certificate.") var out: String = "svid.pem"
        @Option(help: "Where to write the trust bundle.") var bundleOut: String = "bundle.pem"
        @Option(help: "The same key returns the same identity when a request is retried.") var idempotencyKey: String?

        func run() async throws {
            let token = try await joinToken.secret()
            let client = try connection.client()
            var request: [String: Any] = ["token": token, "csr": try ClusterFiles.read(csr, bytesMax: 64 << 10)]
            if let idempotencyKey { request["idempotency_key"] = idempotencyKey }
            try await requestX509SVID(client, "/v1/svid/x509", request, out: out, bundleOut: bundleOut)
        }
    }

    struct JWT: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Exchange a join token for a JWT-SVID for the given audiences.",
                                                        discussion: JoinTokenOptions.discussion)
        @OptionGroup var connection: ConnectionOptions
        @OptionGroup var joinToken: JoinTokenOptions
        @Option(help: "An audience (repeat for more).") var audience: [String]

        func run() async throws {
            let token = try await joinToken.secret()
            let client = try connection.client()
            let request: [String: Any] = ["token": token, "audience": audience]
            try finish(try await client.post("/v1/svid/jwt", json: request))
        }
    }
}

/// Where a command finds a join token: a file, standard input, or
/// WARRANT_JOIN_TOKEN; never the command line, where every local user
/// reads it (/proc/PID/cmdline, ps) and a shell's history keeps it.
struct JoinTokenOptions: ParsableArguments {
    static let variable = "WARRANT_JOIN_TOKEN"
    static let discussion = "The join token is read from --token-file (a file, or '-' for standard input) or from $WARRANT_JOIN_TOKEN, never from the command line."

    @Option(help: "A file holding the join token ('-' for standard input); without it, $WARRANT_JOIN_TOKEN.") var tokenFile: String?
    /// Refused: kept only to say why, without repeating its value.
    @Option(help: .hidden) var token: String?

    func validate() throws {
        if token != nil {
            throw ValidationError("--token is not taken: a join token on the command line is readable by every local user (/proc/PID/cmdline, ps) "
                                  + "and stays in shell history; pass it with --token-file FILE, --token-file - (standard input) or \(Self.variable)")
        }
    }

    func secret(environment: [String: String] = ProcessInfo.processInfo.environment) async throws -> String {
        let source: TokenSource
        switch tokenFile {
        case "-": source = .standardInput
        case let path?: source = .file(path: path)
        case nil:
            guard environment[Self.variable] != nil else {
                throw ValidationError("no join token: pass --token-file FILE, --token-file - (standard input) or set \(Self.variable)")
            }
            source = .environment(variable: Self.variable)
        }
        do {
            return try await source.token(environment: environment)
        } catch let problem as TokenSource.Problem {
            throw ValidationError(problem.description)
        }
    }
}

struct JoinCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "join", abstract: "Attested join: platform tokens (GitHub Actions, GitLab CI, Kubernetes, OIDC) and the rules they meet.",
        discussion: "Inside a job, 'warrant join' obtains the job's identity (see 'warrant join obtain --help'). Issuers and rules are documents: 'warrant doc put policy/issuers/<name> --file issuer.yaml --yaml' and 'warrant doc put policy/join/<name> --file rule.yaml --yaml' (see docs/join-rules.md).",
        subcommands: [JoinObtain.self, Explain.self, Lint.self], defaultSubcommand: JoinObtain.self)

    struct Explain: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Say why a platform token would or would not join: which rule matched, or each rule's failed conditions with the claim's value.",
            discussion: "Nothing is consumed. Example: warrant join explain --token job-token.jwt")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "A file holding the platform token ('-' for standard input).") var token: String
        @Flag(help: "Print the answer as JSON.") var json = false

        func run() async throws {
            let text: String
            do {
                text = try await (token == "-" ? TokenSource.standardInput : .file(path: token)).token()
            } catch let problem as TokenSource.Problem {
                throw ValidationError(problem.description)
            }
            let response = try await connection.client().post("/v1/join/explain", json: ["token": text])
            guard response.status.code < 400, let answer = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any] else {
                return try finish(response)
            }
            let verified = answer["verified"] as? Bool == true
            let allowed = verified && (answer["decision"] as? String ?? "").hasPrefix("allowed")
            if json {
                print(response.text)
                if !allowed { throw ExitCode.failure }
                return
            }
            if let issuer = answer["issuer"] as? String {
                print("issuer: \(issuer) (\(answer["method"] as? String ?? "?"))")
            } else if (answer["error"] as? [String: Any])?["code"] as? String == "unknown_issuer" {
                print("issuer: none is configured for this token's iss")
            } else {
                print("issuer: unknown (the token was refused before its issuer was read)")
            }
            if let error = answer["error"] as? [String: Any] {
                print("token: not verified: \(error["code"] as? String ?? "?"): \(error["message"] as? String ?? "")")
            } else if verified {
                print("token: verified")
            }
            for rule in answer["rules"] as? [[String: Any]] ?? [] {
                let name = rule["rule"] as? String ?? "?"
                if rule["matched"] as? Bool == true {
                    print("rule \(name): matches, identity \(rule["spiffe_id"] as? String ?? "?")")
                } else {
                    print("rule \(name): does not match")
                    for failure in rule["failures"] as? [String] ?? [] { print("  - \(failure)") }
                }
            }
            print("decision: \(answer["decision"] as? String ?? "?")")
            if !allowed { throw ExitCode.failure }
        }
    }

    struct Lint: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Warn about join rules that trust too much, and list policy documents that do not read.")
        @OptionGroup var connection: ConnectionOptions

        func run() async throws {
            let response = try await connection.client().request(.GET, "/v1/join/lint")
            guard response.status.code < 400, let answer = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any] else {
                return try finish(response)
            }
            var findings = 0
            for rule in answer["rules"] as? [[String: Any]] ?? [] {
                let warnings = rule["warnings"] as? [String] ?? []
                print("rule \(rule["rule"] as? String ?? "?") (issuer \(rule["issuer"] as? String ?? "?")): \(warnings.isEmpty ? "ok" : "\(warnings.count) warning(s)")")
                for warning in warnings { print("  - \(warning)") }
                findings += warnings.count
            }
            for (name, problem) in (answer["broken"] as? [String: String] ?? [:]).sorted(by: { $0.key < $1.key }) {
                print("\(name): does not read: \(problem)")
                findings += 1
            }
            if findings > 0 { throw ExitCode(2) }
        }
    }
}

struct BundleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bundle", abstract: "Print the trust bundle (SPIFFE JWKS, or PEM).")
    @OptionGroup var connection: ConnectionOptions
    @Flag(help: "The X.509 authorities in PEM instead of the JWKS.") var pem = false

    func run() async throws {
        let client = try connection.client()
        try finish(try await client.request(.GET, pem ? "/v1/bundle.pem" : "/v1/bundle"))
    }
}

struct CACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ca", abstract: "The trust domain's authorities.", subcommands: [Status.self, Rotate.self])

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the published authorities (prepared, active, retired) and their keys.")
        @OptionGroup var connection: ConnectionOptions

        func run() async throws {
            try finish(try await connection.client().request(.GET, "/v1/ca"))
        }
    }

    struct Rotate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One rotation step: prepare a new authority (published, not signing); the next run activates it and retires the old one.",
            discussion: "Activation waits until the prepared authority has been in bundles for one refresh interval, so relying parties trust it before it signs; --force skips the wait. A retired authority stays in bundles until the last identity it signed expires.")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "Key type of the new authority: \(KeyAlgorithm.names) (default: the cluster's).") var keyAlgorithm: String?
        @Flag(help: "Activate without waiting five bundle refresh intervals (300 s).") var force = false

        func validate() throws {
            if let keyAlgorithm, KeyAlgorithm(rawValue: keyAlgorithm) == nil { throw ValidationError("--key-algorithm must be one of \(KeyAlgorithm.names)") }
        }

        func run() async throws {
            var request: [String: Any] = ["force": force]
            if let keyAlgorithm { request["key_algorithm"] = keyAlgorithm }
            try finish(try await connection.client().post("/v1/ca/rotate", json: request))
        }
    }
}

struct RevokeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke",
        abstract: "Revoke identities issued until now: one serial, every identity of a SPIFFE ID, or every identity with an attribute (name=value).")
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "A certificate serial (hex) or a JWT-SVID's serial.") var serial: String?
    @Option(help: "Every identity of this SPIFFE ID.") var spiffeId: String?
    @Option(help: "Every identity whose attested context has name=value (for example repository=acme/api).") var attribute: String?
    @Option(help: "Why (recorded in the audit log).") var reason: String = ""

    func validate() throws {
        guard [serial, spiffeId, attribute].compactMap({ $0 }).count == 1 else { throw ValidationError("give exactly one of --serial, --spiffe-id, --attribute") }
    }

    func run() async throws {
        var request: [String: Any] = ["reason": reason]
        if let serial { request["serial"] = serial }
        if let spiffeId { request["spiffe_id"] = spiffeId }
        if let attribute { request["attribute"] = attribute }
        try finish(try await connection.client().post("/v1/revocations", json: request))
    }
}

struct AdminCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "admin", abstract: "Operators' certificates: make them, revoke them.",
                                                    subcommands: [Issue.self, Revoke.self, Revocations.self])

    struct Issue: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make an admin certificate and key from the cluster CA (offline: needs the cluster directory's ca.key.sealed and kek).")
        @Option(name: .customLong("dir"), help: "The cluster directory written by 'warrant cluster init' (or $WARRANT_DIR).") var directory: String?
        @Option(help: "The admin's name (1 to 64 printable ASCII characters, no spaces or '/'); audit records name it admin:<name>.") var name: String
        @Option(help: "How long the certificate is valid, in seconds (at most 365 days).") var ttl: UInt32 = 43_200
        @Option(help: "Where to write admin-<name>.pem and admin-<name>.key; default: the cluster directory.") var out: String?

        func run() throws {
            let directory = try ConnectionOptions.clusterDirectory(directory)
            if let reason = ClusterCA.invalidAdminName(name) { throw ValidationError(reason) }
            guard ttl > 0, TimeInterval(ttl) <= ClusterCA.adminValidityMax else {
                throw ValidationError("--ttl must be 1 to \(Int(ClusterCA.adminValidityMax)) seconds")
            }
            let out = self.out ?? directory
            let certificate = try ClusterFiles.issueAdmin(directory: directory, name: name, validity: TimeInterval(ttl), out: out)
            print("admin \(name): serial \(Hex.encode(certificate.serialNumber.bytes)) until \(certificate.notValidAfter.formatted(.iso8601)); "
                + "wrote \(out)/admin-\(name).pem and \(out)/admin-\(name).key (use with --admin-cert and --admin-key)")
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Refuse admin certificates from now on, on every node: one by serial (or its PEM file), or every one of a name issued until now.")
        @OptionGroup var connection: ConnectionOptions
        @Option(help: "The certificate's serial (hex).") var serial: String?
        @Option(help: "The certificate itself (PEM file): its serial is revoked.") var pem: String?
        @Option(help: "Every admin certificate with this name issued until now (a new one may be issued after).") var name: String?
        @Option(help: "Why (kept with the rule, shown to admins).") var reason: String = ""

        func validate() throws {
            guard [serial, pem, name].compactMap({ $0 }).count == 1 else { throw ValidationError("give exactly one of --serial, --pem, --name") }
        }

        func run() async throws {
            var request: [String: Any] = ["reason": reason]
            if let serial { request["serial"] = serial }
            if let name { request["name"] = name }
            if let pem {
                let certificate = try Certificate(pemEncoded: ClusterFiles.read(pem))
                request["serial"] = Hex.encode(certificate.serialNumber.bytes)
            }
            try finish(try await connection.client().post("/v1/cluster/admin-revocations", json: request))
        }
    }

    struct Revocations: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the rules revoking admin certificates.")
        @OptionGroup var connection: ConnectionOptions

        func run() async throws {
            try finish(try await connection.client().request(.GET, "/v1/cluster/admin-revocations"))
        }
    }
}

struct CRLCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "crl", abstract: "Print the CRLs of the published authorities (PEM).")
    @OptionGroup var connection: ConnectionOptions

    func run() async throws {
        try finish(try await connection.client().request(.GET, "/v1/crl.pem"))
    }
}
