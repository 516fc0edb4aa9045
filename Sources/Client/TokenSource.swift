import Foundation
import NIOCore
import NIOSSL
import Node

/// Where a job's platform token comes from.
public enum TokenSource: Sendable, Equatable {
    /// GitHub Actions: requested for `audience` from ACTIONS_ID_TOKEN_REQUEST_URL
    /// with ACTIONS_ID_TOKEN_REQUEST_TOKEN (the workflow needs
    /// `permissions: id-token: write`).
    case github(audience: String)
    /// GitLab CI: the variable an `id_tokens:` entry sets.
    case gitlab(variable: String)
    /// Kubernetes: a projected service-account token file.
    case kubernetes(path: String)
    case file(path: String)
    case environment(variable: String)
    /// Read from this process's standard input (a pipe, a file or a
    /// socket: the descriptor itself, not /dev/stdin reopened).
    case standardInput

    public static let tokenBytesMax = 16 << 10
    public static let kubernetesDefaultPath = "/var/run/secrets/tokens/warrant"

    public struct Problem: Error, CustomStringConvertible, Sendable {
        public var description: String
        init(_ description: String) { self.description = description }
    }

    /// The token, trimmed. `environment` is the process environment;
    /// `extraRootsPEM` adds trust anchors for the GitHub token request
    /// (GitHub Enterprise Server with a private CA).
    public func token(environment: [String: String] = ProcessInfo.processInfo.environment, extraRootsPEM: String? = nil) async throws -> String {
        let text: String
        switch self {
        case .github(let audience):
            text = try await Self.requestGitHubToken(audience: audience, environment: environment, extraRootsPEM: extraRootsPEM)
        case .gitlab(let variable), .environment(let variable):
            guard let value = environment[variable], !value.isEmpty else {
                let hint = self == .gitlab(variable: variable)
                    ? " (declare it in the job: id_tokens: { \(variable): { aud: <this cluster's audience> } })" : ""
                throw Problem("the environment variable \(variable) is not set or empty\(hint)")
            }
            text = value
        case .kubernetes(let path), .file(let path):
            guard FileManager.default.fileExists(atPath: path) else {
                throw Problem("the token file \(path) does not exist" + (self == .kubernetes(path: path) ? " (mount a projected service-account token there, with this cluster's audience)" : ""))
            }
            text = try Self.read(path, what: "the token file \(path)")
        case .standardInput:
            text = try Self.read("-", what: "standard input")
        }
        let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !token.isEmpty, token.utf8.count <= Self.tokenBytesMax, !token.contains(where: \.isWhitespace) else {
            throw Problem("the token from \(self.name) is empty, too large, or not one compact token")
        }
        return token
    }

    /// A token's file (`-`: standard input), read as the cluster files are:
    /// at most one byte past the bound (a device such as /dev/zero never ends).
    private static func read(_ path: String, what: String) throws -> String {
        do {
            return String(decoding: try ClusterFiles.readBytes(path, bytesMax: tokenBytesMax), as: UTF8.self)
        } catch let problem as FileProblem {
            throw Problem("\(what) \(problem.problem)")
        }
    }

    public var name: String {
        switch self {
        case .github: return "GitHub Actions"
        case .gitlab(let variable): return "GitLab CI ($\(variable))"
        case .kubernetes(let path): return "Kubernetes (\(path))"
        case .file(let path): return "file \(path)"
        case .environment(let variable): return "$\(variable)"
        case .standardInput: return "standard input"
        }
    }

    /// GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=... with the request token
    /// as a bearer token; the answer is {"value": "<token>"}. HTTPS (plain
    /// HTTP only to a loopback address, for simulated runners).
    static func requestGitHubToken(audience: String, environment: [String: String], extraRootsPEM: String?) async throws -> String {
        guard let urlText = environment["ACTIONS_ID_TOKEN_REQUEST_URL"], let requestToken = environment["ACTIONS_ID_TOKEN_REQUEST_TOKEN"],
              !urlText.isEmpty, !requestToken.isEmpty else {
            throw Problem("ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set: give the workflow (or job) `permissions: id-token: write`")
        }
        guard var url = URLComponents(string: urlText), let scheme = url.scheme, let host = url.host else {
            throw Problem("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL")
        }
        let loopback = host == "127.0.0.1" || host == "localhost" || host == "::1"
        guard scheme == "https" || (scheme == "http" && loopback) else { throw Problem("ACTIONS_ID_TOKEN_REQUEST_URL must be https") }
        url.queryItems = (url.queryItems ?? []).filter { $0.name != "audience" } + [URLQueryItem(name: "audience", value: audience)]
        var path = url.percentEncodedPath.isEmpty ? "/" : url.percentEncodedPath
        if let query = url.percentEncodedQuery { path += "?" + query }
        var tls: NIOSSLContext?
        if scheme == "https" {
            var configuration = TLSConfiguration.makeClientConfiguration()
            if let extraRootsPEM {
                configuration.additionalTrustRoots = [.certificates(try NIOSSLCertificate.fromPEMBytes(Array(extraRootsPEM.utf8)))]
            }
            tls = try NIOSSLContext(configuration: configuration)
        }
        let address = try SocketAddress.makeAddressResolvingHost(host == "localhost" ? "127.0.0.1" : host, port: url.port ?? (scheme == "https" ? 443 : 80))
        let isIP = (try? SocketAddress(ipAddress: host, port: 0)) != nil
        let connection: HTTPConnection
        do {
            connection = try await HTTPConnection.connect(to: address, tls: tls, serverHostname: isIP ? nil : host, timeout: .seconds(10),
                                                          responseBytesMax: 64 << 10)
        } catch {
            throw Problem("could not reach the GitHub token endpoint \(host): \(error)")
        }
        defer { Task { await connection.close() } }
        let response = try await connection.request(.GET, path, headers: [("authorization", "bearer \(requestToken)"), ("accept", "application/json")],
                                                    timeout: .seconds(10))
        guard response.status == .ok else { throw Problem("the GitHub token endpoint answered \(response.status.code)") }
        guard let value = (try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])?["value"] as? String else {
            throw Problem("the GitHub token endpoint's answer has no \"value\"")
        }
        return value
    }
}
