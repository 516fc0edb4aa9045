import Foundation
import Node

/// Writes an identity into a directory: `svid.pem`, `svid.key` (mode
/// 0600), `bundle.pem`, and `jwt-<audience>.token` per JWT-SVID.
///
/// Every write makes a new version of the whole set, and one rename makes
/// it current, so a reader never sees half a file, nor a certificate
/// beside the key of another (the layout Kubernetes gives its volumes):
/// the files are in a directory `..<random hex>`, the link `..data` names
/// the current one, and each name (`svid.pem`, ...) is a link through
/// `..data`. A write makes a new version directory (files written with
/// their modes and synced; those not written hard-linked from the current
/// version), points a new link at it and renames that over `..data`, then
/// removes the older versions. One writer at a time, in one process or
/// several (`..lock`, waited for 10 s at most). If a write fails before
/// the rename, its version is removed and the files are as they were
/// (but that `remove` has unlinked plain files of the older layout). A
/// program that reads two files at different times can still read them
/// from two versions: one that resolves `..data`, reads both from the
/// directory it names, and starts again if one is gone (the version was
/// replaced meanwhile), or that is told of a change after the write (a
/// signal, say), reads a matching pair. A file watcher sees `..data`
/// renamed, not `svid.pem` changed.
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
        try update(directory, writing: files)
    }

    /// Replaces bundle.pem alone (a trust bundle refreshed between
    /// renewals); a directory that is gone is an error, not made again.
    public static func writeBundle(directory: String, bundlePEM: String) throws {
        try writeBundle(directory: directory, bundlePEM: bundlePEM, lockWait: lockWaitSeconds)
    }

    static func writeBundle(directory: String, bundlePEM: String, lockWait: Double) throws {
        try checkWritable(directory: directory)
        guard FileManager.default.fileExists(atPath: directory) else { throw Problem(description: "the output directory \(directory) is gone") }
        try update(directory, writing: [("bundle.pem", bundlePEM, 0o644)], lockWait: lockWait)
    }

    /// Removes `names` (an identity that expired) at once; whether any was
    /// there. Later writes do not bring them back.
    @discardableResult
    public static func remove(_ names: [String], from directory: String) throws -> Bool {
        guard !names.isEmpty, FileManager.default.fileExists(atPath: directory) else { return false }
        return try update(directory, writing: [], removing: names)
    }

    /// Writes each given file into a new version of the directory's
    /// contents and makes that version current at once (see the type's
    /// comment); files not given are carried over, `removing` dropped.
    /// Returns whether a name in `removing` was there.
    @discardableResult
    private static func update(_ directory: String, writing files: [(name: String, content: String, mode: Int)], removing: [String] = [],
                               lockWait: Double = lockWaitSeconds) throws -> Bool {
        // One writer at a time (the agent's bundle and a renewal, say, in
        // one process or two): each builds on the version the last left.
        // The lock is a file of its own (mode 0600, opened for writing, as
        // NFS needs), waited for `lockWaitSeconds` at most.
        let lockPath = "\(directory)/\(lockFile)"
        let lock = open(lockPath, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard lock >= 0 else { throw Problem(description: "cannot open \(lockPath): \(String(cString: strerror(errno)))") }
        defer { close(lock) }
        let deadline = Date().addingTimeInterval(lockWait)
        while flock(lock, LOCK_EX | LOCK_NB) != 0 {
            guard errno == EINTR || errno == EWOULDBLOCK else { throw Problem(description: "cannot lock \(lockPath): \(String(cString: strerror(errno)))") }
            guard Date() < deadline else {
                throw Problem(description: "the output directory \(directory) is being written by another process (\(lockPath) is locked); gave up after \(lockWait) s")
            }
            usleep(5_000)
        }
        defer { flock(lock, LOCK_UN) }
        let current = currentVersion(directory)
        let written = Set(files.map(\.name)), dropped = Set(removing)
        let carried = (current.map { (try? FileManager.default.contentsOfDirectory(atPath: "\(directory)/\($0)")) ?? [] } ?? [])
            .filter { !written.contains($0) && !dropped.contains($0) }
        // A name removed is there in the current version, or as a file of
        // an older build's layout (unlinked here, on its own).
        let inVersion = current.map { version in removing.filter { FileManager.default.fileExists(atPath: "\(directory)/\(version)/\($0)") } } ?? []
        var removedAny = !inVersion.isEmpty
        for name in removing where isRegularFile("\(directory)/\(name)") {
            removedAny = unlink("\(directory)/\(name)") == 0 || removedAny
        }
        guard !files.isEmpty || !inVersion.isEmpty else { return removedAny }

        let version = "..\(randomHex())"
        let path = "\(directory)/\(version)"
        guard mkdir(path, 0o755) == 0 else { throw Problem(description: "cannot create \(path): \(String(cString: strerror(errno)))") }
        do {
            for name in carried {
                let source = "\(directory)/\(current!)/\(name)"
                guard link(source, "\(path)/\(name)") != 0 else { continue }
                // No hard links here: a copy, with the same mode.
                var info = stat()
                guard isRegularFile(source), lstat(source, &info) == 0,
                      let bytes = FileManager.default.contents(atPath: source) else {
                    throw Problem(description: "cannot carry \(source) over: it is not a plain file that can be read")
                }
                try writeNew("\(path)/\(name)", Array(bytes), mode: Int(info.st_mode & 0o7777))
            }
            for file in files { try writeNew("\(path)/\(file.name)", Array(file.content.utf8), mode: file.mode) }
            try syncDirectory(path)
            // The switch: one rename makes every file of the new version current.
            let temporary = "\(directory)/..data.\(randomHex()).tmp"
            guard symlink(version, temporary) == 0 else { throw Problem(description: "cannot create \(temporary): \(String(cString: strerror(errno)))") }
            guard rename(temporary, "\(directory)/\(dataLink)") == 0 else {
                let reason = String(cString: strerror(errno))
                unlink(temporary)
                throw Problem(description: "cannot move \(temporary) to \(directory)/\(dataLink): \(reason)")
            }
        } catch {
            try? FileManager.default.removeItem(atPath: path)
            throw error
        }
        // Each name written a link through `..data`; removed names go. (A
        // name carried over keeps its link, or its lack of one.) Files of
        // an older build's layout are unlinked first, all of them, then
        // linked: a name is missing for a moment, but a new key is never
        // beside an old plain certificate.
        let unlinked = files.map(\.name).filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\($0)")) != "\(dataLink)/\($0)" }
        for name in unlinked where isRegularFile("\(directory)/\(name)") { unlink("\(directory)/\(name)") }
        for name in unlinked {
            let visible = "\(directory)/\(name)", target = "\(dataLink)/\(name)"
            let temporary = "\(directory)/..link.\(randomHex()).tmp"
            guard symlink(target, temporary) == 0, rename(temporary, visible) == 0 else {
                let reason = String(cString: strerror(errno))
                unlink(temporary)
                throw Problem(description: "cannot link \(visible) to \(target): \(reason)")
            }
        }
        for name in removing where (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(name)")) == "\(dataLink)/\(name)" {
            unlink("\(directory)/\(name)")
        }
        try syncDirectory(directory)
        // Older versions (and anything a crash left half made, by this
        // layout or the older one) go; names of other shapes are not this
        // type's and stay.
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where entry != version && (isMadeHere(entry) || isOlderTemporary(entry)) {
            try? FileManager.default.removeItem(atPath: "\(directory)/\(entry)")
        }
        return removedAny
    }

    /// The link every name goes through, to the current version's directory.
    static let dataLink = "..data"
    /// The file writers lock, one at a time.
    static let lockFile = "..lock"
    /// How long a write waits for another writer, at most.
    static let lockWaitSeconds: Double = 10

    /// A temporary file of the older layout a crash left:
    /// `.<name>.<8 hex digits or letters>.tmp`.
    static func isOlderTemporary(_ name: String) -> Bool {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        return name.hasPrefix(".") && !name.hasPrefix("..") && parts.count >= 4 && parts.last == "tmp" && parts[parts.count - 2].utf8.count == 8
            && parts[parts.count - 2].utf8.allSatisfy { (0x30...0x39).contains($0) || (0x41...0x46).contains($0) }
    }

    /// `..<16 hex>` (a version), `..data.<16 hex>.tmp` or `..link.<16 hex>.tmp`.
    static func isMadeHere(_ name: String) -> Bool {
        func hex(_ part: Substring) -> Bool { part.utf8.count == 16 && part.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) } }
        guard name.hasPrefix("..") else { return false }
        let rest = name.dropFirst(2)
        if hex(rest) { return true }
        for kind in ["data.", "link."] where rest.hasPrefix(kind) && rest.hasSuffix(".tmp") {
            return hex(rest.dropFirst(kind.count).dropLast(4))
        }
        return false
    }

    private static func isRegularFile(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG
    }

    /// The current version's directory name (`..` and hex), if any.
    private static func currentVersion(_ directory: String) -> String? {
        guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(dataLink)"),
              isMadeHere(target), !target.hasSuffix(".tmp") else { return nil }
        var info = stat()
        guard lstat("\(directory)/\(target)", &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else { return nil }
        return target
    }

    private static func writeNew(_ path: String, _ bytes: [UInt8], mode: Int) throws {
        do {
            try ClusterFiles.writeNew(path, bytes, mode: mode_t(mode))
        } catch {
            throw Problem(description: error.description)
        }
    }

    private static func syncDirectory(_ path: String) throws {
        let descriptor = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        defer { if descriptor >= 0 { close(descriptor) } }
        guard descriptor >= 0, fsync(descriptor) == 0 else { throw Problem(description: "cannot sync \(path): \(String(cString: strerror(errno)))") }
    }

    private static func randomHex() -> String {
        (0..<8).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    }
}
