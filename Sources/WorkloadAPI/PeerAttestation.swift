import Crypto
import Foundation
import GRPCCore
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import Synchronization

/// Who is calling, as the kernel says (SO_PEERCRED on the Unix socket),
/// with the executable /proc names for the pid and its SHA-256.
public struct PeerCredentials: Sendable, Hashable, CustomStringConvertible {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
    public var executable: String?
    public var sha256: String?

    /// `pid=..,uid=..,gid=..[,exe=..][,sha256=..]`. The path is the
    /// caller's to choose (a file named `/tmp/x,uid=0`, say), so every byte
    /// of it outside printable ASCII, and ',', '=' and '%', is written as
    /// '%' and two hex digits, and reading refuses a field twice.
    public var description: String {
        "pid=\(pid),uid=\(uid),gid=\(gid)" + (executable.map { ",exe=\(Self.escaped($0))" } ?? "") + (sha256.map { ",sha256=\($0)" } ?? "")
    }

    /// The header the server sets on every stream (a client's own value is dropped).
    static let header = "x-warrant-peer"

    init(pid: Int32, uid: UInt32, gid: UInt32, executable: String?, sha256: String?) {
        (self.pid, self.uid, self.gid, self.executable, self.sha256) = (pid, uid, gid, executable, sha256)
    }

    /// `hashing`: whether the executable is hashed (only when a rule asks
    /// for a digest: hashing can take a while for a large file).
    init(pid: Int32, uid: UInt32, gid: UInt32, hashing: Bool = true) {
        let link = "/proc/\(pid)/exe"
        let path = try? FileManager.default.destinationOfSymbolicLink(atPath: link)
        self.init(pid: pid, uid: uid, gid: gid, executable: path, sha256: path == nil || !hashing ? nil : Self.digest(of: link))
    }

    init?(header: String) {
        var fields: [String: String] = [:]
        for part in header.split(separator: ",", omittingEmptySubsequences: false) {
            guard let equals = part.firstIndex(of: "=") else { return nil }
            let name = String(part[..<equals])
            guard ["pid", "uid", "gid", "exe", "sha256"].contains(name), fields[name] == nil else { return nil }
            fields[name] = String(part[part.index(after: equals)...])
        }
        guard let pid = fields["pid"].flatMap(Int32.init), let uid = fields["uid"].flatMap(UInt32.init), let gid = fields["gid"].flatMap(UInt32.init) else {
            return nil
        }
        var executable: String?
        if let text = fields["exe"] {
            guard let path = Self.unescaped(text) else { return nil }
            executable = path
        }
        self.init(pid: pid, uid: uid, gid: gid, executable: executable, sha256: fields["sha256"])
    }

