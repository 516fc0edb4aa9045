import Foundation
import Ledger
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Raft
import Synchronization
import Transport

/// Where each member listens, for the transport (peer address) and for
/// forwarding (API address). Starts from the node's configuration and
/// follows the replicated `cluster/members/<id>` documents, so members
/// added later are reachable from every node.
public final class MemberDirectory: Sendable {
    public struct Addresses: Sendable, Hashable {
        public var peer: HostPort
        public var api: HostPort
    }
    private let addresses: Mutex<[NodeID: Addresses]>

    public init(_ initial: [NodeID: Addresses]) {
        addresses = Mutex(initial)
    }

    public var all: [NodeID: Addresses] { addresses.withLock { $0 } }

    public func set(_ id: NodeID, _ value: Addresses) { addresses.withLock { $0[id] = value } }

    public static func documentName(_ id: NodeID) -> String { "\(NodeAPI.reservedPrefix)members/\(id)" }

    /// The member a `cluster/members/<id>` write names and its addresses,
    /// if `entry` is one.
    public static func addresses(in entry: Entry) -> (NodeID, Addresses)? {
        // Every applied entry comes here: only document puts are decoded.
        guard case .command(let bytes) = entry.payload, LedgerCommand.operationTag(in: bytes) == 1, let command = try? LedgerCommand(decoding: bytes),
              case .putDocument(let name, _, let content, _) = command.operation else { return nil }
        return addresses(name: name, content: content)
    }

    /// The member a `cluster/members/<id>` document names and its
    /// addresses, if it is one and reads.
    public static func addresses(name: String, content: [UInt8]) -> (NodeID, Addresses)? {
        guard name.hasPrefix("\(NodeAPI.reservedPrefix)members/"),
              let id = NodeID(name.dropFirst("\(NodeAPI.reservedPrefix)members/".count)),
              let body = try? APIJSON.decode(MemberAddressesBody.self, from: content),
              let peer = try? HostPort(parsing: body.peerAddress, at: "peer_address"),
              let api = try? HostPort(parsing: body.apiAddress, at: "api_address") else { return nil }
        return (id, Addresses(peer: peer, api: api))
    }
}

/// Sends a follower's writes on to the leader's API over mutual TLS with
/// this node's certificate; the leader trusts the `warrant-actor` header
/// only from a node certificate.
public final class Forwarder: Sendable {
    private let tls: NIOSSLContext
    private let nodeID: NodeID
    private let pools = Mutex<[PoolKey: HTTPConnectionPool]>([:])
    private let clusterID: String
    /// Requests being forwarded at once, at most: past it the follower
    /// answers 503 overloaded and sends nothing, so callers cannot make one
    /// follower open a connection to the leader each (the leader admits
    /// 256 connections from one address, and then refuses the follower's
    /// own).
    let inFlightMax: Int
    private let inFlight = Atomic(0)

    private struct PoolKey: Hashable {
        var address: HostPort
        var node: NodeID
    }

    private let group: any EventLoopGroup

    /// `group`: the loops of the node's API server, so that a forward made
    /// by a handler goes out and comes back on the handler's own loop.
    public init(identity: NodeIdentity, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, inFlightMax: Int = 192) throws {
        self.inFlightMax = inFlightMax
        self.group = group
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateChain = [.certificate(try identity.nioCertificate)]
        configuration.privateKey = .privateKey(try identity.nioPrivateKey)
        configuration.trustRoots = .certificates([try identity.nioCACertificate])
        configuration.additionalTrustRoots = []
        configuration.certificateVerification = .noHostnameVerification
        configuration.minimumTLSVersion = .tlsv12
        tls = try NIOSSLContext(configuration: configuration)
        nodeID = identity.nodeID
        clusterID = identity.clusterID
    }

