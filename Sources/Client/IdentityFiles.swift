import Foundation
import Node

/// Writes an identity into a directory: `svid.pem`, `svid.key` (mode
/// 0600), `bundle.pem`, and `jwt-<audience>.token` per JWT-SVID. Each file
/// is written to a temporary name beside it and renamed into place, so a
/// reader never sees half a file; if any write fails, the temporary files
/// are removed and the files already there are left as they were.
public enum IdentityFiles {
    public struct Problem: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// Checks that `directory` can be written (or, if it does not exist
    /// yet, made), without creating anything.
    public static func checkWritable(directory: String) throws {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else { throw Problem(description: "the output path \(directory) is a file, not a directory") }
            guard FileManager.default.isWritableFile(atPath: directory) else { throw Problem(description: "the output directory \(directory) is not writable") }
            return
        }
        let parent = URL(fileURLWithPath: directory).deletingLastPathComponent().path
        guard FileManager.default.fileExists(atPath: parent, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw Problem(description: "the output directory \(directory) cannot be made: \(parent) is not a directory")
        }
        guard FileManager.default.isWritableFile(atPath: parent) else {
            throw Problem(description: "the output directory \(directory) cannot be made: \(parent) is not writable")
        }
    }

    /// `jwt-<audience>.token`: ASCII letters, digits, '.' and '-' as they
    /// are, every other byte as '_' and two hex digits, so two audiences
    /// never share a file (`a/b` is `jwt-a_2Fb.token`, `a_b` is
    /// `jwt-a_5Fb.token`). A name that would pass 200 bytes keeps its first
    /// 120 and ends with the audience's SHA-256 (a file name is at most 255).
    public static func jwtFileName(_ audience: String) -> String {
        var encoded = ""
        for byte in audience.utf8 {
            let scalar = Unicode.Scalar(byte)
            if (byte < 0x80 && (Character(scalar).isLetter || Character(scalar).isNumber)) || byte == 0x2E || byte == 0x2D {
                encoded.unicodeScalars.append(scalar)
            } else {
                encoded += String(format: "_%02X", byte)
            }
        }
        if encoded.utf8.count > 200 { encoded = String(encoded.prefix(120)) + "-sha256-" + AuthorityService.hash(audience) }
        return "jwt-" + encoded + ".token"
    }

    /// `createDirectory` false: a directory that is not there is an error.
    /// `bundlePEM` nil: bundle.pem is left as it is (kept by whoever
    /// follows the cluster's bundle, `writeBundle`).
    public static func write(directory: String, certificatePEM: String, keyPEM: String, bundlePEM: String?, jwts: [String: String] = [:],
                             createDirectory: Bool = true) throws {
        try checkWritable(directory: directory)
        if !FileManager.default.fileExists(atPath: directory) {
            guard createDirectory else { throw Problem(description: "the output directory \(directory) is gone") }
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
            } catch {
                throw Problem(description: "cannot create the output directory \(directory): \(error.localizedDescription)")
            }
        }
        var files: [(name: String, content: String, mode: Int)] = [("svid.key", keyPEM, 0o600), ("svid.pem", certificatePEM, 0o644)]
        if let bundlePEM { files.append(("bundle.pem", bundlePEM, 0o644)) }
        for (audience, token) in jwts.sorted(by: { $0.key < $1.key }) {
            files.append((jwtFileName(audience), token, 0o600))
        }
        try place(files, in: directory)
    }

    /// Replaces bundle.pem alone (a trust bundle refreshed between
    /// renewals); a directory that is gone is an error, not made again.
    public static func writeBundle(directory: String, bundlePEM: String) throws {
        try checkWritable(directory: directory)
        guard FileManager.default.fileExists(atPath: directory) else { throw Problem(description: "the output directory \(directory) is gone") }
        try place([("bundle.pem", bundlePEM, 0o644)], in: directory)
    }

    /// Writes each file beside its place, then renames them into place in
    /// order; on a failure, those not yet in place are removed.
    private static func place(_ files: [(name: String, content: String, mode: Int)], in directory: String) throws {
        var temporary: [(String, String)] = []
        do {
            for file in files {
                let final = "\(directory)/\(file.name)"
                let path = "\(directory)/.\(file.name).\(UUID().uuidString.prefix(8)).tmp"
                do {
                    try ClusterFiles.writeNew(path, Array(file.content.utf8), mode: mode_t(file.mode))
                } catch {
                    throw Problem(description: error.description)
                }
                temporary.append((path, final))
            }
            // Key first: a certificate is never in place without its key.
            for (path, final) in temporary {
                guard rename(path, final) == 0 else { throw Problem(description: "cannot move \(path) to \(final): \(String(cString: strerror(errno)))") }
            }
        } catch {
            for (path, _) in temporary { try? FileManager.default.removeItem(atPath: path) }
            throw error
        }
    }
}
