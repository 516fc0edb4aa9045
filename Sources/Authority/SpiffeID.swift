import Crypto

/// A SPIFFE ID in canonical form (SPIFFE-ID.md): `spiffe://<trust domain>`
/// followed by an optional path. Parsing refuses anything non-canonical
/// rather than normalising it, so two spellings never name one identity.
public struct SpiffeID: Sendable, Hashable, CustomStringConvertible {
    /// The whole ID as parsed (kept: every issuance writes it several times).
    public let description: String
    public let trustDomain: String
    /// "" or "/segment/segment".
    public let path: String

    static let scheme = "spiffe://"
    public static let bytesMax = 2048
    public static let trustDomainBytesMax = 255

    /// Why `text` is not a canonical SPIFFE ID, or the ID. One pass over
    /// the bytes in place; the first fault from the left is reported
    /// (scheme, trust domain: empty, too long, a character; then the path:
    /// a trailing slash, then segment by segment).
    public init(parsing text: String) throws(SpiffeIDError) {
        var text = text
        let count = text.utf8.count
        guard count <= Self.bytesMax else { throw .tooLong(count) }
        let schemeCount = Self.scheme.utf8.count
        let slash: Result<Int, SpiffeIDError> = text.withUTF8 { bytes in
            guard bytes.starts(with: Self.scheme.utf8) else { return .failure(.badScheme) }
            var slash = schemeCount
            while slash < bytes.count && bytes[slash] != UInt8(ascii: "/") { slash += 1 }
            let domainCount = slash - schemeCount
            guard domainCount > 0 else { return .failure(.emptyTrustDomain) }
            guard domainCount <= Self.trustDomainBytesMax else { return .failure(.trustDomainTooLong(domainCount)) }
            for index in schemeCount..<slash where !Self.isTrustDomainByte(bytes[index]) {
                return .failure(.badTrustDomainCharacter(Character(Unicode.Scalar(bytes[index]))))
            }
            guard slash < bytes.count else { return .success(slash) }
            guard bytes[bytes.count - 1] != UInt8(ascii: "/") else { return .failure(.trailingSlash) }
            var segmentStart = slash + 1
            for index in (slash + 1)...bytes.count {
                guard index < bytes.count, bytes[index] != UInt8(ascii: "/") else {
                    let length = index - segmentStart
                    guard length > 0 else { return .failure(.emptySegment) }
                    if bytes[segmentStart] == UInt8(ascii: "."), length == 1 || (length == 2 && bytes[segmentStart + 1] == UInt8(ascii: ".")) {
                        return .failure(.dotSegment)
                    }
                    segmentStart = index + 1
                    continue
                }
                let byte = bytes[index]
                if !Self.isPathByte(byte) {
                    return .failure(byte == UInt8(ascii: "%") ? .percentEncoded : .badPathCharacter(Character(Unicode.Scalar(byte))))
                }
            }
            return .success(slash)
        }
        let utf8 = text.utf8
        let pathStart = utf8.index(utf8.startIndex, offsetBy: try slash.get())
        description = text
        trustDomain = String(text[utf8.index(utf8.startIndex, offsetBy: schemeCount)..<pathStart])
        path = String(text[pathStart...])
    }

    /// An ID in `trustDomain` with `path` (which must start with '/').
    public init(trustDomain: String, path: String) throws(SpiffeIDError) {
        self = try SpiffeID(parsing: "spiffe://\(trustDomain)\(path)")
    }

    /// The trust domain's own ID (`spiffe://<td>`), used for bundles.
    public var trustDomainID: String { "spiffe://\(trustDomain)" }

    /// Whether it can name a workload: a leaf X509-SVID's ID has a path
    /// (X509-SVID 3.1); the bare `spiffe://<td>` names the trust domain.
    public var namesWorkload: Bool { !path.isEmpty }

    public static let workloadPathMessage = "a workload's SPIFFE ID has a path (spiffe://<trust domain>/...); the bare trust domain ID names the trust domain itself"

    /// Lower-case letters, digits, '-', '.', '_'.
    static func isTrustDomainByte(_ byte: UInt8) -> Bool {
        (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x30 && byte <= 0x39) || byte == 0x2D || byte == 0x2E || byte == 0x5F
    }

    /// Letters, digits, '-', '.', '_'.
    static func isPathByte(_ byte: UInt8) -> Bool {
        isTrustDomainByte(byte) || (byte >= 0x41 && byte <= 0x5A)
    }
}

public enum SpiffeIDError: Error, Sendable, Hashable, CustomStringConvertible {
    case tooLong(Int)
    case badScheme
    case emptyTrustDomain
    case trustDomainTooLong(Int)
    case badTrustDomainCharacter(Character)
    case trailingSlash
    case emptySegment
    case dotSegment
    case percentEncoded
    case badPathCharacter(Character)

    public var description: String {
        switch self {
        case .tooLong(let count): return "the SPIFFE ID is \(count) bytes; at most \(SpiffeID.bytesMax)"
        case .badScheme: return "a SPIFFE ID starts with 'spiffe://' (lower case)"
        case .emptyTrustDomain: return "the trust domain is empty"
        case .trustDomainTooLong(let count): return "the trust domain is \(count) bytes; at most \(SpiffeID.trustDomainBytesMax)"
        case .badTrustDomainCharacter(let c): return "the trust domain may hold only a-z, 0-9, '.', '-' and '_', not '\(c)' (it must be lower case)"
        case .trailingSlash: return "the path must not end with '/'"
        case .emptySegment: return "the path has an empty segment ('//')"
        case .dotSegment: return "the path has a '.' or '..' segment"
        case .percentEncoded: return "the path must not be percent-encoded"
        case .badPathCharacter(let c): return "path segments may hold only letters, digits, '.', '-' and '_', not '\(c)'"
        }
    }
}

/// Lower-case hexadecimal, two digits a byte (serials, fingerprints, hashes).
public enum Hex {
    public static func encode(_ bytes: some Sequence<UInt8>) -> String {
        if let text = bytes.withContiguousStorageIfAvailable({ encode(UnsafeRawBufferPointer($0)) }) { return text }
        return Array(bytes).withUnsafeBytes { encode($0) }
    }

    /// A digest's bytes, read in place (every join token's and platform
    /// token's hash is written this way).
    public static func encode(_ digest: some Digest) -> String {
        digest.withUnsafeBytes { encode($0) }
    }

    public static func encode(_ bytes: UnsafeRawBufferPointer) -> String {
        String(unsafeUninitializedCapacity: bytes.count * 2) { out in
            for (i, byte) in bytes.enumerated() {
                out[2 * i] = digit(byte >> 4)
                out[2 * i + 1] = digit(byte & 0x0F)
            }
            return bytes.count * 2
        }
    }

    private static func digit(_ value: UInt8) -> UInt8 { value < 10 ? 0x30 + value : 0x57 + value }

    /// Bytes from hex digits (either case); nil for an odd count or a non-digit.
    public static func decode(_ text: String) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case 0x30...0x39: return c - 0x30
            case 0x61...0x66: return c - 0x61 + 10
            case 0x41...0x46: return c - 0x41 + 10
            default: return nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var i = 0
        while i < digits.count {
            guard let high = value(digits[i]), let low = value(digits[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }
}