    private static func escaped(_ path: String) -> String {
        var out = ""
        for byte in path.utf8 {
            if byte > 0x20 && byte < 0x7F && byte != 0x2C && byte != 0x3D && byte != 0x25 {
                out.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    private static func unescaped(_ text: String) -> String? {
        var bytes: [UInt8] = []
        var rest = Array(text.utf8)[...]
        while let byte = rest.popFirst() {
            guard byte == 0x25 else { bytes.append(byte); continue }
            guard rest.count >= 2, let value = UInt8(String(decoding: rest.prefix(2), as: UTF8.self), radix: 16) else { return nil }
            bytes.append(value)
            rest = rest.dropFirst(2)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Executables are hashed once per file (device, inode), size,
    /// modification time and change time, as fstat(2) says of the file
    /// opened for hashing; at most `digestsMax` are remembered. The change
    /// time is in the key because an owner can set a file's modification
    /// time back after rewriting it in place, but not its change time.
    private static let digests = Mutex<[String: String]>([:])
    static let digestsMax = 1_024
    static let hashedBytesMax = 512 << 20

    static func digest(of path: String) -> String? {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        let handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
        var info = stat()
        guard fstat(descriptor, &info) == 0, info.st_size <= hashedBytesMax else { return nil }
        let key = "\(info.st_dev)|\(info.st_ino)|\(info.st_size)|\(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)|\(info.st_ctim.tv_sec).\(info.st_ctim.tv_nsec)"
        if let known = digests.withLock({ $0[key] }) { return known }
        var hasher = SHA256()
        var read = 0
        while read <= hashedBytesMax, let chunk = try? handle.read(upToCount: 1 << 20), !chunk.isEmpty {
            hasher.update(data: chunk)
            read += chunk.count
        }
        guard read <= hashedBytesMax else { return nil }
        let hex = hasher.finalize().map { String(format: "%02x", $0) }.joined()
        digests.withLock {
            if $0.count >= digestsMax { $0.removeAll() }
            $0[key] = hex
        }
        return hex
    }

    /// How many executables' digests are remembered (tests).
    static var digestsKept: Int { digests.withLock { $0.count } }
}

/// Which local processes may have the identity: any rule whose every
/// field matches admits a caller. `uid=1000`, `gid=100`,
/// `exe=/usr/bin/python3.11`, `sha256=<hex>`, combined with commas.
public struct PeerRule: Sendable, Hashable, CustomStringConvertible {
    public var uid: UInt32?
    public var gid: UInt32?
    public var executable: String?
    public var sha256: String?

    public init(uid: UInt32? = nil, gid: UInt32? = nil, executable: String? = nil, sha256: String? = nil) {
        self.uid = uid
        self.gid = gid
        self.executable = executable
        self.sha256 = sha256
    }

    public struct Problem: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    public init(parsing text: String) throws(Problem) {
        for part in text.split(separator: ",") {
            guard let equals = part.firstIndex(of: "=") else { throw Problem(description: "'\(part)' is not name=value (uid, gid, exe or sha256)") }
            let name = part[..<equals], value = String(part[part.index(after: equals)...])
            switch name {
            case "uid": guard let parsed = UInt32(value) else { throw Problem(description: "uid must be a number") }; uid = parsed
            case "gid": guard let parsed = UInt32(value) else { throw Problem(description: "gid must be a number") }; gid = parsed
            case "exe": guard value.hasPrefix("/") else { throw Problem(description: "exe must be an absolute path") }; executable = value
            case "sha256":
                guard value.count == 64, value.allSatisfy(\.isHexDigit) else { throw Problem(description: "sha256 must be 64 hex digits") }
                sha256 = value.lowercased()
            default: throw Problem(description: "unknown field '\(name)' (uid, gid, exe or sha256)")
            }
        }
        guard uid != nil || gid != nil || executable != nil || sha256 != nil else { throw Problem(description: "a rule names at least one field") }
    }

    public func admits(_ peer: PeerCredentials) -> Bool {
        (uid == nil || uid == peer.uid) && (gid == nil || gid == peer.gid)
            && (executable == nil || executable == peer.executable) && (sha256 == nil || sha256 == peer.sha256)
    }

    public var description: String {
        [uid.map { "uid=\($0)" }, gid.map { "gid=\($0)" }, executable.map { "exe=\($0)" }, sha256.map { "sha256=\($0)" }]
            .compactMap { $0 }.joined(separator: ",")
    }

    /// The default: the agent's own user.
    public static var ownUser: PeerRule { PeerRule(uid: getuid()) }
}

/// `struct ucred` of <sys/socket.h> (Linux), which Swift's Glibc module
/// leaves out: pid, uid, gid.
struct KernelPeerCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// Reads SO_PEERCRED when a connection is accepted and stamps every HTTP/2
/// stream's request headers with it, replacing anything the client sent
/// under that name: the interceptor then judges the real caller.
///
/// The executable is read from /proc when the connection is accepted, not
/// when the caller connected: a process can connect, then hand the socket
/// to a child and exec an admitted executable itself. `exe=` and
/// `sha256=` rules therefore hold only together with a `uid=` (or `gid=`)
/// that such a process cannot have (docs/jobs.md says so).
final class PeerStamper: Sendable {
    private let peers = Mutex<[ObjectIdentifier: PeerCredentials]>([:])
    /// Whether executables are hashed: only when a rule asks for a digest.
    private let hashing: Bool
    /// Connections open at once, at most: past it a new one is closed at
    /// once (a socket other users may reach must not let one of them take
    /// every file descriptor the agent has, its own renewals' included).
    private let connectionsMax: Int
    private let open = Atomic(0)

    init(hashing: Bool, connectionsMax: Int) {
        self.hashing = hashing
        self.connectionsMax = connectionsMax
    }

    func accepted(_ channel: any Channel) -> EventLoopFuture<Void> {
        guard open.wrappingAdd(1, ordering: .relaxed).newValue <= connectionsMax else {
            open.wrappingSubtract(1, ordering: .relaxed)
            return channel.close()
        }
        channel.closeFuture.whenComplete { [self] _ in self.open.wrappingSubtract(1, ordering: .relaxed) }
        guard let provider = channel as? any SocketOptionProvider else { return channel.eventLoop.makeSucceededVoidFuture() }
        let id = ObjectIdentifier(channel), hashing = self.hashing
        return provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
            .flatMap { (credentials: KernelPeerCredentials) in
                // Reading /proc and hashing block: off the event loop.
                NIOThreadPool.singleton.runIfActive(eventLoop: channel.eventLoop) {
                    PeerCredentials(pid: credentials.pid, uid: credentials.uid, gid: credentials.gid, hashing: hashing)
                }
            }
            .map { [self] peer in
                self.peers.withLock { $0[id] = peer }
                channel.closeFuture.whenComplete { [self] _ in _ = self.peers.withLock { $0.removeValue(forKey: id) } }
            }
    }

    func stream(_ channel: any Channel) -> EventLoopFuture<Void> {
        let peer = channel.parent.flatMap { parent in peers.withLock { $0[ObjectIdentifier(parent)] } }
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(PeerHeaderHandler(peer: peer), position: .first)
        }
    }
}

private final class PeerHeaderHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = HTTP2Frame.FramePayload
    let peer: PeerCredentials?

    init(peer: PeerCredentials?) { self.peer = peer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var payload = unwrapInboundIn(data)
        if case .headers(var headers) = payload {
            headers.headers.remove(name: PeerCredentials.header)
            if let peer { headers.headers.add(name: PeerCredentials.header, value: peer.description) }
            payload = .headers(headers)
        }
        context.fireChannelRead(wrapInboundOut(payload))
    }
}

/// Admits a call only if a rule admits its caller (PermissionDenied otherwise).
struct PeerRuleInterceptor: ServerInterceptor {
    let rules: [PeerRule]

    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingServerRequest<Input>, context: ServerContext,
        next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
        guard let text = request.metadata[stringValues: PeerCredentials.header].first(where: { _ in true }),
              let peer = PeerCredentials(header: text) else {
            throw RPCError(code: .permissionDenied, message: "the caller's process could not be identified")
        }
        guard rules.contains(where: { $0.admits(peer) }) else {
            throw RPCError(code: .permissionDenied, message: "no rule gives an identity to this process (\(peer))")
        }
        // A unary call's handler runs within `next`: it sees its caller.
        return try await WorkloadCaller.$current.withValue(peer) { try await next(request, context) }
    }
}

/// The process making the Workload API call being handled (unary calls),
/// as the kernel named it: a source's budgets are kept per caller.
public enum WorkloadCaller {
    @TaskLocal public static var current: PeerCredentials?
}