    /// Connections to `node`'s API at `address`: the server must show that
    /// node's certificate (any certificate of the cluster CA passes TLS,
    /// another node's or a removed one's too), checked before anything,
    /// a caller's token say, is sent.
    private func pool(_ address: HostPort, node: NodeID) throws -> HTTPConnectionPool {
        pools.withLock { pools in
            let key = PoolKey(address: address, node: node)
            if let pool = pools[key] { return pool }
            let clusterID = self.clusterID
            let pool = HTTPConnectionPool(host: address.host, port: address.port, tls: tls, group: group) { der in
                NodeIdentity.refusal(ofServer: der, expecting: node, clusterID: clusterID)
            }
            pools[key] = pool
            return pool
        }
    }

    /// Asks another member's API, as this node (`GET`).
    func get(_ path: String, of node: NodeID, at address: HostPort, timeout: TimeAmount) async throws -> HTTPClientResponse {
        try await pool(address, node: node).request(.GET, path, headers: [("warrant-forwarded-by", String(nodeID))], body: [], timeout: timeout)
    }

    /// `path` percent-encoded for a request line; a path with nothing to
    /// encode (every API path) is taken as it is, without Foundation's
    /// encoder (2.5% of a forwarding follower's time, measured).
    static func encodedPath(_ path: String) -> String {
        func plain(_ byte: UInt8) -> Bool {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
            case UInt8(ascii: "/"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"): true
            default: false
            }
        }
        if path.utf8.allSatisfy(plain) { return path }
        return path.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? path
    }

    func forward(_ request: HTTPRequest, to leader: NodeID, at address: HostPort, actor: String) async throws -> HTTPResponse {
        guard inFlight.wrappingAdd(1, ordering: .relaxed).newValue <= inFlightMax else {
            inFlight.wrappingSubtract(1, ordering: .relaxed)
            throw APIError.unavailable("overloaded", "this node is forwarding \(inFlightMax) requests to the leader already; retry, or send to the leader (node \(leader))")
        }
        defer { inFlight.wrappingSubtract(1, ordering: .relaxed) }
        let pool: HTTPConnectionPool
        do {
            pool = try self.pool(address, node: leader)
        } catch {
            throw APIError.unavailable("not_leader", "node \(leader) leads but its API address \(address) does not resolve: \(error)")
        }
        var headers: [(String, String)] = [("warrant-actor", actor), ("warrant-forwarded-by", String(nodeID))]
        for name in ["content-type", "warrant-request-id"] {
            if let value = request.headers.first(name: name) { headers.append((name, value)) }
        }
        // A workload's certificate, verified here, travels to the leader
        // (which believes this header only from a node).
        if case .workload(_, let der) = request.caller {
            headers.append(("warrant-workload-certificate", Data(der).base64EncodedString()))
        }
        // An admin's certificate, which the leader checks against its own revocation list.
        if let header = NodeAPI.adminCertificateHeader(request.caller) { headers.append(header) }
        var uri = Self.encodedPath(request.path)
        if !request.query.isEmpty {
            let unreserved = CharacterSet.alphanumerics.union(CharacterSet(charactersIn: "-._~"))
            func encode(_ text: String) -> String { text.addingPercentEncoding(withAllowedCharacters: unreserved) ?? "" }
            uri += "?" + request.query.sorted { $0.key < $1.key }.map { "\(encode($0.key))=\(encode($0.value))" }.joined(separator: "&")
        }
        let response: HTTPClientResponse
        do {
            response = try await pool.request(request.method, uri, headers: headers, body: request.body)
        } catch let error as HTTPClientError where error.requestSent {
            // Sent, and no answer: the leader may have made the change.
            // Not a 503, which clients retry as surely not done.
            throw APIError(status: .gatewayTimeout, code: "outcome_unknown",
                           message: "forwarded to the leader, node \(leader) at \(address), but no answer came (\(error)): the request may or may not have taken effect; read before retrying")
        } catch {
            throw APIError.unavailable("leader_unreachable", "could not forward to the leader, node \(leader) at \(address): \(error)")
        }
        var passed: [(String, String)] = [("warrant-forwarded-by", String(nodeID))]
        for name in ["content-type", "warrant-leader", "retry-after"] {
            if let value = response.headers.first(name: name) { passed.append((name, value)) }
        }
        return HTTPResponse(status: response.status, headers: passed, body: response.body)
    }
}
